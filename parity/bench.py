"""`python -m parity.bench`: both backends' training throughput on the same config and the same batches.

Each backend runs in its own worker process (so peak memory is its own and neither framework's
thread pools disturb the other), started from the same common weights and fed the same batches by
the shared loader, through the same `train_step` the trainers use. After compile/warm-up the parent
asks the workers for timed windows in alternation — round by round — so a slow spell of this noisy
VM hits both alike; it reports medians and the JAX/PyTorch ratio within each round.

`--suite` runs the README's rows (tiny, small, GPT-2 124M × fp32, bf16) that way, with MFU against
the GEMM peak `parity.probe` measures at the start, a single-CPU pass under `taskset`, the data
loader's share of the step and optionally torch.compile time and per-op profiles (`parity.profile`),
and prints one markdown table with the machine, peaks, date and command above it.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("parity.bench")

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from common.config import (Config, ConfigError, apply_overrides, dump_toml, load_toml, resolve_config_path,
                           validate)
# The Makefile's allocator settings (docs/performance.md). Both backends must run under the same ones, so a
# suite started without them (and without the re-exec above) hands this value to every worker.
from common.launch import GLIBC_TUNABLES as MAKEFILE_TUNABLES
from common.cpuinfo import cpuinfo_field
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

    def steps(n: int) -> tuple[float, float, list[float]]:
        """Wall seconds of n steps (loader included, as in the trainer), the loader's part, losses."""
        nonlocal state
        losses = []
        loader_s = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            t1 = time.perf_counter()
            x, y = loader.next_step()
            loader_s += time.perf_counter() - t1
            state, m = backend.train_step(state, x, y)
            losses.append(m["loss"])
        # One host sync per window, as the trainer has one per log_interval (common/loop.py): JAX keeps
        # dispatching the next step while one computes.
        losses = [float(v) for v in losses]
        return time.perf_counter() - t0, loader_s, losses

    first_s, first_loader_s, first_losses = steps(1)
    answer = {"first_step_s": first_s, "loader_seconds": first_loader_s, "losses": first_losses, "peak_flops": peak}
    print(json.dumps(answer), file=out, flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "window":
            seconds, loader_s, losses = steps(int(arg))
            print(json.dumps({"seconds": seconds, "loader_seconds": loader_s, "losses": losses}), file=out,
                  flush=True)
        elif cmd == "exit":
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"peak_rss_mb": rss_mb}), file=out, flush=True)
            return


class Worker:
    def __init__(self, name: str, cfg_path: Path, weights_path: Path | None, pin: str | None,
                 extra_env: dict[str, str] | None = None):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **(extra_env or {}))
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


def bench(cfg: Config, rounds: int, window: int, warmup: int, pin: str | None = None,
          backends: tuple[str, ...] = BACKENDS, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    import tempfile

    import numpy as np

    tokens_per_step = cfg.optim.total_batch_size
    flops_tok = flops_per_token(cfg.model)
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        cfg_path = Path(tmp) / "config.toml"
        cfg_path.write_text(dump_toml(cfg))
        # An empty JAX compilation cache, so JAX's first step is the cold compile a new user sees; a
        # second JAX worker started on the filled cache afterwards gives the warm (second run) figure.
        extra_env = {**(extra_env or {}), "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax-cache")}
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
            workers[name] = Worker(name, cfg_path, weights_path, pin, extra_env)
            first = workers[name].read()
            results[name] = {"startup_s": time.perf_counter() - t0, "first_step_s": first["first_step_s"],
                             "peak_flops": first["peak_flops"], "windows": [], "loader_windows": [],
                             "losses": list(first["losses"])}
            if warmup:
                results[name]["losses"] += workers[name].ask(f"window {warmup}")["losses"]
        for _ in range(rounds):
            for name in backends:
                w = workers[name].ask(f"window {window}")
                results[name]["windows"].append(w["seconds"])
                results[name]["loader_windows"].append(w["loader_seconds"])
                results[name]["losses"] += w["losses"]
        for name in backends:
            results[name]["peak_rss_mb"] = workers[name].close()["peak_rss_mb"]
        if "jax" in backends:
            warm = Worker("jax", cfg_path, weights_path, pin, extra_env)
            results["jax"]["warm_first_step_s"] = warm.read()["first_step_s"]
            warm.close()
    for name, r in results.items():
        tok_s = [tokens_per_step * window / s for s in r["windows"]]
        r["tokens_per_s"] = statistics.median(tok_s)
        r["tokens_per_s_windows"] = tok_s
        r["ms_per_step"] = statistics.median(s * 1e3 / window for s in r["windows"])
        r["mfu"] = flops_tok * r["tokens_per_s"] / r["peak_flops"]
        r["loader_ms_per_step"] = statistics.median(s * 1e3 / window for s in r["loader_windows"])
        r["loader_share"] = sum(r["loader_windows"]) / sum(r["windows"])
    report = {"config": cfg.to_dict(), "rounds": rounds, "window_steps": window, "warmup_steps": warmup,
              "pinned_cpu": pin, "flops_per_token": flops_tok, "backends": results}
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
    "tiny": ["--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "128", "--model.block_size", "128",
             "--optim.micro_batch_size", "8", "--optim.total_batch_size", "1024"],
    "small": ["--model.n_layer", "6", "--model.n_head", "6", "--model.n_embd", "384", "--model.block_size", "256",
              "--optim.micro_batch_size", "4", "--optim.total_batch_size", "1024"],
    "gpt2-124m-b1": ["--model.n_layer", "12", "--model.n_head", "12", "--model.n_embd", "768",
                     "--model.block_size", "1024", "--optim.micro_batch_size", "1", "--optim.total_batch_size", "1024"],
}


