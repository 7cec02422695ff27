"""`python -m parity.bench --vs-plain`: each backend against the plain step a user would write first in its framework.

Our torch and JAX steps and their plain baselines (bench/plain_torch.py, bench/plain_jax.py) run as
bench.pairwise workers in the same interleaved rounds, from the same weights, on the same batches and
under the same allocator settings. A backend's speed-up is the median over rounds of its tokens/s over
its plain baseline's in the same round, with the spread (smallest and largest) of those ratios: an
optimisation that does not beat the plain step on the machine at hand buys nothing there. First steps
are cold: an empty JAX compilation cache and an empty inductor cache for the bench run.
"""
from __future__ import annotations

import tempfile
from typing import Any, Mapping, Sequence

from bench.pairwise import bench, config_line, levers_lines, ratio_summary, same_round_ratios
from bench.trainee import BACKENDS, PLAIN
from common.config import Config, ConfigError
from common.levers import usable_cpus

LABELS = {"torch": "torch", "jax": "JAX", "plain_torch": "plain torch", "plain_jax": "plain JAX"}


def workers_for(backends: Sequence[str]) -> tuple[str, ...]:
    """The backends, then each one's plain baseline."""
    return tuple(backends) + tuple(PLAIN[b] for b in backends)


def check_config(cfg: Config) -> None:
    """The plain baselines are the fp32 step without dropout, so a comparison needs the same run."""
    if cfg.run.dtype != "fp32":
        raise ConfigError(f"--vs-plain: the plain baselines run fp32 only, got dtype {cfg.run.dtype}")
    if cfg.model.dropout != 0:
        raise ConfigError(f"--vs-plain: the plain baselines have no dropout, got model.dropout {cfg.model.dropout}")


def vs_plain(cfg: Config, rounds: int, window: int, warmup: int, pin: str | None = None,
             backends: Sequence[str] = BACKENDS, extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """bench.pairwise.bench() of the backends and their plain baselines, with each backend's speed-up."""
    check_config(cfg)
    with tempfile.TemporaryDirectory(prefix="parity-bench-inductor-") as inductor:
        env = {**(extra_env or {}), "TORCHINDUCTOR_CACHE_DIR": inductor}
        report = bench(cfg, rounds, window, warmup, pin, workers_for(backends), env)
    figures = report["backends"]
    report["speedup_over_plain"] = {
        b: ratio_summary(same_round_ratios(figures[b]["windows"], figures[PLAIN[b]]["windows"])) for b in backends}
    if "jax_over_torch" in report:
        report["jax_over_torch_spread"] = ratio_summary(report["jax_over_torch_rounds"])
    report["usable_cpus"] = usable_cpus()
    return report


def _spread(s: dict[str, Any]) -> str:
    return f"{s['min']:.2f}–{s['max']:.2f}"


def format_vs_plain(report: dict[str, Any], allocator_note: str) -> str:
    where = (f"pinned to CPU {report['pinned_cpu']} (taskset)" if report["pinned_cpu"] is not None
             else f"on all {report['usable_cpus']} usable CPUs")
    lines = [config_line(report), f"workers {where}; allocator: {allocator_note}", "",
             "| worker | tok/s (median) | ms/step | first step s, cold (warm cache) | peak RSS MB |",
             "|---|---|---|---|---|"]
    for name, r in report["backends"].items():
        warm = r.get("warm_first_step_s")
        first = f"{r['first_step_s']:.2f}" + ("" if warm is None else f" ({warm:.2f})")
        lines.append(f"| {LABELS[name]} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {first} | "
                     f"{r['peak_rss_mb']:,.0f} |")
    lines += ["", "| backend | speed-up over its plain baseline (median of same-round ratios) | spread (min–max) |",
              "|---|---|---|"]
    for name, s in report["speedup_over_plain"].items():
        lines.append(f"| {LABELS[name]} | {s['median']:.2f}× | {_spread(s)} |")
    if "jax_over_torch" in report:
        lines.append(f"JAX / PyTorch tokens/s: {report['jax_over_torch']:.2f} (median of same-round ratios; "
                     f"spread {_spread(report['jax_over_torch_spread'])})")
    return "\n".join(lines + [""] + levers_lines(report))
