"""The parity section of `python -m parity.gpu`: `parity.check` on the device in fp32 and bf16, judged for the GPU.

Each dtype runs the parity.check command line in its own process (both at once on a GPU: the parity model is tiny)
with `--run.device` set, and writes parity.check's JSON report; this module judges that report against
GPU_TOLERANCES. parity.check's own verdict uses its CPU tolerances (measured with every op aligned on the
CPU) and is recorded beside ours.

Full precision on both sides: parity.check turns TF32 off in torch, and JAX's matmul precision is pinned
to "highest" for the whole check process here (a thread-local setting, which the trainers' own global
precision choice made while building the JAX runtime cannot undo), for fp32 and for the fp32 parts of bf16.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parity.gpu_options import ROOT, Options, child_env
from parity.gpu_sections import model_config, say


@dataclass(frozen=True)
class GpuTolerances:
    """The fields of parity.check's Tolerances, for a CUDA device."""
    logits: float  # step-0 logits, max abs
    loss: float  # per-step loss, abs
    grad_norm: float  # per-step pre-clip global grad norm, relative
    grads: float  # per-tensor gradient at step 0, relative L2
    params: float  # ‖θ_torch − θ_jax‖ / ‖θ_torch − θ_0‖ at the end
    moments: float  # AdamW m and v at the end, relative L2


# fp32, TF32 off on both sides: both compute in IEEE fp32, but with kernels whose reduction orders cannot be
# aligned op by op as on the CPU (cuBLAS vs XLA's GEMMs, fused softmax/LayerNorm reductions, atomics in
# torch's embedding backward), so the envelope is fp32 rounding noise, about 1e-6 on the loss. TF32 on
# either side (a 10-bit mantissa, ~5e-4 relative per product) moves step-0 logits and gradients by ~1e-3:
# logits, loss and step-0 gradients at 1e-4 sit between the two and catch it. Parameters and AdamW moments
# are compared after 50 steps, where Adam turns gradients that are zero in exact arithmetic (the attention
# key bias) into lr-sized steps of rounding noise, different on each side: 1e-2, the CPU's bf16 bound.
# bf16: autocast on both sides (bf16 matmul inputs, fp32 accumulation, softmax/LayerNorm/loss in fp32);
# torch's attention is SDPA's flash kernel, JAX's is its own: differences are bf16 rounding (2^-8 relative)
# of the activations. The loss bound is the project's bf16 target, 5e-3; the rest are parity.check's CPU bf16 bounds,
# parameters and moments at 5e-2 for the same Adam-noise reason as fp32.
GPU_TOLERANCES = {
    "fp32": GpuTolerances(logits=1e-4, loss=1e-4, grad_norm=1e-3, grads=1e-4, params=1e-2, moments=1e-2),
    "bf16": GpuTolerances(logits=5e-2, loss=5e-3, grad_norm=1e-1, grads=2e-1, params=5e-2, moments=5e-2),
}
LR_REL = 1e-6  # the lr schedule is the same table on both sides


def judge(report: dict[str, Any], tol: GpuTolerances) -> tuple[dict[str, float], list[str]]:
    """The worst value of each quantity in a parity.check JSON report, and what exceeds `tol`."""
    steps = report["steps"]
    worst = {"logits": report["logits_max_abs"],
             "loss": max(r["loss_abs_diff"] for r in steps),
             "grad_norm": max(r["grad_norm_rel_diff"] for r in steps),
             "grads": max(report["grads_step0"].values()),
             "params": report["params_rel"],
             "moments": max(report["moments_rel"].values()),
             "lr": max(r["lr_rel_diff"] for r in steps)}
    limits = {**asdict(tol), "lr": LR_REL}
    failures = []
    for name, value in worst.items():
        if not value <= limits[name]:  # also NaN
            where = ""
            if name in ("loss", "grad_norm", "lr"):
                key = {"loss": "loss_abs_diff", "grad_norm": "grad_norm_rel_diff", "lr": "lr_rel_diff"}[name]
                first = next(r["step"] for r in steps if not r[key] <= limits[name])
                where = f" (first at step {first})"
            failures.append(f"{name} {value:.3e} > {limits[name]:.0e}{where}")
    return worst, failures


def check_command(opts: Options, dtype: str, json_path: Path) -> list[str]:
    return [sys.executable, "-m", "parity.gpu_parity", "--steps", str(opts.parity_steps), "--dtype", dtype,
            "--json", str(json_path), "--run.device", opts.device, "--data.dir", opts.data_dir]


def section_parity(opts: Options, work: Path) -> dict[str, Any]:
    from common.loop import ensure_data

    ensure_data(model_config(opts), say)  # once, before two processes would both prepare it
    procs = {}
    for dtype in GPU_TOLERANCES:
        log = open(opts.out / "logs" / f"parity-{dtype}.log", "w")
        json_path = work / f"parity-{dtype}.json"
        say(f"{dtype}: python -m parity.check --steps {opts.parity_steps} --dtype {dtype} --run.device "
            f"{opts.device} (log: logs/parity-{dtype}.log)")
        proc = subprocess.Popen(check_command(opts, dtype, json_path), cwd=ROOT, env=child_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        if opts.device == "cpu":  # on the CPU, two processes would only share the same cores: one at a time
            proc.wait()
        procs[dtype] = (proc, log, json_path)
    results, failures = {}, []
    for dtype, (proc, log, json_path) in procs.items():
        code = proc.wait()
        log.close()
        lines = (opts.out / "logs" / f"parity-{dtype}.log").read_text().splitlines()
        for line in lines[-3:]:
            say(f"{dtype}: {line}")
        if code not in (0, 1) or not json_path.exists():
            failures.append(f"parity.check {dtype} exited {code} without a report")
            results[dtype] = {"exit_code": code}
            continue
        report = json.loads(json_path.read_text())
        tol = GPU_TOLERANCES[dtype]
        worst, bad = judge(report, tol)
        failures += [f"{dtype}: {b}" for b in bad]
        if opts.dry_run and not report["passed"]:  # on the CPU, parity.check's own (tighter) bounds hold too
            failures.append(f"{dtype}: parity.check's CPU tolerances failed: {report['failures'][:2]}")
        results[dtype] = {"exit_code": code, "worst": worst, "tolerances": asdict(tol), "passed": not bad,
                          "cpu_tolerances": report["tolerances"], "cpu_tolerances_passed": report["passed"],
                          "steps": len(report["steps"]),
                          "loss_first_last": [report["steps"][0]["loss_torch"], report["steps"][-1]["loss_torch"]]}
        say(f"{dtype}: worst " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
            + f" -> {'PASS' if not bad else 'FAIL'} against the GPU tolerances")
    return {"dtypes": results, "jax_matmul_precision": "highest (pinned for the whole check process)",
            "torch_tf32": False, "passed": not failures, "failures": failures}


def main(argv: list[str]) -> int:
    """parity.check's command line with JAX's matmul precision pinned to "highest" in this thread."""
    import jax

    with jax.default_matmul_precision("highest"):
        from parity.check import main as check_main
        return check_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
