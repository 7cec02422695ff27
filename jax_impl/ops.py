"""The operations the JAX model writes out itself: blocked causal attention, and GPT-2's GELU with the
backward torch computes.

torch_impl/ops.py is its counterpart (torch's own GEMM dispatch). Both are what one framework needs
done its own way for the two backends to compute the same numbers at comparable speed.
"""
from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def wide(dtype: Dtype) -> Dtype:
    """The precision of the numerically sensitive parts: fp32 unless the whole run is fp64."""
    return jnp.promote_types(dtype, jnp.float32)


# Query rows per block of causal attention (see causal_attention).
ATTN_BLOCK_ROWS = 128

# The attention kernels the model can run: its own blocked attention (any platform and dtype, with
# attention dropout), or cuDNN's fused flash attention through jax.nn.dot_product_attention (NVIDIA GPUs,
# 16-bit inputs, no attention dropout), the kernel torch's SDPA runs there.
ATTENTIONS = ("blocked", "fused")


def attention_for(platform: str, dtype: Dtype, dropout: float) -> str:
    """The attention a model on `platform` ("cpu", "gpu", ...) computing in `dtype` runs: the fused one
    where cuDNN's flash attention applies (GPU, 16-bit, no attention dropout), else the blocked one. fp32
    stays blocked on GPUs too, so the parity mode compares the same math on every platform."""
    if platform == "gpu" and jnp.dtype(dtype).itemsize == 2 and dropout == 0:
        return "fused"
    return "blocked"


def fused_causal_attention(q, k, v):
    """softmax(q·kᵀ/√hs, causal) · v for q, k, v of shape (B, T, nh, hs), by cuDNN's flash attention.

    jax.nn.dot_product_attention's default implementation is XLA's (it materialises the (T, T) scores),
    so cuDNN is asked for by name. Where cuDNN refuses the call while tracing (no cuDNN, an unsupported
    head size or GPU), XLA's implementation of the same call runs instead, with a warning.
    """
    try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as e:
        warnings.warn(f"cuDNN's fused attention is unavailable ({e}); using XLA's attention", stacklevel=2)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


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
        att = att.astype(wide(dtype))
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
    formula would keep four more (B, T, 4C) intermediates per layer, which lax.scan stacks over the
    layers and writes forward and reads backward every step (`python -m parity.profile` shows the
    copies of such stacks among the top ops).
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, dy):
    # torch's GeluBackward (tanh) term for term, in fp32 for bf16 inputs as torch's CPU kernel computes.
    x, wide_dy = x.astype(wide(x.dtype)), dy.astype(wide(x.dtype))
    x_sq = x * x
    tanh_inner = jnp.tanh(_GELU_BETA * (x + _GELU_KAPPA * (x_sq * x)))
    left_derivative = 0.5 * (1 + tanh_inner)
    right_derivative = (0.5 * x) * (1 - tanh_inner * tanh_inner) * (_GELU_BETA * (1 + 3 * _GELU_KAPPA * x_sq))
    return ((wide_dy * (left_derivative + right_derivative)).astype(dy.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)
