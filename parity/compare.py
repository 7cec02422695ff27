"""What parity.check and its --suite compare with: the tolerances, the difference measures, and the two
backends started side by side from one init on one loader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.backend import DistInfo, load_backend
from common.data import DataLoader, loader_for


@dataclass(frozen=True)
class Tolerances:
    logits: float  # step-0 logits, max abs
    loss: float  # per-step loss, abs
    grad_norm: float  # per-step pre-clip global grad norm, relative
    grads: float  # per-tensor gradient at step 0 (and at a divergence), relative L2
    params: float  # ‖θ_torch − θ_jax‖ / ‖θ_torch − θ_0‖ over all parameters at the end
    moments: float  # AdamW m and v at the end, relative L2 over all parameters


# About 10× the envelope measured with every op aligned (docs/parity.md), so each single misalignment
# listed there fails at least one of these.
TOLERANCES = {
    "fp32": Tolerances(logits=1e-5, loss=2e-5, grad_norm=1e-4, grads=1e-5, params=1e-4, moments=5e-6),
    "fp64": Tolerances(logits=1e-10, loss=1e-10, grad_norm=1e-10, grads=1e-10, params=1e-10, moments=1e-10),
    "bf16": Tolerances(logits=5e-2, loss=5e-3, grad_norm=1e-1, grads=2e-1, params=1e-2, moments=1e-2),
}


def rel_l2(a: np.ndarray, b: np.ndarray, ref: np.ndarray | None = None) -> float:
    """‖a − b‖ / ‖ref‖ (ref defaults to a), in float64; 0 when both are zero."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = float(np.linalg.norm(a64 - b64))
    den = float(np.linalg.norm(np.asarray(a if ref is None else ref, np.float64)))
    return 0.0 if num == 0.0 else (num / den if den > 0 else math.inf)


def tensor_diffs(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                 ref: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    return {k: rel_l2(a[k], b[k], None if ref is None else ref[k]) for k in a}


def max_abs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a}


def global_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    """‖a − b‖ / ‖ref‖ over all tensors at once: one number that per-tensor noise cannot dominate.

    Per tensor, a gradient that is zero in exact arithmetic (the attention key bias) is rounding
    noise that Adam scales up to lr-sized steps, so its relative difference is large and legitimate.
    """
    num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in a)
    den = sum(float(np.sum(np.asarray(ref[k], np.float64) ** 2)) for k in a)
    return 0.0 if num == 0 else (math.sqrt(num / den) if den > 0 else math.inf)


def update_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray], init: dict[str, np.ndarray]) -> float:
    """‖a − b‖ / ‖a − init‖: global_rel against what training moved the parameters from `init`."""
    return global_rel(a, b, {k: a[k] - init[k] for k in a})


def worst(diffs: dict[str, float], n: int = 5) -> list[tuple[str, float]]:
    return sorted(diffs.items(), key=lambda kv: -kv[1])[:n]


def load_backends():
    return load_backend("torch"), load_backend("jax")


@dataclass
class Pair:
    """Both backends' states at the same step, started from the same weights."""
    tb: Any
    jb: Any
    ts: Any
    js: Any
    init: dict[str, np.ndarray]


def pin_full_precision(cfg, tdist) -> None:
    """Full-precision matmuls on both sides whatever the dtype (GPUs default to TF32, and JAX on TPU to
    one-pass bf16, for fp32): each backend's own precision switch, with exact=True."""
    import torch

    from jax_impl.dist import set_precision as jax_precision
    from torch_impl.dist import set_precision as torch_precision

    torch_precision(cfg.run.dtype, torch.device(tdist.device), exact=True)
    jax_precision(cfg.run.dtype, exact=True)


def start_pair(cfg, backends=None) -> Pair:
    """Both backends at step 0 of `cfg`: each draws the common init of run.seed, checked to be identical."""
    tb, jb = backends or load_backends()
    tdist, jdist = tb.setup(cfg), jb.setup(cfg)
    pin_full_precision(cfg, tdist)  # after setup, which sets the trainers' own (fast) defaults
    ts, js = tb.init_state(cfg, tdist), jb.init_state(cfg, jdist)
    init = tb.to_common(ts)
    moved = tensor_diffs(init, jb.to_common(js))
    bad = [k for k, d in moved.items() if d != 0.0]
    if bad:
        raise AssertionError(f"the two backends' initial weights differ for {bad[:3]}")
    return Pair(tb, jb, ts, js, init)


def make_loader(cfg) -> DataLoader:
    """The one-process training loader of `cfg` (data.order included): both backends step on its batches."""
    return loader_for(cfg, DistInfo())
