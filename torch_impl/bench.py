"""Time full training steps (forward + backward + AdamW): `python -m torch_impl.bench [--compile] [--dtype bf16]`.

`--shape`: `default` is the config's own step (micro_batch_size × block_size, accumulated to
total_batch_size); the other names of common.benchtiming.SHAPES (tiny, small, gpt2-124m ...) set the
model and one micro-step per replica, as in every bench. Tokens are random. Warm-up steps are
excluded; the figure is the median over several timed windows. With --compile the eager and the
torch.compile'd step are both measured, and compile time is reported on its own.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("torch_impl.bench")

import argparse
import dataclasses
import sys
from typing import Sequence

import torch

from common import benchtiming
from common.config import DTYPES, Config, ConfigError, validate
from torch_impl.train import BACKEND, train_step


def bench_config(config: str, shape: str, dtype: str | None, compile: bool) -> Config:
    cfg = benchtiming.shaped_config(config, shape)
    run = dataclasses.replace(cfg.run, compile=compile, dtype=dtype or cfg.run.dtype, device="auto")
    return validate(dataclasses.replace(cfg, run=run))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: Config, steps: int, windows: int, warmup: int) -> dict:
    dist = BACKEND.setup(cfg)
    state = BACKEND.init_state(cfg, dist)
    accum = cfg.optim.total_batch_size // (cfg.optim.micro_batch_size * cfg.model.block_size)
    buf = benchtiming.random_tokens(cfg, accum, cfg.optim.micro_batch_size)
    x, y = buf[..., :-1], buf[..., 1:]

    def step() -> float:
        nonlocal state
        state, m = train_step(state, x, y)
        return float(m["loss"])  # forces the step to finish, as the loop's logging does

    timing = benchtiming.time_steps(step, steps, windows, warmup, lambda: _sync(state.device))
    chosen = BACKEND.levers(cfg, dist)
    peak, peak_source = chosen.peak_flops, chosen.peak_source
    return {"backend": "torch", "compile": cfg.run.compile, "dtype": cfg.run.dtype, "device": dist.device,
            "threads": torch.get_num_threads(), **benchtiming.figures(cfg, accum, timing, peak, peak_source),
            "minflt_per_step": timing.minflt_per_step, "compile_s": None}


def line(r: dict) -> str:
    mode = "compiled" if r["compile"] else "eager"
    extra = f" | compile {r['compile_s']:.1f} s" if r["compile_s"] is not None else ""
    return (f"torch {mode:8s} {r['dtype']} {benchtiming.shape_text(r)} | {benchtiming.speed_text(r)} | "
            f"{r['minflt_per_step']:,.0f} minor faults/step{extra}")


def run(args: argparse.Namespace) -> list[dict]:
    """The eager step's result, then with --compile the compiled one's, whose compile time is the difference."""
    if min(args.steps, args.windows, args.warmup) < 1:
        raise ConfigError("--steps, --windows and --warmup must be ≥ 1")
    results = [measure(bench_config(args.config, args.shape, args.dtype, compiled), args.steps, args.windows,
                       args.warmup) for compiled in ((False, True) if args.compile else (False,))]
    for r in results[1:]:
        r["compile_s"] = max(0.0, r["first_step_s"] - results[0]["first_step_s"])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    def backend_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dtype", choices=DTYPES, default=None, help="default: the config's run.dtype")
        p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")

    args = benchtiming.build_parser("python -m torch_impl.bench", __doc__, backend_flags).parse_args(argv)
    return benchtiming.print_results(lambda: run(args), line, args.json)


if __name__ == "__main__":
    sys.exit(main())
