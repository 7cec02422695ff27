import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from common.config import ModelConfig
from common.hf import load_hf_folder, save_hf_folder
from common.names import init_std, init_weights, param_shapes
from common.plan import num_params
from helpers import hf_gpt2
from jax_impl.loss import lm_loss
from jax_impl.layout import flatten, stacked, unflatten, unstacked
from jax_impl.model import GPT, from_common, to_common
from jax_impl.sample import generate

TINY = ModelConfig(vocab_size=250, padded_vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)


class Jitted:
    """A GPT whose apply is jitted (op-by-op dispatch would dominate these tests' time)."""

    def __init__(self, cfg: ModelConfig):
        self.module = GPT(cfg)
        self.cfg = cfg
        self.features, self.head = GPT.features, GPT.head
        self._apply = jax.jit(self.module.apply, static_argnames=("train", "method"))

    def apply(self, variables, *args, **kw):
        return self._apply(variables, *args, **kw)


def init_params(cfg: ModelConfig, seed: int) -> dict:
    return from_common(init_weights(cfg, seed), cfg)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> tuple[Jitted, dict]:
    return Jitted(cfg), init_params(cfg, seed)


def tokens(shape, vocab=TINY.vocab_size, seed=0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), dtype=jnp.int32)


def with_weight(params: dict, name: str, fn) -> dict:
    flat = flatten(params)
    flat[name] = fn(flat[name])
    return unflatten(flat)


def test_output_shapes():
    model, params = tiny_model()
    logits = model.apply({"params": params}, tokens((3, 16)))
    loss = lm_loss(logits, tokens((3, 16), seed=1), TINY.vocab_size)
    assert logits.shape == (3, 16, 256)
    assert logits.dtype == jnp.float32
    assert loss.shape == () and loss.dtype == jnp.float32
    assert model.apply({"params": params}, tokens((1, 5))).shape == (1, 5, 256)
    with pytest.raises(ValueError, match="block_size"):
        model.module.apply({"params": params}, tokens((1, 17)))


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_and_shapes_are_the_contract(bias):
    cfg = ModelConfig(**{**TINY.__dict__, "bias": bias})
    params = init_params(cfg, 0)
    got = {k: tuple(v.shape) for k, v in unstacked(params).items()}
    assert got == param_shapes(cfg)
    assert sum(v.size for v in jax.tree.leaves(params)) == num_params(cfg)
    # Nested as the dotted names say, except the blocks: stacked by layer under "h".
    assert params["h"]["attn"]["c_attn"]["weight"].shape == (2, 32, 96)
    assert params["wte"]["weight"].shape == (256, 32) and "0" not in params["h"]
    assert set(to_common(params)) == set(param_shapes(cfg))


def test_the_layer_stack_converts_both_ways_without_changing_a_value():
    weights = init_weights(TINY, 5)
    params = from_common(weights, TINY)
    np.testing.assert_array_equal(params["h"]["mlp"]["c_fc"]["weight"][1], weights["h.1.mlp.c_fc.weight"])
    back = to_common(params)
    assert set(back) == set(weights) and all(np.array_equal(back[k], weights[k]) for k in weights)
    # to_common copies: writing to its arrays changes neither the params nor another call's arrays.
    back["h.0.ln_1.weight"][:] = 7.0
    assert float(params["h"]["ln_1"]["weight"][0, 0]) == 1.0 and to_common(params)["h.0.ln_1.weight"][0] == 1.0
    restacked = stacked(unstacked(jax.device_get(params)))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restacked, jax.device_get(params)))


def test_init_follows_gpt2():
    cfg = ModelConfig(vocab_size=256, padded_vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)
    weights = to_common(init_params(cfg, 0))
    for name, value in weights.items():
        if value.ndim >= 2:
            assert abs(value.std() - init_std(name, cfg)) < 0.1 * init_std(name, cfg), name
            assert abs(value.mean()) < 0.002, name
        elif name.endswith(".bias"):
            assert not value.any(), name
        else:
            assert (value == 1).all(), name
    assert init_std("h.0.mlp.c_proj.weight", cfg) == pytest.approx(0.02 / math.sqrt(8))
    # The seed fixes the init.
    a, b, c = (to_common(init_params(cfg, s)) for s in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["wte.weight"], c["wte.weight"])


