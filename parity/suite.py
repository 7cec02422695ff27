"""`python -m parity.check --suite`: the checks beyond one step-by-step run.

1. Gradient accumulation on/off: 2 micro-steps × B/2 ≡ 1 × B, in each backend and across them.
2. 1 vs 2 data-parallel replicas: torchrun with 2 gloo ranks and JAX with 2 host devices each train
   the same steps as one replica (the loader makes the tokens identical); weights compared after.
3. The same with the 2 replicas sharding parameters, gradients and AdamW's state (run.parallel fsdp:
   torch FSDP2, a JAX fsdp mesh axis), against the same one-replica run.
4. Checkpoint round trips: torch → JAX → torch and torch → HF → torch leave weights (and, between
   the backends, AdamW's state) bit-identical.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import workers
from common.checkpoints import CheckpointMeta
from common.config import Config
from common.config_files import dump_toml
from common.names import init_weights
from common.portable import read_portable
from parity.compare import Tolerances, make_loader, start_pair, tensor_diffs, update_rel
from parity.convert import write_portable

def _result(name: str, passed: bool, detail: str, **extra: Any) -> dict[str, Any]:
    print(f"[{'PASS' if passed else 'FAIL'}] {name}: {detail}")
    return {"check": name, "passed": passed, "detail": detail, **extra}


def check_accumulation(cfg: Config, tol: Tolerances) -> dict[str, Any]:
    pair = start_pair(cfg)
    x, y = make_loader(cfg).step_batch(0)
    rows = x.shape[0] * x.shape[1]
    if rows % 2:
        return _result("accumulation", False, f"needs an even number of rows per step, got {rows}")
    full = (x.reshape(1, rows, -1), y.reshape(1, rows, -1))
    split = (x.reshape(2, rows // 2, -1), y.reshape(2, rows // 2, -1))
    diffs = {}
    for name, backend, state in (("torch", pair.tb, pair.ts), ("jax", pair.jb, pair.js)):
        d = tensor_diffs(backend.grads(state, *full), backend.grads(state, *split))
        diffs[name] = max(d.values())
    cross = max(tensor_diffs(pair.tb.grads(pair.ts, *split), pair.jb.grads(pair.js, *full)).values())
    ok = max(diffs.values()) <= tol.grads and cross <= tol.grads
    return _result("accumulation", ok, f"1×{rows} vs 2×{rows // 2} gradients, worst rel L2: torch {diffs['torch']:.1e}, "
                   f"jax {diffs['jax']:.1e}, torch 2× vs jax 1× {cross:.1e} (tolerance {tol.grads:.0e})")


def _train_cli(module: str, cfg: Config, out: Path, launcher: list[str], extra: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.toml"
    run = dataclasses.replace(cfg.run, out_dir=str(out / "run"), checkpoint_interval=cfg.optim.max_steps,
                              eval_interval=0, sample_interval=0, num_samples=0)
    cfg_path.write_text(dump_toml(dataclasses.replace(cfg, run=run)))
    cmd = workers.module_command(module, ["--config", cfg_path, *extra], launcher=launcher)
    workers.run(cmd, timeout=900).check(" ".join(cmd))


def check_replicas(cfg: Config, tol: Tolerances, steps: int = 3,
                   parallels: tuple[str, ...] = ("ddp", "fsdp")) -> list[dict[str, Any]]:
    """One replica with micro-batch B vs two with B/2 under each run.parallel of `parallels`: same tokens per
    step, so the same weights. Each backend trains its one-replica reference once for all of them."""
    names = ["replicas" if p == "ddp" else f"replicas ({p})" for p in parallels]
    half = cfg.optim.micro_batch_size // 2
    if half == 0 or cfg.optim.total_batch_size % (half * cfg.model.block_size * 2):
        return [_result(n, False, "micro_batch_size must be even and divide the step for 2 replicas") for n in names]
    base = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=steps,
                                                              warmup_steps=min(cfg.optim.warmup_steps, steps)))

    def two(parallel: str) -> Config:
        return dataclasses.replace(base, optim=dataclasses.replace(base.optim, micro_batch_size=half),
                                   run=dataclasses.replace(base.run, parallel=parallel, fsdp_size=0))

    py = [sys.executable]
    one = {"torch": [], "jax": ["--devices", "1"]}  # extra flags of the one-replica reference
    pair = {"torch": (py + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], []),
            "jax": (py, ["--devices", "2"])}
    lines: dict[str, list[str]] = {p: [] for p in parallels}
    ok = dict.fromkeys(parallels, True)
    init = init_weights(cfg.model, cfg.run.seed)
    with tempfile.TemporaryDirectory(prefix="parity-replicas-") as tmp:
        for backend in ("torch", "jax"):
            module = f"{backend}_impl.train"
            _train_cli(module, base, Path(tmp) / f"{backend}-1", py, one[backend])
            reference = read_portable(Path(tmp) / f"{backend}-1" / "run").weights
            for parallel in parallels:
                out = Path(tmp) / f"{backend}-2-{parallel}"
                _train_cli(module, two(parallel), out, *pair[backend])
                d = update_rel(reference, read_portable(out / "run").weights, init)  # as parity.check compares
                lines[parallel].append(f"{backend} {d:.1e}")
                ok[parallel] = ok[parallel] and d <= tol.params
    return [_result(name, ok[p], f"weights after {steps} steps, 1 vs 2 replicas, ‖Δθ‖ / ‖θ − θ₀‖: "
                    + ", ".join(lines[p]) + f" (tolerance {tol.params:.0e})") for name, p in zip(names, parallels)]


def check_round_trip(cfg: Config, steps: int = 2) -> dict[str, Any]:
    pair = start_pair(cfg)
    loader = make_loader(cfg)
    for _ in range(steps):  # so that AdamW's moments and step are not trivially zero
        pair.ts, _ = pair.tb.train_step(pair.ts, *loader.next_step())
    weights, moments = pair.tb.to_common(pair.ts), pair.tb.optimizer_moments(pair.ts)
    meta = CheckpointMeta(step=steps, backend="torch", config=cfg.to_dict(), loader=loader.state_dict())
    problems = []
    with tempfile.TemporaryDirectory(prefix="parity-convert-") as tmp:
        src = pair.tb.save_checkpoint(pair.ts, Path(tmp) / "torch", meta)
        jax_ckpt = write_portable(read_portable(src, moments=True), Path(tmp) / "jax", "jax")
        back = read_portable(write_portable(read_portable(jax_ckpt, moments=True), Path(tmp) / "torch2", "torch"),
                             moments=True)
        for k in weights:
            if not np.array_equal(weights[k], back.weights[k]):
                problems.append(f"weight {k}")
        for kind in ("m", "v"):
            for k in moments[kind]:
                if not np.array_equal(moments[kind][k], back.moments[kind][k]):
                    problems.append(f"AdamW {kind} {k}")
        if back.step != steps or back.moments["step"] != moments["step"]:
            problems.append(f"step {back.step}/{back.moments['step']} ≠ {steps}")
        hf = read_portable(write_portable(read_portable(src), Path(tmp) / "hf", "hf"))
        vocab = cfg.model.vocab_size  # HF holds the real vocabulary only; padded rows are dropped
        for k in weights:
            if not np.array_equal(weights[k][:vocab], hf.weights[k][:vocab]):
                problems.append(f"HF weight {k}")
    return _result("checkpoint round trip", not problems,
                   "torch → JAX → torch and torch → HF → torch bit-identical" if not problems
                   else "differs: " + ", ".join(problems[:5]))


def run_suite(cfg: Config, tol: Tolerances) -> list[dict[str, Any]]:
    return [check_accumulation(cfg, tol), check_round_trip(cfg), *check_replicas(cfg, tol)]
