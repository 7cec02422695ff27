"""AdamW with weight decay on matrices and embeddings only, the lr of common.schedule, and torch's clipping.

The chain is clip (torch's formula, before the update) → optax.adamw. optax's adamw computes
lr · (m̂ / (√v̂ + eps) + wd · θ), which is torch's decoupled p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps).
torch_impl/optim.py builds the same optimizer, in the same order of functions.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from common.config import Config, OptimConfig
from common.names import decays
from common.schedule import CLIP_EPS, lr_table
from jax_impl.layout import in_layer_stack


def decay_mask(params) -> dict:
    """True where common.names.decays says so of each layer's tensor (ndim ≥ 2: matrices and embeddings)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: decays(".".join(k.key for k in path), tuple(v.shape)[1 if in_layer_stack(path) else 0:]),
        params)


def build_optimizer(params, cfg: Config, dtype: Any = jnp.float32) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.chain(
        clipping(o.grad_clip),
        optax.adamw(learning_rate=lr_schedule(o, dtype), b1=o.betas[0], b2=o.betas[1], eps=o.eps, eps_root=0.0,
                    weight_decay=o.weight_decay, mask=decay_mask(params)),
    )


def lr_schedule(optim: OptimConfig, dtype: Any = jnp.float32):
    """count -> common.schedule.lr_at(count), read from its table (the last entry serves later steps)."""
    table = jnp.asarray(lr_table(optim), dtype=dtype)

    def schedule(count):
        return table[jnp.minimum(count, table.shape[0] - 1)]

    return schedule


class ClipState(NamedTuple):
    grad_norm: jax.Array  # global norm of the last gradients, before clipping


def clipping(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_'s rule, g · min(1, max_norm / (‖g‖ + 1e-6)), remembering ‖g‖.

    optax.clip_by_global_norm has no 1e-6 (a drift between the backends that fp64 parity shows) and
    does not report the norm; max_norm 0 only measures.
    """
    def init(params):
        leaves = jax.tree.leaves(params)
        return ClipState(jnp.zeros([], leaves[0].dtype if leaves else jnp.float32))

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        if max_norm > 0:
            coef = jnp.minimum(1.0, max_norm / (norm + CLIP_EPS))
            updates = jax.tree.map(lambda g: g * coef.astype(g.dtype), updates)
        return updates, ClipState(norm)

    return optax.GradientTransformation(init, update)


def pre_clip_norm(opt_state) -> jax.Array:
    """The pre-clip global gradient norm of the last update (state of the chain's first element)."""
    return opt_state[0].grad_norm