def test_loss_at_init_is_ln_vocab():
    cfg = ModelConfig(vocab_size=50257, padded_vocab_size=50304, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model, params = tiny_model(cfg=cfg)
    loss = lm_loss(model.apply({"params": params}, tokens((4, 32), vocab=50257)), tokens((4, 32), 50257, 1), 50257)
    assert abs(float(loss) - math.log(50257)) < 0.1
    assert abs(math.log(50257) - 10.82) < 0.01


def test_lm_head_is_tied_to_wte():
    model, params = tiny_model()
    assert not any("lm_head" in k for k in flatten(params))
    idx = tokens((2, 8), vocab=100)  # ids < 100 only, so row 200 feeds nothing but the head
    params = with_weight(params, "wte.weight", lambda w: w.at[200].set(0.0))
    logits = model.apply({"params": params}, idx)
    assert (logits[..., 200] == 0).all()
    params = with_weight(params, "wte.weight", lambda w: w.at[200, 0].set(1.0))
    logits2 = model.apply({"params": params}, idx)
    h = model.apply({"params": params}, idx, method=model.features)
    # Column 200 of the logits is now exactly ln_f's output channel 0.
    np.testing.assert_array_equal(logits2[..., 200], h[..., 0])
    np.testing.assert_array_equal(logits2[..., :200], logits[..., :200])


def test_padded_logits_never_win_and_never_enter_the_loss():
    model, params = tiny_model()
    idx, targets = tokens((2, 16)), tokens((2, 16), seed=1)
    # Every position's final hidden state becomes b, so a padded row along b wins everywhere.
    b = jnp.asarray(np.random.default_rng(1).standard_normal(TINY.n_embd), jnp.float32)
    params = with_weight(params, "ln_f.weight", jnp.zeros_like)
    params = with_weight(params, "ln_f.bias", lambda _: b)
    base = lm_loss(model.apply({"params": params}, idx), targets, TINY.vocab_size)
    params = with_weight(params, "wte.weight", lambda w: w.at[TINY.vocab_size:].set(100 * b / b.dot(b)))
    logits = model.apply({"params": params}, idx)
    assert logits[..., TINY.vocab_size:].max() > logits[..., :TINY.vocab_size].max()
    assert float(lm_loss(logits, targets, TINY.vocab_size)) == float(base)
    greedy = np.concatenate(list(generate(model.module, params, [1, 2, 3], 2, 10, temperature=0.0, top_k=0, seed=0)))
    sampled = np.concatenate(list(generate(model.module, params, [1, 2, 3], 4, 20, temperature=2.0, top_k=0, seed=0)))
    assert greedy.max() < TINY.vocab_size and sampled.max() < TINY.vocab_size


def test_lm_loss_ignores_padded_columns():
    logits = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    targets = np.array([[0, 1, 4], [2, 3, 4]])
    padded = logits.copy()
    padded[..., 5:] = 1e4
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits[..., :5]).reshape(-1, 5),
                                                 torch.from_numpy(targets).reshape(-1))
    assert float(lm_loss(jnp.asarray(padded), jnp.asarray(targets), 5)) == pytest.approx(expected.item(), abs=1e-6)


def test_causality_through_gradients():
    model, params = tiny_model()
    T, t = 16, 6
    idx = tokens((2, T))

    def logit_sum(wpe):  # row s of wpe enters position s only, so d/d wpe[s] is d/d (input at s)
        p = with_weight(params, "wpe.weight", lambda _: wpe)
        return model.apply({"params": p}, idx)[:, t].sum()

    grad = jax.grad(logit_sum)(params["wpe"]["weight"])
    assert (grad[t + 1:] == 0).all()
    assert (jnp.abs(grad[:t + 1]).sum(-1) > 0).all()


def test_dropout_only_in_training():
    cfg = ModelConfig(**{**TINY.__dict__, "dropout": 0.5})
    model, params = tiny_model(cfg=cfg)
    idx = tokens((2, 16))
    a, b = model.apply({"params": params}, idx), model.apply({"params": params}, idx)
    c = model.apply({"params": params}, idx, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_jit_matches_eager():
    model, params = tiny_model()
    idx = tokens((2, 16))
    with jax.disable_jit():
        eager = model.module.apply({"params": params}, idx)
    jitted = model.apply({"params": params}, idx)
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=0)


