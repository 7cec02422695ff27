"""Plots and a text summary of one or more training runs, from their metrics.jsonl.

    python -m common.report runs/default/torch runs/default/jax --target 3.28

Reads the records of common/records.py. Several runs are overlaid, one colour per run, so a torch
and a jax run of the same config can be compared at a glance. Writes loss.png, lr.png,
grad_norm.png, tokens_per_s.png, and grad_to_weight.png / group_grad_norms.png when the records
carry those optional diagnostics (dicts of name -> value). Steps are shown as optimizer steps
completed (record step + 1), the numbering of the console lines and checkpoints.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from common.records import RecordsError, read_records
from common.usage import Parser, UsageError
from common.numbers import is_finite_number

METRICS_FILE = "metrics.jsonl"
WARMUP_STEPS = 2  # the first steps include compilation; excluded from throughput, as in common/loop.py
DIAGNOSTICS = {"grad_to_weight": "gradient-to-weight norm ratio", "group_grad_norms": "gradient norm per group"}
MARKERS = ("o", "s", "^", "D", "v", "P")


class ReportError(RecordsError):
    """A run folder or metrics file that cannot be read; the message names the file (and line)."""


@dataclass
class Run:
    label: str
    path: Path  # the metrics.jsonl file
    records: list[dict[str, Any]]


def metrics_path(run: str | Path) -> Path:
    p = Path(run)
    if p.is_dir():
        p = p / METRICS_FILE
        if not p.is_file():
            raise ReportError(f"{p}: no {METRICS_FILE} in this run folder")
        return p
    if not p.exists():
        raise ReportError(f"{p}: no such run folder or metrics file")
    return p


def load_run(run: str | Path, label: str | None = None) -> Run:
    path = metrics_path(run)
    records = read_records(path)
    if not records:
        raise ReportError(f"{path}: no records")
    if label is None:
        backend = str(records[0].get("backend", "?"))
        folder = path.parent.resolve()
        # run.out_dir defaults to runs/<name>/{backend}: "torch torch" would say less than "torch <name>".
        name = folder.parent.name if folder.name == backend and folder.parent.name else folder.name
        label = f"{backend} {name}"
    return Run(label=label, path=path, records=records)


def _num(rec: dict[str, Any], key: str) -> float | None:
    v = rec.get(key)
    if not is_finite_number(v):
        return None
    return float(v)


def wall_time(records: list[dict[str, Any]]) -> float | None:
    """Seconds of training: elapsed_s restarts at 0 in a resumed process, so segments are summed."""
    total, last = 0.0, None
    for rec in records:
        e = _num(rec, "elapsed_s")
        if e is None:
            continue
        if last is not None and e < last:
            total += last
        last = e
    return None if last is None else total + last


def summarize(records: list[dict[str, Any]], target: float | None = None) -> dict[str, Any]:
    """The numbers of the text summary. Steps are optimizer steps completed (record step + 1)."""
    vals = [(v, int(r["step"]) + 1) for r in records if (v := _num(r, "val_loss")) is not None]
    best = min(vals, key=lambda t: t[0]) if vals else None
    # Time-weighted (= total tokens / total time, like the loop's own "after warm-up" figure): a plain
    # mean of tokens_per_s would let a few fast steps outweigh slow ones.
    steady = [(t, ms) for r in records if int(r["step"]) >= WARMUP_STEPS
              and (t := _num(r, "tokens_per_s")) is not None and (ms := _num(r, "ms")) is not None and ms > 0]
    summary = {
        "steps": int(records[-1]["step"]) + 1,
        "min_val_loss": best[0] if best else None,
        "min_val_step": best[1] if best else None,
        "final_val_loss": vals[-1][0] if vals else None,
        "final_loss": float(records[-1]["loss"]),
        "tokens": None if (tokens := _num(records[-1], "tokens")) is None else int(tokens),
        "wall_s": wall_time(records),
        "mean_tokens_per_s": sum(t * ms for t, ms in steady) / sum(ms for _, ms in steady) if steady else None,
    }
    if target is not None:
        hit = next((r for r in records if (v := _num(r, "val_loss")) is not None and v <= target), None)
        summary["target_step"] = int(hit["step"]) + 1 if hit else None
        summary["target_tokens"] = hit.get("tokens") if hit else None
    return summary


def summary_lines(run: Run, target: float | None = None) -> list[str]:
    s = summarize(run.records, target)

    def fmt(v: Any, spec: str, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:{spec}}{unit}"

    lines = [f"{run.label}  ({run.path})",
             f"  steps              {s['steps']:,}",
             f"  min val loss       {fmt(s['min_val_loss'], '.4f')}"
             + (f" at step {s['min_val_step']:,}" if s["min_val_step"] is not None else ""),
             f"  final train loss   {s['final_loss']:.4f}",
             f"  tokens seen        {fmt(s['tokens'], ',')}",
             f"  wall time          {fmt(s['wall_s'], ',.1f', ' s')}",
             f"  mean tokens/s      {fmt(s['mean_tokens_per_s'], ',.0f')} (steps after the first {WARMUP_STEPS})"]
    if target is not None:
        reached = (f"at step {s['target_step']:,} ({fmt(s['target_tokens'], ',')} tokens)"
                   if s["target_step"] is not None else "not reached")
        lines.append(f"  val loss ≤ {target:g}    {reached}")
    return lines


def _series(run: Run, key: str, skip_warmup: bool = False) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in run.records:
        if skip_warmup and int(r["step"]) < WARMUP_STEPS:
            continue
        v = _num(r, key)
        if v is not None:
            xs.append(int(r["step"]) + 1)
            ys.append(v)
    return xs, ys


def _style(ax, title: str, ylabel: str, log: bool = False) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, MaxNLocator, ScalarFormatter

    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.35)
    if log:
        ax.set_yscale("log")
        # Losses span about a decade: plain numbers on extra ticks read better than 10^x labels.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)))
        formatter = ScalarFormatter()
        formatter.set_scientific(False)
        ax.yaxis.set_major_formatter(formatter)
        ax.yaxis.set_minor_formatter(plt.NullFormatter())


def _figure(title: str, ylabel: str, log: bool = False):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    _style(ax, title, ylabel, log)
    return fig, ax


def _save(fig, path: Path, legend: bool = True) -> Path:
    import matplotlib.pyplot as plt

    ax = fig.axes[0]
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def plot_loss(runs: list[Run], out: Path, target: float | None) -> Path:
    """Whole run on a log scale (left) and the second half on a linear scale (right), where runs differ."""
    import matplotlib.pyplot as plt

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(14, 5.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    _style(full, "Loss", "cross-entropy (nats/token, log scale)", log=True)
    _style(zoom, "Loss, second half", "cross-entropy (nats/token)")
    last = max(int(r["step"]) + 1 for run in runs for r in run.records)
    zoom_ys: list[float] = []
    for i, (run, color) in enumerate(zip(runs, _colors(len(runs)))):
        xs, ys = _series(run, "loss")
        vx, vy = _series(run, "val_loss")
        # Distinct markers keep a run's val points visible when another run's lie exactly on top.
        marker = MARKERS[i % len(MARKERS)]
        for ax in (full, zoom):
            ax.plot(xs, ys, color=color, lw=1.0, alpha=0.75, label=f"{run.label} train")
            if vx:
                ax.plot(vx, vy, color=color, lw=1.6, ls="--", marker=marker, ms=6, mfc="none", mew=1.5,
                        label=f"{run.label} val")
        zoom_ys += [y for x, y in zip(xs + vx, ys + vy) if x > last / 2]
    if target is not None:
        for ax in (full, zoom):
            ax.axhline(target, color="black", lw=1.0, ls=":", label=f"target {target:g}")
        zoom_ys.append(target)
    zoom.set_xlim(last / 2, last * 1.01)
    if zoom_ys:
        lo, hi = min(zoom_ys), max(zoom_ys)
        pad = 0.05 * (hi - lo or 1.0)
        zoom.set_ylim(lo - pad, hi + pad)
    full.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metric(runs: list[Run], out: Path, key: str, title: str, ylabel: str, log: bool = False,
                skip_warmup: bool = False) -> Path | None:
    series = [(run, *_series(run, key, skip_warmup)) for run in runs]
    if not any(xs for _, xs, _ in series):
        return None
    fig, ax = _figure(title, ylabel, log=log and all(y > 0 for _, _, ys in series for y in ys))
    for (run, xs, ys), color in zip(series, _colors(len(runs))):
        if xs:
            ax.plot(xs, ys, color=color, lw=1.2, label=run.label)
    if key == "tokens_per_s":
        # Each run's time-weighted mean (the summary's figure), on an axis from 0 so ratios read true.
        for (run, xs, _), color in zip(series, _colors(len(runs))):
            mean = summarize(run.records)["mean_tokens_per_s"]
            if xs and mean is not None:
                ax.axhline(mean, color=color, lw=1.0, ls="--", label=f"{run.label} mean {mean:,.0f}")
        ax.set_ylim(bottom=0)
    return _save(fig, out / f"{key}.png")


def _diagnostic(run: Run, key: str) -> dict[str, tuple[list[int], list[float]]]:
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in run.records:
        d = r.get(key)
        if not isinstance(d, dict):
            continue
        for name, v in d.items():
            if is_finite_number(v):
                xs, ys = curves.setdefault(name, ([], []))
                xs.append(int(r["step"]) + 1)
                ys.append(float(v))
    return curves


def plot_diagnostic(runs: list[Run], out: Path, key: str) -> Path | None:
    """One panel per run that logged `key`, one line per entry (parameter or group) of the dict."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(run, c) for run in runs if (c := _diagnostic(run, key))]
    if not panels:
        return None
    n_lines = max(len(c) for _, c in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels) + 3, 5.5), dpi=110, squeeze=False,
                             sharey=True)
    for ax, (run, curves) in zip(axes[0], panels):
        cmap = plt.get_cmap("viridis" if n_lines > 10 else "tab10")
        for i, (name, (xs, ys)) in enumerate(curves.items()):
            color = cmap(i / max(1, n_lines - 1)) if n_lines > 10 else cmap(i % 10)
            ax.plot(xs, ys, lw=1.0, color=color, label=name)
        ax.set_title(run.label)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        if all(y > 0 for xs_ys in curves.values() for y in xs_ys[1]):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.35)
    axes[0][0].set_ylabel(DIAGNOSTICS[key])
    fig.suptitle(DIAGNOSTICS[key].capitalize())
    # Many entries (one per parameter) would cover the curves: the legend goes to the right.
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="x-small",
                       ncol=1 if n_lines <= 24 else 2)
    fig.tight_layout()
    path = out / f"{key}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(runs: list[Run], out: Path, target: float | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_loss(runs, out, target),
             plot_metric(runs, out, "lr", "Learning rate", "learning rate"),
             plot_metric(runs, out, "grad_norm", "Gradient norm (before clipping)", "global L2 norm (log scale)",
                         log=True),
             plot_metric(runs, out, "tokens_per_s", f"Throughput (first {WARMUP_STEPS} steps, with compilation, "
                         f"left out)", "tokens / s", skip_warmup=True)]
    paths += [plot_diagnostic(runs, out, key) for key in DIAGNOSTICS]
    return [p for p in paths if p is not None]


