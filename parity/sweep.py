"""`python -m parity.sweep --backend torch|jax [--config C] [--shape S] [--dtype D] [--max-batch 256] [--steps 3]`.

Finds the largest micro-batch that fits before a long run: doubles it from 1, timing `--steps`
optimizer steps (after two warm-up steps) at each size with accumulation 1, and prints
micro-batch → ms/step, tokens/s and peak memory. Each size runs in a fresh subprocess, so an
out-of-memory error (torch: CUDA OOM; JAX: RESOURCE_EXHAUSTED) or the kernel's OOM killer ends that
try only. On CPU the sweep also stops before the machine would swap: at `--max-batch`, when the
previous sizes' memory predicts the next one over `--max-rss-gb` (default 80% of the memory
available at start), or when a try's resident memory crosses that guard (it is stopped at once).
Any config field can be overridden: `--model.n_layer 6`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from bench import workers
from bench.trainee import BACKENDS
from common.backend import load_backend
from common.benchtiming import DEFAULT_SHAPE, SHAPES, random_tokens, shaped_config
from common.usage import Parser, UsageError
from common.config import Config, ConfigError, validate
from common.config_files import dump_toml, load_toml
from common.usage import first_line

EXIT_OOM, EXIT_GUARD = 3, 4
WARMUP_STEPS = 2  # compilation, and torch's allocator settling: the first two steps are not timed
GIB = 2 ** 30


def with_micro_batch(cfg: Config, micro_batch: int, replicas: int = 1) -> Config:
    """One micro-step per optimizer step: the step's tokens are exactly what one forward/backward holds."""
    optim = dataclasses.replace(cfg.optim, micro_batch_size=micro_batch,
                                total_batch_size=micro_batch * cfg.model.block_size * replicas)
    return dataclasses.replace(cfg, optim=optim)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text or type(e).__name__ == "OutOfMemoryError"


def _guard_rss(channel: TextIO, limit_bytes: int) -> None:
    """Stop this process the moment its resident memory crosses the guard (before the machine swaps)."""
    import psutil

    proc = psutil.Process()

    def watch():
        while True:
            rss = proc.memory_info().rss
            if rss > limit_bytes:
                workers.reply(channel, {"status": "guard", "rss_bytes": rss})
                os._exit(EXIT_GUARD)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def _peak_memory(backend_name: str, device: str) -> tuple[int, str]:
    """(bytes, what was measured): the accelerator's peak allocation, else this process's peak RSS."""
    if device.startswith("cuda") and backend_name == "torch":
        import torch

        return int(torch.cuda.max_memory_allocated()), "device"
    if device in ("gpu", "cuda", "tpu"):
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"  # Linux reports KiB


def measure(backend_name: str, cfg: Config, micro_batch: int, steps: int) -> dict[str, Any]:
    """Time `steps` optimizer steps of micro-batch `micro_batch` (after the warm-up steps), in this process."""
    b = load_backend(backend_name)
    dist = b.setup(cfg)
    cfg = with_micro_batch(cfg, micro_batch, dist.data_parallel_size)
    state = b.init_state(cfg, dist)
    T = cfg.model.block_size
    tokens = random_tokens(cfg, 1, micro_batch * dist.local_replicas)
    x, y = tokens[..., :-1], tokens[..., 1:]
    times = []
    for _ in range(WARMUP_STEPS + steps):
        t0 = time.perf_counter()
        state, metrics = b.train_step(state, x, y)
        float(metrics["loss"])  # wait for the device: JAX and CUDA return before the work is done
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[WARMUP_STEPS:])
    peak, kind = _peak_memory(backend_name, dist.device)
    return {"status": "ok", "micro_batch": micro_batch, "tokens_per_step": micro_batch * T * dist.data_parallel_size,
            "ms": step_s * 1e3, "tokens_per_s": micro_batch * T * dist.data_parallel_size / step_s,
            "peak_bytes": peak, "memory": kind, "first_step_ms": times[0] * 1e3}


def child_main(args: argparse.Namespace) -> int:
    channel = workers.answer_channel()
    _guard_rss(channel, int(args.max_rss_gb * GIB))
    cfg = load_toml(Path(args.config))
    try:
        workers.reply(channel, measure(args.backend, cfg, args.child, args.steps))
        return 0
    except Exception as e:  # an OOM ends this try only; anything else is a real error for the parent to show
        if is_oom(e):
            workers.reply(channel, {"status": "oom", "error": first_line(e)[:300]})
            return EXIT_OOM
        raise


def run_child(backend: str, config_path: Path, micro_batch: int, steps: int, max_rss_gb: float) -> dict[str, Any]:
    done = workers.run(workers.module_command("parity.sweep", [
        "--backend", backend, "--config", config_path, "--steps", steps, "--max-rss-gb", max_rss_gb,
        "--child", micro_batch]))
    if done.answers:
        return done.answers[-1]
    if done.returncode < 0:  # killed by a signal: the kernel's OOM killer sends SIGKILL
        return {"status": "killed", "error": f"killed by signal {-done.returncode} (out of memory?)"}
    last = [line for line in done.stderr.splitlines() if line.strip()]
    return {"status": "error", "error": last[-1] if last else f"exit code {done.returncode}"}


