"""What every bench shares: the named shapes, and for `python -m torch_impl.bench` / `python -m jax_impl.bench`
the flags, the timing loop and the figures.

SHAPES is the one vocabulary of benchmark shapes: `parity.bench` (pairwise, `--suite`, `--vs-plain`),
`parity.profile`, `parity.sweep` and both backends' bench.py take the same names. Each backend's bench.py builds
its training step and says how to wait for the device; the warm-up, the timed windows, the median and the
throughput / MFU arithmetic live here once, so the two report the same figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from common.config import Config, ConfigError

from common.config_files import apply_overrides, load_toml, resolve_config_path
from common.plan import flops_per_token
from common.usage import ExitingParser


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model size and one micro-step of `micro_batch_size` sequences per data-parallel replica."""
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    micro_batch_size: int


DEFAULT_SHAPE = "default"  # the config's own model and batch, unchanged
_GPT2_124M_B1 = Shape(12, 12, 768, 1024, 1)
SHAPES: dict[str, Shape | None] = {
    DEFAULT_SHAPE: None,
    "tiny": Shape(4, 4, 128, 128, 8),
    "small": Shape(6, 6, 384, 256, 4),
    # GPT-2 124M benches one B=1 sequence per replica: a CPU step of the preset's 0.5M-token batch is far too
    # long to time in rounds. The suite's row and the backends' --shape say `gpt2-124m`; `-b1` names the batch.
    "gpt2-124m": _GPT2_124M_B1,
    "gpt2-124m-b1": _GPT2_124M_B1,
}


def apply_shape(cfg: Config, shape: str, replicas: int = 1) -> Config:
    """`cfg` with the shape's model dimensions and one micro-step per replica (`default`: `cfg` unchanged)."""
    if shape not in SHAPES:
        raise ConfigError(f"--shape: expected one of {', '.join(SHAPES)}, got '{shape}'")
    s = SHAPES[shape]
    if s is None:
        return cfg
    model = dataclasses.replace(cfg.model, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                                block_size=s.block_size)
    optim = dataclasses.replace(cfg.optim, micro_batch_size=s.micro_batch_size,
                                total_batch_size=s.micro_batch_size * s.block_size * replicas)
    return dataclasses.replace(cfg, model=model, optim=optim)


def build_parser(prog: str, doc: str, add_backend_flags: Callable[[argparse.ArgumentParser], None]
                 ) -> argparse.ArgumentParser:
    """The flags both benches take; `add_backend_flags` adds --dtype and the backend's own after --shape."""
    p = ExitingParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--config", default="default", help="preset name or TOML path (model, batch, dtype)")
    p.add_argument("--shape", choices=tuple(SHAPES), default=DEFAULT_SHAPE,
                   help="a named shape over the config's model and batch (default: the config's own)")
    add_backend_flags(p)
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    return p


def shaped_config(config: str, shape: str, replicas: int = 1, overrides: Sequence[str] = ()) -> Config:
    """The preset, then the shape (one micro-step per data-parallel replica), then `--section.key value`
    overrides, so the user's flags win over both."""
    cfg = apply_shape(load_toml(resolve_config_path(config)), shape, replicas)
    return apply_overrides(cfg, overrides)


def random_tokens(cfg: Config, accum: int, rows: int) -> np.ndarray:
    """(accum, rows, block_size + 1) random ids: inputs and targets of one step, the same on both backends."""
    return np.random.default_rng(0).integers(0, cfg.model.vocab_size, (accum, rows, cfg.model.block_size + 1),
                                             dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class Timing:
    first_step_s: float
    per_step_s: list[float]  # one per timed window
    minflt_per_step: float


def time_steps(step: Callable[[], object], steps: int, windows: int, warmup: int,
               sync: Callable[[], None] = lambda: None) -> Timing:
    """Runs `step` (which must wait for its result) 1 + (warmup - 1) + steps × windows times."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0  # includes compilation when the step compiles lazily
    for _ in range(warmup - 1):
        step()
    per_step = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        per_step.append((time.perf_counter() - t0) / steps)
    # Minor page faults per timed step: allocator churn (docs/performance.md, GLIBC_TUNABLES).
    minflt = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (steps * windows)
    return Timing(first, per_step, minflt)


def figures(cfg: Config, accum: int, timing: Timing, peak: float | None, peak_source: str, devices: int = 1) -> dict:
    """Shape and speed fields of a bench result, in report order; `peak` is one device's FLOP/s (None: no MFU)."""
    sec = statistics.median(timing.per_step_s)
    tokens = cfg.optim.total_batch_size
    tok_s = tokens / sec
    return {"n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size,
            "batch": cfg.optim.micro_batch_size, "accum": accum, "tokens_per_step": tokens, "ms_per_step": sec * 1e3,
            "ms_windows": [s * 1e3 for s in timing.per_step_s], "tokens_per_s": tok_s,
            "mfu": flops_per_token(cfg.model) * tok_s / (peak * devices) if peak else None,
            "peak_tflops": peak / 1e12 if peak else None,
            "peak_source": peak_source, "first_step_s": timing.first_step_s}


# The GEMM peak probes (parity.probe, the levers' peak): timed windows per case.
REPEATS = 5
MIN_REPEATS = 3


def time_gemm(fn: Callable[[], Any], n: int, budget_s: float, repeats: int = REPEATS) -> dict[str, float]:
    """GFLOP/s of `fn` (one n³ GEMM that has finished when it returns), median of up to `repeats` windows."""
    fn()  # the first call builds kernels / compiles / faults in the output: not the steady state
    t0 = time.perf_counter()
    fn()  # a second warm-up call, timed to size the windows
    once = max(time.perf_counter() - t0, 1e-7)
    # Slow cases (N=2048 on one CPU) get fewer windows, never under MIN_REPEATS, to keep to the budget;
    # fast ones (small N) several calls per window, so timer resolution and call overhead do not count.
    repeats = max(MIN_REPEATS, min(repeats, int(budget_s / once)))
    inner = max(1, min(1000, int(budget_s / repeats / once)))
    windows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        windows.append((time.perf_counter() - t0) / inner)
    sec = statistics.median(windows)
    return {"gflops": 2 * n ** 3 / sec / 1e9, "ms": sec * 1e3, "repeats": repeats, "calls": inner * repeats}


def shape_text(r: dict) -> str:
    return f"L{r['n_layer']} C{r['n_embd']} T{r['block_size']} B{r['batch']}×{r['accum']}"


def speed_text(r: dict) -> str:
    mfu = (f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops'] * 1e3:.0f} GFLOP/s" if r["mfu"] is not None
           else f"no MFU ({r['peak_source']})")
    return f"{r['ms_per_step']:.1f} ms/step | {r['tokens_per_s']:,.0f} tok/s | {mfu}"


def print_results(results: Callable[[], list[dict]], line: Callable[[dict], str], as_json: bool) -> int:
    """Prints each result as its text line or as JSON; a ConfigError is one `error:` line and exit code 2."""
    try:
        for r in results():
            print(json.dumps(r) if as_json else line(r), flush=True)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
