"""The learning-rate schedule and clipping's constant: the single definitions both backends are tested against."""
from __future__ import annotations

import math

import numpy as np

from common.config import OptimConfig

# torch.nn.utils.clip_grad_norm_'s denominator is ‖g‖ + CLIP_EPS; both backends clip with that rule.
CLIP_EPS = 1e-6


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warmup to max_lr, cosine decay to min_lr at max_steps, then min_lr.

    Step 0 already gets max_lr / warmup_steps (build-nanogpt's `(it + 1) / warmup`): an optimizer
    step with lr 0 would be wasted, and optax's own warmup (which starts at its init value) differs
    here, so JAX reads this function's values instead of optax's schedule.
    """
    if step < optim.warmup_steps:
        return optim.max_lr * (step + 1) / optim.warmup_steps
    if step >= optim.max_steps:
        return optim.min_lr
    decay_ratio = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return optim.min_lr + coeff * (optim.max_lr - optim.min_lr)


def lr_table(optim: OptimConfig) -> np.ndarray:
    """lr_at for steps 0..max_steps (the last entry serves every later step), as float64."""
    return np.array([lr_at(s, optim) for s in range(optim.max_steps + 1)], dtype=np.float64)