@dataclasses.dataclass(frozen=True)
class SuiteRow:
    """One row of `--suite`: a SHAPES entry and its default timing (flags override them)."""
    shape: str
    rounds: int
    steps: int
    warmup: int


# A 124M step takes 3-7 s on 2 CPUs: one step per window and three rounds keep that row to minutes.
SUITE_ROWS = {"tiny": SuiteRow("tiny", rounds=4, steps=3, warmup=2),
              "small": SuiteRow("small", rounds=4, steps=3, warmup=2),
              "gpt2-124m": SuiteRow("gpt2-124m-b1", rounds=3, steps=1, warmup=1)}
SUITE_DTYPES = ("fp32", "bf16")
SUITE_ONLY = ("rows", "dtypes", "no_pin", "pin_rounds", "compile_time", "profile")
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


def bench_config(config: str, shape_flags: Sequence[str], overrides: Sequence[str], dtype: str | None,
                 compile: bool | None, total_steps: int) -> Config:
    """The config a bench runs: the preset, then the shape, then the user's overrides (so they win)."""
    cfg = load_toml(resolve_config_path(config))
    cfg = apply_overrides(cfg, list(shape_flags) + list(overrides))
    run = dataclasses.replace(cfg.run, dtype=dtype or cfg.run.dtype,
                              compile=cfg.run.compile if compile is None else compile, devices=1)
    # The LR schedule has to cover every step the workers take.
    optim = dataclasses.replace(cfg.optim, max_steps=max(cfg.optim.max_steps, total_steps))
    return validate(dataclasses.replace(cfg, run=run, optim=optim))


