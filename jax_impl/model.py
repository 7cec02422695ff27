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

# Rows of (B·T) per chunk of the fused LM head + cross-entropy in GPT.loss (0 = materialise the full
# logits): the same chunking as torch_impl/model.py, measured in docs/performance.md.
LOSS_CHUNK_ROWS = 128


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
        q, k, v = (t.reshape(B, T, nh, hs) for t in jnp.split(qkv, 3, axis=-1))  # (B, T, nh, hs)
        # Written out rather than jax.nn.dot_product_attention because that has no attention dropout;
        # the math is the same (scores in the compute dtype, masked softmax in fp32, like CUDA autocast).
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / np.sqrt(hs))  # (B, nh, T, T)
        att = att.astype(_wide(self.dtype))
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        att = jnp.where(causal, att, jnp.finfo(att.dtype).min)
        att = jax.nn.softmax(att, axis=-1)
        att = nn.Dropout(cfg.dropout, deterministic=not train)(att).astype(self.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, C)
        y = Conv1D(C, init_std("attn.c_proj.weight", cfg), name="c_proj", **dense)(y)
        return nn.Dropout(cfg.dropout, deterministic=not train)(y)


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, train: bool):
        cfg = self.cfg
        dense = dict(bias=cfg.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Conv1D(4 * cfg.n_embd, init_std("mlp.c_fc.weight", cfg), name="c_fc", **dense)(x)
        h = jax.nn.gelu(h, approximate=GELU_TANH)  # GPT-2's tanh GELU, explicitly (torch's default is erf)
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


class Blocks(nn.Module):
    """The layer stack, named "h" with children "0", "1", ... so the tree flattens to h.{i}.*."""
    cfg: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.cfg.n_layer):
            x = Block(self.cfg, self.dtype, self.param_dtype, name=str(i))(x, train)
        return x


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
        """Mean cross-entropy of the next tokens; with chunk_rows > 0 (default LOSS_CHUNK_ROWS) the
        head and loss run fused over row chunks and the (B·T, V) logits never exist."""
        h = self.features(idx, train)
        chunk_rows = LOSS_CHUNK_ROWS if chunk_rows is None else chunk_rows
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

    Per chunk: logp = log_softmax(h_c @ wte[:V].T), loss −= logp[target], and d mean-loss / d logits
    = (softmax − onehot) / N gives grad_h_c and the chunk's share of grad_wte in the same pass, so
    nothing is recomputed in backward. Padded rows of wte get zero gradient.
    """
    n, c = h.shape
    wide = _wide(dtype)
    w = wte[:vocab_size].astype(dtype)  # (V, C): padded columns never enter the softmax

    def chunk(h_c, t_c):
        logits = jnp.dot(h_c.astype(dtype), w.T).astype(wide)  # (rows, V)
        logp = jax.nn.log_softmax(logits, axis=-1)
        loss = -jnp.take_along_axis(logp, t_c[:, None], axis=1).sum()
        if not with_grad:
            return loss, None, None
        dlogits = (jnp.exp(logp) - jax.nn.one_hot(t_c, vocab_size, dtype=wide)) / n
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
    zero biases, unit LayerNorm gains."""
    params = _jitted_init(cfg)(jax.random.PRNGKey(seed))
    # Drawn in fp32 whatever the run's dtype, so an fp64 (parity) run starts from the fp32 run's weights.
    return jax.tree.map(lambda p: p.astype(param_dtype), params)


@functools.lru_cache(maxsize=8)
def _jitted_init(cfg: ModelConfig):
    model = GPT(cfg)
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), dtype=jnp.int32))["params"])


def to_common(params) -> dict[str, np.ndarray]:
    """Fresh float32 numpy copies (never aliases of device buffers)."""
    return {k: np.array(jax.device_get(v), dtype=np.float32, copy=True) for k, v in flatten(params).items()}


def from_common(weights: dict[str, np.ndarray], cfg: ModelConfig, param_dtype: Dtype = jnp.float32,
                source: str = "weights") -> dict:
    """Common weights -> a params tree of `param_dtype` (copied: torch buffers are never aliased)."""
    check_weights(weights, cfg, source)
    return unflatten({k: jnp.asarray(np.array(weights[k], copy=True), dtype=param_dtype)
                      for k in param_shapes(cfg)})
