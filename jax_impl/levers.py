"""JAX's speed levers (common/levers.py): what the probe times on this machine, and how a choice is applied.

Levers: `gemm` and `head_gemm` (XLA:CPU picks each dot's library itself, so there is nothing to choose),
`loss_chunk_rows` (rows per chunk of the fused head + loss, 0 = the full logits), `threads` (XLA sizes
its pool from the CPUs the process may use, so it is not set from inside: a run with fewer threads is
started under `taskset`) and `allocator` (glibc's tunables, set at start-up). The probe compiles and
times the head + loss at the run's width, vocabulary and rows for each chunk size, in alternation
(common.levers.interleaved), and keeps the plain full logits unless a chunk size is clearly faster
(common.levers.fastest). torch_impl/levers.py is the same module in PyTorch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from common import levers
from common.config import Config, ConfigError
from common.levers import FIXED_CHUNK_ROWS, GEMM_PEAK_N, PROBE_ROUNDS, Choice, Levers
from common.plan import datasheet_peak
from jax_impl.loss import chunked_lm_loss, lm_loss

NAMES = ("gemm", "head_gemm", "loss_chunk_rows", "threads", "allocator")


def explicit_choices(cfg: Config) -> dict[str, Choice]:
    """The levers the config sets (run.loss_chunk_rows ≥ 0, run.threads > 0, run.cpu_gemm)."""
    out = levers.config_choices(cfg)
    if cfg.run.cpu_gemm != "auto":
        if cfg.run.cpu_gemm != "xla":
            raise ConfigError(f"run.cpu_gemm: JAX's GEMMs are XLA's (xla), got '{cfg.run.cpu_gemm}'")
        out["gemm"] = out["head_gemm"] = Choice("xla", "config")
    if cfg.run.threads > 0:
        if cfg.run.threads != levers.usable_cpus():
            raise ConfigError(f"run.threads: XLA sizes its thread pool from the CPUs this process may use "
                              f"({levers.usable_cpus()}); start JAX under `taskset -c 0-{cfg.run.threads - 1}` for "
                              f"{cfg.run.threads}")
        out["threads"] = Choice(cfg.run.threads, "config")
    return out


def choose(cfg: Config, platform: str, log: Callable[[str], None] = print) -> Levers:
    """The levers of `cfg` on `platform` ("cpu", "gpu", ...)."""
    fixed = {"allocator": levers.allocator_choice(), "gemm": Choice("xla", "fixed", "XLA's dot kernels"),
             "head_gemm": Choice("xla", "fixed", "XLA's dot kernels"),
             "threads": Choice(levers.usable_cpus(), "fixed", "XLA's pool spans the usable CPUs")}
    explicit = explicit_choices(cfg)
    if platform != "cpu":
        fixed.update(loss_chunk_rows=Choice(FIXED_CHUNK_ROWS, "device"))
        for name in ("gemm", "head_gemm", "threads"):
            fixed[name] = Choice(fixed[name].value, "device", fixed[name].note)
        result = levers.on_device("jax", fixed, explicit, NAMES)
        result.peak_flops, result.peak_source = accelerator_peak(cfg)
        return result
    defaults = {"loss_chunk_rows": Choice(FIXED_CHUNK_ROWS, "fixed")}
    return levers.resolve("jax", cfg, explicit=explicit, fixed=fixed, defaults=defaults, entry=levers.entry_key(cfg),
                          probe=lambda: probe(cfg, list(defaults)), peak_probe=lambda: gemm_peak(cfg.run.dtype),
                          order=NAMES, log=log)


# ---- the probe -----------------------------------------------------------------------------------------

def _dtypes(cfg: Config) -> tuple[Any, Any]:
    from jax_impl.dist import dtypes
    return dtypes(cfg.run.dtype)


def _head_pass(cfg: Config, chunk: int) -> Callable[..., Any]:
    """Loss and gradients of the tied head and loss as GPT.loss computes them at `chunk` rows (0: full logits)."""
    m = cfg.model
    dtype, _ = _dtypes(cfg)

    def loss(h, w, t):
        if chunk:
            return chunked_lm_loss(h, w, t, m.vocab_size, chunk, dtype)
        logits = jnp.dot(h.astype(dtype), w.astype(dtype).T).astype(jnp.promote_types(dtype, jnp.float32))
        return lm_loss(logits, t, m.vocab_size)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def probe(cfg: Config, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Times the head + loss at each chunk size (each compiled once, before the timed rounds)."""
    m = cfg.model
    rows = levers.probe_rows(cfg)
    _, param_dtype = _dtypes(cfg)
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((rows, m.n_embd)), param_dtype)
    w = jnp.asarray(0.02 * rng.standard_normal((m.padded_vocab_size, m.n_embd)), param_dtype)
    t = jnp.asarray(rng.integers(0, m.vocab_size, rows), jnp.int32)

    def run(fn: Callable[..., Any]) -> Callable[[], None]:
        return lambda: jax.block_until_ready(fn(h, w, t))

    chosen: dict[str, Any] = {}
    timings: dict[str, Any] = {"rows": rows}
    if "loss_chunk_rows" in names:
        seconds = levers.interleaved({k: run(_head_pass(cfg, k)) for k in levers.chunk_candidates(rows)}, PROBE_ROUNDS)
        chosen["loss_chunk_rows"] = levers.fastest(seconds, 0)
        timings["loss_chunk_rows"] = levers.timings_record(seconds)
    return chosen, timings


def gemm_peak(dtype: str) -> tuple[float, str]:
    """XLA's jitted N×N product in the run's dtype."""
    from common.benchtiming import time_gemm

    dt = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp64": jnp.float64}.get(dtype, jnp.float32)
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((GEMM_PEAK_N, GEMM_PEAK_N)), dt) for _ in range(2))
    matmul = jax.jit(jnp.dot)
    gflops = time_gemm(lambda: matmul(a, b).block_until_ready(), GEMM_PEAK_N, 0.3)["gflops"]
    return gflops * 1e9, (f"{dtype} GEMM peak {gflops:,.0f} GFLOP/s (XLA, N={GEMM_PEAK_N}, {levers.usable_cpus()} CPUs) "
                          f"on this machine")


def accelerator_peak(cfg: Config) -> tuple[float, str]:
    """run.peak_tflops, else the GPU's datasheet peak by name, else a probed GEMM in the run's dtype."""
    if cfg.run.peak_tflops > 0:
        return cfg.run.peak_tflops * 1e12, "run.peak_tflops"
    return _probed_accelerator_peak(cfg.run.dtype)


@functools.cache
def _probed_accelerator_peak(dtype: str) -> tuple[float, str]:
    from common.benchtiming import time_gemm

    device = jax.devices()[0]
    sheet = datasheet_peak(device.device_kind, dtype)
    if sheet:
        return sheet
    n = 8192
    dt = {"fp64": jnp.float64, "fp32": jnp.float32, "fp16": jnp.float16}.get(dtype, jnp.bfloat16)
    a, b = (jnp.ones((n, n), dt) for _ in range(2))
    matmul = jax.jit(jnp.dot)
    gflops = time_gemm(lambda: matmul(a, b).block_until_ready(), n, 0.5)["gflops"]
    return gflops * 1e9, f"{dtype} GEMM peak {gflops / 1e3:,.0f} TFLOP/s probed on {device.device_kind} (not in the datasheet table)"
