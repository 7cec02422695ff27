"""The kernels the torch model calls its own way: fp32 GEMMs through oneDNN where the machine runs them faster.

jax_impl/ops.py is its counterpart (what XLA needs written out). Same precision either way, another
summation order. Which library runs what is a lever (torch_impl/levers.py times both on the machine at
hand and calls set_gemm): aten's sgemm (MKL in the CPU wheels, whose fast path depends on the CPU) or
oneDNN's JIT kernels, separately for the blocks' linears (and the head's two backward products) and for
the tied head's forward, whose shape (K = n_embd against the 50k-wide vocabulary) is unlike the others'.
"""
from __future__ import annotations

import torch

GEMMS = ("aten", "onednn")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# The library of each GEMM lever ("gemm": the blocks, "head_gemm": the head's forward). Only plain fp32
# eager CPU calls take oneDNN: autocast, fp64 and torch.compile keep aten.
_LIBRARY = {"gemm": "aten", "head_gemm": "aten"}


def set_gemm(gemm: str, head_gemm: str) -> None:
    """Route fp32 CPU GEMMs through `gemm` and the head's forward through `head_gemm` (one of GEMMS)."""
    for lever, library in (("gemm", gemm), ("head_gemm", head_gemm)):
        if library not in GEMMS or (library == "onednn" and not onednn_available()):
            raise ValueError(f"{lever}: cannot use {library!r} (this torch has oneDNN: {onednn_available()})")
        _LIBRARY[lever] = library


def gemm_of(lever: str) -> str:
    return _LIBRARY[lever]


def _use_onednn(*tensors: torch.Tensor, lever: str = "gemm") -> bool:
    return (_LIBRARY[lever] == "onednn"
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, lever: str = "gemm"
           ) -> torch.Tensor:
    """a @ b (+ bias) for 2-D a and b, without autograd, through the library of `lever`."""
    if _use_onednn(a, b, lever=lever):
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
