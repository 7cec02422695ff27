"""Training throughput of several workers on the same config and the same batches, in interleaved rounds.

Each worker (bench.trainee: one of our backends or a plain baseline) runs in its own process, so peak
memory is its own and no framework's thread pools disturb another's; all start from the same common
weights and read the same batches from the shared loader. After the first (compile) step and warm-up the
parent asks the workers for timed windows in turn, round by round, so a slow spell of a noisy machine
hits all of them alike, and compares them by the ratio within each round.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench.trainee import BACKENDS, TRAINEES
from bench.workers import Worker, module_command
from common.benchtiming import shaped_config
from common.config import Config, ConfigError, dump_toml, validate
from common.plan import flops_per_token



def bench_config(config: str, shape: str, overrides: Sequence[str], dtype: str | None, compile: bool | None,
                 total_steps: int) -> Config:
    """The config a bench runs: the preset, then the shape, then the user's overrides (so they win)."""
    cfg = shaped_config(config, shape, overrides=overrides)
    run = dataclasses.replace(cfg.run, dtype=dtype or cfg.run.dtype,
                              compile=cfg.run.compile if compile is None else compile, devices=1)
    # The LR schedule has to cover every step the workers take.
    optim = dataclasses.replace(cfg.optim, max_steps=max(cfg.optim.max_steps, total_steps))
    return validate(dataclasses.replace(cfg, run=run, optim=optim))


def parse_backends(text: str) -> tuple[str, ...]:
    backends = tuple(b.strip() for b in text.split(",") if b.strip())
    if not backends or any(b not in BACKENDS for b in backends):
        raise ConfigError(f"--backends: expected a subset of {','.join(BACKENDS)}, got '{text}'")
    return backends


def start_worker(name: str, cfg_path: Path, weights_path: Path | None, pin: str | None,
                 extra_env: Mapping[str, str] | None = None) -> Worker:
    args = [name, "--config", cfg_path] + (["--weights", weights_path] if weights_path else [])
    return Worker(name, module_command("bench.trainee", args, pin), extra_env)


def same_round_ratios(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> list[float]:
    """Tokens/s of the numerator's worker over the denominator's, round by round, from their window seconds.

    Both windows of a round hold the same number of steps of the same tokens, so the throughput ratio
    is the inverse ratio of the seconds; pairing by round cancels what the machine did in that round.
    """
    if len(numerator_s) != len(denominator_s) or not numerator_s:
        raise ValueError("same-round ratios need the same, non-zero number of windows on both sides")
    return [d / n for n, d in zip(numerator_s, denominator_s)]


def ratio_summary(ratios: Sequence[float]) -> dict[str, Any]:
    """Median of same-round ratios, and their spread (smallest and largest)."""
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": list(ratios)}


def common_init(cfg: Config, path: Path) -> Path:
    """One initialization for every worker: the common GPT-2 init of the run's seed, as in parity.check."""
    import numpy as np

    from common.names import init_weights

    np.savez(path, **init_weights(cfg.model, cfg.run.seed))
    return path


def bench(cfg: Config, rounds: int, window: int, warmup: int, pin: str | None = None,
          backends: Sequence[str] = BACKENDS, extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Interleaved timed windows of every worker in `backends` (names of bench.trainee.TRAINEES)."""
    if any(name not in TRAINEES for name in backends):
        raise ValueError(f"unknown workers in {backends}")
    tokens_per_step = cfg.optim.total_batch_size
    flops_tok = flops_per_token(cfg.model)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        cfg_path = Path(tmp) / "config.toml"
        cfg_path.write_text(dump_toml(cfg))
        # An empty JAX compilation cache, so JAX's first step is the cold compile a new user sees; a
        # second JAX worker started on the filled cache afterwards gives the warm (second run) figure.
        env = {**(extra_env or {}), "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax-cache")}
        weights_path = common_init(cfg, Path(tmp) / "init.npz") if set(backends) != {"jax"} else None
        workers: dict[str, Worker] = {}
        try:
            for name in backends:  # started one after the other so compile times are not contended
                t0 = time.perf_counter()
                workers[name] = start_worker(name, cfg_path, weights_path, pin, env)
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
                warm = workers["jax-warm"] = start_worker("jax", cfg_path, weights_path, pin, env)
                results["jax"]["warm_first_step_s"] = warm.read()["first_step_s"]
                warm.close()
        finally:
            for w in workers.values():
                w.kill()
    for r in results.values():
        tok_s = [tokens_per_step * window / s for s in r["windows"]]
        r["tokens_per_s"] = statistics.median(tok_s)
        r["tokens_per_s_windows"] = tok_s
        r["ms_per_step"] = statistics.median(s * 1e3 / window for s in r["windows"])
        r["mfu"] = flops_tok * r["tokens_per_s"] / r["peak_flops"]
        r["loader_ms_per_step"] = statistics.median(s * 1e3 / window for s in r["loader_windows"])
        r["loader_share"] = sum(r["loader_windows"]) / sum(r["windows"])
    report = {"config": cfg.to_dict(), "rounds": rounds, "window_steps": window, "warmup_steps": warmup,
              "pinned_cpu": pin, "flops_per_token": flops_tok, "backends": results}
    if {"torch", "jax"} <= results.keys():
        ratios = same_round_ratios(results["jax"]["windows"], results["torch"]["windows"])
        report["jax_over_torch"] = statistics.median(ratios)  # same-round ratio of tokens/s
        report["jax_over_torch_rounds"] = ratios
    return report


def config_line(report: dict[str, Any]) -> str:
    c = report["config"]
    m, o = c["model"], c["optim"]
    return (f"config: L{m['n_layer']} H{m['n_head']} C{m['n_embd']} T{m['block_size']} B{o['micro_batch_size']} "
            f"vocab {m['padded_vocab_size']}, {o['total_batch_size']} tokens/step, dtype {c['run']['dtype']}, "
            f"compile {c['run']['compile']}; {report['rounds']} rounds × {report['window_steps']} steps"
            + (f", pinned to CPU {report['pinned_cpu']}" if report["pinned_cpu"] is not None else ""))


def format_table(report: dict[str, Any]) -> str:
    lines = [config_line(report),
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
