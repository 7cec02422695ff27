"""AdamW with weight decay on matrices and embeddings only (common.names.decays)."""
from __future__ import annotations

import torch

from common.config import Config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    from common.names import decays

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, tuple(p.shape)) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """torch's AdamW is decoupled: p ← p·(1 − lr·wd) before the Adam step, as the JAX side reproduces."""
    o = cfg.optim
    on_cuda = next(model.parameters()).device.type == "cuda"
    # fused kernels exist for CUDA; on CPU the multi-tensor (foreach) path is the fast one.
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.max_lr, betas=tuple(o.betas), eps=o.eps,
                             **kind)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