def write_run_report(run_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """The plots of one run into its own folder (what `python -m common.report RUN_DIR` writes), and a line
    naming them; the trainers call it when a run ends. A report that cannot be made (no matplotlib, a full
    disk, unreadable records) is one warning on stderr, never an error: the run it describes is complete."""
    try:
        paths = write_plots([load_run(run_dir)], Path(run_dir))
    except Exception as e:  # whatever plotting raises: the trained run is already saved
        print(f"warning: {run_dir}: no report written ({type(e).__name__}: {e})", file=sys.stderr)
        return []
    log("report: " + ", ".join(str(p) for p in paths))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m common.report", description="Plot and summarize training runs from their metrics.jsonl.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder holding metrics.jsonl, or a metrics.jsonl path")
    p.add_argument("--out", help="folder for the PNGs (default: the run's folder for one run, ./report for several)")
    p.add_argument("--target", type=float, help="val loss to draw as a line and report the first step reaching it")
    p.add_argument("--labels", help="comma-separated legend labels, one per RUN (default: '<backend> <folder>')")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.target is not None and not math.isfinite(args.target):  # nan would match no step, inf no plot
            raise UsageError(f"--target must be a finite val loss, got {args.target}")
        labels: list[str | None] = [None] * len(args.runs)
        if args.labels is not None:
            labels = [s.strip() for s in args.labels.split(",")]
            if len(labels) != len(args.runs):
                raise ReportError(f"--labels: {len(labels)} label(s) for {len(args.runs)} run(s)")
            if "" in labels:
                raise ReportError(f"--labels: label {labels.index('') + 1} is empty")
        runs = [load_run(r, lab) for r, lab in zip(args.runs, labels)]
        out = Path(args.out) if args.out else (runs[0].path.parent if len(runs) == 1 else Path("report"))
        for run in runs:
            print("\n".join(summary_lines(run, args.target)))
        paths = write_plots(runs, out, args.target)
    except (RecordsError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that cannot be created or written
        print(f"error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
