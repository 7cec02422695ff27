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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.config import ModelConfig
from common.names import check_weights, init_std, param_shapes
from jax_impl.loss import chunked_lm_loss, lm_loss
from jax_impl.ops import Dtype, causal_attention, fused_causal_attention, gelu_tanh, wide


def _normal(std: float):
    def init(key, shape, dtype):
        return std * jax.random.normal(key, shape, dtype)
    return init


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


# Aligned with torch_impl/model.py (docs/parity.md): Flax's LayerNorm defaults to eps 1e-6.
LN_EPS = 1e-5


class LayerNorm(nn.Module):
    """Two-pass variance and eps 1e-5 like torch (Flax's default is eps 1e-6 with E[x²] − E[x]²)."""
    bias: bool
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        x = x.astype(wide(self.param_dtype))
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
    attention: str = "blocked"  # jax_impl.ops.ATTENTIONS

    @nn.compact
    def __call__(self, x, train: bool):
        cfg = self.cfg
        B, T, C = x.shape
        nh, hs = cfg.n_head, C // cfg.n_head
        dense = dict(bias=cfg.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Conv1D(3 * C, init_std("attn.c_attn.weight", cfg), name="c_attn", **dense)(x)
        if self.attention == "fused":
            q, k, v = (t[:, :, 0] for t in jnp.split(qkv.reshape(B, T, 3, nh, hs), 3, axis=2))  # each (B, T, nh, hs)
            y = fused_causal_attention(q, k, v).reshape(B, T, C)
        else:
            q, k, v = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
            drop = nn.Dropout(cfg.dropout, deterministic=not train) if train and cfg.dropout > 0 else None
            y = causal_attention(q, k, v, self.dtype, drop)
            y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
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
        h = gelu_tanh(h)  # GPT-2's tanh GELU, as torch_impl's F.gelu(approximate="tanh")
        h = Conv1D(cfg.n_embd, init_std("mlp.c_proj.weight", cfg), name="c_proj", **dense)(h)
        return nn.Dropout(cfg.dropout, deterministic=not train)(h)


class Block(nn.Module):
    cfg: ModelConfig
    dtype: Dtype
    param_dtype: Dtype
    attention: str = "blocked"

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = dict(bias=self.cfg.bias, param_dtype=self.param_dtype)
        # The residual stream stays in the parameter dtype: adding a bf16 branch promotes, as in torch.
        attn = CausalSelfAttention(self.cfg, name="attn", attention=self.attention, **kw)
        x = x + attn(LayerNorm(name="ln_1", **ln)(x), train)
        return x + MLP(self.cfg, name="mlp", **kw)(LayerNorm(name="ln_2", **ln)(x), train)


def scan_layers_for(platform: str) -> bool:
    """Whether the layer stack runs as one lax.scan on `platform`: on CPUs, where the scanned program
    loads from the persistent compilation cache faster and compiles faster for deep stacks (the unrolled
    one compiles faster for shallow ones, docs/performance.md); not on GPUs, where the unrolled stack lets
    XLA schedule and fuse across layers and skip the stacking copies, for a faster step
    (`python -m parity.gpu` measures the step; `python -m parity.bench --suite --compile-time` the compile)."""
    return platform != "gpu"


class Blocks(nn.Module):
    """The layer stack, named "h" with children "0", "1", ... so the tree flattens to h.{i}.*.

    With `scan_layers`, applied as one lax.scan over the layers' parameters stacked on a leading axis:
    XLA compiles the block once instead of n_layer unrolled copies, at the price of one copy of the block
    parameters into the stack and of their gradients out of it per step. Otherwise the layers are applied
    one after the other. The parameters stay per layer, in the HF layout, either way; Flax's init takes
    the unrolled branch, which declares them.
    """
    cfg: ModelConfig
    dtype: Dtype
    param_dtype: Dtype
    attention: str = "blocked"
    scan_layers: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        cfg = self.cfg
        if self.is_initializing() or not self.scan_layers:  # init declares the parameters h.0 ... h.{L-1}
            for i in range(cfg.n_layer):
                x = Block(cfg, self.dtype, self.param_dtype, self.attention, name=str(i))(x, train)
            return x
        block = Block(cfg, self.dtype, self.param_dtype, self.attention, parent=None)
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
    attention: str = "blocked"  # jax_impl.ops.ATTENTIONS; jax_impl.ops.attention_for picks it per platform
    scan_layers: bool = True  # scan_layers_for picks it per platform

    def setup(self):
        cfg = self.cfg
        self.wte = Embedding(cfg.padded_vocab_size, cfg.n_embd, init_std("wte.weight", cfg), self.param_dtype)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, init_std("wpe.weight", cfg), self.param_dtype)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = Blocks(cfg, self.dtype, self.param_dtype, self.attention, self.scan_layers)
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
        return self.wte.attend(h, self.dtype).astype(wide(self.dtype))

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


def abstract_params(cfg: ModelConfig, param_dtype: Dtype = jnp.float32) -> dict:
    """Shapes and dtypes of the params tree, without any values (for optax/orbax templates)."""
    return unflatten({k: jax.ShapeDtypeStruct(s, jnp.dtype(param_dtype)) for k, s in param_shapes(cfg).items()})


def to_common(params) -> dict[str, np.ndarray]:
    """The weights as common weights: fresh numpy copies (never aliases of device buffers) in the
    parameters' dtype, float32 or float64."""
    return {k: np.array(jax.device_get(v), copy=True) for k, v in flatten(params).items()}


def from_common(weights: dict[str, np.ndarray], cfg: ModelConfig, param_dtype: Dtype = jnp.float32,
                source: str = "weights") -> dict:
    """Common weights -> a params tree of `param_dtype` (copied: torch buffers are never aliased)."""
    check_weights(weights, cfg, source)
    return unflatten({k: jnp.asarray(np.array(weights[k], copy=True), dtype=param_dtype)
                      for k in param_shapes(cfg)})
