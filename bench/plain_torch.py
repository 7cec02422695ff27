"""The plain PyTorch GPT-2 training step: the yardstick torch_impl is measured against (`parity.bench --vs-plain`).

What a user writes first, after nanoGPT's model.py and train.py: eager mode, nn.Linear layers, SDPA
causal attention, tanh GELU, the tied head's full (B·T, V) logits into F.cross_entropy, gradient
accumulation by repeated backward, clip_grad_norm_ and torch.optim.AdamW(fused=True). Nothing from
torch_impl: it is written independently, so it can show what torch_impl's own choices buy. It computes
the same function as torch_impl (tests/test_plain.py checks the loss on the same weights and batch):
the padded rows of the embedding are kept (the weight layout) but only the real vocabulary's columns
enter the softmax, and weight decay goes to matrices and embeddings only, with the shared LR schedule.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import Config, ModelConfig
from common.schedule import lr_at


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        # The tied head over the real vocabulary: (B, T, V) logits, all of them materialised.
        logits = F.linear(self.ln_f(x), self.wte.weight[:self.vocab_size])
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def load_common(model: GPT, weights: dict[str, np.ndarray]) -> None:
    """Common weights (HF names, linear weights stored (in, out)) into the model; nn.Linear holds (out, in)."""
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = {k: torch.from_numpy(np.ascontiguousarray(w.T if k.rsplit(".", 1)[0] in linear and w.ndim == 2 else w))
             for k, w in weights.items()}
    model.load_state_dict(state, strict=True)


def pick_device(cfg: Config) -> torch.device:
    if cfg.run.device != "cpu" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def build(cfg: Config, weights: dict[str, np.ndarray]) -> tuple[Callable[[np.ndarray, np.ndarray], torch.Tensor], str]:
    """(step, device kind): `step(x, y)` trains one optimizer step on (accum, rows, T) token arrays and returns
    the mean loss of its micro-batches (before the update)."""
    device = pick_device(cfg)
    model = GPT(cfg.model)
    load_common(model, weights)
    model.to(device).train()
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.max_lr, betas=tuple(o.betas), eps=o.eps, fused=True)
    step_count = 0

    def step(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        nonlocal step_count
        xs = torch.from_numpy(np.asarray(x, dtype=np.int64)).to(device)
        ys = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        accum = xs.size(0)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            loss = model(xs[micro], ys[micro])
            loss_sum += loss.detach()
            (loss / accum).backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step_count, o)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_count += 1
        return loss_sum / accum

    return step, device.type
