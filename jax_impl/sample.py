"""Sample text from a checkpoint: `python -m jax_impl.sample --checkpoint PATH [--prompt TEXT] ...`.

PATH is one of our checkpoints, a run folder (its newest checkpoint) or a Hugging Face GPT-2 folder
(config.json + model.safetensors). Without --prompt the prompt is read from stdin when it is not a
terminal; an empty prompt starts from EOT. Text is printed as tokens are produced.

Decoding keeps a fixed (num_samples, block_size) window of tokens on the device, so one jitted
function serves every position (no recompilation per token): the prompt fills it from the left,
and once it is full it slides by one token. The causal mask makes the unused slots on the right
irrelevant, and only the hidden state at the last real position goes through the LM head.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import numpy as np

from common import sampling


@functools.lru_cache(maxsize=16)
def _decoder(model, top_k: int, greedy: bool):
    import jax
    import jax.numpy as jnp

    T, V = model.cfg.block_size, model.cfg.vocab_size

    @jax.jit
    def step(params, window, length, key, temperature):
        pos = length - 1  # the last real token; `length` ≤ T
        h = model.apply({"params": params}, window, method=model.features)  # (N, T, C)
        h_last = jax.lax.dynamic_index_in_dim(h, pos, axis=1, keepdims=False)  # (N, C)
        logits = model.apply({"params": params}, h_last, method=model.head)[:, :V]  # padded ids never sampled
        key, sub = jax.random.split(key)
        if greedy:
            tok = jnp.argmax(logits, axis=-1)
        else:
            logits = logits / temperature
            if 0 < top_k < V:
                kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            tok = jax.random.categorical(sub, logits, axis=-1)
        tok = tok.astype(window.dtype)
        full = length >= T
        window = jnp.where(full, jnp.roll(window, -1, axis=1), window)
        window = window.at[:, jnp.minimum(length, T - 1)].set(tok)
        return tok, window, jnp.minimum(length + 1, T), key

    return step


def generate(model, params, prompt: Sequence[int], num_samples: int, max_new_tokens: int,
             temperature: float, top_k: int, seed: int) -> Iterator[np.ndarray]:
    """Yields one (num_samples,) int array of new token ids per position (see Backend.generate)."""
    import jax
    import jax.numpy as jnp

    T, V = model.cfg.block_size, model.cfg.vocab_size
    for t in prompt:
        if not 0 <= t < V:
            raise ValueError(f"prompt token id {t} is outside the model's vocabulary of {V}")
    # GPT-2's convention for an empty prompt is to start from EOT, its last vocabulary id.
    context = (list(prompt) or [V - 1])[-T:]  # cropped to the block size
    window = np.zeros((num_samples, T), dtype=np.int32)
    window[:, :len(context)] = context
    window, length = jnp.asarray(window), jnp.asarray(len(context), jnp.int32)
    key = jax.random.PRNGKey(seed)
    step = _decoder(model, int(top_k), temperature <= 0)
    temp = jnp.asarray(max(temperature, 1e-6), jnp.float32)
    for _ in range(max_new_tokens):
        tok, window, length, key = step(params, window, length, key, temp)
        yield np.asarray(tok)


def load_weights(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """(ModelConfig, common weights) from a HF GPT-2 folder or our checkpoint / run folder."""
    from common.checkpoints import CheckpointError
    from common.config import ConfigError, config_from_dict
    from common.hf import is_hf_folder, load_hf_folder
    from jax_impl import checkpoint as ckpt

    if is_hf_folder(path):
        return load_hf_folder(path)
    folder = ckpt.resolve(path)
    try:
        cfg = config_from_dict(ckpt.read_meta(folder)["config"]).model
    except (KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{folder / ckpt.META}: no readable config ({e})") from None
    return cfg, ckpt.read_common_weights(folder)


def load_model(path: Path, dtype: str = "fp32") -> tuple[Any, Any]:
    """(GPT, params) from our checkpoint (or run folder) or a HF GPT-2 folder."""
    import jax

    from jax_impl.model import GPT, from_common
    from jax_impl.train import DTYPES

    jax.config.update("jax_enable_x64", dtype == "fp64")
    cfg, weights = load_weights(path)
    compute, param_dtype = DTYPES[dtype]
    return GPT(cfg, dtype=compute, param_dtype=param_dtype), from_common(weights, cfg, param_dtype, source=str(path))


def build_parser() -> argparse.ArgumentParser:
    p = sampling.build_parser("python -m jax_impl.sample", __doc__,
                              checkpoint_help="our checkpoint or run folder, or a HF GPT-2 folder",
                              prompt_help="prompt text (default: stdin when piped, else start from EOT)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp64"), default="fp32", help="fp16 is torch-only")
    return p


def run(args: argparse.Namespace, model_params: tuple[Any, Any], prompt_text: str, out: TextIO) -> None:
    model, params = model_params
    prompt = sampling.encode_prompt(prompt_text, model.cfg.vocab_size)

    def tokens(i: int):
        # One sample at a time so each streams as it is produced; seed + i makes each reproducible alone.
        for new in generate(model, params, prompt, 1, args.max_new_tokens, args.temperature, args.top_k,
                            args.seed + i):
            yield new[0]

    sampling.write_samples(out, prompt_text, args.num_samples, tokens)


def main(argv: Sequence[str] | None = None) -> int:
    def load(args: argparse.Namespace) -> tuple[Any, Any]:
        if not Path(args.checkpoint).exists():
            raise sampling.UsageError(f"--checkpoint: {args.checkpoint} does not exist")
        return load_model(Path(args.checkpoint), args.dtype)

    return sampling.main(argv, build_parser(), load, run)


if __name__ == "__main__":
    sys.exit(main())
