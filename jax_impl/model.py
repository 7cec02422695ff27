"""GPT-2 in Flax linen: the weights of common/names.py, the blocks stacked by layer.

Why linen rather than nnx: a linen model is a pure function of a plain nested dict of arrays, which
optax and orbax take as-is and `jax.jit(..., donate_argnums=0)` can donate without nnx's split/merge
of mutable module state on every step.

The tree is the common weights' names nested at the dots ("wte.weight" -> {"wte": {"weight"}}),
except the transformer blocks: their parameters are stacked on a leading layer axis under "h"
({"h": {"attn": {"c_attn": {"weight": (n_layer, C, 3C)}}}}), the layout of the layer scan. Stored per
layer, every step would copy them into the stack and the gradients back out, and each layer's AdamW
update would be a kernel of its own for XLA to compile. to_common / from_common convert between the
two layouts at the edges (checkpoints to other formats, parity, sampling); `unstacked` gives the
per-layer view by common name.

Linear weights are stored (in, out) like Hugging Face's Conv1D and Flax's Dense, so the conversion
transposes nothing. Shapes are noted as (B, T, C): batch, time, channels; nh heads of hs = C / nh.

Precision mirrors torch autocast: parameters keep their own dtype (fp32, or fp64 for parity);
matmuls run in the compute `dtype`; LayerNorm, the residual stream, the softmax of attention and the
logits/loss are kept in at least fp32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.config import ModelConfig
from common.names import LN_EPS, check_weights, init_std, param_shapes
from jax_impl.loss import chunked_lm_loss, lm_loss
from jax_impl.layout import LAYERS, stacked, unstacked
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
    """Whether the layer stack runs as a loop (lax.scan) on `platform`: on CPUs, where the loop compiles
    the block once and loads from the persistent compilation cache faster; not on GPUs, where the
    unrolled stack lets XLA schedule and fuse across layers, for a faster step (`python -m parity.gpu`
    measures the step). The stacked parameters are the same either way."""
    return platform != "gpu"


class ScannedBlock(Block):
    """A Block in nn.scan's form, (x, train) -> (x, None): the residual stream is the carry, `train` goes
    unchanged to every layer and nothing is stacked out."""

    def __call__(self, x, train: bool):
        return super().__call__(x, train), None


def block_stack(cfg: ModelConfig, dtype: Dtype, param_dtype: Dtype, attention: str, scan_layers: bool) -> nn.Module:
    """The n_layer blocks as one module named "h", its parameters stacked on a leading layer axis, applied
    `(x, train) -> (x, None)`. With scan_layers, a lax.scan over the layers (XLA compiles the block once);
    otherwise the scan fully unrolled (no loop from two layers on; each layer reads its slice of the stack
    and the backward pass concatenates the layers' gradients into the stacked ones)."""
    stack = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=nn.broadcast, length=cfg.n_layer, unroll=1 if scan_layers else cfg.n_layer)
    return stack(cfg, dtype, param_dtype, attention, name=LAYERS)


class GPT(nn.Module):
    """`__call__(idx) -> logits (B, T, padded_vocab_size)` in fp32 (fp64 in fp64 runs)."""
    cfg: ModelConfig
    dtype: Dtype = jnp.float32  # compute dtype of the matmuls
    param_dtype: Dtype = jnp.float32
    attention: str = "blocked"  # jax_impl.ops.ATTENTIONS; jax_impl.ops.attention_for picks it per platform
    scan_layers: bool = True  # scan_layers_for picks it per platform
    loss_chunk_rows: int = 0  # run.loss_chunk_rows of the run: rows per chunk of GPT.loss's fused head; 0 = full logits

    def setup(self):
        cfg = self.cfg
        self.wte = Embedding(cfg.padded_vocab_size, cfg.n_embd, init_std("wte.weight", cfg), self.param_dtype)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd, init_std("wpe.weight", cfg), self.param_dtype)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = block_stack(cfg, self.dtype, self.param_dtype, self.attention, self.scan_layers)
        self.ln_f = LayerNorm(bias=cfg.bias, param_dtype=self.param_dtype)

    def features(self, idx, train: bool = False):
        """Final hidden states (B, T, C) after ln_f."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than model.block_size {self.cfg.block_size}")
        x = self.wte(idx) + self.wpe(jnp.arange(T))  # (B, T, C)
        x = self.drop(x, deterministic=not train)
        return self.ln_f(self.h(x, train)[0])

    def head(self, h):
        """Tied LM head: h @ wte.T over the padded vocabulary, returned in at least fp32."""
        return self.wte.attend(h, self.dtype).astype(wide(self.dtype))

    def __call__(self, idx, train: bool = False):
        return self.head(self.features(idx, train))

    def loss(self, idx, targets, train: bool = False, chunk_rows: int | None = None):
        """Mean cross-entropy of the next tokens; with chunk_rows > 0 (default: the module's loss_chunk_rows) the
        head and loss run fused over row chunks and the (B·T, V) logits never exist."""
        h = self.features(idx, train)
        chunk_rows = self.loss_chunk_rows if chunk_rows is None else chunk_rows
        if chunk_rows <= 0:
            return lm_loss(self.head(h), targets, self.cfg.vocab_size)
        return chunked_lm_loss(h.reshape(-1, h.shape[-1]), self.wte.weight, targets.reshape(-1),
                               self.cfg.vocab_size, chunk_rows, self.dtype)


def to_common(params) -> dict[str, np.ndarray]:
    """The weights (or any params-shaped tree) as common weights, per layer: fresh numpy copies (never
    aliases of device buffers) in the leaves' dtype, float32 or float64."""
    return {k: np.array(v, copy=True) for k, v in unstacked(jax.device_get(params)).items()}


def from_common(weights: dict[str, np.ndarray], cfg: ModelConfig, param_dtype: Dtype = jnp.float32,
                source: str = "weights") -> dict:
    """Common weights -> a params tree of `param_dtype`, blocks stacked (copied: torch buffers are never
    aliased)."""
    check_weights(weights, cfg, source)
    # stacked copies the blocks into their stacks; the other tensors are copied here.
    tree = stacked({k: weights[k] if k.startswith(LAYERS + ".") else np.array(weights[k], copy=True)
                    for k in param_shapes(cfg)})
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=param_dtype), tree)