def allocator_env(environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """What to add to every worker's environment, and the header line that says which allocator they ran on.

    glibc reads GLIBC_TUNABLES only at process start, so the value must be in the workers' environment;
    a parent started without it (not via `make`) would otherwise bench both backends on glibc's defaults.
    """
    value = environ.get("GLIBC_TUNABLES")
    if value == MAKEFILE_TUNABLES:
        return {}, f"GLIBC_TUNABLES={value} (the Makefile's value, in the environment of every worker)"
    if value is not None:
        return {}, (f"GLIBC_TUNABLES={value or '(empty)'} (from the environment, not the Makefile's value; "
                    f"inherited by every worker)")
    return ({"GLIBC_TUNABLES": MAKEFILE_TUNABLES},
            f"GLIBC_TUNABLES={MAKEFILE_TUNABLES} (not set in the environment: the Makefile's value, given to "
            f"every worker)")


def torch_compile_first_step(cfg: Config, extra_env: dict[str, str]) -> float:
    """First-step seconds of a torch worker with run.compile on: compilation plus the first execution.

    With an empty inductor cache, as JAX's cold figure has an empty compilation cache: inductor's FX-graph
    and kernel caches (/tmp/torchinductor_<user>) otherwise make every later measurement of a shape a
    cache hit (here 11-25 s instead of 24-56 s)."""
    import tempfile

    compiled = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, compile=True))
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(dump_toml(compiled))
        env = {**extra_env, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        w = Worker("torch", path, None, None, env)
        first = w.read()
        w.close()
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
            f"{len(os.sched_getaffinity(0))} usable); CPU: {cpuinfo_field('model name') or platform.processor() or 'unknown'}",
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
            plan.append((row, dtype, bench_config(opts.config, SHAPES[spec.shape], opts.overrides, dtype, False,
                                                  total), timing))
    return plan


def run_suite(opts: SuiteOptions, command: str, json_path: Path | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    from parity.probe import measure_peaks

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
            from parity.profile import format_profiles, profile_config
            log(f"[{row} {dtype}] profiling")
            profiles = profile_config(cfg, opts.backends, extra_env=extra_env)
            summary["profile"] = profiles
            summary["profile_text"] = format_profiles(profiles, f"{summary['label']} {dtype}")
        summary["reports"] = {"main": main, "pinned": pinned}
        report["rows"].append(summary)
        log(format_suite_row(summary))
        if json_path:  # after every row, so a long suite that dies later keeps what it measured
            json_path.write_text(json.dumps(report, indent=1) + "\n")
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
    if args.warmup is not None and args.warmup < 0:
        raise ConfigError("--warmup must be ≥ 0")
    if args.pin_rounds is not None and args.pin_rounds < 1:
        raise ConfigError("--pin-rounds must be ≥ 1")
    if args.compile_time and "torch" not in backends:
        raise ConfigError("--compile-time needs the torch backend")
    return SuiteOptions(config=args.config, overrides=tuple(overrides),
                        rows=parse_choices(args.rows or ",".join(SUITE_ROWS), "--rows", tuple(SUITE_ROWS)),
                        dtypes=parse_choices(args.dtypes or ",".join(SUITE_DTYPES), "--dtypes", SUITE_DTYPES),
                        backends=backends, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                        pin=None if args.no_pin else (args.pin or "0"), pin_rounds=args.pin_rounds,
                        compile_time=args.compile_time, profile=args.profile)


def parse_backends(text: str) -> tuple[str, ...]:
    backends = tuple(b.strip() for b in text.split(",") if b.strip())
    if not backends or any(b not in BACKENDS for b in backends):
        raise ConfigError(f"--backends: expected a subset of torch,jax, got '{text}'")
    return backends


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.bench", description=__doc__.splitlines()[0],
                                epilog="Config fields can be overridden: --optim.micro_batch_size 4 ... "
                                       "(with --suite, on top of each row's shape)")
    p.add_argument("--config", default="default", help="preset or TOML path (default: configs/default.toml)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a named model/batch shape applied over the config")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="compute dtype (default: the config's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile on/off for the torch backend (default: the config's)")
    p.add_argument("--rounds", type=int, default=None, help="timed windows per backend, interleaved (default 5; "
                   "--suite: per row)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per timed window (default 5; --suite: "
                   "per row)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (compile) step "
                   "(default 2; --suite: per row)")
    p.add_argument("--backends", default="torch,jax", help="comma-separated subset of torch,jax")
    p.add_argument("--pin", default=None, help="run each worker under `taskset -c PIN` (e.g. 0); with --suite: "
                   "the CPUs of the single-CPU pass (default 0)")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--plot", type=Path, help="write a PNG of tokens/s per window and loss curves")
    suite = p.add_argument_group("suite", "the README's table: rows × dtypes, both backends")
    suite.add_argument("--suite", action="store_true", help="run the benchmark suite and print one markdown table")
    suite.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(SUITE_ROWS)}")
    suite.add_argument("--dtypes", default=None, help="comma-separated subset of fp32,bf16")
    suite.add_argument("--no-pin", action="store_true", help="skip the single-CPU (taskset) pass")
    suite.add_argument("--pin-rounds", type=int, default=None, help="rounds of the single-CPU pass (default: "
                       "half the row's)")
    suite.add_argument("--compile-time", action="store_true", help="also time torch.compile (~30 s per row)")
    suite.add_argument("--profile", action="store_true", help="per-op profile of every row (parity.profile)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    if args.worker:
        worker(args.worker, Path(args.config))
        return 0
    try:
        backends = parse_backends(args.backends)
        for flag in ("rounds", "steps"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ConfigError(f"--{flag} must be ≥ 1")
        if args.suite:
            opts = suite_options(args, overrides, backends)
            command = "python -m parity.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
            report = run_suite(opts, command, args.json, lambda msg: print(msg, file=sys.stderr, flush=True))
            print(suite_text(report))
            return 0
        used = [f"--{f.replace('_', '-')}" for f in SUITE_ONLY if getattr(args, f) not in (None, False)]
        if used:
            raise ConfigError(f"{used[0]} needs --suite")
        rounds, steps, warmup = args.rounds or 5, args.steps or 5, 2 if args.warmup is None else args.warmup
        cfg = bench_config(args.config, SHAPES.get(args.shape, []), overrides, args.dtype, args.compile,
                           1 + warmup + rounds * steps)
        ensure_data(cfg, print)
        report = bench(cfg, rounds, steps, warmup, args.pin, backends)
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
