import json

import numpy as np
import pytest

from common.config import ModelConfig
from common.hf import HFError, load_hf_folder, save_hf_folder
from common.names import param_shapes

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_param_shapes_equal_hf_gpt2(hf_model):
    cfg = ModelConfig(vocab_size=100, padded_vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)
    hf = {k.removeprefix("transformer."): tuple(v.shape) for k, v in hf_model.state_dict().items()
          if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    assert hf == param_shapes(cfg)
    assert list(hf) == list(param_shapes(cfg))  # the same order too


def test_load_pads_vocab_and_keeps_values(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    cfg, weights = load_hf_folder(tmp_path)
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.n_layer, cfg.n_embd, cfg.block_size) == (100, 128, 2, 32, 16)
    assert weights["wte.weight"].shape == (128, 32)
    np.testing.assert_array_equal(weights["wte.weight"][:100], hf_model.transformer.wte.weight.detach().numpy())
    assert not weights["wte.weight"][100:].any()
    np.testing.assert_array_equal(weights["h.1.attn.c_attn.weight"],
                                  hf_model.transformer.h[1].attn.c_attn.weight.detach().numpy())


def test_openai_layout_without_prefix_and_with_mask_buffers(hf_model, tmp_path):
    from safetensors.numpy import save_file
    tensors = {k.removeprefix("transformer."): v.detach().numpy().copy() for k, v in hf_model.state_dict().items()
               if k != "lm_head.weight"}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), dtype=np.float32))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    hf_model.config.to_json_file(tmp_path / "config.json")
    cfg, weights = load_hf_folder(tmp_path, padded_vocab_size=100)
    assert "h.0.attn.bias" not in weights and cfg.padded_vocab_size == 100


def test_export_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "in")
    cfg, weights = load_hf_folder(tmp_path / "in")
    save_hf_folder(tmp_path / "out", cfg, weights)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(again(idx).logits, hf_model(idx).logits)


def test_bad_folders_name_the_file(tmp_path):
    with pytest.raises(HFError, match="config.json: missing"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(HFError, match="config.json: model_type is 'llama'"):
        load_hf_folder(tmp_path)
    gpt2 = {"vocab_size": 256, "n_positions": 32, "n_layer": 1, "n_head": 2, "n_embd": 32}
    for config, message in (([1, 2], "not a GPT-2 config"), ({**gpt2, "n_layer": "x"}, 'n_layer must be an integer, got "x"'),
                            ({**gpt2, "n_head": 3}, r"n_embd \(32\) is not divisible by n_head \(3\)"),
                            ({**gpt2, "n_positions": 0}, "n_positions must be positive, got 0")):
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(HFError, match=f"config.json: {message}"):
            load_hf_folder(tmp_path)


def variant(hf_model, **change):
    """hf_model's weights under a config with `change`: a model transformers computes differently."""
    cfg = transformers.GPT2Config(**{**hf_model.config.to_dict(), **change})
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(hf_model.state_dict(), strict=False)
    return model


def logits(model):
    with torch.no_grad():
        return model(torch.arange(16).reshape(1, 16)).logits


@pytest.mark.parametrize("change, message", [
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx is true; only GPT-2's false"),
    ({"scale_attn_weights": False}, "scale_attn_weights is false; only GPT-2's true"),
    ({"activation_function": "relu"}, "activation_function 'relu' is not GPT-2's tanh GELU"),
    ({"layer_norm_epsilon": 1e-2}, "layer_norm_epsilon 0.01 is not 1e-5"),
])
def test_config_options_that_change_the_function_are_refused_naming_the_field(hf_model, tmp_path, change, message):
    other = variant(hf_model, **change)
    assert (logits(other) - logits(hf_model)).abs().max() > 1e-4  # transformers computes something else
    other.save_pretrained(tmp_path)
    with pytest.raises(HFError, match=f"config.json: {message}"):
        load_hf_folder(tmp_path)


def test_an_untied_head_is_refused_unless_it_equals_wte(hf_model, tmp_path):
    untied = variant(hf_model, tie_word_embeddings=False)
    with torch.no_grad():
        untied.lm_head.weight.normal_()
    assert (logits(untied) - logits(hf_model)).abs().max() > 1e-2
    untied.save_pretrained(tmp_path / "a")
    with pytest.raises(HFError, match="config.json: tie_word_embeddings is false and lm_head.weight differs"):
        load_hf_folder(tmp_path / "a")
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.transformer.wte.weight)
    untied.save_pretrained(tmp_path / "b")  # an untied head that equals wte computes GPT-2: read
    _, weights = load_hf_folder(tmp_path / "b")
    np.testing.assert_array_equal(weights["wte.weight"][:100], hf_model.transformer.wte.weight.detach().numpy())


def test_reorder_and_upcast_attn_only_changes_precision_and_is_read(hf_model, tmp_path):
    upcast = variant(hf_model, reorder_and_upcast_attn=True)
    assert (logits(upcast) - logits(hf_model)).abs().max() < 1e-6
    upcast.save_pretrained(tmp_path)
    _, weights = load_hf_folder(tmp_path)
    np.testing.assert_array_equal(weights["h.1.attn.c_attn.weight"],
                                  hf_model.transformer.h[1].attn.c_attn.weight.detach().numpy())
