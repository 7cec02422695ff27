"""`python -m parity.check`: train PyTorch and JAX from one init on the same batches, compare every step.

One initialization (common.names.init_weights: both backends draw the same arrays from the seed), the
same batches from the shared loader, the same config. Per step: loss (abs diff), pre-clip grad
norm (relative diff) and lr; at step 0 the logits and every tensor's gradient; at the end every
parameter (relative to how far it moved) and AdamW's moments. Tolerances are in `TOLERANCES`, chosen
from the measured aligned envelope (docs/parity.md). Exit 0 when all agree, 1 otherwise, naming the
first diverging step and quantity and, at that step, the per-tensor gradient and parameter diffs.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("parity.check")

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.usage import InputError, Parser
from common.config import ConfigError, validate
from common.config_files import apply_overrides, load_toml, parse_overrides, resolve_config_path
from common.data import DataLoader
from common.loop import ensure_data
from common.outdir import output_file, write_output
from parity.compare import (TOLERANCES, Pair, Tolerances, global_rel, load_backends, make_loader, max_abs,
                            start_pair, tensor_diffs, update_rel, worst)
from parity.suite import run_suite


def replay(cfg, steps: int, backends=None) -> tuple[Pair, DataLoader]:
    """Both backends after `steps` steps: runs are deterministic, so a replay reaches the same states."""
    pair, loader = start_pair(cfg, backends), make_loader(cfg)
    for _ in range(steps):
        x, y = loader.next_step()
        pair.ts, _ = pair.tb.train_step(pair.ts, x, y)
        pair.js, _ = pair.jb.train_step(pair.js, x, y)
    return pair, loader


def divergence_detail(cfg, step: int, backends=None) -> dict[str, Any]:
    """Per-tensor gradient and parameter diffs at the start of `step`, to point at the first bad layer."""
    pair, loader = replay(cfg, step, backends)
    x, y = loader.next_step()
    gt, gj = pair.tb.grads(pair.ts, x, y), pair.jb.grads(pair.js, x, y)
    wt, wj = pair.tb.to_common(pair.ts), pair.jb.to_common(pair.js)
    return {"step": step, "grads": tensor_diffs(gt, gj), "params": max_abs(wt, wj)}


def run_check(cfg, steps: int, tol: Tolerances, log: Callable[[str], None] = print,
              backends=None) -> dict[str, Any]:
    backends = backends or load_backends()
    pair, loader = start_pair(cfg, backends), make_loader(cfg)
    failures: list[dict[str, Any]] = []

    def check(step: int, quantity: str, value: float, limit: float) -> None:
        if not value <= limit:  # also catches NaN
            failures.append({"step": step, "quantity": quantity, "value": value, "tolerance": limit})

    report: dict[str, Any] = {"config": cfg.to_dict(), "dtype": cfg.run.dtype, "steps": [],
                              "tolerances": dataclasses.asdict(tol)}
    x, y = loader.micro_batch(0, 0)
    lt, lj = pair.tb.logits(pair.ts, x), pair.jb.logits(pair.js, x)
    report["logits_max_abs"] = float(np.max(np.abs(np.asarray(lt, np.float64) - np.asarray(lj, np.float64))))
    check(0, "logits (max abs)", report["logits_max_abs"], tol.logits)
    xs, ys = loader.step_batch(0)
    g0 = tensor_diffs(pair.tb.grads(pair.ts, xs, ys), pair.jb.grads(pair.js, xs, ys))
    report["grads_step0"] = g0
    for name, d in g0.items():
        check(0, f"gradient {name} (rel L2)", d, tol.grads)
    log(f"step 0: logits max |Δ| {report['logits_max_abs']:.2e}; worst gradient rel Δ "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst(g0, 3)))

    header = f"{'step':>5} {'lr':>9} {'loss torch':>11} {'loss jax':>11} {'|Δ|':>8} " \
             f"{'norm torch':>11} {'norm jax':>11} {'rel Δ':>8}"
    log(header)
    for step in range(steps):
        x, y = loader.next_step()
        pair.ts, mt = pair.tb.train_step(pair.ts, x, y)
        pair.js, mj = pair.jb.train_step(pair.js, x, y)
        row = {"step": step, "lr_torch": float(mt["lr"]), "lr_jax": float(mj["lr"]),
               "loss_torch": float(mt["loss"]), "loss_jax": float(mj["loss"]),
               "grad_norm_torch": float(mt["grad_norm"]), "grad_norm_jax": float(mj["grad_norm"])}
        row["loss_abs_diff"] = abs(row["loss_torch"] - row["loss_jax"])
        row["grad_norm_rel_diff"] = abs(row["grad_norm_torch"] - row["grad_norm_jax"]) / abs(row["grad_norm_torch"])
        row["lr_rel_diff"] = abs(row["lr_torch"] - row["lr_jax"]) / row["lr_torch"]
        report["steps"].append(row)
        log(f"{step:>5} {row['lr_torch']:>9.3e} {row['loss_torch']:>11.6f} {row['loss_jax']:>11.6f} "
            f"{row['loss_abs_diff']:>8.1e} {row['grad_norm_torch']:>11.6f} {row['grad_norm_jax']:>11.6f} "
            f"{row['grad_norm_rel_diff']:>8.1e}")
        check(step, "loss (abs)", row["loss_abs_diff"], tol.loss)
        check(step, "grad norm (rel)", row["grad_norm_rel_diff"], tol.grad_norm)
        check(step, "lr (rel)", row["lr_rel_diff"], 1e-6)

    wt, wj = pair.tb.to_common(pair.ts), pair.jb.to_common(pair.js)
    report["params_max_abs"] = max_abs(wt, wj)
    report["params_rel"] = update_rel(wt, wj, pair.init)
    check(steps, "parameters ‖θ_torch − θ_jax‖ / ‖θ_torch − θ₀‖", report["params_rel"], tol.params)
    mt_, mj_ = pair.tb.optimizer_moments(pair.ts), pair.jb.optimizer_moments(pair.js)
    report["moments_max_abs"] = {kind: max_abs(mt_[kind], mj_[kind]) for kind in ("m", "v")}
    report["moments_rel"] = {kind: global_rel(mt_[kind], mj_[kind], mt_[kind]) for kind in ("m", "v")}
    for kind, d in report["moments_rel"].items():
        check(steps, f"AdamW {kind} (rel L2)", d, tol.moments)
    log(f"after {steps} steps: parameters ‖Δθ‖/‖θ−θ₀‖ = {report['params_rel']:.2e}; max |Δ| per tensor, worst five: "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst(report["params_max_abs"])))
    for kind in ("m", "v"):
        log(f"AdamW {kind}: rel L2 {report['moments_rel'][kind]:.2e}; max |Δ|, worst three: "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst(report["moments_max_abs"][kind], 3)))
    report["max"] = {
        "loss_abs_diff": max((r["loss_abs_diff"] for r in report["steps"]), default=0.0),
        "grad_norm_rel_diff": max((r["grad_norm_rel_diff"] for r in report["steps"]), default=0.0),
        "params_rel": report["params_rel"], "grads_step0_rel": max(g0.values()),
    }
    report["passed"] = not failures
    report["failures"] = failures
    if failures:
        first = min(failures, key=lambda f: f["step"])
        report["first_failure"] = first
        if first["step"] < steps:
            report["first_failure"]["detail"] = divergence_detail(cfg, first["step"], backends)
    return report


def print_verdict(report: dict[str, Any], log: Callable[[str], None] = print) -> None:
    m = report["max"]
    log(f"max |Δloss| {m['loss_abs_diff']:.2e}, max grad-norm rel Δ {m['grad_norm_rel_diff']:.2e}, "
        f"step-0 logits {report['logits_max_abs']:.2e}, worst param {m['params_rel']:.2e} "
        f"(tolerances: {report['tolerances']})")
    if report["passed"]:
        log(f"PASS: PyTorch and JAX agree over {len(report['steps'])} steps ({report['dtype']})")
        return
    f = report["first_failure"]
    log(f"FAIL at step {f['step']}: {f['quantity']} = {f['value']:.3e} > {f['tolerance']:.1e} "
        f"({len(report['failures'])} checks failed in all)")
    detail = f.get("detail")
    if detail:
        log(f"at the start of step {detail['step']}, gradients (rel L2), worst five: "
            + ", ".join(f"{k} {v:.2e}" for k, v in worst(detail["grads"])))
        log("parameters, max |Δ|, worst five: " + ", ".join(f"{k} {v:.2e}" for k, v in worst(detail["params"])))
        first_bad = [k for k, v in detail["grads"].items() if v > report["tolerances"]["grads"]]
        if first_bad:
            log(f"first tensor (in model order) whose gradient disagrees: {first_bad[0]}")


# Fields the check sets itself; an override of one would be silently replaced, so it is refused.
SET_BY_CHECK = {"run.dtype": "use --dtype", "run.compile": "the check runs eager", "run.devices": "one device",
                "optim.max_steps": "use --steps"}


def build_config(args: argparse.Namespace, overrides: list[str]):
    cfg = load_toml(resolve_config_path(args.config))
    for name, _ in parse_overrides(cfg, overrides):
        if name in SET_BY_CHECK:
            raise ConfigError(f"--{name}: parity.check sets it ({SET_BY_CHECK[name]})")
    cfg = apply_overrides(cfg, overrides)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=max(args.steps, 1)),
                              run=dataclasses.replace(cfg.run, dtype=args.dtype, compile=False, devices=1))
    if cfg.optim.warmup_steps > cfg.optim.max_steps:
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=cfg.optim.max_steps))
    return validate(cfg)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m parity.check", description=__doc__.splitlines()[0],
               epilog="Config fields can be overridden: --model.n_layer 3 ...")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps to compare (also sets optim.max_steps)")
    p.add_argument("--config", default="parity", help="preset name or TOML path (default: configs/parity.toml)")
    p.add_argument("--dtype", choices=sorted(TOLERANCES), default="fp32")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--suite", action="store_true",
                   help="also check accumulation on/off, 1 vs 2 replicas (ddp and fsdp) and checkpoint round trips")
    try:
        args, overrides = p.parse_known_args(argv)
        if args.steps < 1:
            raise ConfigError(f"--steps must be ≥ 1, got {args.steps}")
        if args.json:
            output_file(args.json, "--json")
        cfg = build_config(args, overrides)
        ensure_data(cfg, print)
        report = run_check(cfg, args.steps, TOLERANCES[args.dtype])
        print_verdict(report)
        if args.suite:
            report["suite"] = run_suite(cfg, TOLERANCES[args.dtype])
            report["passed"] = report["passed"] and all(c["passed"] for c in report["suite"])
        if args.json:
            write_output(args.json, json.dumps(report, indent=1, default=float) + "\n")
            print(f"report written to {args.json}")
        return 0 if report["passed"] else 1
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
