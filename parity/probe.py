"""`python -m parity.probe`: this machine's GEMM peak, measured on the spot, for MFU figures.

Square N×N @ N×N products in fp32 and bf16 through every library the two trainers use: torch's aten
`a @ b`, torch's oneDNN `_linear_pointwise` (the `onednn` choice of torch_impl/ops.py's GEMM levers) and a
jitted JAX `x @ y`. Each framework runs in its own subprocess, so neither framework's thread pool
competes with the other's and torch and jax are never imported together; threads are what such a
process gets by default (so `--pin 0` gives the single-CPU peak the same way). The figure per case is
the median of a few timed repeats after warm-up; the peak per dtype is the best over libraries and
sizes, i.e. the ceiling an ideal training step could reach here right now.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from bench import workers
from common.benchtiming import MIN_REPEATS, REPEATS, time_gemm
from common.levers import usable_cpus
from common.outdir import FolderError, output_file, write_output
from common.usage import ExitingParser, UsageError

FRAMEWORKS = ("torch", "jax")
DTYPES = ("fp32", "bf16")
DEFAULT_SIZES = (1024, 2048)


class ProbeError(ValueError):
    """Bad probe input (flags); printed on one line with exit code 2."""


def torch_cases(sizes: Sequence[int]) -> tuple[list[tuple[str, str, int, Callable[[], Any]]], dict[str, Any]]:
    import torch

    from torch_impl.ops import onednn_available

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    onednn = onednn_available()
    cases = []
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        for dname, dt in dtypes.items():
            a = torch.randn(n, n, generator=gen).to(dt)
            b = torch.randn(n, n, generator=gen).to(dt)
            b_t = b.t().contiguous()  # _linear_pointwise takes the weight as (out, in), like nn.Linear
            cases.append(("aten", dname, n, lambda a=a, b=b: a @ b))
            if onednn:
                cases.append(("onednn", dname, n,
                              lambda a=a, b_t=b_t: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")))
    info = {"threads": torch.get_num_threads(), "version": torch.__version__, "onednn": onednn}
    return cases, info


def jax_cases(sizes: Sequence[int]) -> tuple[list[tuple[str, str, int, Callable[[], Any]]], dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    matmul = jax.jit(lambda x, y: x @ y)
    cases = []
    key = jax.random.PRNGKey(0)
    for n in sizes:
        for dname, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
            kx, ky, key = jax.random.split(key, 3)
            x = jax.random.normal(kx, (n, n), dt)
            y = jax.random.normal(ky, (n, n), dt)
            cases.append(("xla", dname, n, lambda x=x, y=y: matmul(x, y).block_until_ready()))
    # XLA's CPU client sizes its pool from the CPUs this process may run on.
    info = {"threads": usable_cpus(), "version": jax.__version__}
    return cases, info


def probe_child(framework: str, sizes: Sequence[int], budget_s: float) -> dict[str, Any]:
    """Runs inside the framework's own process: every case of that framework, plain numbers out."""
    cases, info = (torch_cases if framework == "torch" else jax_cases)(sizes)
    results, errors = [], {}
    share = budget_s / max(len(cases), 1)
    for library, dtype, n, fn in cases:
        try:
            r = time_gemm(fn, n, share)
        except Exception as e:  # a library without this dtype on this CPU is a finding, not a crash
            errors[f"{framework} {library} {dtype} N={n}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        results.append({"framework": framework, "library": library, "dtype": dtype, "n": n, **r})
    return {"framework": framework, "results": results, "errors": errors, **info}


def run_child(framework: str, sizes: Sequence[int], budget_s: float, pin: str | None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = workers.module_command("parity.probe", ["--child", framework, "--sizes", ",".join(map(str, sizes)),
                                                  "--budget", budget_s], pin)
    return workers.run(cmd, base_env=env, timeout=600).answer(f"probe child {framework}")


def peaks(results: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
    """Best GFLOP/s per dtype over libraries and sizes, and which case gave it."""
    best: dict[str, float] = {}
    source: dict[str, str] = {}
    for r in results:
        if r["gflops"] > best.get(r["dtype"], 0.0):
            best[r["dtype"]] = r["gflops"]
            source[r["dtype"]] = f"{r['framework']} {r['library']} N={r['n']}"
    return best, source


def measure_peaks(seconds_budget: float = 4.0, sizes: Sequence[int] = DEFAULT_SIZES, pin: str | None = None,
                  frameworks: Sequence[str] = FRAMEWORKS, env: dict[str, str] | None = None) -> dict[str, Any]:
    """GEMM peaks of this machine now. `seconds_budget` is the timed part, shared by the frameworks;
    their imports and warm-up calls come on top."""
    per_framework = seconds_budget / max(len(frameworks), 1)
    children = [run_child(f, sizes, per_framework, pin, env) for f in frameworks]  # one after the other
    results = [r for c in children for r in c["results"]]
    best, source = peaks(results)
    return {"pin": pin, "sizes": list(sizes), "seconds_budget": seconds_budget, "results": results,
            "threads": {c["framework"]: c["threads"] for c in children},
            "versions": {c["framework"]: c["version"] for c in children},
            "errors": {k: v for c in children for k, v in c["errors"].items()},
            "peak_gflops": best, "peak_source": source}


def format_probe(report: dict[str, Any]) -> str:
    threads = ", ".join(f"{k} {v}" for k, v in report["threads"].items())
    pinned = f", pinned to CPU {report['pin']}" if report["pin"] is not None else ""
    lines = [f"GEMM probe: square N×N @ N×N, median of {MIN_REPEATS}-{REPEATS} windows after warm-up; threads: "
             f"{threads}{pinned}",
             "| framework | library | dtype | N | GFLOP/s | ms/GEMM |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['framework']} | {r['library']} | {r['dtype']} | {r['n']} | {r['gflops']:,.0f} | "
                     f"{r['ms']:.2f} |")
    for case, err in report["errors"].items():
        lines.append(f"not measured: {case}: {err}")
    lines.append("peak: " + "; ".join(f"{d} {report['peak_gflops'][d]:,.0f} GFLOP/s ({report['peak_source'][d]})"
                                      for d in DTYPES if d in report["peak_gflops"]))
    return "\n".join(lines)


def parse_list(text: str, flag: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or (allowed is not None and any(i not in allowed for i in items)):
        expected = f"a subset of {','.join(allowed)}" if allowed else "a comma-separated list"
        raise ProbeError(f"{flag}: expected {expected}, got '{text}'")
    return items


def parse_sizes(text: str) -> list[int]:
    items = parse_list(text, "--sizes")
    if not all(i.isdigit() and int(i) > 0 for i in items):
        raise ProbeError(f"--sizes: expected positive integers, got '{text}'")
    return [int(i) for i in items]


def main(argv: Sequence[str] | None = None) -> int:
    p = ExitingParser(prog="python -m parity.probe", description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed GEMMs, shared by the frameworks")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="square sizes N, comma-separated")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of torch,jax")
    p.add_argument("--pin", default=None, help="run each probe under `taskset -c PIN` (e.g. 0: one CPU)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        if args.child:
            channel = workers.answer_channel()
            workers.reply(channel, probe_child(args.child, sizes, args.budget))
            return 0
        if args.budget <= 0:
            raise ProbeError("--budget must be > 0")
        frameworks = parse_list(args.frameworks, "--frameworks", FRAMEWORKS)
        pin = workers.parse_pin(args.pin)
        if args.json is not None:
            output_file(args.json, "--json")
        report = measure_peaks(args.budget, sizes, pin, frameworks)
        print(format_probe(report))
        if args.json:
            write_output(args.json, json.dumps(report, indent=1) + "\n")
        return 0
    except (ProbeError, UsageError, FolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
