"""`python -m parity.bench --suite`: the README's performance table, every row × dtype for both backends.

Each (row, dtype) is a bench.pairwise run of both backends in interleaved rounds, with MFU against the
GEMM peak `parity.probe` measures at the start, a single-CPU pass under `taskset`, the data loader's
share of the step, and optionally torch.compile time and per-op profiles (`parity.profile`); it prints
one markdown table with the machine, peaks, date and command above it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from bench import pairwise
from bench.pairwise import bench, bench_config
from bench.trainee import BACKENDS
from bench.workers import allocator_env
from common.config import Config, ConfigError
from common.config_files import dump_toml
from common.cpuinfo import cpuinfo_field
from common.levers import usable_cpu_ids, usable_cpus
from common.loop import ensure_data
from common.outdir import write_output
from parity.probe import measure_peaks
from parity.profile import format_profiles, profile_config


@dataclasses.dataclass(frozen=True)
class SuiteRow:
    """One row of `--suite`: a shape of common.benchtiming.SHAPES and its default timing (flags override them)."""
    shape: str
    rounds: int
    steps: int
    warmup: int


# A 124M step takes seconds on a CPU: one step per window and three rounds keep that row to minutes.
SUITE_ROWS = {"tiny": SuiteRow("tiny", rounds=4, steps=3, warmup=2),
              "small": SuiteRow("small", rounds=4, steps=3, warmup=2),
              "gpt2-124m": SuiteRow("gpt2-124m", rounds=3, steps=1, warmup=1)}
SUITE_DTYPES = ("fp32", "bf16")
COLUMNS = ("row", "dtype", "torch tok/s (MFU)", "JAX tok/s (MFU)", "JAX/torch same-round", "first step s torch / JAX cold (warm)",
           "torch.compile s", "peak RSS MB torch / JAX", "loader ms/step (% of step) torch / JAX",
           "1 CPU tok/s torch / JAX", "1 CPU JAX/torch")
NONE = "—"


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    config: str
    overrides: tuple[str, ...]
    rows: tuple[str, ...]
    dtypes: tuple[str, ...]
    backends: tuple[str, ...]
    rounds: int | None  # None: each row's default
    steps: int | None
    warmup: int | None
    pin: str | None  # CPU list of the single-CPU pass; None skips it
    pin_rounds: int | None  # None: half the row's rounds
    compile_time: bool
    profile: bool


def torch_compile_first_step(cfg: Config, extra_env: dict[str, str]) -> float:
    """First-step seconds of a torch worker with run.compile on: compilation plus the first execution.

    With an empty inductor cache, as JAX's cold figure has an empty compilation cache: inductor's FX-graph
    and kernel caches (/tmp/torchinductor_<user>) otherwise make every later measurement of a shape a
    cache hit, which is not what a new user waits for."""
    compiled = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, compile=True))
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(dump_toml(compiled))
        env = {**extra_env, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        w = pairwise.start_worker("torch", path, None, None, env)
        try:
            first = w.read()
            w.close()
        finally:
            w.kill()
    return first["first_step_s"]


def mfu(flops_per_token: float, tokens_per_s: float, peak_gflops: float | None) -> float | None:
    return flops_per_token * tokens_per_s / (peak_gflops * 1e9) if peak_gflops else None


def row_label(row: str, config: dict[str, Any]) -> str:
    m, o = config["model"], config["optim"]
    return f"{row} L{m['n_layer']} H{m['n_head']} C{m['n_embd']} T{m['block_size']} B{o['micro_batch_size']}"


def suite_row(row: str, dtype: str, main: dict[str, Any], pinned: dict[str, Any] | None,
              compile_first_s: float | None, peaks: dict[str, float], pinned_peaks: dict[str, float]
              ) -> dict[str, Any]:
    """The figures of one (row, dtype) from bench() reports: main pass, optional single-CPU pass, and the
    first-step time of a torch.compile worker. MFU is against the probe's peak for the row's dtype."""
    flops_tok = main["flops_per_token"]
    backends = {name: {"tokens_per_s": r["tokens_per_s"], "ms_per_step": r["ms_per_step"],
                       "mfu": mfu(flops_tok, r["tokens_per_s"], peaks.get(dtype)),
                       "first_step_s": r["first_step_s"], "warm_first_step_s": r.get("warm_first_step_s"),
                       "peak_rss_mb": r["peak_rss_mb"],
                       "loader_ms_per_step": r["loader_ms_per_step"], "loader_share": r["loader_share"]}
                for name, r in main["backends"].items()}
    eager_first = main["backends"].get("torch", {}).get("first_step_s")
    single = None
    if pinned is not None:
        single = {"rounds": pinned["rounds"], "pinned_cpu": pinned["pinned_cpu"],
                  "jax_over_torch": pinned.get("jax_over_torch"),
                  "backends": {name: {"tokens_per_s": r["tokens_per_s"],
                                      "mfu": mfu(flops_tok, r["tokens_per_s"], pinned_peaks.get(dtype))}
                               for name, r in pinned["backends"].items()}}
    return {"row": row, "label": row_label(row, main["config"]), "dtype": dtype, "flops_per_token": flops_tok,
            "rounds": main["rounds"], "window_steps": main["window_steps"], "warmup_steps": main["warmup_steps"],
            "backends": backends, "jax_over_torch": main.get("jax_over_torch"),
            "torch_compile_first_step_s": compile_first_s,
            "torch_compile_s": None if compile_first_s is None or eager_first is None
            else compile_first_s - eager_first,
            "single_cpu": single}


def _fmt(value: float | None, spec: str) -> str:
    return NONE if value is None else format(value, spec)


def _pair(row: dict[str, Any], cell: Callable[[dict[str, Any]], str]) -> str:
    return " / ".join(cell(row["backends"][n]) if n in row["backends"] else NONE for n in BACKENDS)


def _share(fraction: float) -> str:
    return "<0.1%" if fraction < 0.001 else f"{100 * fraction:.1f}%"


def _tok_cell(b: dict[str, Any] | None) -> str:
    if b is None:
        return NONE
    tok = f"{b['tokens_per_s']:,.0f}"
    return tok if b["mfu"] is None else f"{tok} ({100 * b['mfu']:.1f}%)"


def _first_step_cell(b: dict[str, Any]) -> str:
    warm = b.get("warm_first_step_s")
    return f"{b['first_step_s']:.2f}" + ("" if warm is None else f" ({warm:.2f})")


def format_suite_row(row: dict[str, Any]) -> str:
    single = row["single_cpu"]
    cells = [row["label"], row["dtype"],
             _tok_cell(row["backends"].get("torch")), _tok_cell(row["backends"].get("jax")),
             _fmt(row["jax_over_torch"], ".2f"),
             _pair(row, _first_step_cell),
             _fmt(row["torch_compile_s"], ".1f"),
             _pair(row, lambda b: f"{b['peak_rss_mb']:,.0f}"),
             _pair(row, lambda b: f"{b['loader_ms_per_step']:.1f} ({_share(b['loader_share'])})"),
             NONE if single is None else " / ".join(
                 f"{single['backends'][n]['tokens_per_s']:,.0f}" if n in single["backends"] else NONE
                 for n in BACKENDS),
             NONE if single is None else _fmt(single["jax_over_torch"], ".2f")]
    return "| " + " | ".join(cells) + " |"


def format_suite(header: Sequence[str], rows: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    lines = [f"- {h}" for h in header] + ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [format_suite_row(r) for r in rows]
    return "\n".join(lines + ([""] + list(notes) if notes else []))


def _peaks_text(probe: dict[str, Any]) -> str:
    return ", ".join(f"{d} {probe['peak_gflops'][d]:,.0f} GFLOP/s ({probe['peak_source'][d]})"
                     for d in SUITE_DTYPES if d in probe["peak_gflops"])


def suite_header(probe: dict[str, Any], pinned_probe: dict[str, Any] | None, env_note: str,
                 command: str, now: datetime.datetime) -> list[str]:
    threads = ", ".join(f"{k} {v}" for k, v in probe["threads"].items())
    versions = ", ".join(f"{k} {v}" for k, v in probe["versions"].items())
    peaks = f"GEMM peak measured at the start (`python -m parity.probe`): {_peaks_text(probe)}"
    if pinned_probe is not None:
        peaks += f"; pinned to CPU {pinned_probe['pin']}: {_peaks_text(pinned_probe)}"
    return [f"machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
            f"{usable_cpus()} usable); CPU: {cpuinfo_field('model name') or platform.processor() or 'unknown'}",
            f"threads per process (framework defaults): {threads}; {versions}, Python {platform.python_version()}",
            peaks + "; MFU = FLOPs/token (common.plan) × tok/s ÷ the peak of the row's dtype",
            f"allocator: {env_note}",
            f"date: {now.strftime('%Y-%m-%d %H:%M %Z')}",
            f"command: `{command}`"]


def suite_notes(pin: str | None) -> list[str]:
    notes = ["tok/s: median of interleaved timed windows (both workers: same init weights, same batches). "
             "JAX/torch: median of the same-round tok/s ratios. First step: torch eager's first step; JAX's is "
             "jit compilation + the first execution, with an empty compilation cache (cold) and, in brackets, in a "
             "second process on the cache the first one filled (warm: every later run). torch.compile s: a torch "
             "worker with run.compile=true and an empty inductor cache, its first step minus the eager first step "
             "(— unless --compile-time). Loader: DataLoader.next_step() per step and its share of the step time "
             "(included in tok/s, as in the trainer)."]
    if pin is not None:
        notes.append(f"1 CPU: the same row re-run with both workers under `taskset -c {pin}`.")
    return notes


def parse_choices(text: str, flag: str, allowed: Sequence[str]) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not items or any(i not in allowed for i in items):
        raise ConfigError(f"{flag}: expected a subset of {','.join(allowed)}, got '{text}'")
    return items


def suite_plan(opts: SuiteOptions) -> list[tuple[str, str, Config, SuiteRow]]:
    """Every (row, dtype) config with its timing, validated before anything is measured."""
    plan = []
    for row in opts.rows:
        spec = SUITE_ROWS[row]
        timing = SuiteRow(spec.shape, opts.rounds or spec.rounds, opts.steps or spec.steps,
                          spec.warmup if opts.warmup is None else opts.warmup)
        total = 1 + timing.warmup + timing.rounds * timing.steps
        for dtype in opts.dtypes:
            plan.append((row, dtype, bench_config(opts.config, spec.shape, opts.overrides, dtype, False,
                                                  total), timing))
    return plan


def run_suite(opts: SuiteOptions, command: str, json_path: Path | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    plan = suite_plan(opts)
    extra_env, env_note = allocator_env(os.environ)
    ensure_data(plan[0][2], log)  # rows differ only in shape and dtype: one data folder for all
    log("probing the GEMM peak (parity.probe) ...")
    probe = measure_peaks(env={**os.environ, **extra_env})
    pinned_probe = None
    if opts.pin is not None:
        pinned_probe = measure_peaks(pin=opts.pin, env={**os.environ, **extra_env})
    report: dict[str, Any] = {
        "header": suite_header(probe, pinned_probe, env_note, command, datetime.datetime.now(datetime.timezone.utc)),
        "notes": suite_notes(opts.pin), "probe": probe, "pinned_probe": pinned_probe,
        "options": dataclasses.asdict(opts), "rows": []}
    for row, dtype, cfg, timing in plan:
        log(f"[{row} {dtype}] {timing.rounds} rounds × {timing.steps} steps, warm-up {timing.warmup}")
        main = bench(cfg, timing.rounds, timing.steps, timing.warmup, None, opts.backends, extra_env)
        pinned = None
        if opts.pin is not None:
            rounds = opts.pin_rounds or max(1, math.ceil(timing.rounds / 2))
            log(f"[{row} {dtype}] pinned to CPU {opts.pin}: {rounds} rounds")
            pinned = bench(cfg, rounds, timing.steps, timing.warmup, opts.pin, opts.backends, extra_env)
        compile_first = None
        if opts.compile_time and "torch" in opts.backends:
            log(f"[{row} {dtype}] torch.compile first step")
            compile_first = torch_compile_first_step(cfg, extra_env)
        summary = suite_row(row, dtype, main, pinned, compile_first, probe["peak_gflops"],
                            pinned_probe["peak_gflops"] if pinned_probe else {})
        if opts.profile:
            log(f"[{row} {dtype}] profiling")
            profiles = profile_config(cfg, opts.backends, extra_env=extra_env)
            summary["profile"] = profiles
            summary["profile_text"] = format_profiles(profiles, f"{summary['label']} {dtype}")
        summary["reports"] = {"main": main, "pinned": pinned}
        report["rows"].append(summary)
        log(format_suite_row(summary))
        if json_path:  # after every row, so a long suite that dies later keeps what it measured
            write_output(json_path, json.dumps(report, indent=1) + "\n")
    return report


def suite_text(report: dict[str, Any]) -> str:
    text = format_suite(report["header"], report["rows"], report["notes"])
    profiles = [r["profile_text"] for r in report["rows"] if "profile_text" in r]
    return "\n\n".join([text] + profiles)


def suite_options(args: argparse.Namespace, overrides: Sequence[str], backends: tuple[str, ...]) -> SuiteOptions:
    for flag in ("shape", "dtype", "compile", "plot"):
        if getattr(args, flag) is not None:
            hint = {"dtype": " (use --dtypes)", "compile": " (use --compile-time)"}.get(flag, "")
            raise ConfigError(f"--{flag} does not apply to --suite{hint}")
    if args.pin_rounds is not None and args.pin_rounds < 1:
        raise ConfigError("--pin-rounds must be ≥ 1")
    if args.compile_time and "torch" not in backends:
        raise ConfigError("--compile-time needs the torch backend")
    return SuiteOptions(config=args.config, overrides=tuple(overrides),
                        rows=parse_choices(args.rows or ",".join(SUITE_ROWS), "--rows", tuple(SUITE_ROWS)),
                        dtypes=parse_choices(args.dtypes or ",".join(SUITE_DTYPES), "--dtypes", SUITE_DTYPES),
                        backends=backends, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                        pin=None if args.no_pin else args.pin or str(min(usable_cpu_ids() or {0})),
                        pin_rounds=args.pin_rounds,
                        compile_time=args.compile_time, profile=args.profile)

