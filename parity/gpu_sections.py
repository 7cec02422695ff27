"""The sections of `python -m parity.gpu` that need no helper process (env, peaks), and what all sections share:
the run's model config, progress lines and earlier sections' results.

A section is a function (Options, work folder) -> result dict with "passed" and "failures"; parity.gpu's
run_one runs one in a section process.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from common.config import Config, validate

from common.config_files import apply_overrides, load_toml, resolve_config_path
from common.usage import first_line
from parity.gpu_options import REPORT_JSON, Options

# GPT-2 124M at T=1024 in bf16, the shape GPU users compare; the dry run keeps the GPT-2 vocabulary (the corpus's)
# and shrinks everything else.
MODEL = "gpt2-124m"
DRY_SHAPE = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "64", "--model.block_size", "64"]
# Micro-steps per optimizer step at the largest micro-batch: tokens per step stay fixed when a backend has to
# halve its micro-batch (it accumulates more), so both backends' tok/s and the trainers' steps compare.
ACCUM_AT_MAX = 2
VERSIONED = ("gpt2-twin", "torch", "triton", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "numpy", "tiktoken", "safetensors", "transformers", "nvidia-cudnn-cu13",
             "nvidia-cudnn-cu12")


def say(msg: str) -> None:
    print(msg, flush=True)


def model_config(opts: Options, micro_batch: int | None = None) -> Config:
    """The bench's and trainers' config: GPT-2 124M (tiny in the dry run), bf16, torch.compile on the GPU."""
    cfg = load_toml(resolve_config_path(MODEL))
    cfg = apply_overrides(cfg, (DRY_SHAPE if opts.dry_run else []) + ["--data.dir", opts.data_dir])
    b = micro_batch or opts.max_micro_batch
    optim = dataclasses.replace(cfg.optim, micro_batch_size=b,
                                total_batch_size=ACCUM_AT_MAX * opts.max_micro_batch * cfg.model.block_size)
    run = dataclasses.replace(cfg.run, dtype="bf16", device=opts.device, devices=1, compile=not opts.dry_run)
    return validate(dataclasses.replace(cfg, optim=optim, run=run))


def earlier(opts: Options, section: str) -> dict[str, Any] | None:
    """The result of an earlier section of this report, if it passed."""
    path = opts.out / REPORT_JSON
    if not path.exists():
        return None
    entry = json.loads(path.read_text())["sections"].get(section)
    return entry["result"] if entry and entry["status"] == "passed" else None


def bf16_peak_flops(opts: Options) -> float | None:
    peaks = earlier(opts, "peaks")
    return peaks["bf16_peak_tflops"] * 1e12 if peaks and peaks.get("bf16_peak_tflops") else None


# ---- env ------------------------------------------------------------------------------------------------

def versions() -> dict[str, str | None]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def nvidia_smi() -> list[dict[str, str]] | None:
    if not shutil.which("nvidia-smi"):
        return None
    fields = ("name", "driver_version", "memory.total", "power.limit", "clocks.max.sm", "compute_cap")
    proc = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return [{"error": (proc.stderr or proc.stdout).strip()[:300]}]
    return [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in proc.stdout.strip().splitlines()]


def section_env(opts: Options, work: Path) -> dict[str, Any]:
    from common.cpuinfo import cpuinfo_field

    result: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                              "cpu": cpuinfo_field("model name") or platform.processor(), "cpus": os.cpu_count(),
                              "versions": versions(), "nvidia_smi": nvidia_smi()}
    failures = []
    import torch

    t = {"cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        t.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2 ** 30,
                 devices=torch.cuda.device_count())
    result["torch"] = t
    import jax

    devices = jax.devices()
    result["jax"] = {"backend": jax.default_backend(), "devices": [str(d) for d in devices],
                     "device_kind": devices[0].device_kind}
    say(f"python {result['python']}; torch {result['versions']['torch']} (CUDA {t['cuda']}, cuDNN {t['cudnn']}); "
        f"jax {result['versions']['jax']} on {result['jax']['backend']}; flax {result['versions']['flax']}, "
        f"optax {result['versions']['optax']}, orbax {result['versions']['orbax-checkpoint']}")
    say(f"device: {t.get('device', result['cpu'])}; driver: "
        f"{(result['nvidia_smi'] or [{}])[0].get('driver_version', 'none')}; JAX sees {result['jax']['devices']}")
    if not opts.dry_run:
        if not t["cuda_available"]:
            failures.append("torch sees no CUDA device")
        if result["jax"]["backend"] not in ("gpu", "cuda"):
            failures.append(f"JAX's default backend is {result['jax']['backend']}, not gpu (is jax[cuda] installed?)")
    return {**result, "device": t.get("device") or result["cpu"], "passed": not failures, "failures": failures}


# ---- peaks ----------------------------------------------------------------------------------------------

def _timed(run: Callable[[int], float], budget_s: float) -> float:
    """Seconds per call of `run(n)` (which times n calls itself), n sized from a first call to fill the budget."""
    run(2)  # warm-up: kernel selection, compilation, memory
    once = run(1)
    n = max(3, min(200, int(budget_s / max(once, 1e-6))))
    return run(n)


def torch_gemm(n: int, kind: str, device: str, budget_s: float) -> float:
    """FLOP/s of an n×n @ n×n product; kind bf16, fp32 (TF32 off) or tf32. CUDA events time the GPU."""
    import torch

    tf32 = kind == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def run(calls: int) -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=c)
        return (time.perf_counter() - t0) / calls

    return 2 * n ** 3 / _timed(run, budget_s)


def jax_gemm(n: int, kind: str, budget_s: float) -> float:
    """The same in JAX: fp32 at precision HIGHEST, tf32 at JAX's default (TF32 on NVIDIA GPUs since Ampere)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if kind == "bf16" else jnp.float32
    precision = jax.lax.Precision.HIGHEST if kind == "fp32" else jax.lax.Precision.DEFAULT
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x, y = jax.random.normal(kx, (n, n), dtype), jax.random.normal(ky, (n, n), dtype)

    def run(calls: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):  # dispatched asynchronously: the device runs them back to back
            out = f(x, y)
        out.block_until_ready()
        return (time.perf_counter() - t0) / calls

    return 2 * n ** 3 / _timed(run, budget_s)


