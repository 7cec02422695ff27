"""GPT-2 in PyTorch, parameter for parameter the layout of common/names.py.

Linear weights are stored (in, out) like Hugging Face's Conv1D and Flax's Dense, so the state_dict
*is* the common weights: to_common / from_common rename nothing and transpose nothing.
Shapes are noted as (B, T, C): batch, time, channels; nh heads of hs = C / nh.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ModelConfig
from common.names import check_weights, init_std, param_shapes


# Aligned with jax_impl/model.py (docs/parity.md): F.gelu defaults to erf, GPT-2 uses tanh.
LN_EPS = 1e-5
GELU_APPROXIMATE = "tanh"

# Rows of (B·T) per chunk of the fused LM head + cross-entropy in training (0 = materialise the full
# logits). 128 rows of the 50,257 real columns are 26 MB of fp32 logits instead of 206 MB per 1,024
# tokens: under glibc's 32 MB mmap ceiling, so with the Makefile's malloc settings the chunk buffers
# are reused from the heap instead of being mapped and page-faulted afresh (docs/performance.md).
LOSS_CHUNK_ROWS = 128

# fp32 matmuls through oneDNN instead of aten's MKL sgemm: MKL takes its generic path on AMD CPUs and
# runs at about half of oneDNN's AVX-512 kernels (docs/performance.md). Same precision, another
# summation order. Only plain fp32 eager calls take it: autocast, fp64 and torch.compile keep aten.
ONEDNN_FP32 = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(*tensors: torch.Tensor) -> bool:
    return (ONEDNN_FP32 and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias) for 2-D a and b, without autograd; oneDNN for fp32 on CPU (strided views are fine)."""
    if _use_onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")
    return torch.addmm(bias, a, b) if bias is not None else a @ b


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
        self.loss_chunk_rows = LOSS_CHUNK_ROWS
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
                logp = torch.log_softmax(matmul(h_c, w.t()).to(wide), dim=1)  # (rows, V)
                loss -= logp.gather(1, t_c[:, None]).sum()
                if with_grad:  # d mean-loss / d logits = (softmax − onehot) / n, in place over logp
                    dlogits = logp.add_(-math.log(n)).exp_()
                    dlogits[torch.arange(len(t_c), device=h.device), t_c] -= 1.0 / n
                    dlogits = dlogits.to(compute)
                    grad_h[start:start + chunk_rows] = matmul(dlogits, w)
                    grad_w[:vocab_size] += matmul(dlogits.t(), h_c)
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("chunked_lm_loss was called without gradients enabled; it cannot be differentiated")
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None, None
