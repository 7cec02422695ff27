"""`python -m parity.bench`: both backends' training throughput on the same config and the same batches.

Each backend runs in its own worker process (so peak memory is its own and neither framework's
thread pools disturb the other), started from the same common weights and fed the same batches by
the shared loader, through the same `train_step` the trainers use. After compile/warm-up the parent
asks the workers for timed windows in alternation — round by round — so a slow spell of this noisy
VM hits both alike; it reports medians and the JAX/PyTorch ratio within each round.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.config import ConfigError, apply_overrides, dump_toml, load_toml, resolve_config_path, validate
from common.loop import INPUT_ERRORS, ensure_data
from common.plan import flops_per_token

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "jax")


def worker(name: str, cfg_path: Path) -> None:
    """Runs in a child: reads commands on stdin, answers one JSON line each on stdout."""
    from common.data import DataLoader
    from parity.convert import get_backend

    out = sys.stdout
    sys.stdout = sys.stderr  # keep the protocol channel clean of library prints
    cfg = load_toml(cfg_path)
    backend = get_backend(name)
    dist = backend.setup(cfg)
    loader = DataLoader(cfg.data.dir, cfg.optim.micro_batch_size, cfg.model.block_size, cfg.optim.total_batch_size,
                        seed=cfg.run.seed, vocab_size=cfg.model.vocab_size)
    weights = None
    if os.environ.get("PARITY_BENCH_WEIGHTS"):
        import numpy as np
        weights = dict(np.load(os.environ["PARITY_BENCH_WEIGHTS"]))
    state = backend.init_state(cfg, dist, weights=weights)
    peak, _ = backend.peak_flops(cfg, dist)

    def steps(n: int) -> tuple[float, list[float]]:
        nonlocal state
        losses = []
        t0 = time.perf_counter()
        for _ in range(n):
            state, m = backend.train_step(state, *loader.next_step())
            losses.append(float(m["loss"]))  # the trainer's own sync point, once per step
        return time.perf_counter() - t0, losses

    first_s, first_losses = steps(1)
    answer = {"first_step_s": first_s, "losses": first_losses, "peak_flops": peak}
    print(json.dumps(answer), file=out, flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "window":
            seconds, losses = steps(int(arg))
            print(json.dumps({"seconds": seconds, "losses": losses}), file=out, flush=True)
        elif cmd == "exit":
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"peak_rss_mb": rss_mb}), file=out, flush=True)
            return


class Worker:
    def __init__(self, name: str, cfg_path: Path, weights_path: Path | None, pin: str | None):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if weights_path:
            env["PARITY_BENCH_WEIGHTS"] = str(weights_path)
        cmd = [sys.executable, "-m", "parity.bench", "--worker", name, "--config", str(cfg_path)]
        if pin is not None:
            cmd = ["taskset", "-c", pin] + cmd
        self.name = name
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise RuntimeError(f"{self.name} worker died: {err.strip()[-2000:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict[str, Any]:
        answer = self.ask("exit")
        self.proc.wait(timeout=60)
        return answer


def bench(cfg, rounds: int, window: int, warmup: int, pin: str | None = None,
          backends: tuple[str, ...] = BACKENDS) -> dict[str, Any]:
    import tempfile

    import numpy as np

    tokens_per_step = cfg.optim.total_batch_size
    flops_tok = flops_per_token(cfg.model)
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        cfg_path = Path(tmp) / "config.toml"
        cfg_path.write_text(dump_toml(cfg))
        weights_path = None
        if "torch" in backends:  # one initialization for both: torch's, as in parity.check
            from torch_impl.train import BACKEND as tb
            tdist = tb.setup(cfg)
            weights_path = Path(tmp) / "init.npz"
            np.savez(weights_path, **tb.to_common(tb.init_state(cfg, tdist)))
        workers = {}
        results: dict[str, dict[str, Any]] = {}
        for name in backends:  # started one after the other so compile times are not contended
            t0 = time.perf_counter()
            workers[name] = Worker(name, cfg_path, weights_path, pin)
            first = workers[name].read()
            results[name] = {"startup_s": time.perf_counter() - t0, "first_step_s": first["first_step_s"],
                             "peak_flops": first["peak_flops"], "windows": [], "losses": list(first["losses"])}
            if warmup:
                results[name]["losses"] += workers[name].ask(f"window {warmup}")["losses"]
        for _ in range(rounds):
            for name in backends:
                w = workers[name].ask(f"window {window}")
                results[name]["windows"].append(w["seconds"])
                results[name]["losses"] += w["losses"]
        for name in backends:
            results[name]["peak_rss_mb"] = workers[name].close()["peak_rss_mb"]
    for name, r in results.items():
        tok_s = [tokens_per_step * window / s for s in r["windows"]]
        r["tokens_per_s"] = statistics.median(tok_s)
        r["tokens_per_s_windows"] = tok_s
        r["ms_per_step"] = statistics.median(s * 1e3 / window for s in r["windows"])
        r["mfu"] = flops_tok * r["tokens_per_s"] / r["peak_flops"]
    report = {"config": cfg.to_dict(), "rounds": rounds, "window_steps": window, "warmup_steps": warmup,
              "pinned_cpu": pin, "backends": results}
    if len(backends) == 2:
        ratios = [t / j for t, j in zip(results["torch"]["windows"], results["jax"]["windows"])]
        report["jax_over_torch"] = statistics.median(ratios)  # same-round ratio of tokens/s
        report["jax_over_torch_rounds"] = ratios
    return report


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    m, o = c["model"], c["optim"]
    lines = [f"config: L{m['n_layer']} H{m['n_head']} C{m['n_embd']} T{m['block_size']} B{o['micro_batch_size']} "
             f"vocab {m['padded_vocab_size']}, {o['total_batch_size']} tokens/step, dtype {c['run']['dtype']}, "
             f"compile {c['run']['compile']}; {report['rounds']} rounds × {report['window_steps']} steps"
             + (f", pinned to CPU {report['pinned_cpu']}" if report["pinned_cpu"] is not None else ""),
             "| backend | tok/s (median) | ms/step | MFU | first step (compile) s | start-up s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["backends"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {100 * r['mfu']:.1f}% "
                     f"(of {r['peak_flops'] / 1e9:.0f} GFLOP/s) | {r['first_step_s']:.2f} | {r['startup_s']:.1f} | "
                     f"{r['peak_rss_mb']:,.0f} |")
    if "jax_over_torch" in report:
        lines.append(f"JAX / PyTorch tokens/s: {report['jax_over_torch']:.2f} (median of same-round ratios "
                     + ", ".join(f"{x:.2f}" for x in report["jax_over_torch_rounds"]) + ")")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in report["backends"].items():
        ax1.plot(range(1, len(r["tokens_per_s_windows"]) + 1), r["tokens_per_s_windows"], marker="o", label=name)
        ax2.plot(r["losses"], label=name)
    ax1.set(xlabel="round", ylabel="tokens/s", title="throughput per timed window")
    ax2.set(xlabel="step", ylabel="train loss", title="loss on the same batches")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SHAPES = {  # named shapes people compare on; `--shape` applies them on top of --config
    "gpt2-124m-b1": ["--model.n_layer", "12", "--model.n_head", "12", "--model.n_embd", "768",
                     "--model.block_size", "1024", "--optim.micro_batch_size", "1", "--optim.total_batch_size", "1024"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.bench", description=__doc__.splitlines()[0],
                                epilog="Config fields can be overridden: --optim.micro_batch_size 4 ...")
    p.add_argument("--config", default="default", help="preset or TOML path (default: configs/default.toml)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a named model/batch shape applied over the config")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="compute dtype (default: the config's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile on/off for the torch backend (default: the config's)")
    p.add_argument("--rounds", type=int, default=5, help="timed windows per backend, interleaved")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed window")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compile) step")
    p.add_argument("--backends", default="torch,jax", help="comma-separated subset of torch,jax")
    p.add_argument("--pin", default=None, help="run each worker under `taskset -c PIN` (e.g. 0)")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--plot", type=Path, help="write a PNG of tokens/s per window and loss curves")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    if args.worker:
        worker(args.worker, Path(args.config))
        return 0
    try:
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        if not backends or any(b not in BACKENDS for b in backends):
            raise ConfigError(f"--backends: expected a subset of torch,jax, got '{args.backends}'")
        for flag in ("rounds", "steps"):
            if getattr(args, flag) < 1:
                raise ConfigError(f"--{flag} must be ≥ 1")
        cfg = load_toml(resolve_config_path(args.config))
        cfg = apply_overrides(cfg, SHAPES.get(args.shape, []) + overrides)
        run = dataclasses.replace(cfg.run, dtype=args.dtype or cfg.run.dtype,
                                  compile=cfg.run.compile if args.compile is None else args.compile, devices=1)
        total_steps = 1 + args.warmup + args.rounds * args.steps
        optim = dataclasses.replace(cfg.optim, max_steps=max(cfg.optim.max_steps, total_steps))
        cfg = validate(dataclasses.replace(cfg, run=run, optim=optim))
        ensure_data(cfg, print)
        report = bench(cfg, args.rounds, args.steps, args.warmup, args.pin, backends)
        print(format_table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.plot:
            plot(report, args.plot)
            print(f"plot written to {args.plot}")
        return 0
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