def section_peaks(opts: Options, work: Path) -> dict[str, Any]:
    sizes = (256, 512) if opts.dry_run else (4096, 8192)
    budget = 0.1 if opts.dry_run else 0.5
    kinds = ("bf16", "fp32", "tf32")
    rows, failures = [], []
    for framework, gemm in (("torch", lambda n, k: torch_gemm(n, k, opts.device, budget)),
                            ("jax", lambda n, k: jax_gemm(n, k, budget))):
        for kind in kinds:
            for n in sizes:
                try:
                    tflops = gemm(n, kind) / 1e12
                except Exception as e:  # one framework's failure must not hide the other's figures
                    failures.append(f"{framework} {kind} N={n}: {type(e).__name__}: {first_line(e)[:200]}")
                    continue
                rows.append({"framework": framework, "kind": kind, "n": n, "tflops": tflops})
                say(f"{framework:5} {kind:4} N={n}: {tflops:,.2f} TFLOP/s")
    best = {k: max((r["tflops"] for r in rows if r["kind"] == k), default=None) for k in kinds}
    say("peaks: " + ", ".join(f"{k} {v:,.2f} TFLOP/s" for k, v in best.items() if v))
    return {"rows": rows, "peak_tflops": best, "bf16_peak_tflops": best["bf16"], "sizes": list(sizes),
            "note": "fp32: TF32 off (torch matmul precision highest; JAX Precision.HIGHEST); tf32: torch 'high', "
                    "JAX default precision", "passed": not failures, "failures": failures}


# ---- dispatch -------------------------------------------------------------------------------------------
