"""The fused, row-chunked LM head + cross-entropy equals the unfused path, in both backends.

Same test names on both sides; the vocabulary is padded (250 real of 256 rows) and the 3 × 7 = 21
rows are not a multiple of the chunk of 8, so the remainder chunk is exercised too.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from common.config import ModelConfig
from common.names import init_weights
from jax_impl import loss as jl
from jax_impl import model as jm
from jax_impl.layout import flatten
from torch_impl import loss as tl
from torch_impl import model as tm

V, VP, C, ROWS, CHUNK = 250, 256, 32, (3, 7), 8
CFG = ModelConfig(vocab_size=V, padded_vocab_size=VP, block_size=16, n_layer=2, n_head=2, n_embd=C)
# Rounding-level bounds (the parity suite's fp32 budget is 1e-5 relative on step-0 grads).
TOL = {"fp32": 2e-6, "fp64": 1e-13}


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal(ROWS + (C,))
    wte = 0.5 * rng.standard_normal((VP, C))
    wte[V:] = 10 * h.reshape(-1, C).mean(0)  # padded rows would win every softmax if they entered it
    targets = rng.integers(0, V, ROWS)
    return h, wte, targets


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_loss_and_grads(chunk: int, dtype: torch.dtype, scale: float = 1.0):
    h, wte, targets = (torch.tensor(a) for a in inputs())
    h = h.to(dtype).requires_grad_()
    wte = wte.to(dtype).requires_grad_()
    if chunk:
        loss = tl.chunked_lm_loss(h, wte, targets, V, chunk)
    else:
        loss = tl.lm_loss(h @ wte.T, targets, V)
    (scale * loss).backward()
    return loss.item(), h.grad.double().numpy(), wte.grad.double().numpy()


def jax_loss_and_grads(chunk: int, dtype, scale: float = 1.0):
    h, wte, targets = inputs()
    h, wte, targets = jnp.asarray(h, dtype), jnp.asarray(wte, dtype), jnp.asarray(targets, jnp.int32)

    def f(h, wte):
        if chunk:
            return jl.chunked_lm_loss(h.reshape(-1, C), wte, targets.reshape(-1), V, chunk, dtype)
        return jl.lm_loss(jnp.dot(h, wte.T), targets, V)

    loss, (gh, gw) = jax.jit(jax.value_and_grad(lambda h, w: scale * f(h, w), argnums=(0, 1)))(h, wte)
    return float(loss) / scale, np.asarray(gh, np.float64), np.asarray(gw, np.float64)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_torch_chunked_matches_full(mode):
    dtype = torch.float32 if mode == "fp32" else torch.float64
    full = torch_loss_and_grads(0, dtype)
    chunked = torch_loss_and_grads(CHUNK, dtype, scale=0.5)  # the incoming gradient is applied in backward
    assert abs(chunked[0] - full[0]) <= TOL[mode] * full[0]
    assert rel(2 * chunked[1], full[1]) <= TOL[mode]
    assert rel(2 * chunked[2], full[2]) <= TOL[mode]
    assert np.all(chunked[2][V:] == 0) and np.all(full[2][V:] == 0)


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_jax_chunked_matches_full(mode, request):
    if mode == "fp64":
        request.getfixturevalue("x64")
    dtype = jnp.float32 if mode == "fp32" else jnp.float64
    full = jax_loss_and_grads(0, dtype)
    chunked = jax_loss_and_grads(CHUNK, dtype, scale=0.5)
    assert chunked[1].dtype == np.float64 and full[1].shape == ROWS + (C,)
    assert abs(chunked[0] - full[0]) <= TOL[mode] * full[0]
    assert rel(2 * chunked[1], full[1]) <= TOL[mode]
    assert rel(2 * chunked[2], full[2]) <= TOL[mode]
    assert np.all(chunked[2][V:] == 0) and np.all(full[2][V:] == 0)


def test_torch_and_jax_chunked_agree_in_fp64(x64):
    t = torch_loss_and_grads(CHUNK, torch.float64)
    j = jax_loss_and_grads(CHUNK, jnp.float64)
    assert abs(t[0] - j[0]) <= 1e-13 * t[0]
    assert rel(t[1], j[1]) <= 1e-13 and rel(t[2], j[2]) <= 1e-13


def test_chunk_size_does_not_change_the_loss_beyond_rounding():
    losses = [torch_loss_and_grads(chunk, torch.float64)[0] for chunk in (1, 5, 8, 21, 64)]
    assert max(losses) - min(losses) <= 1e-13 * losses[0]


def test_torch_model_training_forward_uses_the_chunked_loss():
    model = tm.from_common(init_weights(CFG, 0), CFG)
    idx = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(2))
    grads = {}
    for chunk in (0, 20):
        model.loss_chunk_rows = chunk
        model.zero_grad(set_to_none=True)
        logits, loss = model.train()(idx, targets)
        loss.backward()
        assert (logits is None) == (chunk > 0)
        grads[chunk] = (loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[20][0] == pytest.approx(grads[0][0], rel=1e-6)
    for k, g in grads[0][1].items():
        assert rel(grads[20][1][k], g) <= 1e-5, k
    logits, loss = model.eval()(idx, targets)  # evaluation keeps the logits
    assert logits.shape == (3, 16, VP) and loss.item() == pytest.approx(grads[0][0], rel=1e-6)


def test_jax_model_loss_method_matches_logits_path():
    model = jm.GPT(CFG)
    params = jm.from_common(init_weights(CFG, 0), CFG)
    idx = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, V)
    targets = jax.random.randint(jax.random.PRNGKey(2), (3, 16), 0, V)

    def loss(p, chunk):
        return model.apply({"params": p}, idx, targets, method=jm.GPT.loss, chunk_rows=chunk)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    full, g_full = grad(params, 0)
    chunked, g_chunked = grad(params, 20)
    assert float(full) == pytest.approx(float(jl.lm_loss(model.apply({"params": params}, idx), targets, V)), rel=1e-6)
    assert float(chunked) == pytest.approx(float(full), rel=1e-6)
    for k, g in flatten(g_full).items():
        assert rel(flatten(g_chunked)[k], g) <= 1e-5, k


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_chunked_loss_under_bf16_stays_close_to_unfused(backend):
    if backend == "torch":
        h, wte, targets = (torch.tensor(a) for a in inputs())
        h, wte = h.float(), wte.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = tl.lm_loss(h @ wte.T, targets, V).item()
            chunked = tl.chunked_lm_loss(h, wte, targets, V, CHUNK).item()
    else:
        h, wte, targets = inputs()
        h, wte = jnp.asarray(h, jnp.float32), jnp.asarray(wte, jnp.float32)
        full = float(jl.lm_loss(jnp.dot(h.astype(jnp.bfloat16), wte.astype(jnp.bfloat16).T).astype(jnp.float32),
                                jnp.asarray(targets), V))
        chunked = float(jax.jit(jl.chunked_lm_loss, static_argnums=(3, 4, 5))(
            h.reshape(-1, C), wte, jnp.asarray(targets).reshape(-1), V, CHUNK, jnp.bfloat16))
    # torch: the same bf16 logits on both paths, only the fp32 reduction order differs. XLA may round
    # the bf16 dot's output differently per shape (a few bf16 ulps of single logits), so a bf16-level bound.
    assert chunked == pytest.approx(full, rel=1e-6 if backend == "torch" else 1e-3)


def test_model_loss_chunk_rows_selects_the_path_in_both_backends():
    idx = np.random.default_rng(1).integers(0, V, (3, 16))
    targets = np.random.default_rng(2).integers(0, V, (3, 16))
    model = tm.GPT(CFG).train()
    assert model.loss_chunk_rows == 0  # until a trainer sets its run.loss_chunk_rows: the full logits
    logits, _ = model(torch.tensor(idx), torch.tensor(targets))
    assert logits.shape == (3, 16, VP)  # the unfused path materialises the logits
    model.loss_chunk_rows = CHUNK
    assert model(torch.tensor(idx), torch.tensor(targets))[0] is None
    params = jm.from_common(init_weights(CFG, 0), CFG)

    def jax_loss(rows, **kw):
        return float(jm.GPT(CFG, loss_chunk_rows=rows).apply({"params": params}, jnp.asarray(idx),
                                                             jnp.asarray(targets), method=jm.GPT.loss, **kw))

    assert jax_loss(0) == jax_loss(CHUNK, chunk_rows=0) == float(
        jm.GPT(CFG).apply({"params": params}, jnp.asarray(idx), jnp.asarray(targets), method=jm.GPT.loss))
    assert jax_loss(CHUNK) == jax_loss(0, chunk_rows=CHUNK)


def test_torch_chunked_loss_refuses_a_second_backward_over_its_spent_gradients():
    h, wte, targets = (torch.tensor(a) for a in inputs())
    h, wte = h.float().requires_grad_(), wte.float().requires_grad_()
    loss = tl.chunked_lm_loss(h, wte, targets, V, CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
