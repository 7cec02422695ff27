"""GPT-2 in Flax linen, parameter for parameter the layout of common/names.py.

Why linen rather than nnx: a linen model is a pure function of a plain nested dict of arrays. That
dict, flattened with ".", *is* the common weights ({"h": {"0": {"attn": {"c_attn": {"weight"}}}}}
-> "h.0.attn.c_attn.weight"), optax and orbax take it as-is, and `jax.jit(..., donate_argnums=0)`
can donate it without nnx's split/merge of mutable module state on every step.

Linear weights are stored (in, out) like Hugging Face's Conv1D and Flax's Dense, so to_common /
from_common rename nothing and transpose nothing. Shapes are noted as (B, T, C): batch, time,
channels; nh heads of hs = C / nh.

Precision mirrors torch autocast: parameters keep their own dtype (fp32, or fp64 for parity);
matmuls run in the compute `dtype`; LayerNorm, the residual stream, the softmax of attention and the
logits/loss are kept in at least fp32.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.config import ModelConfig
from common.names import check_weights, init_std, param_shapes

Dtype = Any


def _normal(std: float):
    def init(key, shape, dtype):
        return std * jax.random.normal(key, shape, dtype)
    return init


def _wide(dtype: Dtype) -> Dtype:
    """The precision of the numerically sensitive parts: fp32 unless the whole run is fp64."""
    return jnp.promote_types(dtype, jnp.float32)


class Conv1D(nn.Module):
    """y = x @ W + b with W of shape (in, out), named weight/bias as in HF GPT-2."""
    n_out: int
    std: float
    bias: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", _normal(self.std), (x.shape[-1], self.n_out), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.n_out,), self.param_dtype).astype(self.dtype)
        return y


# Aligned with torch_impl/model.py (docs/parity.md): Flax's LayerNorm defaults to eps 1e-6; GELU is pinned to tanh.
LN_EPS = 1e-5
GELU_TANH = True


class LayerNorm(nn.Module):
    """Two-pass variance and eps 1e-5 like torch (Flax's default is eps 1e-6 with E[x²] − E[x]²)."""
    bias: bool
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        x = x.astype(_wide(self.param_dtype))
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + LN_EPS)
        y = y * self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return y


class Embedding(nn.Module):
    """A lookup table named "weight" (flax's nn.Embed calls it "embedding"), usable as the tied head."""
    num: int
    features: int
    std: float
    param_dtype: Dtype

    def setup(self):
        self.weight = self.param("weight", _normal(self.std), (self.num, self.features), self.param_dtype)

    def __call__(self, idx):
        return jnp.take(self.weight, idx, axis=0)

    def attend(self, h, dtype):
        return jnp.dot(h.astype(dtype), self.weight.astype(dtype).T)


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, train: bool):
        cfg = self.cfg
        B, T, C = x.shape
        nh, hs = cfg.n_head, C // cfg.n_head
        dense = dict(bias=cfg.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Conv1D(3 * C, init_std("attn.c_attn.weight", cfg), name="c_attn", **dense)(x)
        q, k, v = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        drop = nn.Dropout(cfg.dropout, deterministic=not train) if train and cfg.dropout > 0 else None
        y = causal_attention(q, k, v, self.dtype, drop)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        y = Conv1D(C, init_std("attn.c_proj.weight", cfg), name="c_proj", **dense)(y)
        return nn.Dropout(cfg.dropout, deterministic=not train)(y)


# Query rows per block of causal attention (see causal_attention).
ATTN_BLOCK_ROWS = 128


def causal_attention(q, k, v, dtype: Dtype, dropout=None, block_rows: int = ATTN_BLOCK_ROWS):
    """softmax(q·kᵀ/√hs, causal) · v for q, k, v of shape (B, nh, T, hs), `block_rows` query rows at a time.

    Query block [s, e) is scored against keys [0, e) only, so the upper triangle, which the mask would
    zero anyway, is mostly never computed: at T = 1024 and 128-row blocks that is 44% of the (T, T)
    scores, as torch's flash attention skips them. Written out rather than jax.nn.dot_product_attention
    because that has no attention dropout. The math is the same as the full masked softmax (masked
    scores contribute exp(min − max) = 0): scores in the compute dtype, softmax in fp32, like CUDA autocast.
    """
    T, hs = q.shape[2], q.shape[3]
    out = []
    for s in range(0, T, block_rows):
        e = min(T, s + block_rows)
        att = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, s:e], k[:, :, :e]) * (1.0 / np.sqrt(hs))  # (B, nh, e-s, e)
        att = att.astype(_wide(dtype))
        causal = jnp.arange(s, e)[:, None] >= jnp.arange(e)[None, :]
        att = jax.nn.softmax(jnp.where(causal, att, jnp.finfo(att.dtype).min), axis=-1)
        if dropout is not None:
            att = dropout(att)
        out.append(jnp.einsum("bhqk,bhkd->bhqd", att.astype(dtype), v[:, :, :e]))
    return jnp.concatenate(out, axis=2) if len(out) > 1 else out[0]


