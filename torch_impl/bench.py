"""Time full training steps (forward + backward + AdamW): `python -m torch_impl.bench [--compile] [--dtype bf16]`.

Shapes: `default` is the config's own step (micro_batch_size × block_size, accumulated to
total_batch_size); `gpt2-124m` is one GPT-2-124M-shaped micro-step at B=1, T=1024. Tokens are random.
Warm-up steps are excluded; the figure is the median over several timed windows. With --compile the
eager and the torch.compile'd step are both measured, and compile time is reported on its own.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("torch_impl.bench")

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from typing import Sequence

import numpy as np
import torch

from common.config import DTYPES, Config, ConfigError, load_toml, resolve_config_path, validate
from common.plan import flops_per_token
from torch_impl.train import BACKEND, train_step


def bench_config(config: str, shape: str, dtype: str | None, compile: bool) -> Config:
    cfg = load_toml(resolve_config_path(config))
    if shape == "gpt2-124m":
        model = load_toml(resolve_config_path("gpt2-124m")).model
        cfg = dataclasses.replace(cfg, model=model, optim=dataclasses.replace(
            cfg.optim, micro_batch_size=1, total_batch_size=model.block_size))
    run = dataclasses.replace(cfg.run, compile=compile, dtype=dtype or cfg.run.dtype, device="auto")
    return validate(dataclasses.replace(cfg, run=run))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: Config, steps: int, windows: int, warmup: int) -> dict:
    dist = BACKEND.setup(cfg)
    state = BACKEND.init_state(cfg, dist)
    accum = cfg.optim.total_batch_size // (cfg.optim.micro_batch_size * cfg.model.block_size)
    rng = np.random.default_rng(0)
    buf = rng.integers(0, cfg.model.vocab_size, (accum, cfg.optim.micro_batch_size, cfg.model.block_size + 1),
                       dtype=np.int32)
    x, y = buf[..., :-1], buf[..., 1:]

    def step() -> float:
        nonlocal state
        state, m = train_step(state, x, y)
        return float(m["loss"])  # forces the step to finish, as the loop's logging does

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0  # includes compilation when compiled
    for _ in range(warmup - 1):
        step()
    per_step = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(windows):
        _sync(state.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(state.device)
        per_step.append((time.perf_counter() - t0) / steps)
    # Minor page faults per timed step: allocator churn (docs/performance.md, GLIBC_TUNABLES).
    minflt = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (steps * windows)
    sec = statistics.median(per_step)
    tokens = cfg.optim.total_batch_size
    peak, peak_source = BACKEND.peak_flops(cfg, dist)
    tok_s = tokens / sec
    return {"backend": "torch", "compile": cfg.run.compile, "dtype": cfg.run.dtype, "device": dist.device,
            "threads": torch.get_num_threads(), "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
            "block_size": cfg.model.block_size, "batch": cfg.optim.micro_batch_size, "accum": accum,
            "tokens_per_step": tokens, "ms_per_step": sec * 1e3, "ms_windows": [s * 1e3 for s in per_step],
            "tokens_per_s": tok_s, "mfu": flops_per_token(cfg.model) * tok_s / peak,
            "peak_tflops": peak / 1e12, "peak_source": peak_source, "first_step_s": first, "minflt_per_step": minflt,
            "compile_s": None}


def line(r: dict) -> str:
    mode = "compiled" if r["compile"] else "eager"
    extra = f" | compile {r['compile_s']:.1f} s" if r["compile_s"] is not None else ""
    return (f"torch {mode:8s} {r['dtype']} L{r['n_layer']} C{r['n_embd']} T{r['block_size']} B{r['batch']}×{r['accum']}"
            f" | {r['ms_per_step']:.1f} ms/step | {r['tokens_per_s']:,.0f} tok/s | MFU {100 * r['mfu']:.1f}% of "
            f"{r['peak_tflops'] * 1e3:.0f} GFLOP/s | {r['minflt_per_step']:,.0f} minor faults/step{extra}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m torch_impl.bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="default", help="preset name or TOML path (model, batch, dtype)")
    p.add_argument("--shape", choices=("default", "gpt2-124m"), default="default")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: the config's run.dtype")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    try:
        if min(args.steps, args.windows, args.warmup) < 1:
            raise ConfigError("--steps, --windows and --warmup must be ≥ 1")
        results = []
        for compiled in ((False, True) if args.compile else (False,)):
            r = measure(bench_config(args.config, args.shape, args.dtype, compiled), args.steps, args.windows,
                        args.warmup)
            results.append(r)
        eager = results[0]
        for r in results[1:]:
            r["compile_s"] = max(0.0, r["first_step_s"] - eager["first_step_s"])
        for r in results:
            print(json.dumps(r) if args.json else line(r), flush=True)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
