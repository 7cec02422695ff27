"""The train section of `python -m parity.gpu`: the real trainers on the default corpus, for a time budget each.

`python -m torch_impl.train` and `python -m jax_impl.train` run one after the other on GPT-2 124M (bf16,
torch.compile on the GPU) with the bench section's micro-batch and tokens per step, for as many steps as
--train-seconds allows at the step time the bench measured (shortened when the command's --time-limit is
near). No evaluation, checkpoint or samples: the point is the training path end to end. Each run must exit
0 and its training loss must fall: the mean of its last steps at least DROP below its first step's loss
(a fresh GPT-2 starts near ln(50257) ≈ 10.8; in a hundred steps on the corpus it falls by several nats).
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.plan import flops_per_token
from parity.gpu import ROOT, Options, Timer, child_env
from parity.gpu_sections import DRY_SHAPE, MODEL, bf16_peak_flops, earlier, model_config, say

BACKENDS = ("torch", "jax")
DROP = {"gpu": 2.0, "dry": 0.5}  # nats the loss must fall, first step vs the mean of the last steps
MARGIN_S = 20  # left free before the deadline for the report
START_S = {"gpu": 30.0, "dry": 10.0}  # process start and data check, before the first step
MIN_STEPS = {"gpu": 20, "dry": 10}  # enough for the loss to fall by DROP even when time is short
# The first step's compilation, as a share of the bench's cold first step: torch reuses the bench worker's
# inductor and Triton caches, so it mostly loads kernels; JAX's step differs (the lr table is a constant in
# the program, and max_steps differs), so it compiles again in full.
RECOMPILE_SHARE = {"torch": 0.3, "jax": 1.0}
DRY_LR = "3e-3"  # the dry run's 2-layer model learns visibly in a few dozen steps at this peak lr


def step_seconds(opts: Options, name: str, bench: dict[str, Any] | None) -> tuple[float, str]:
    """Expected seconds per optimizer step: the bench's figure, else one from the measured peak at 30% MFU."""
    if bench and name in bench["backends"] and "ms_per_step" in bench["backends"][name]:
        return bench["backends"][name]["ms_per_step"] / 1e3, "bench section"
    peak = bf16_peak_flops(opts)
    cfg = model_config(opts)
    if peak:
        return flops_per_token(cfg.model) * cfg.optim.total_batch_size / (0.3 * peak), "30% of the measured peak"
    return (0.1 if opts.dry_run else 1.0), "a default guess (no bench or peaks result)"


