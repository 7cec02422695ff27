"""AdamW with weight decay on matrices and embeddings only, the lr of common.schedule, and clipping.

jax_impl/optim.py builds the same optimizer from optax, in the same order of functions.
"""
from __future__ import annotations

import torch

from common.config import Config
from common.names import decay_groups
from common.schedule import CLIP_EPS
from torch_impl import dist


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """AdamW's two groups in common.names.decay_groups' order (a checkpoint's optimizer state numbers the
    parameters in this order: torch_impl/checkpoint.py reads it back by name)."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(cfg.model)
    return [{"params": [params[n] for n in decay], "weight_decay": cfg.optim.weight_decay, "name": "decay"},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """torch's AdamW is decoupled: p ← p·(1 − lr·wd) before the Adam step, as the JAX side reproduces."""
    o = cfg.optim
    # The fused kernel exists for CUDA and CPU. On CPU it is one pass per tensor where foreach allocates
    # temporaries (sqrt(v), the bias-corrected denominators) as large as the model. Same math,
    # rounding-level drift; `python -m parity.profile --shape gpt2-124m` shows the optimizer's share.
    return torch.optim.AdamW(param_groups(model, cfg), lr=o.max_lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_by_global_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s rule, g · min(1, max_norm / (‖g‖ + 1e-6)), in place (max_norm 0
    only measures); returns the pre-clip norm, the same number whether the gradients are whole or
    sharded (FSDP2)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = global_norm(grads)
    shards = [dist.local(g) for g in grads]
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)
        torch._foreach_mul_(shards, coef.to(shards[0].dtype))
    return total.to(shards[0].dtype)


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients, in float64.

    Summed more carefully than clip_grad_norm_: torch's fp32 norm of the whole 50k-row embedding
    gradient is off in the fifth digit on CPU, enough to move the clip coefficient (parity.check sees
    it). Norms of rows (a few hundred to a few thousand elements) are exact to rounding in fp32 and
    their squares are summed in float64, which costs one fp32 read of the gradients, not an fp64 copy.
    Sharded gradients (FSDP2 shards by rows) contribute their rows' squares, and vectors their entries,
    and dist.whole_rows gathers them, so the sum runs over the same numbers in the same order as
    unsharded: a last-bit difference would move the clip coefficient and then every later step.
    """
    pieces = [torch.linalg.vector_norm(dist.local(g).flatten(1), dim=1).double().square() if g.ndim > 1
              else dist.local(g) for g in grads]
    whole = dist.whole_rows(pieces, grads)
    squares = [w if g.ndim > 1 else torch.linalg.vector_norm(w.to(g.dtype).reshape(1, -1), dim=1).double().square()
               for w, g in zip(whole, grads)]
    return torch.cat(squares).sum().sqrt()
