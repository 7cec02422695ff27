"""Training throughput of several workers on the same config and the same batches, in interleaved rounds.

Each worker (bench.trainee: one of our backends or a plain baseline) runs in its own process, so peak
memory is its own and no framework's thread pools disturb another's; all start from the same common
weights and read the same batches from the shared loader. After the first (compile) step and warm-up the
parent asks the workers for timed windows in turn, round by round, so a slow spell of a noisy machine
hits all of them alike, and compares them by the ratio within each round.

With `parallel` (`parity.bench --parallel fsdp`), each backend runs once per run.parallel on `devices`
data-parallel replicas: torch as that many gloo ranks under torchrun, JAX on that many XLA host devices
in one process; the report compares fsdp with ddp within each round.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench.trainee import BACKENDS, TRAINEES
from bench.workers import Worker, module_command
from common.benchtiming import shaped_config
from common.config import Config, ConfigError, validate
from common.config_files import dump_toml
from common.plan import flops_per_token



def bench_config(config: str, shape: str, overrides: Sequence[str], dtype: str | None, compile: bool | None,
                 total_steps: int, devices: int = 1) -> Config:
    """The config a bench runs on `devices` replicas: the preset, then the shape (one micro-step per replica),
    then the user's overrides (so they win)."""
    cfg = shaped_config(config, shape, replicas=devices, overrides=overrides)
    run = dataclasses.replace(cfg.run, dtype=dtype or cfg.run.dtype,
                              compile=cfg.run.compile if compile is None else compile, devices=devices)
    # The LR schedule has to cover every step the workers take.
    optim = dataclasses.replace(cfg.optim, max_steps=max(cfg.optim.max_steps, total_steps))
    return validate(dataclasses.replace(cfg, run=run, optim=optim), devices)


def parse_backends(text: str, allowed: Sequence[str] = BACKENDS) -> tuple[str, ...]:
    backends = tuple(b.strip() for b in text.split(",") if b.strip())
    if not backends or any(b not in allowed for b in backends):
        raise ConfigError(f"--backends: expected a subset of {','.join(allowed)}, got '{text}'")
    return backends


