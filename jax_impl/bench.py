"""Time full training steps (forward + backward + AdamW): `python -m jax_impl.bench [--dtype bf16] [--devices N]`.

Shapes: `default` is the config's own step (micro_batch_size × block_size per device, accumulated to
total_batch_size); `gpt2-124m` is one GPT-2-124M-shaped micro-step at B=1, T=1024. Tokens are random.
Compilation (lower + compile) and the first execution are timed on their own; warm-up steps are
excluded and the figure is the median over several timed windows, each step including the host →
device batch transfer as in the training loop.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("jax_impl.bench")

import argparse
import dataclasses
import json
import resource
import os
import statistics
import sys
import time
from typing import Sequence

import numpy as np

from common.config import DTYPES, Config, ConfigError, grad_accum_steps, load_toml, resolve_config_path, validate
from common.plan import flops_per_token


def bench_config(config: str, shape: str, dtype: str | None, devices: int) -> Config:
    cfg = load_toml(resolve_config_path(config))
    if shape == "gpt2-124m":
        model = load_toml(resolve_config_path("gpt2-124m")).model
        cfg = dataclasses.replace(cfg, model=model, optim=dataclasses.replace(
            cfg.optim, micro_batch_size=1, total_batch_size=model.block_size * max(devices, 1)))
    run = dataclasses.replace(cfg.run, dtype=dtype or cfg.run.dtype, devices=devices)
    return dataclasses.replace(cfg, run=run)


def measure(cfg: Config, steps: int, windows: int, warmup: int) -> dict:
    import jax

    from jax_impl import dist as jdist
    from jax_impl.train import BACKEND

    info = BACKEND.setup(cfg)
    cfg = validate(cfg, info.data_parallel_size)
    state = BACKEND.init_state(cfg, info)
    rt = BACKEND.runtime(cfg)
    accum = grad_accum_steps(cfg, info.data_parallel_size)
    rows = cfg.optim.micro_batch_size * info.local_replicas
    buf = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (accum, rows, cfg.model.block_size + 1),
                                            dtype=np.int32)
    x, y = np.ascontiguousarray(buf[..., :-1]), np.ascontiguousarray(buf[..., 1:])

    def put(a):
        return jdist.put_batch(a, rt.batch_sharding)

    t0 = time.perf_counter()
    compiled = rt.train_step.lower(state, put(x), put(y)).compile()
    compile_s = time.perf_counter() - t0

    def step() -> float:
        nonlocal state
        state, m = compiled(state, put(x), put(y))
        return float(m["loss"])  # forces the step to finish, as the loop's logging does

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    per_step = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        per_step.append((time.perf_counter() - t0) / steps)
    # Minor page faults per timed step: allocator churn (docs/performance.md, GLIBC_TUNABLES).
    minflt = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (steps * windows)
    sec = statistics.median(per_step)
    tokens = cfg.optim.total_batch_size
    peak, peak_source = BACKEND.peak_flops(cfg, info)
    tok_s = tokens / sec
    return {"backend": "jax", "compile": True, "dtype": cfg.run.dtype, "device": info.device,
            "devices": info.data_parallel_size, "threads": os.cpu_count(), "n_layer": cfg.model.n_layer,
            "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size, "batch": cfg.optim.micro_batch_size,
            "accum": accum, "tokens_per_step": tokens, "ms_per_step": sec * 1e3,
            "ms_windows": [s * 1e3 for s in per_step], "tokens_per_s": tok_s,
            "mfu": flops_per_token(cfg.model) * tok_s / (peak * info.data_parallel_size),
            "peak_tflops": peak / 1e12, "peak_source": peak_source, "first_step_s": first, "compile_s": compile_s,
            "minflt_per_step": minflt,
            "jax": jax.__version__}


def line(r: dict) -> str:
    devices = f" ×{r['devices']} devices" if r["devices"] > 1 else ""
    return (f"jax   jit      {r['dtype']} L{r['n_layer']} C{r['n_embd']} T{r['block_size']} B{r['batch']}×{r['accum']}"
            f"{devices} | {r['ms_per_step']:.1f} ms/step | {r['tokens_per_s']:,.0f} tok/s | MFU {100 * r['mfu']:.1f}% "
            f"of {r['peak_tflops'] * 1e3:.0f} GFLOP/s | compile {r['compile_s']:.1f} s | first step "
            f"{r['first_step_s']:.2f} s | {r['minflt_per_step']:,.0f} minor faults/step")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jax_impl.bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="default", help="preset name or TOML path (model, batch, dtype)")
    p.add_argument("--shape", choices=("default", "gpt2-124m"), default="default")
    p.add_argument("--dtype", choices=tuple(d for d in DTYPES if d != "fp16"), default=None,
                   help="default: the config's run.dtype (fp16 is torch-only)")
    p.add_argument("--devices", type=int, default=0, help="data-parallel devices (CPU: N host devices)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    try:
        if min(args.steps, args.windows, args.warmup) < 1 or args.devices < 0:
            raise ConfigError("--steps, --windows and --warmup must be ≥ 1 and --devices ≥ 0")
        cfg = bench_config(args.config, args.shape, args.dtype, args.devices)
        if cfg.run.dtype == "fp16":
            raise ConfigError("run.dtype fp16 is torch-only; pass --dtype fp32 or bf16")
        r = measure(cfg, args.steps, args.windows, args.warmup)
        print(json.dumps(r) if args.json else line(r), flush=True)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
