"""The bench section of `python -m parity.gpu`: GPT-2 124M, T=1024, bf16, both backends alive on one GPU.

Each backend runs in a persistent worker process that builds its state through the Backend protocol
(common/backend.py), as the trainers do: torch with torch.compile (run.compile), SDPA and fused AdamW;
JAX jitted with the state donated and the optimizer inside the step. Micro-batch: the largest that fits,
from --max-micro-batch down, halved on out-of-memory, with the other backend's worker already holding its
memory (as during the timed rounds); tokens per optimizer step are the same for both backends (the one
with the smaller micro-batch accumulates more). Each worker starts on empty inductor / Triton / JAX
compilation caches, so its first step is the cold compile plus one step. After a warm-up, the parent asks
the workers for timed windows of about equal length in alternation, round by round, so a slow spell of the
machine hits both alike: tok/s is the median over rounds and JAX/torch the median of same-round ratios.
MFU = FLOPs/token (common.plan) × tok/s ÷ the bf16 GEMM peak measured by the peaks section.
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.config import grad_accum_steps

from common.config_files import dump_toml, load_toml
from common.plan import flops_per_token
from common.usage import first_line
from parity.gpu_options import ROOT, Options, child_env
from parity.gpu_sections import bf16_peak_flops, model_config, say

BACKENDS = ("torch", "jax")
EXIT_OOM = 3
TARGET_MFU, TARGET_RATIO = 0.45, (0.8, 1.25)  # the project's targets on one H100/H200-class GPU


def is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "RESOURCE_EXHAUSTED" in text \
        or "out of memory" in text.lower()


def backend_named(name: str):
    if name == "torch":
        from torch_impl.train import BACKEND
    else:
        from jax_impl.train import BACKEND
    return BACKEND


def peak_memory(name: str, device: str) -> dict[str, Any]:
    """The device's peak allocation in GiB (torch: allocated and reserved by its caching allocator)."""
    if device.startswith("cuda") and name == "torch":
        import torch
        return {"gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                "reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30, "kind": "device"}
    if device in ("gpu", "cuda"):
        import jax
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return {"gib": stats["peak_bytes_in_use"] / 2 ** 30, "kind": "device"}
    return {"gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "kind": "process RSS"}


def torch_attention(backend, state, x, y) -> dict[str, Any]:
    """The attention ops and kernels one profiled training step ran (SDPA picks flash, efficient or math)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        _, m = backend.train_step(state, x, y)
        float(m["loss"])
    names = sorted({e.name for e in prof.events()
                    if re.search(r"scaled_dot_product|flash|fmha|attention", e.name, re.IGNORECASE)})
    kind = "flash" if any("flash" in n.lower() for n in names) else \
        "efficient" if any("efficient" in n.lower() for n in names) else "math/other"
    return {"implementation": f"SDPA ({kind})", "ops": names[:12]}


def jax_attention(dump_dir: Path) -> dict[str, Any]:
    """Whether XLA's optimized programs call cuDNN's fused attention: the custom calls in the HLO that XLA
    dumped after optimization (--xla_dump_to in the worker's XLA_FLAGS), whatever jax_impl names its step."""
    hlo = "".join(p.read_text(errors="replace") for p in sorted(dump_dir.glob("*after_optimizations.txt")))
    if not hlo:
        return {"implementation": "unknown", "error": f"no optimized HLO dumped in {dump_dir}"}
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    fused = [c for c in calls if "fmha" in c.lower() or ("cudnn" in c.lower() and "attention" in c.lower())]
    what = f"cuDNN fused attention ({', '.join(fused)})" if fused else \
        "XLA-compiled attention (no fused-attention custom call)"
    return {"implementation": what, "custom_calls": calls[:12]}


def worker(name: str, cfg_path: Path, dump_dir: Path) -> int:
    """Runs in a child: answers one JSON line per command ('window N', 'finish') on stdout."""
    import numpy as np

    from common.benchtiming import random_tokens

    proto, sys.stdout = sys.stdout, sys.stderr  # library prints go to the log, the protocol stays clean

    def answer(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), file=proto, flush=True)

    cfg = load_toml(cfg_path)
    backend = backend_named(name)
    try:
        dist = backend.setup(cfg)
        state = backend.init_state(cfg, dist)
        tokens = random_tokens(cfg, grad_accum_steps(cfg, dist.data_parallel_size), cfg.optim.micro_batch_size)
        x, y = np.ascontiguousarray(tokens[..., :-1]), np.ascontiguousarray(tokens[..., 1:])
        t0 = time.perf_counter()
        state, m = backend.train_step(state, x, y)
        float(m["loss"])  # waits for the device
        first = time.perf_counter() - t0
    except Exception as e:
        if not is_oom(e):
            raise
        answer({"status": "oom", "error": first_line(e)[:300]})
        return EXIT_OOM
    answer({"status": "ready", "first_step_s": first, "device": dist.device})
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "window":
            t0 = time.perf_counter()
            metrics = []
            for _ in range(int(arg)):
                state, m = backend.train_step(state, x, y)
                metrics.append(m["loss"])
            losses = [float(v) for v in metrics]  # one wait for the device per window, as the trainer's logging
            answer({"seconds": time.perf_counter() - t0, "losses": losses})
        elif cmd == "finish":
            out: dict[str, Any] = {"memory": peak_memory(name, dist.device)}
            try:
                out["attention"] = torch_attention(backend, state, x, y) if name == "torch" else \
                    jax_attention(dump_dir)
            except Exception as e:  # a finding for the report, not a reason to lose the figures
                out["attention"] = {"implementation": "unknown", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            answer(out)
            return 0
    return 0


class Worker:
    def __init__(self, name: str, cfg, opts: Options, work: Path):
        self.name, self.cfg = name, cfg
        b = cfg.optim.micro_batch_size
        folder = work / "bench" / f"{name}-b{b}"
        folder.mkdir(parents=True, exist_ok=True)
        self.caches = {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton"),
                       "JAX_COMPILATION_CACHE_DIR": str(folder / "jax")}
        cfg_path = folder / "config.toml"
        cfg_path.write_text(dump_toml(cfg))
        dump = folder / "xla-dump"
        env = dict(self.caches)
        if name == "jax":  # the optimized HLO, to tell which attention XLA compiled (jax_attention)
            env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text".strip()
        self.log_path = opts.out / "logs" / f"bench-{name}-b{b}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "parity.gpu_bench", name, str(cfg_path), str(dump)],
                                     cwd=ROOT, env=child_env(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.close()
            tail = [t for t in self.log_path.read_text().splitlines() if t.strip()][-3:]
            raise RuntimeError(f"{self.name} worker exited {self.proc.returncode}: {' | '.join(tail)[-600:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def finish(self) -> dict[str, Any]:
        answer = self.ask("finish")
        self.close()
        return answer

    def close(self) -> None:
        self.proc.wait(timeout=120)
        self.log.close()


def start_fitting(name: str, opts: Options, work: Path) -> tuple[Worker, dict[str, Any], list[dict[str, Any]]]:
    """A ready worker at the largest micro-batch that fits (halving from the maximum), its first answer, the tries."""
    b, tries = opts.max_micro_batch, []
    while True:
        w = Worker(name, model_config(opts, b), opts, work)
        first = w.read()
        tries.append({"micro_batch": b, **first})
        if first["status"] == "ready":
            say(f"{name}: micro-batch {b} fits; first step (cold compile + one step) {first['first_step_s']:.1f} s")
            return w, first, tries
        w.close()
        say(f"{name}: out of memory at micro-batch {b}: {first['error'][:160]}")
        if b == 1:
            raise RuntimeError(f"{name}: out of memory even at micro-batch 1")
        b //= 2


def summarize(name: str, w: Worker, res: dict[str, Any], window_steps: int, peak: float | None) -> None:
    """Finishes worker `w` and adds its figures to `res`."""
    done = w.finish()
    cfg = w.cfg
    tokens = cfg.optim.total_batch_size
    per_step = [s / window_steps for s in res["seconds"]]
    res.update(tokens_per_step=tokens, window_steps=window_steps, ms_per_step=statistics.median(per_step) * 1e3,
               tokens_per_s=statistics.median(tokens / s for s in per_step), memory=done["memory"],
               attention=done["attention"], caches=w.caches)
    res["compile_s"] = max(0.0, res["first_step_s"] - res["ms_per_step"] / 1e3)
    res["mfu"] = flops_per_token(cfg.model) * res["tokens_per_s"] / peak if peak else None
    mfu = "" if res["mfu"] is None else f", MFU {100 * res['mfu']:.1f}%"
    say(f"{name}: B={res['micro_batch']}×{res['accum']}, {res['tokens_per_s']:,.0f} tok/s{mfu}, "
        f"{res['ms_per_step']:.1f} ms/step, peak memory {done['memory']['gib']:.2f} GiB, cold compile "
        f"{res['compile_s']:.1f} s; attention: {done['attention']['implementation']}")


def section_bench(opts: Options, work: Path) -> dict[str, Any]:
    rounds, window_s, warmup = (2, 0.5, 2) if opts.dry_run else (5, 3.0, 3)
    peak = bf16_peak_flops(opts)
    workers: dict[str, Worker] = {}
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for name in BACKENDS:  # one after the other: compile times are not contended, memory is (as in the rounds)
        try:
            w, first, tries = start_fitting(name, opts, work)
        except RuntimeError as e:  # the other backend's figures are still worth having
            failures.append(str(e))
            continue
        workers[name] = w
        results[name] = {"micro_batch": w.cfg.optim.micro_batch_size, "accum": grad_accum_steps(w.cfg),
                         "first_step_s": first["first_step_s"], "tries": tries, "seconds": [], "losses": []}
    steps: dict[str, int] = {}
    ratios: list[float] = []
    try:
        for name, w in workers.items():
            warm = w.ask(f"window {warmup}")
            steps[name] = max(1, round(window_s / (warm["seconds"] / warmup)))
            results[name]["losses"] += warm["losses"]
        say("timed windows: " + ", ".join(f"{n} {s} steps" for n, s in steps.items()) + f", {rounds} rounds")
        for r in range(rounds):
            tok_s = {}
            for name, w in workers.items():
                ans = w.ask(f"window {steps[name]}")
                results[name]["seconds"].append(ans["seconds"])
                results[name]["losses"] += ans["losses"]
                tok_s[name] = steps[name] * w.cfg.optim.total_batch_size / ans["seconds"]
            if len(tok_s) == 2:
                ratios.append(tok_s["jax"] / tok_s["torch"])
            say(f"round {r + 1}: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in tok_s.items())
                + (f"; JAX/torch {ratios[-1]:.3f}" if len(tok_s) == 2 else ""))
        for name, w in workers.items():
            summarize(name, w, results[name], steps[name], peak)
    except RuntimeError as e:  # a worker died mid-way: what was measured so far stays in the report
        failures.append(str(e))
    ratio = statistics.median(ratios) if len(ratios) == rounds else None
    targets: dict[str, bool | None] = {"jax_over_torch_in_range": None if ratio is None
                                       else TARGET_RATIO[0] <= ratio <= TARGET_RATIO[1]}
    for name in BACKENDS:
        mfu = results.get(name, {}).get("mfu")
        targets[f"{name}_mfu_at_least_45pct"] = None if mfu is None else mfu >= TARGET_MFU
    if ratio is not None:
        say(f"JAX/torch tokens/s: {ratio:.3f} (median of same-round ratios)")
    failures += [f"{n}: loss not finite" for n, r in results.items() if not all(v == v for v in r["losses"])]
    cfg = model_config(opts)
    return {"model": {"n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size,
                      "vocab": cfg.model.padded_vocab_size, "dtype": cfg.run.dtype, "torch_compile": cfg.run.compile},
            "flops_per_token": flops_per_token(cfg.model), "bf16_peak_tflops": peak / 1e12 if peak else None,
            "rounds": rounds, "backends": results, "jax_over_torch": ratio, "jax_over_torch_rounds": ratios,
            "targets": targets, "passed": not failures and len(results) == 2 and "tokens_per_s" in results["jax"]
            and "tokens_per_s" in results["torch"], "failures": failures}


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