def start_worker(name: str, cfg_path: Path, weights_path: Path | None, pin: str | None,
                 extra_env: Mapping[str, str] | None = None, devices: int = 1) -> Worker:
    """bench.trainee NAME on `devices` replicas: torch ranks under torchrun, JAX host devices (XLA_FLAGS, which
    XLA reads when JAX starts)."""
    args = [name, "--config", cfg_path] + (["--weights", weights_path] if weights_path else [])
    launcher, env = None, dict(extra_env or {})
    if devices > 1 and name == "torch":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}"]
    elif devices > 1:
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                  f"--xla_force_host_platform_device_count={devices}"]))
    return Worker(name, module_command("bench.trainee", args, pin, launcher), env)


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
          backends: Sequence[str] = BACKENDS, extra_env: Mapping[str, str] | None = None,
          parallel: Sequence[str] = ()) -> dict[str, Any]:
    """Interleaved timed windows of every worker in `backends` (names of bench.trainee.TRAINEES); with
    `parallel`, of each backend under each of those run.parallel values on cfg.run.devices replicas
    (workers named "torch fsdp" ...)."""
    if any(name not in TRAINEES for name in backends) or (parallel and not set(backends) <= set(BACKENDS)):
        raise ValueError(f"unknown workers in {backends}")
    entrants = {f"{name} {mode}" if parallel else name: (name, mode) for name in backends
                for mode in (parallel or [cfg.run.parallel])}
    tokens_per_step = cfg.optim.total_batch_size
    flops_tok = flops_per_token(cfg.model)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        cfg_paths = {}
        for mode in {mode for _, mode in entrants.values()}:
            cfg_paths[mode] = Path(tmp) / f"config-{mode}.toml"
            cfg_paths[mode].write_text(dump_toml(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run,
                                                                                                  parallel=mode))))
        # An empty JAX compilation cache, so JAX's first step is the cold compile a new user sees; a
        # second JAX worker started on the filled cache afterwards gives the warm (second run) figure.
        env = {**(extra_env or {}), "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax-cache")}
        weights_path = common_init(cfg, Path(tmp) / "init.npz") if set(backends) != {"jax"} else None
        workers: dict[str, Worker] = {}
        try:
            for name, (trainee, mode) in entrants.items():  # one after the other: compile times not contended
                t0 = time.perf_counter()
                workers[name] = start_worker(trainee, cfg_paths[mode], weights_path, pin, env, cfg.run.devices)
                first = workers[name].read()
                # MFU as the trainers give it: against the peak of all the run's replicas.
                results[name] = {"startup_s": time.perf_counter() - t0, "first_step_s": first["first_step_s"],
                                 "peak_flops": first["peak_flops"] and first["peak_flops"] * cfg.run.devices,
                                 "windows": [], "loader_windows": [], "losses": list(first["losses"]),
                                 "levers": first.get("levers", "")}
                if warmup:
                    results[name]["losses"] += workers[name].ask(f"window {warmup}")["losses"]
            for _ in range(rounds):
                for name in entrants:
                    w = workers[name].ask(f"window {window}")
                    results[name]["windows"].append(w["seconds"])
                    results[name]["loader_windows"].append(w["loader_seconds"])
                    results[name]["losses"] += w["losses"]
            for name in entrants:
                results[name]["peak_rss_mb"] = workers[name].close()["peak_rss_mb"]
            if "jax" in entrants:
                warm = workers["jax-warm"] = start_worker("jax", cfg_paths[cfg.run.parallel], weights_path, pin, env)
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
        r["mfu"] = flops_tok * r["tokens_per_s"] / r["peak_flops"] if r["peak_flops"] else None
        r["loader_ms_per_step"] = statistics.median(s * 1e3 / window for s in r["loader_windows"])
        r["loader_share"] = sum(r["loader_windows"]) / sum(r["windows"])
    report = {"config": cfg.to_dict(), "rounds": rounds, "window_steps": window, "warmup_steps": warmup,
              "pinned_cpu": pin, "flops_per_token": flops_tok, "backends": results}
    if {"ddp", "fsdp"} <= set(parallel):
        report["fsdp_over_ddp"] = {name: ratio_summary(same_round_ratios(results[f"{name} fsdp"]["windows"],
                                                                         results[f"{name} ddp"]["windows"]))
                                   for name in backends}
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
            + (f", pinned to CPU {report['pinned_cpu']}" if report["pinned_cpu"] is not None else "")
            + (f"; {c['run']['devices']} replicas each" if c["run"]["devices"] > 1 else ""))


def levers_lines(report: dict[str, Any]) -> list[str]:
    """Each backend worker's levers, as its trainer's run header prints them."""
    return [r["levers"] for r in report["backends"].values() if r.get("levers")]


def format_table(report: dict[str, Any]) -> str:
    lines = [config_line(report),
             "| backend | tok/s (median) | ms/step | MFU | first step (compile) s | start-up s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["backends"].items():
        mfu = f"{100 * r['mfu']:.1f}% (of {r['peak_flops'] / 1e9:.0f} GFLOP/s)" if r["mfu"] is not None else "n/a"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {mfu} | {r['first_step_s']:.2f} | "
                     f"{r['startup_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
    if "jax_over_torch" in report:
        lines.append(f"JAX / PyTorch tokens/s: {report['jax_over_torch']:.2f} (median of same-round ratios "
                     + ", ".join(f"{x:.2f}" for x in report["jax_over_torch_rounds"]) + ")")
    lines += levers_lines(report)
    for name, r in report.get("fsdp_over_ddp", {}).items():
        lines.append(f"{name} fsdp / ddp tokens/s: {r['median']:.2f} (median of same-round ratios "
                     + ", ".join(f"{x:.2f}" for x in r["rounds"]) + ")")
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