def predict_peak(rows: list[dict[str, Any]], micro_batch: int) -> float | None:
    """Peak memory at `micro_batch`, extrapolated linearly from the last two sizes (memory ≈ a + b·batch)."""
    if len(rows) < 2:
        return None
    (b0, m0), (b1, m1) = [(r["micro_batch"], r["peak_bytes"]) for r in rows[-2:]]
    slope = max(m1 - m0, 0) / (b1 - b0)
    return m1 + slope * (micro_batch - b1)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m parity.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--backend", required=True, choices=BACKENDS)
    p.add_argument("--config", default="default", help="preset name in configs/ or a TOML path")
    p.add_argument("--shape", choices=tuple(SHAPES), default=DEFAULT_SHAPE,
                   help="a named model shape over the config (the micro-batch is what the sweep varies)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "fp64"), default=None,
                   help="run.dtype for the sweep (default: the config's)")
    p.add_argument("--max-batch", type=int, default=256, help="largest micro-batch to try")
    p.add_argument("--steps", type=int, default=3, help="timed steps per size, after two warm-up steps")
    p.add_argument("--max-rss-gb", type=float, default=None,
                   help="memory guard in GiB (default: 80%% of the memory available at start)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one try, in a subprocess
    return p


def _fmt_row(r: dict[str, Any]) -> str:
    mem = f"{r['peak_bytes'] / GIB:.2f} GiB" + (" RSS" if r["memory"] == "rss" else "")
    return (f"{r['micro_batch']:>11} | {r['tokens_per_step']:>11,} | {r['ms']:>9.1f} | {r['tokens_per_s']:>10,.0f} | "
            f"{mem}")


def sweep(backend: str, cfg: Config, max_batch: int, steps: int, max_rss_gb: float,
          log=print) -> tuple[list[dict[str, Any]], str]:
    """(rows of the sizes that ran, why the sweep stopped)."""
    m = cfg.model
    log(f"sweep: {backend}, L{m.n_layer} C{m.n_embd} H{m.n_head} T{m.block_size} vocab {m.padded_vocab_size}, "
        f"{cfg.run.dtype}; {steps} timed steps per size after {WARMUP_STEPS} warm-up steps; "
        f"memory guard {max_rss_gb:.2f} GiB")
    log(f"{'micro-batch':>11} | {'tokens/step':>11} | {'ms/step':>9} | {'tokens/s':>10} | peak memory")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "sweep.toml"
        config_path.write_text(dump_toml(cfg))
        micro_batch = 1
        while True:
            if micro_batch > max_batch:
                return rows, f"--max-batch {max_batch} reached"
            predicted = predict_peak(rows, micro_batch)
            if predicted is not None and rows[-1]["memory"] == "rss" and predicted > max_rss_gb * GIB:
                return rows, (f"micro-batch {micro_batch} would need about {predicted / GIB:.1f} GiB, over the "
                              f"{max_rss_gb:.2f} GiB guard")
            result = run_child(backend, config_path, micro_batch, steps, max_rss_gb)
            status = result["status"]
            if status == "ok":
                rows.append(result)
                log(_fmt_row(result))
            elif status == "oom":
                return rows, f"out of memory at micro-batch {micro_batch} ({result['error']})"
            elif status == "guard":
                return rows, (f"micro-batch {micro_batch} crossed the {max_rss_gb:.2f} GiB memory guard "
                              f"({result['rss_bytes'] / GIB:.2f} GiB resident) and was stopped")
            elif status == "killed":
                return rows, f"micro-batch {micro_batch} was {result['error']}"
            else:
                raise RuntimeError(f"micro-batch {micro_batch} failed: {result['error']}")
            micro_batch *= 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, rest = build_parser().parse_known_args(argv)
        if args.child is not None:
            return child_main(args)
        for flag, value in (("--max-batch", args.max_batch), ("--steps", args.steps)):
            if value < 1:
                raise UsageError(f"{flag} must be ≥ 1, got {value}")
        if args.max_rss_gb is not None and not (math.isfinite(args.max_rss_gb) and args.max_rss_gb > 0):
            raise UsageError(f"--max-rss-gb must be a finite number > 0, got {args.max_rss_gb}")
        cfg = shaped_config(args.config, args.shape, overrides=rest)
        if args.dtype:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dtype=args.dtype))
        if args.backend == "jax" and cfg.run.dtype == "fp16":
            raise UsageError("--dtype fp16 is torch-only (it needs a GradScaler)")
        validate(with_micro_batch(cfg, 1))
        max_rss_gb = args.max_rss_gb
        if max_rss_gb is None:
            import psutil

            max_rss_gb = 0.8 * psutil.virtual_memory().available / GIB
        rows, reason = sweep(args.backend, cfg, args.max_batch, args.steps, max_rss_gb)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"stopped: {reason}")
    if rows:
        best = max(rows, key=lambda r: r["tokens_per_s"])
        print(f"largest micro-batch that ran: {rows[-1]['micro_batch']}; fastest: {best['micro_batch']} "
              f"({best['tokens_per_s']:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
