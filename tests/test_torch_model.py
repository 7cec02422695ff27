import math

import numpy as np
import pytest
import torch
import transformers

from common.config import ModelConfig
from common.hf import load_hf_folder, save_hf_folder
from common.names import init_std, init_weights, param_shapes
from common.plan import num_params
from helpers import hf_gpt2
from torch_impl.loss import lm_loss
from torch_impl.model import GPT, from_common, to_common
from torch_impl.sample import generate

TINY = ModelConfig(vocab_size=250, padded_vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> GPT:
    return from_common(init_weights(cfg, seed), cfg).eval()


def tokens(shape, vocab=TINY.vocab_size, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    model = tiny_model()
    logits, loss = model(tokens((3, 16)), tokens((3, 16), seed=1))
    assert logits.shape == (3, 16, 256)
    assert logits.dtype == torch.float32
    assert loss.shape == () and loss.dtype == torch.float32
    logits, loss = model(tokens((1, 5)))
    assert logits.shape == (1, 5, 256) and loss is None
    with pytest.raises(ValueError, match="block_size"):
        model(tokens((1, 17)))


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_and_shapes_are_the_contract(bias):
    cfg = ModelConfig(**{**TINY.__dict__, "bias": bias})
    model = GPT(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == param_shapes(cfg)
    assert list(got) == list(param_shapes(cfg))
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


def test_init_follows_gpt2():
    cfg = ModelConfig(vocab_size=256, padded_vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)
    sd = tiny_model(cfg=cfg).state_dict()
    for name, value in sd.items():
        if value.ndim >= 2:
            assert abs(value.std().item() - init_std(name, cfg)) < 0.1 * init_std(name, cfg), name
            assert abs(value.mean().item()) < 0.002, name
        elif name.endswith(".bias"):
            assert not value.any(), name
        else:
            assert (value == 1).all(), name
    assert init_std("h.0.mlp.c_proj.weight", cfg) == pytest.approx(0.02 / math.sqrt(8))
    # The seed fixes the init.
    a, b, c = tiny_model(1).state_dict(), tiny_model(1).state_dict(), tiny_model(2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_loss_at_init_is_ln_vocab():
    cfg = ModelConfig(vocab_size=50257, padded_vocab_size=50304, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = tiny_model(cfg=cfg)
    with torch.no_grad():
        _, loss = model(tokens((4, 32), vocab=50257), tokens((4, 32), vocab=50257, seed=1))
    assert abs(loss.item() - math.log(50257)) < 0.1
    assert abs(math.log(50257) - 10.82) < 0.01


def test_lm_head_is_tied_to_wte():
    model = tiny_model()
    assert not any("lm_head" in k for k in model.state_dict())
    idx = tokens((2, 8), vocab=100)  # ids < 100 only, so row 200 feeds nothing but the head
    with torch.no_grad():
        model.wte.weight[200] = 0.0
        logits, _ = model(idx)
        assert (logits[..., 200] == 0).all()
        model.wte.weight[200, 0] = 1.0
        logits2, _ = model(idx)
    # Column 200 of the logits is now exactly ln_f's output channel 0.
    assert not torch.equal(logits2[..., 200], logits[..., 200])
    assert torch.equal(logits2[..., :200], logits[..., :200])


def test_padded_logits_never_win_and_never_enter_the_loss():
    model = tiny_model()
    idx, targets = tokens((2, 16)), tokens((2, 16), seed=1)
    with torch.no_grad():
        # Every position's final hidden state becomes b, so a padded row along b wins everywhere.
        b = torch.randn(TINY.n_embd, generator=torch.Generator().manual_seed(1))
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(b)
        _, base = model(idx, targets)
        model.wte.weight[TINY.vocab_size:] = 100 * b / b.dot(b)  # padded logits = 100
        logits, loss = model(idx, targets)
    assert logits[..., TINY.vocab_size:].max() > logits[..., :TINY.vocab_size].max()
    assert loss.item() == pytest.approx(base.item(), abs=0)
    greedy = np.concatenate(list(generate(model, [1, 2, 3], 2, 10, temperature=0.0, top_k=0, seed=0)))
    sampled = np.concatenate(list(generate(model, [1, 2, 3], 4, 20, temperature=2.0, top_k=0, seed=0)))
    assert greedy.max() < TINY.vocab_size and sampled.max() < TINY.vocab_size


def test_lm_loss_ignores_padded_columns():
    logits = torch.randn(2, 3, 8)
    targets = torch.tensor([[0, 1, 4], [2, 3, 4]])
    padded = logits.clone()
    padded[..., 5:] = 1e4
    expected = torch.nn.functional.cross_entropy(logits[..., :5].reshape(-1, 5), targets.reshape(-1))
    assert lm_loss(padded, targets, 5).item() == pytest.approx(expected.item(), abs=1e-7)


def test_causality_through_gradients():
    model = tiny_model()
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["x"] = output

    model.drop.register_forward_hook(keep)
    T, t = 16, 6
    logits, _ = model(tokens((2, T)))
    logits[:, t].sum().backward()
    grad = captured["x"].grad  # d logits[t] / d (embedding at every position)
    assert (grad[:, t + 1:] == 0).all()
    assert (grad[:, :t + 1].abs().sum(-1) > 0).all()


def test_dropout_only_in_training():
    cfg = ModelConfig(**{**TINY.__dict__, "dropout": 0.5})
    model = tiny_model(cfg=cfg)
    idx = tokens((2, 16))
    with torch.no_grad():
        a, b = model(idx)[0], model(idx)[0]
        model.train()
        c = model(idx)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_to_common_returns_fresh_float32_copies():
    model = tiny_model()
    w = to_common(model)
    assert {k: v.shape for k, v in w.items()} == param_shapes(TINY)
    assert all(v.dtype == np.float32 for v in w.values())
    w["wte.weight"][:] = 0
    assert model.wte.weight.abs().sum() > 0
    again = from_common(to_common(model), TINY)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_hf_import_logits_match(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    cfg, weights = load_hf_folder(tmp_path)
    assert cfg == TINY
    model = from_common(weights, cfg).eval()
    idx = tokens((2, 16))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == (2, 16, 256) and theirs.shape == (2, 16, 250)
    torch.testing.assert_close(ours[..., :250], theirs, atol=1e-5, rtol=0)


def test_hf_export_logits_match(tmp_path):
    model = tiny_model(3)
    save_hf_folder(tmp_path, TINY, to_common(model))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = tokens((2, 16), seed=5)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours[..., :250], theirs, atol=1e-5, rtol=0)
