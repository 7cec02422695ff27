"""The plain Flax GPT-2 training step: the yardstick jax_impl is measured against (`parity.bench --vs-plain`).

What a user writes first: a flax.linen GPT-2 (nn.Dense, nn.LayerNorm, nn.Embed,
jax.nn.dot_product_attention with is_causal, tanh GELU) whose whole training step is one `jax.jit`
with its arguments donated: the tied head's full (B·T, V) logits into
optax.softmax_cross_entropy_with_integer_labels, gradient accumulation unrolled in Python, and
optax.clip_by_global_norm → optax.adamw applied inside the step. No scan over layers, no custom VJPs,
no chunking, nothing from jax_impl: it is written independently, so it can show what jax_impl's own
choices buy. It computes the same function as jax_impl (tests/test_plain.py checks the loss on the
same weights and batch): the padded rows of the embedding are kept (the weight layout) but only the
real vocabulary's columns enter the softmax, and weight decay goes to matrices and embeddings only,
with the shared LR schedule.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.config import Config, ModelConfig
from common.schedule import lr_table

LN_EPS = 1e-5  # GPT-2's (and torch's); Flax's default is 1e-6


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        B, T, C = x.shape
        h = nn.LayerNorm(epsilon=LN_EPS, use_bias=c.bias, name="ln_1")(x)
        q, k, v = jnp.split(nn.Dense(3 * C, use_bias=c.bias, name="c_attn")(h), 3, axis=-1)
        q, k, v = (t.reshape(B, T, c.n_head, C // c.n_head) for t in (q, k, v))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, T, C)
        x = x + nn.Dense(C, use_bias=c.bias, name="attn_c_proj")(y)
        h = nn.LayerNorm(epsilon=LN_EPS, use_bias=c.bias, name="ln_2")(x)
        h = nn.gelu(nn.Dense(4 * C, use_bias=c.bias, name="c_fc")(h), approximate=True)
        return x + nn.Dense(C, use_bias=c.bias, name="mlp_c_proj")(h)


class GPT(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, idx: jax.Array) -> jax.Array:
        c = self.cfg
        wte = nn.Embed(c.padded_vocab_size, c.n_embd, name="wte")
        x = wte(idx) + nn.Embed(c.block_size, c.n_embd, name="wpe")(jnp.arange(idx.shape[1]))
        for i in range(c.n_layer):
            x = Block(c, name=f"h_{i}")(x)
        x = nn.LayerNorm(epsilon=LN_EPS, use_bias=c.bias, name="ln_f")(x)
        # The tied head over the real vocabulary: (B, T, V) logits, all of them materialised.
        return x @ wte.embedding[:c.vocab_size].T


# Common (HF) name parts → this model's module and parameter names.
MODULES = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_c_proj"}


def params_from_common(weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Common weights ({"h.0.attn.c_attn.weight": (in, out) array, ...}) as this model's parameter tree.

    Dense kernels are stored (in, out) like the common layout, so nothing is transposed."""
    params: dict[str, Any] = {}
    for name, w in weights.items():
        path, leaf = name.rsplit(".", 1)
        if path.startswith("h."):
            _, i, sub = path.split(".", 2)
            path = f"h_{i}.{MODULES.get(sub, sub)}"
        module = path.rsplit(".", 1)[-1]
        if leaf == "weight":
            leaf = "embedding" if module in ("wte", "wpe") else "scale" if module.startswith("ln") else "kernel"
        node = params
        for part in path.split("."):
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(w, dtype=jnp.float32)
    return params


class Step:
    """The training state and its jitted step: calling it trains one step; `lower` is the program it runs
    (parity.profile names the ops of its trace from that program's HLO)."""

    def __init__(self, train_step: Any, params: Any, opt_state: Any):
        self.train_step, self.params, self.opt_state = train_step, params, opt_state

    def __call__(self, x: np.ndarray, y: np.ndarray) -> jax.Array:
        self.params, self.opt_state, loss = self.train_step(self.params, self.opt_state, *self._tokens(x, y))
        return loss

    def lower(self, x: np.ndarray, y: np.ndarray) -> jax.stages.Lowered:
        return self.train_step.lower(self.params, self.opt_state, *self._tokens(x, y))

    @staticmethod
    def _tokens(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(x, np.int32), np.asarray(y, np.int32)


def build(cfg: Config, weights: dict[str, np.ndarray]) -> tuple[Step, str]:
    """(step, device kind): `step(x, y)` trains one optimizer step on (accum, rows, T) token arrays and returns
    the mean loss of its micro-batches (before the update), as a device value."""
    model = GPT(cfg.model)
    o = cfg.optim
    lrs = jnp.asarray(lr_table(o), dtype=jnp.float32)
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(lambda count: lrs[jnp.minimum(count, lrs.shape[0] - 1)], b1=o.betas[0], b2=o.betas[1],
                    eps=o.eps, weight_decay=o.weight_decay, mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, x, y):
        accum = x.shape[0]
        loss, grads = jax.value_and_grad(loss_fn)(params, x[0], y[0])
        for micro in range(1, accum):
            micro_loss, micro_grads = jax.value_and_grad(loss_fn)(params, x[micro], y[micro])
            loss, grads = loss + micro_loss, jax.tree.map(jnp.add, grads, micro_grads)
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss / accum

    params = params_from_common(weights)
    return Step(train_step, params, tx.init(params)), jax.devices()[0].platform