_GELU_BETA = float(np.sqrt(2.0 / np.pi))  # Python floats are weakly typed: bf16 stays bf16
_GELU_KAPPA = 0.044715


@jax.custom_vjp
def gelu_tanh(x):
    """GPT-2's tanh GELU, x · ½(1 + tanh(√(2/π)(x + 0.044715x³))), as jax.nn.gelu(approximate=True).

    Its own VJP keeps only x for the backward pass, as torch's GeluBackward does. Autodiff of the
    formula kept four more (B, T, 4C) intermediates per layer, which lax.scan stacks over the layers
    and zero-fills every step: 4 × 151 MB more written forward and read backward per GPT-2 124M step.
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, dy):
    # torch's GeluBackward (tanh) term for term, in fp32 for bf16 inputs as torch's CPU kernel computes.
    x, wide_dy = x.astype(_wide(x.dtype)), dy.astype(_wide(x.dtype))
    x_sq = x * x
    tanh_inner = jnp.tanh(_GELU_BETA * (x + _GELU_KAPPA * (x_sq * x)))
    left_derivative = 0.5 * (1 + tanh_inner)
    right_derivative = (0.5 * x) * (1 - tanh_inner * tanh_inner) * (_GELU_BETA * (1 + 3 * _GELU_KAPPA * x_sq))
    return ((wide_dy * (left_derivative + right_derivative)).astype(dy.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, train: bool):
        cfg = self.cfg
        dense = dict(bias=cfg.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Conv1D(4 * cfg.n_embd, init_std("mlp.c_fc.weight", cfg), name="c_fc", **dense)(x)
        h = gelu_tanh(h) if GELU_TANH else jax.nn.gelu(h, approximate=False)  # torch's default is erf
        h = Conv1D(cfg.n_embd, init_std("mlp.c_proj.weight", cfg), name="c_proj", **dense)(h)
        return nn.Dropout(cfg.dropout, deterministic=not train)(h)


class Block(nn.Module):
    cfg: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = dict(bias=self.cfg.bias, param_dtype=self.param_dtype)
        # The residual stream stays in the parameter dtype: adding a bf16 branch promotes, as in torch.
        x = x + CausalSelfAttention(self.cfg, name="attn", **kw)(LayerNorm(name="ln_1", **ln)(x), train)
        return x + MLP(self.cfg, name="mlp", **kw)(LayerNorm(name="ln_2", **ln)(x), train)


# One lax.scan over the layers (see Blocks); False unrolls them (measured against in docs/performance.md).
SCAN_LAYERS = True


class Blocks(nn.Module):
    """The layer stack, named "h" with children "0", "1", ... so the tree flattens to h.{i}.*.

    Applied as one lax.scan over the layers' parameters stacked on a leading axis: XLA compiles the
    block once instead of n_layer unrolled copies (GPT-2 124M: compile 20 → 13 s, and the step was
    faster too, docs/performance.md), at the price of one copy of the block parameters into the stack
    and of their gradients out of it per step. The parameters stay per layer, in the HF layout.
    """
    cfg: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, train: bool):
        cfg = self.cfg
        if self.is_initializing() or not SCAN_LAYERS:  # init creates the per-layer parameters h.0 ... h.{L-1}
            for i in range(cfg.n_layer):
                x = Block(cfg, self.dtype, self.param_dtype, name=str(i))(x, train)
            return x
        block = Block(cfg, self.dtype, self.param_dtype, parent=None)
        layers = [self.variables["params"][str(i)] for i in range(cfg.n_layer)]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
        dropout = train and cfg.dropout > 0
        keys = jax.random.split(self.make_rng("dropout"), cfg.n_layer) if dropout else jnp.zeros(cfg.n_layer)

        def layer(h, inputs):
            params, key = inputs
            return block.apply({"params": params}, h, train, rngs={"dropout": key} if dropout else None), None

        return jax.lax.scan(layer, x, (stacked, keys))[0]


class GPT(nn.Module):
    """`__call__(idx) -> logits (B, T, padded_vocab_size)` in fp32 (fp64 in fp64 runs)."""
    cfg: ModelConfig
    dtype: Dtype = jnp.float32  # compute dtype of the matmuls
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        self.wte = Embedding(cfg.padded_vocab_size, cfg.n_embd, init_std("wte.weight", cfg), self.param_dtype)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, init_std("wpe.weight", cfg), self.param_dtype)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = Blocks(cfg, self.dtype, self.param_dtype)
        self.ln_f = LayerNorm(bias=cfg.bias, param_dtype=self.param_dtype)

    def features(self, idx, train: bool = False):
        """Final hidden states (B, T, C) after ln_f."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than model.block_size {self.cfg.block_size}")
        x = self.wte(idx) + self.wpe(jnp.arange(T))  # (B, T, C)
        x = self.drop(x, deterministic=not train)
        return self.ln_f(self.h(x, train))

    def head(self, h):
        """Tied LM head: h @ wte.T over the padded vocabulary, returned in at least fp32."""
        return self.wte.attend(h, self.dtype).astype(_wide(self.dtype))

    def __call__(self, idx, train: bool = False):
        return self.head(self.features(idx, train))

    def loss(self, idx, targets, train: bool = False, chunk_rows: int | None = None):
        """Mean cross-entropy of the next tokens; with chunk_rows > 0 (default model.loss_chunk_rows) the
        head and loss run fused over row chunks and the (B·T, V) logits never exist."""
        h = self.features(idx, train)
        chunk_rows = self.cfg.loss_chunk_rows if chunk_rows is None else chunk_rows
        if chunk_rows <= 0:
            return lm_loss(self.head(h), targets, self.cfg.vocab_size)
        return chunked_lm_loss(h.reshape(-1, h.shape[-1]), self.wte.weight, targets.reshape(-1),
                               self.cfg.vocab_size, chunk_rows, self.dtype)


