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
from common.names import check_weights, init_std, param_shapes


# Aligned with jax_impl/model.py (docs/parity.md): F.gelu defaults to erf, GPT-2 uses tanh.
LN_EPS = 1e-5
GELU_APPROXIMATE = "tanh"


class Conv1D(nn.Module):
    """y = x @ W + b with W of shape (in, out): HF GPT-2's layout, kept to avoid transposes."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.weight.shape[1],)
        x2 = x.reshape(-1, x.shape[-1])
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
        """(logits (B, T, padded_vocab_size), mean cross-entropy in fp32 or None)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than model.block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
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
