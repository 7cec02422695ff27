"""Hugging Face GPT-2 folders (`config.json` + `model.safetensors`) to and from common weights.

Reads the layout of openai-community/gpt2 (keys without a prefix, plus `attn.bias` mask buffers)
and of `GPT2LMHeadModel.save_pretrained` (keys under `transformer.`, tied `lm_head` omitted).
Writes the latter, which `transformers` loads back with `from_pretrained(folder)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from common.config import ConfigError, ModelConfig, validate_model
from common.names import LN_EPS, check_weights, param_shapes
from common.numbers import is_int
from common.usage import InputError, first_line

SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not parameters


class HFError(InputError):
    """A folder that is not a usable GPT-2 checkpoint; the message names the file."""


def _pad_to(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


# ModelConfig's fields as a config.json names them, for its validation messages.
HF_KEYS = {f.name: f.name for f in dataclasses.fields(ModelConfig)} | {"block_size": "n_positions"}


def config_from_hf(hf: dict, source: str, padded_vocab_size: int | None = None) -> ModelConfig:
    if not isinstance(hf, dict):
        raise HFError(f"{source}: not a GPT-2 config (a JSON object of GPT2Config fields)")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'gpt2'")
    sizes = {}  # checked first: the checks below compute with them
    for key in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"):
        if not is_int(hf[key]):
            raise HFError(f"{source}: {key} must be an integer, got {json.dumps(hf[key])}")
        sizes[key] = hf[key]
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU")
    if hf.get("n_inner") not in (None, 4 * sizes["n_embd"]):
        raise HFError(f"{source}: n_inner {hf['n_inner']} is not 4 × n_embd")
    eps = hf.get("layer_norm_epsilon", LN_EPS)
    if not isinstance(eps, (int, float)) or abs(eps - LN_EPS) > 1e-12:
        raise HFError(f"{source}: layer_norm_epsilon {hf['layer_norm_epsilon']} is not 1e-5")
    # Options of transformers' GPT2Config that change the function computed; both backends compute GPT-2's
    # defaults only, so a folder with another value is refused rather than scored as something else.
    # (reorder_and_upcast_attn changes only the precision of the attention scores: accepted.)
    for key, gpt2 in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, gpt2) != gpt2:
            raise HFError(f"{source}: {key} is {json.dumps(hf[key])}; only GPT-2's {json.dumps(gpt2)} is supported")
    vocab = sizes["vocab_size"]
    cfg = ModelConfig(vocab_size=vocab, padded_vocab_size=padded_vocab_size or _pad_to(vocab),
                      block_size=sizes["n_positions"], n_layer=sizes["n_layer"], n_head=sizes["n_head"],
                      n_embd=sizes["n_embd"], dropout=0.0, bias=True)
    try:
        return validate_model(cfg, names=HF_KEYS)
    except ConfigError as e:
        raise HFError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "layer_norm_epsilon": LN_EPS, "initializer_range": 0.02, "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "tie_word_embeddings": True,
        "bos_token_id": 50256, "eos_token_id": 50256, "scale_attn_weights": True,
    }


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def load_hf_folder(path: str | os.PathLike, padded_vocab_size: int | None = None
                   ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Common weights (float32, vocab rows zero-padded) and the model config of a GPT-2 folder."""
    from safetensors.numpy import load_file

    folder = Path(path)
    cfg_path, st_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise HFError(f"{p}: missing (a GPT-2 folder holds config.json and model.safetensors)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
        cfg = config_from_hf(hf_cfg, str(cfg_path), padded_vocab_size)
    except (json.JSONDecodeError, KeyError) as e:
        raise HFError(f"{cfg_path}: not a GPT-2 config ({first_line(e)})") from None
    try:
        raw = load_file(str(st_path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise HFError(f"{st_path}: cannot read safetensors ({first_line(e)})") from None
    weights = {}
    for key, value in raw.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith(SKIPPED_SUFFIXES):
            continue  # lm_head is tied to wte; masks are rebuilt by the model
        weights[name] = np.asarray(value, dtype=np.float32)
    if hf_cfg.get("tie_word_embeddings", True) is not True:
        _check_untied_head(raw, weights, cfg_path, st_path)
    if "wte.weight" in weights and cfg.padded_vocab_size > cfg.vocab_size:
        wte = weights["wte.weight"]
        pad = np.zeros((cfg.padded_vocab_size - wte.shape[0], wte.shape[1]), dtype=np.float32)
        weights["wte.weight"] = np.concatenate([wte, pad])
    try:
        check_weights(weights, cfg, str(st_path))
    except ValueError as e:
        raise HFError(str(e)) from None
    return cfg, weights


def _check_untied_head(raw: dict, weights: dict[str, np.ndarray], cfg_path: Path, st_path: Path) -> None:
    """A folder with tie_word_embeddings false computes its logits with its own lm_head.weight; our models
    tie the head to wte, so such a folder is read only when its head equals wte."""
    head = raw.get("lm_head.weight")
    wte = weights.get("wte.weight")
    if head is None:
        raise HFError(f"{cfg_path}: tie_word_embeddings is false but {st_path.name} holds no lm_head.weight")
    if wte is None or head.shape != wte.shape or not np.array_equal(np.asarray(head, np.float32), wte):
        raise HFError(f"{cfg_path}: tie_word_embeddings is false and lm_head.weight differs from wte.weight; "
                      f"only GPT-2's tied head is supported")


def save_hf_folder(path: str | os.PathLike, cfg: ModelConfig, weights: dict[str, np.ndarray]) -> Path:
    """Write a folder `transformers.GPT2LMHeadModel.from_pretrained` loads (padded vocab rows cropped)."""
    from safetensors.numpy import save_file

    check_weights(weights, cfg, "export")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in param_shapes(cfg):
        value = np.ascontiguousarray(weights[name], dtype=np.float32)
        if name == "wte.weight":
            value = np.ascontiguousarray(value[:cfg.vocab_size])
        tensors[f"transformer.{name}"] = value
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    return folder