def command(opts: Options, name: str, micro_batch: int, max_steps: int, out_dir: Path) -> list[str]:
    cfg = model_config(opts, micro_batch)
    flags = {"--data.dir": opts.data_dir, "--run.device": opts.device, "--run.dtype": cfg.run.dtype,
             "--run.compile": str(cfg.run.compile).lower(), "--run.devices": "1",
             "--optim.micro_batch_size": str(micro_batch), "--optim.total_batch_size": str(cfg.optim.total_batch_size),
             "--optim.max_steps": str(max_steps), "--optim.warmup_steps": str(max(1, max_steps // 10)),
             "--run.out_dir": str(out_dir), "--run.log_interval": "10", "--run.eval_interval": "0",
             "--run.checkpoint_interval": "0", "--run.sample_interval": "0", "--run.num_samples": "0"}
    if opts.dry_run:
        flags["--optim.max_lr"] = DRY_LR
    return [sys.executable, "-m", f"{name}_impl.train", "--config", MODEL] + \
        [a for kv in flags.items() for a in kv] + (DRY_SHAPE if opts.dry_run else [])


def run_trainer(opts: Options, name: str, cmd: list[str], env: dict[str, str], timeout: float) -> int:
    """Runs one trainer with its output in logs/train-NAME.log and on this section's output; its exit code."""
    with open(opts.out / "logs" / f"train-{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        timer = Timer(timeout, proc.kill)  # the JAX run still gets its turn if the torch run hangs
        for line in proc.stdout:
            log.write(line)
            say(f"{name}: {line.rstrip()}")
        code = proc.wait()
        if timer.cancel():
            say(f"{name}: stopped after {timeout:.0f} s")
        return code


def judge(records: list[dict[str, Any]], drop: float) -> tuple[dict[str, Any], list[str]]:
    losses = [r["loss"] for r in records]
    if not losses:
        return {}, ["no step records"]
    tail = losses[-max(1, min(10, len(losses) // 4)):]
    steady = [r["tokens_per_s"] for r in records if r["step"] >= 2] or [records[-1]["tokens_per_s"]]
    summary = {"steps": len(records), "first_loss": losses[0], "last_loss_mean": statistics.fmean(tail),
               "tokens": records[-1]["tokens"], "train_seconds": records[-1]["elapsed_s"],
               "tokens_per_s": statistics.median(steady)}
    failures = []
    if not summary["last_loss_mean"] <= losses[0] - drop:
        failures.append(f"loss did not fall by {drop} nats: first {losses[0]:.3f}, last "
                        f"{summary['last_loss_mean']:.3f}")
    return summary, failures


def section_train(opts: Options, work: Path) -> dict[str, Any]:
    from common.loop import ensure_data

    ensure_data(model_config(opts), say)
    kind = "dry" if opts.dry_run else "gpu"
    bench = earlier(opts, "bench")
    results: dict[str, Any] = {}
    failures: list[str] = []

    def overhead(name: str) -> float:
        first = (bench or {}).get("backends", {}).get(name, {}).get("first_step_s", START_S[kind])
        return START_S[kind] + RECOMPILE_SHARE[name] * first

    for i, name in enumerate(BACKENDS):
        b_res = (bench or {}).get("backends", {}).get(name, {})
        micro_batch = b_res.get("micro_batch", opts.max_micro_batch)
        step_s, source = step_seconds(opts, name, bench)
        later = BACKENDS[i:]
        left = opts.deadline - time.time() - MARGIN_S - sum(overhead(n) for n in later)
        seconds = max(0.0, min(opts.train_seconds, left / len(later)))
        max_steps = max(MIN_STEPS[kind], int(seconds / step_s))
        out_dir = opts.out / "train" / name
        shutil.rmtree(out_dir, ignore_errors=True)
        caches = b_res.get("caches") or {"TORCHINDUCTOR_CACHE_DIR": str(work / "train" / "inductor"),
                                         "TRITON_CACHE_DIR": str(work / "train" / "triton"),
                                         "JAX_COMPILATION_CACHE_DIR": str(work / "train" / "jax")}
        say(f"{name}: {max_steps} steps of micro-batch {micro_batch} ({seconds:.0f} s at {step_s * 1e3:.0f} ms/step "
            f"from the {source})")
        cmd = command(opts, name, micro_batch, max_steps, out_dir)
        t0 = time.time()
        # Its time-out leaves the later runs what they are planned to need; the last one runs up to the deadline.
        timeout = opts.deadline - time.time() - MARGIN_S / 2 - sum(overhead(n) + seconds for n in later[1:])
        code = run_trainer(opts, name, cmd, caches, max(60.0, timeout))
        res: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_code": code, "max_steps": max_steps,
                               "micro_batch": micro_batch, "wall_s": time.time() - t0, "step_estimate_from": source}
        metrics = out_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        summary, bad = judge(records, DROP[kind])
        res.update(summary)
        if code != 0:
            bad.insert(0, f"exit code {code}")
        failures += [f"{name}: {b}" for b in bad]
        res["losses"] = [round(r["loss"], 4) for r in records]
        results[name] = res
        if summary:
            say(f"{name}: {summary['steps']} steps in {summary['train_seconds']:.0f} s, loss {summary['first_loss']:.3f}"
                f" -> {summary['last_loss_mean']:.3f}, {summary['tokens_per_s']:,.0f} tok/s")
    return {"backends": results, "drop_required": DROP[kind], "passed": not failures, "failures": failures}