def lm_loss(logits, targets, vocab_size: int):
    """Mean cross-entropy over real vocabulary columns only: padded columns never enter the softmax."""
    real = logits[..., :vocab_size].astype(_wide(logits.dtype))
    return optax.softmax_cross_entropy_with_integer_labels(real, targets).mean()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def chunked_lm_loss(h, wte, targets, vocab_size: int, chunk_rows: int, dtype: Dtype):
    """lm_loss(h @ wte.T, targets, vocab_size) for h (N, C), computed chunk_rows rows at a time.

    The head matmuls run in `dtype` and the softmax in at least fp32, as in GPT.head + lm_loss.
    """
    return _chunked_pass(h, wte, targets, vocab_size, chunk_rows, dtype, with_grad=False)[0]


def _chunked_fwd(h, wte, targets, vocab_size, chunk_rows, dtype):
    loss, grad_h, grad_w = _chunked_pass(h, wte, targets, vocab_size, chunk_rows, dtype, with_grad=True)
    return loss, (grad_h, grad_w, targets)


def _chunked_bwd(vocab_size, chunk_rows, dtype, residuals, g):
    """The gradients were computed with the loss; backward only scales them by the incoming scalar."""
    grad_h, grad_w, targets = residuals
    zero_targets = np.zeros(targets.shape, dtype=jax.dtypes.float0)  # integer input: no cotangent
    return (g * grad_h).astype(grad_h.dtype), (g * grad_w).astype(grad_w.dtype), zero_targets


