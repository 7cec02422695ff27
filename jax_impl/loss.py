"""The LM loss of the tied head: cross-entropy over the real vocabulary, and its fused row-chunked form.

torch_impl/loss.py is the same two functions in PyTorch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl.ops import Dtype, wide


def lm_loss(logits, targets, vocab_size: int):
    """Mean cross-entropy over real vocabulary columns only: padded columns never enter the softmax."""
    real = logits[..., :vocab_size].astype(wide(logits.dtype))
    return optax.softmax_cross_entropy_with_integer_labels(real, targets).mean()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def chunked_lm_loss(h, wte, targets, vocab_size: int, chunk_rows: int, dtype: Dtype):
    """lm_loss(h @ wte.T, targets, vocab_size) for h (N, C), computed chunk_rows rows at a time.

    The head matmuls run in `dtype` and the softmax in at least fp32, as in GPT.head + lm_loss.
    """
    return _chunked_pass(h, wte, targets, vocab_size, chunk_rows, dtype, with_grad=False)[0]


def _chunked_fwd(h, wte, targets, vocab_size, chunk_rows, dtype):
    loss, grad_h, grad_w = _chunked_pass(h, wte, targets, vocab_size, chunk_rows, dtype, with_grad=True)
    return loss, (grad_h, grad_w, targets)


def _chunked_bwd(vocab_size, chunk_rows, dtype, residuals, g):
    """The gradients were computed with the loss; backward only scales them by the incoming scalar."""
    grad_h, grad_w, targets = residuals
    zero_targets = np.zeros(targets.shape, dtype=jax.dtypes.float0)  # integer input: no cotangent
    return (g * grad_h).astype(grad_h.dtype), (g * grad_w).astype(grad_w.dtype), zero_targets


chunked_lm_loss.defvjp(_chunked_fwd, _chunked_bwd)


def _chunked_pass(h, wte, targets, vocab_size, chunk_rows, dtype, with_grad: bool):
    """(mean loss, grad_h, grad_wte) — grads None unless with_grad — over full chunks in a lax.scan
    (XLA keeps one chunk's logits alive) plus a remainder chunk when chunk_rows does not divide N.

    Per chunk: loss += logsumexp(h_c @ wte[:V].T) − logit[target], and d mean-loss / d logits
    = (softmax − onehot) / N gives grad_h_c and the chunk's share of grad_wte in the same pass, so
    nothing is recomputed in backward. Padded rows of wte get zero gradient.
    """
    n, c = h.shape
    acc = wide(dtype)
    w = wte[:vocab_size].astype(dtype)  # (V, C): padded columns never enter the softmax

    def chunk(h_c, t_c):
        logits = jnp.dot(h_c.astype(dtype), w.T).astype(acc)  # (rows, V)
        # exp(logits − max) once, for both the logsumexp and the softmax: log_softmax followed by exp
        # would evaluate the exponentials twice over the (rows, V) chunk.
        top = logits.max(axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = e.sum(axis=-1, keepdims=True)
        target_logit = jnp.take_along_axis(logits, t_c[:, None], axis=1)
        loss = (top + jnp.log(total) - target_logit).sum()
        if not with_grad:
            return loss, None, None
        dlogits = (e / total - jax.nn.one_hot(t_c, vocab_size, dtype=acc)) / n
        dlogits = dlogits.astype(dtype)
        return loss, jnp.dot(dlogits, w).astype(h.dtype), jnp.dot(dlogits.T, h_c.astype(dtype)).astype(wte.dtype)

    full = n // chunk_rows * chunk_rows

    def body(carry, inputs):
        loss, grad_w = carry
        l_c, gh_c, gw_c = chunk(*inputs)
        return (loss + l_c, grad_w + gw_c if with_grad else grad_w), gh_c

    loss, grad_w = jnp.zeros((), acc), jnp.zeros((vocab_size, c), wte.dtype) if with_grad else None
    grad_h = []
    if full:
        (loss, grad_w), gh = jax.lax.scan(body, (loss, grad_w), (h[:full].reshape(-1, chunk_rows, c),
                                                                 targets[:full].reshape(-1, chunk_rows)))
        grad_h.append(gh.reshape(full, c) if with_grad else None)
    if full < n:
        l_c, gh_c, gw_c = chunk(h[full:], targets[full:])
        loss, grad_w = loss + l_c, grad_w + gw_c if with_grad else None
        grad_h.append(gh_c)
    if not with_grad:
        return loss / n, None, None
    grad_h = jnp.concatenate(grad_h) if len(grad_h) > 1 else grad_h[0]
    grad_w = jnp.pad(grad_w, ((0, wte.shape[0] - vocab_size), (0, 0)))
    return loss / n, grad_h, grad_w
