"""The LM loss of the tied head: cross-entropy over the real vocabulary, and its fused row-chunked form.

jax_impl/loss.py is the same two functions in JAX.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_impl.ops import matmul, matmul_add_


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
                # log_softmax is F.cross_entropy's own first step: one fused pass over the chunk. It
                # overwrites the logits, which nothing reads again: a second (rows, V) buffer would be
                # fresh memory, page-faulted in on every chunk (each row is read whole before it is
                # written, so the result is the same bit for bit).
                logits = matmul(h_c, w.t(), lever="head_gemm").to(wide)  # (rows, V)
                logp = torch.log_softmax(logits, dim=1, out=logits)
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
        # Scaled in place rather than into a new (padded_vocab, C) product, whose allocation and page
        # faults are a visible share of a large model's step. The saved gradients are then spent:
        # autograd's version check refuses a second backward through the same graph.
        return (grad_h.mul_(grad_loss.to(grad_h.dtype)), grad_w.mul_(grad_loss.to(grad_w.dtype)),
                None, None, None, None, None)
