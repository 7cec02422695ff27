"""Time full training steps (forward + backward + AdamW): `python -m jax_impl.bench [--dtype bf16] [--devices N]`.

`--shape`: `default` is the config's own step (micro_batch_size × block_size per device, accumulated
to total_batch_size); the other names of common.benchtiming.SHAPES (tiny, small, gpt2-124m ...) set the
model and one micro-step per replica, as in every bench. Tokens are random. Compilation (lower +
compile) and the first execution are timed on their own; warm-up steps are excluded and the figure
is the median over several timed windows, each step including the host → device batch transfer as
in the training loop.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("jax_impl.bench")

import argparse
import dataclasses
import os
import sys
import time
from typing import Sequence

import numpy as np

from common import benchtiming
from common.config import DTYPES, Config, ConfigError, grad_accum_steps, validate


def bench_config(config: str, shape: str, dtype: str | None, devices: int) -> Config:
    cfg = benchtiming.shaped_config(config, shape, max(devices, 1))
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
    buf = benchtiming.random_tokens(cfg, accum, cfg.optim.micro_batch_size * info.local_replicas)
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

    timing = benchtiming.time_steps(step, steps, windows, warmup)
    chosen = BACKEND.levers(cfg, info)
    peak, peak_source = chosen.peak_flops, chosen.peak_source
    return {"backend": "jax", "compile": True, "dtype": cfg.run.dtype, "device": info.device,
            "devices": info.data_parallel_size, "threads": os.cpu_count(),
            **benchtiming.figures(cfg, accum, timing, peak, peak_source, info.data_parallel_size),
            "compile_s": compile_s, "minflt_per_step": timing.minflt_per_step, "jax": jax.__version__}


def line(r: dict) -> str:
    devices = f" ×{r['devices']} devices" if r["devices"] > 1 else ""
    return (f"jax   jit      {r['dtype']} {benchtiming.shape_text(r)}{devices} | {benchtiming.speed_text(r)} | "
            f"compile {r['compile_s']:.1f} s | first step {r['first_step_s']:.2f} s | "
            f"{r['minflt_per_step']:,.0f} minor faults/step")


def run(args: argparse.Namespace) -> list[dict]:
    if min(args.steps, args.windows, args.warmup) < 1 or args.devices < 0:
        raise ConfigError("--steps, --windows and --warmup must be ≥ 1 and --devices ≥ 0")
    cfg = bench_config(args.config, args.shape, args.dtype, args.devices)
    if cfg.run.dtype == "fp16":
        raise ConfigError("run.dtype fp16 is torch-only; pass --dtype fp32 or bf16")
    return [measure(cfg, args.steps, args.windows, args.warmup)]


def main(argv: Sequence[str] | None = None) -> int:
    def backend_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dtype", choices=tuple(d for d in DTYPES if d != "fp16"), default=None,
                       help="default: the config's run.dtype (fp16 is torch-only)")
        p.add_argument("--devices", type=int, default=0, help="data-parallel devices (CPU: N host devices)")

    args = benchtiming.build_parser("python -m jax_impl.bench", __doc__, backend_flags).parse_args(argv)
    return benchtiming.print_results(lambda: run(args), line, args.json)


if __name__ == "__main__":
    sys.exit(main())
