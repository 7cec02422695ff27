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
from common.names import LN_EPS, check_weights
from torch_impl.loss import chunked_lm_loss, lm_loss
from torch_impl.ops import linear

# Aligned with jax_impl/model.py (docs/parity.md): F.gelu defaults to erf, GPT-2 uses tanh.
GELU_APPROXIMATE = "tanh"


class Conv1D(nn.Module):
    """y = x @ W + b with W of shape (in, out): HF GPT-2's layout, kept to avoid transposes."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(shape)


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
        # GPT-2 and HF use the tanh approximation; F.gelu's default is erf.
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
    """Built with placeholder values; from_common gives it weights (the GPT-2 init is
    common.names.init_weights, the same arrays the JAX model starts from)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=LN_EPS, bias=cfg.bias)
        self.loss_chunk_rows = 0  # run.loss_chunk_rows, set by the trainer: a run's choice, not the model's shape

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


def to_common(model: GPT) -> dict[str, np.ndarray]:
    """The weights as common weights: fresh numpy copies (never views of the live parameters, which the
    optimizer updates in place) in the parameters' dtype, float32 or float64."""
    return {k: v.detach().to("cpu").numpy().copy() for k, v in model.state_dict().items()}


@torch.no_grad()
def from_common(weights: dict[str, np.ndarray], cfg: ModelConfig, param_dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", source: str = "weights") -> GPT:
    """A GPT holding copies of `weights` in `param_dtype` on `device` (never aliasing the arrays)."""
    check_weights(weights, cfg, source)
    with torch.device("meta"):  # no default init drawn only to be overwritten
        model = GPT(cfg)
    model = model.to_empty(device=device).to(dtype=param_dtype)
    for name, p in model.named_parameters():
        p.copy_(torch.from_numpy(np.array(weights[name], copy=True)).to(p.dtype))
    return model