chunked_lm_loss.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked_pass(h, wte, targets, vocab_size, chunk_rows, dtype, with_grad: bool):
    """(mean loss, grad_h, grad_wte) — grads None unless with_grad — over full chunks in a lax.scan
    (XLA keeps one chunk's logits alive) plus a remainder chunk when chunk_rows does not divide N.

    Per chunk: loss += logsumexp(h_c @ wte[:V].T) − logit[target], and d mean-loss / d logits
    = (softmax − onehot) / N gives grad_h_c and the chunk's share of grad_wte in the same pass, so
    nothing is recomputed in backward. Padded rows of wte get zero gradient.
    """
    n, c = h.shape
    wide = _wide(dtype)
    w = wte[:vocab_size].astype(dtype)  # (V, C): padded columns never enter the softmax

    def chunk(h_c, t_c):
        logits = jnp.dot(h_c.astype(dtype), w.T).astype(wide)  # (rows, V)
        # exp(logits − max) once, for both the logsumexp and the softmax: log_softmax followed by exp
        # evaluated the exponentials twice, and dropping that made the head + loss 1.09-1.26x faster
        # (docs/performance.md). torch keeps log_softmax + exp_, which measured as fast as its alternatives.
        top = logits.max(axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = e.sum(axis=-1, keepdims=True)
        target_logit = jnp.take_along_axis(logits, t_c[:, None], axis=1)
        loss = (top + jnp.log(total) - target_logit).sum()
        if not with_grad:
            return loss, None, None
        dlogits = (e / total - jax.nn.one_hot(t_c, vocab_size, dtype=wide)) / n
        dlogits = dlogits.astype(dtype)
        return loss, jnp.dot(dlogits, w).astype(h.dtype), jnp.dot(dlogits.T, h_c.astype(dtype)).astype(wte.dtype)

    full = n // chunk_rows * chunk_rows

    def body(carry, inputs):
        loss, grad_w = carry
        l_c, gh_c, gw_c = chunk(*inputs)
        return (loss + l_c, grad_w + gw_c if with_grad else grad_w), gh_c

    loss, grad_w = jnp.zeros((), wide), jnp.zeros((vocab_size, c), wte.dtype) if with_grad else None
    grad_h = []
    if full:
        (loss, grad_w), gh = jax.lax.scan(body, (loss, grad_w), (h[:full].reshape(-1, chunk_rows, c),
                                                                 targets[:full].reshape(-1, chunk_rows)))
        grad_h.append(gh.reshape(full, c) if with_grad else None)
    if full < n:
        l_c, gh_c, gw_c = chunk(h[full:], targets[full:])
        loss, grad_w = loss + l_c, grad_w + gw_c if with_grad else None
        grad_h.append(gh_c)
    if not with_grad:
        return loss / n, None, None
    grad_h = jnp.concatenate(grad_h) if len(grad_h) > 1 else grad_h[0]
    grad_w = jnp.pad(grad_w, ((0, wte.shape[0] - vocab_size), (0, 0)))
    return loss / n, grad_h, grad_w


def flatten(tree, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {"h.0.attn.c_attn.weight": array}."""
    out = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def init_params(cfg: ModelConfig, seed: int, param_dtype: Dtype = jnp.float32) -> dict:
    """The GPT-2 init: normal(0.02) matrices and embeddings, 0.02/sqrt(2L) residual projections,
    zero biases, unit LayerNorm gains.

    Drawn tensor by tensor from the weight contract, as torch_impl's reset_parameters does: the i-th
    tensor of common.names.param_shapes from numpy's PCG64 seeded with (seed, i), in fp32 whatever the
    run's dtype (so an fp64 parity run starts from the fp32 run's weights). Not through `GPT.init` and
    jax.random: that traces and compiles the whole forward pass only to drop its output, and threefry
    draws ~35M normals/s on a CPU: 2.6 s of a tiny run's start-up, 0.5 s this way.
    """
    flat = {}
    for i, (name, shape) in enumerate(param_shapes(cfg).items()):
        if len(shape) >= 2:
            a = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
            a *= np.float32(init_std(name, cfg))
        elif name.endswith(".bias"):
            a = np.zeros(shape, np.float32)
        else:  # the only 1-D weights are LayerNorm gains
            a = np.ones(shape, np.float32)
        flat[name] = jnp.asarray(a).astype(param_dtype)
    return unflatten(flat)


def abstract_params(cfg: ModelConfig, param_dtype: Dtype = jnp.float32) -> dict:
    """Shapes and dtypes of init_params' tree, without drawing anything (for optax/orbax templates)."""
    return unflatten({k: jax.ShapeDtypeStruct(s, jnp.dtype(param_dtype)) for k, s in param_shapes(cfg).items()})


def to_common(params) -> dict[str, np.ndarray]:
    """Fresh float32 numpy copies (never aliases of device buffers)."""
    return {k: np.array(jax.device_get(v), dtype=np.float32, copy=True) for k, v in flatten(params).items()}


def from_common(weights: dict[str, np.ndarray], cfg: ModelConfig, param_dtype: Dtype = jnp.float32,
                source: str = "weights") -> dict:
    """Common weights -> a params tree of `param_dtype` (copied: torch buffers are never aliased)."""
    check_weights(weights, cfg, source)
    return unflatten({k: jnp.asarray(np.array(weights[k], copy=True), dtype=param_dtype)
                      for k in param_shapes(cfg)})
