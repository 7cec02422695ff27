"""The kernels the torch model calls its own way: fp32 GEMMs through oneDNN on CPUs where it is faster.

jax_impl/ops.py is its counterpart (what XLA needs written out). Same precision either way, another
summation order; `python -m parity.probe` measures this CPU's GEMM rates per library.
"""
from __future__ import annotations

import torch

from common.cpuinfo import cpuinfo_field

_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# fp32 matmuls of the blocks through oneDNN instead of aten's MKL sgemm where MKL is slow: MKL takes its
# generic path on non-Intel CPUs. On Intel CPUs MKL is as fast or faster for every block GEMM, and
# oneDNN's weight-gradient GEMM (two transposed inputs, reordered by copies) is slower, so they stay on
# aten. Only plain fp32 eager CPU calls take oneDNN: autocast, fp64 and torch.compile keep aten.
ONEDNN_FP32 = _ONEDNN_AVAILABLE and cpuinfo_field("vendor_id") != "GenuineIntel"
# The tied head's forward (K = n_embd against the 50k-wide vocabulary) is faster on oneDNN on both vendors.
ONEDNN_FP32_HEAD = _ONEDNN_AVAILABLE


def _use_onednn(*tensors: torch.Tensor, enabled: bool | None = None) -> bool:
    return ((ONEDNN_FP32 if enabled is None else enabled)
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool | None = None
           ) -> torch.Tensor:
    """a @ b (+ bias) for 2-D a and b, without autograd; oneDNN for fp32 on CPU where it is the faster library."""
    if _use_onednn(a, b, enabled=onednn):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")
    return torch.addmm(bias, a, b) if bias is not None else a @ b


def matmul_add_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha · a @ b in place: aten's addmm_ folds the sum into the GEMM's own write of `out`."""
    if _use_onednn(a, b):
        return out.add_(matmul(a, b), alpha=alpha)
    if out.dtype != a.dtype:  # autocast's bf16 products into fp32 accumulators
        return out.add_(a @ b, alpha=alpha)
    return out.addmm_(a, b, alpha=alpha)


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ W + b with all three matmuls of forward and backward on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = matmul(grad_y, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = matmul(x.t(), grad_y) if ctx.needs_input_grad[1] else None
        grad_b = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 @ weight (+ bias) for 2-D x2 and an (in, out) weight, differentiable."""
    if _use_onednn(x2, weight):
        return _OneDNNLinear.apply(x2, weight, bias)
    return torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
