"""GPT-2 in PyTorch, parameter for parameter the layout of common/names.py.

Linear weights are stored (in, out) like Hugging Face's Conv1D and Flax's Dense, so the state_dict
*is* the common weights: to_common / from_common rename nothing and transpose nothing.
Shapes are noted as (B, T, C): batch, time, channels; nh heads of hs = C / nh.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ModelConfig
from common.cpuinfo import cpuinfo_field
from common.names import check_weights, init_std, param_shapes


# Aligned with jax_impl/model.py (docs/parity.md): F.gelu defaults to erf, GPT-2 uses tanh.
LN_EPS = 1e-5
GELU_APPROXIMATE = "tanh"


_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# fp32 matmuls of the blocks through oneDNN instead of aten's MKL sgemm where MKL is slow: MKL takes its
# generic path on non-Intel CPUs and ran at about half of oneDNN's AVX-512 kernels on the AMD EPYC
# measured in docs/performance.md. On Intel CPUs MKL is as fast or faster for every block GEMM, and
# oneDNN's weight-gradient GEMM (two transposed inputs, reordered by copies) is 1.3-3x slower, so they
# stay on aten. Same precision either way, another summation order. Only plain fp32 eager CPU calls
# take oneDNN: autocast, fp64 and torch.compile keep aten.
ONEDNN_FP32 = _ONEDNN_AVAILABLE and cpuinfo_field("vendor_id") != "GenuineIntel"
# The tied head's forward (K = n_embd against the 50k-wide vocabulary) is faster on oneDNN on both
# vendors measured (Intel Xeon: 8.8 vs 12.7 ms for 128 rows x 128 x 50,257).
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


class Conv1D(nn.Module):
    """y = x @ W + b with W of shape (in, out): HF GPT-2's layout, kept to avoid transposes."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.weight.shape[1],)
        x2 = x.reshape(-1, x.shape[-1])
        if _use_onednn(x2, self.weight):
            return _OneDNNLinear.apply(x2, self.weight, self.bias).view(shape)
        y = torch.addmm(self.bias, x2, self.weight) if self.bias is not None else x2 @ self.weight
        return y.view(shape)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd, cfg.bias)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd, cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd, cfg.bias)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 and HF use the tanh approximation; F.gelu's default (erf) differs by ~1e-5 in logits.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=GELU_APPROXIMATE)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=LN_EPS, bias=cfg.bias)
        self.loss_chunk_rows = cfg.loss_chunk_rows
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 init, drawn in the fixed order of common.names.param_shapes (so a seed fixes it)."""
        params = dict(self.named_parameters())
        for name in param_shapes(self.cfg):
            p = params[name]
            if p.ndim >= 2:
                p.normal_(0.0, init_std(name, self.cfg), generator=generator)
            elif name.endswith(".bias"):
                p.zero_()
            else:  # the only 1-D weights are LayerNorm gains
                p.fill_(1.0)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, T, padded_vocab_size), mean cross-entropy in fp32 or None).

        In training mode with targets and loss_chunk_rows > 0 the logits are never materialised:
        (None, loss) from the fused chunked head + loss. Eval mode always returns the logits.
        """
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than model.block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is not None and self.training and self.loss_chunk_rows > 0:
            return None, chunked_lm_loss(x, self.wte.weight, targets, self.cfg.vocab_size, self.loss_chunk_rows)
        logits = x @ self.wte.weight.T  # tied head: (B, T, padded_vocab_size)
        loss = None
        if targets is not None:
            loss = lm_loss(logits, targets, self.cfg.vocab_size)
        return logits, loss

    def to_common(self, dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
        """Fresh numpy copies (never views of the live parameters, which the optimizer updates in place)."""
        return {k: v.detach().to("cpu", torch.float64).numpy().astype(dtype, copy=True)
                for k, v in self.state_dict().items()}

    @torch.no_grad()
    def load_common(self, weights: dict[str, np.ndarray], source: str = "weights") -> None:
        check_weights(weights, self.cfg, source)
        for name, p in self.named_parameters():
            p.copy_(torch.from_numpy(np.array(weights[name], copy=True)).to(p.dtype))

    @classmethod
    def from_common(cls, weights: dict[str, np.ndarray], cfg: ModelConfig, source: str = "weights") -> "GPT":
        model = cls(cfg)
        model.load_common(weights, source)
        return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy over real vocabulary columns only: padded columns never enter the softmax."""
    real = logits[..., :vocab_size]
    if real.dtype != torch.float64:
        real = real.float()
    return F.cross_entropy(real.reshape(-1, vocab_size), targets.reshape(-1).long())



def chunked_lm_loss(h: torch.Tensor, wte: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                    chunk_rows: int) -> torch.Tensor:
    """lm_loss(h @ wte.T, targets, vocab_size) computed `chunk_rows` rows at a time.

    h (..., C) are the final hidden states, wte (padded_vocab_size, C) the tied embedding. Under
    autocast the head matmuls run in the autocast dtype and the softmax in fp32, as in the unfused path.
    """
    device = h.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with_grad = torch.is_grad_enabled() and (h.requires_grad or wte.requires_grad)
    return _ChunkedLMLoss.apply(h.reshape(-1, h.shape[-1]), wte, targets.reshape(-1).long(), vocab_size,
                                chunk_rows, compute, with_grad)


class _ChunkedLMLoss(torch.autograd.Function):
    """Mean cross-entropy of the tied head, its gradients computed in the same pass over the chunks.

    Per chunk of rows: logp = log_softmax(h_c @ wte[:V].T), loss −= logp[target], and (when grads
    are needed) d mean-loss / d logits = (softmax − onehot) / N, from which grad_h_c and the chunk's
    share of grad_wte follow at once. Backward only scales the two saved gradients by the incoming scalar,
    so nothing is recomputed and no (N, V) tensor ever exists. Padded rows of wte get zero gradient.
    """

    @staticmethod
    def forward(ctx, h, wte, targets, vocab_size, chunk_rows, compute, with_grad):
        n = h.shape[0]
        wide = torch.promote_types(compute, torch.float32)
        with torch.autocast(h.device.type, enabled=False):  # casts below are explicit
            w = wte[:vocab_size].to(compute)  # (V, C): padded columns never enter the softmax
            loss = torch.zeros((), dtype=wide, device=h.device)
            grad_h = torch.empty_like(h) if with_grad else None
            grad_w = torch.zeros_like(wte) if with_grad else None
            for start in range(0, n, chunk_rows):
                h_c, t_c = h[start:start + chunk_rows].to(compute), targets[start:start + chunk_rows]
                # log_softmax is F.cross_entropy's own first step: one fused pass over the chunk.
                logp = torch.log_softmax(matmul(h_c, w.t(), onednn=ONEDNN_FP32_HEAD).to(wide), dim=1)  # (rows, V)
                loss -= logp.gather(1, t_c[:, None]).sum()
                if with_grad:  # n · d mean-loss / d logits = softmax − onehot, in place over logp; the 1/n
                    # is applied to the two small products instead of to the (rows, V) chunk.
                    dlogits = logp.exp_()
                    dlogits[torch.arange(len(t_c), device=h.device), t_c] -= 1.0
                    dlogits = dlogits.to(compute)
                    grad_h[start:start + chunk_rows] = matmul(dlogits, w).mul_(1.0 / n)
                    matmul_add_(grad_w[:vocab_size], dlogits.t(), h_c, alpha=1.0 / n)
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("chunked_lm_loss was called without gradients enabled; it cannot be differentiated")
        # Scaled in place: a new (padded_vocab, C) product per step was 7% of a GPT-2 124M step (allocation
        # and page faults of 154 MB). The saved gradients are then spent: autograd's version check refuses
        # a second backward through the same graph.
        return (grad_h.mul_(grad_loss.to(grad_h.dtype)), grad_w.mul_(grad_loss.to(grad_w.dtype)),
                None, None, None, None, None)