def test_to_common_returns_fresh_float32_copies():
    _, params = tiny_model()
    w = to_common(params)
    assert {k: v.shape for k, v in w.items()} == param_shapes(TINY)
    assert all(v.dtype == np.float32 for v in w.values())
    w["wte.weight"][:] = 0
    assert float(jnp.abs(params["wte"]["weight"]).sum()) > 0
    again = from_common(to_common(params), TINY)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), again, params))
    with pytest.raises(ValueError, match="missing"):
        from_common({k: v for k, v in w.items() if k != "ln_f.bias"}, TINY)


def test_hf_import_logits_match(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    cfg, weights = load_hf_folder(tmp_path)
    assert cfg == TINY
    model = Jitted(cfg)
    idx = np.random.default_rng(0).integers(0, 250, (2, 16))
    ours = model.apply({"params": from_common(weights, cfg)}, jnp.asarray(idx, jnp.int32))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    assert ours.shape == (2, 16, 256) and theirs.shape == (2, 16, 250)
    np.testing.assert_allclose(np.asarray(ours[..., :250]), theirs, atol=1e-5, rtol=0)


def test_hf_export_logits_match(tmp_path):
    model, params = tiny_model(3)
    save_hf_folder(tmp_path, TINY, to_common(params))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = np.random.default_rng(5).integers(0, 250, (2, 16))
    ours = model.apply({"params": params}, jnp.asarray(idx, jnp.int32))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours[..., :250]), theirs, atol=1e-5, rtol=0)


def test_scanned_layers_equal_the_unrolled_stack_and_init_matches_the_module():
    cfg = ModelConfig(vocab_size=250, padded_vocab_size=256, block_size=16, n_layer=3, n_head=2, n_embd=32)
    params = init_params(cfg, 0)
    # The tree of the common init is the one the Flax module declares (names, shapes, dtypes).
    declared = jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    assert jax.tree.map(lambda a: (a.shape, a.dtype), declared) == jax.tree.map(lambda a: (a.shape, a.dtype), params)
    x = tokens((2, 16))
    scan, unroll = (jax.jit(GPT(cfg, scan_layers=s).apply).lower({"params": params}, x).compile()
                    for s in (True, False))
    np.testing.assert_allclose(np.asarray(scan({"params": params}, x)), np.asarray(unroll({"params": params}, x)),
                               rtol=0, atol=1e-5)
    # Both read the same stacked parameters; only the scan leaves a loop in XLA's program.
    assert "while" in scan.as_text() and "while" not in unroll.as_text()


def test_blocked_causal_attention_equals_the_full_masked_softmax():
    from jax_impl.ops import causal_attention

    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 3, 40, 8)) for i in range(3))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8)
    full = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((40, 40), bool)), scores, -jnp.inf), axis=-1) @ v
    for rows in (40, 16, 7):  # one block, blocks with a remainder, many small blocks
        np.testing.assert_allclose(causal_attention(q, k, v, jnp.float32, block_rows=rows), full, atol=2e-6)


def test_attention_is_chosen_by_platform_dtype_and_dropout():
    from jax_impl.ops import attention_for

    assert attention_for("gpu", jnp.bfloat16, 0.0) == "fused"
    assert attention_for("gpu", jnp.float16, 0.0) == "fused"
    assert attention_for("gpu", jnp.float32, 0.0) == "blocked"  # the parity mode keeps the same math everywhere
    assert attention_for("gpu", jnp.bfloat16, 0.1) == "blocked"  # the fused path has no attention dropout
    assert attention_for("cpu", jnp.bfloat16, 0.0) == "blocked"


def test_layers_are_scanned_on_cpus_and_unrolled_on_gpus():
    from jax_impl.model import scan_layers_for

    assert scan_layers_for("cpu") and not scan_layers_for("gpu")


def test_fused_attention_computes_the_blocked_attention():
    """The fused branch's (B, T, nh, hs) layout; on the CPU (no cuDNN) it runs XLA's kernel for the same call."""
    params = init_params(TINY, 3)
    x = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, TINY.block_size)).astype(np.int32)
    blocked = GPT(TINY).apply({"params": params}, x)
    with pytest.warns(UserWarning, match="cuDNN's fused attention is unavailable"):
        fused = GPT(TINY, attention="fused").apply({"params": params}, x)
    assert np.abs(np.asarray(blocked) - np.asarray(fused)).max() < 1e-5
    assert np.abs(np.asarray(blocked)).max() > 0.1  # real logits, not a degenerate zero case
