"""Sample text from a checkpoint: `python -m jax_impl.sample --checkpoint PATH [--prompt TEXT] ...`.

PATH is a torch or JAX checkpoint, either's run folder (its newest checkpoint) or a Hugging Face GPT-2
folder (config.json + model.safetensors). Without --prompt the prompt is read from stdin when it is not a
terminal; an empty prompt starts from EOT. Text is printed as tokens are produced. torch_impl/sample.py is
the same program in PyTorch, with the same flags.

Decoding keeps a fixed (num_samples, block_size) window of tokens on the device, so one jitted
function serves every position (no recompilation per token): the prompt fills it from the left,
and once it is full it slides by one token. The causal mask makes the unused slots on the right
irrelevant, and only the hidden state at the last real position goes through the LM head.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Iterator, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from common import sampling
from jax_impl import checkpoint
from jax_impl.model import GPT


@functools.lru_cache(maxsize=16)
def _decoder(model, top_k: int, greedy: bool):
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


def generate(model: GPT, params: Any, prompt: Sequence[int], num_samples: int, max_new_tokens: int,
             temperature: float, top_k: int, seed: int) -> Iterator[np.ndarray]:
    """Yield one (num_samples,) array of new token ids per position; temperature 0 is greedy."""
    T = model.cfg.block_size
    context = sampling.context(prompt, model.cfg.vocab_size)[-T:]  # cropped to the block size
    window = np.zeros((num_samples, T), dtype=np.int32)
    window[:, :len(context)] = context
    window, length = jnp.asarray(window), jnp.asarray(len(context), jnp.int32)
    key = jax.random.PRNGKey(seed)
    step = _decoder(model, int(top_k), temperature <= 0)
    temp = jnp.asarray(max(temperature, 1e-6), jnp.float32)
    for _ in range(max_new_tokens):
        tok, window, length, key = step(params, window, length, key, temp)
        yield np.asarray(tok)


def load_model(args: argparse.Namespace) -> tuple[GPT, Any]:
    """(GPT, params) of --checkpoint in --dtype on --device."""
    return checkpoint.load_model(args.checkpoint, args.device, args.dtype)[0]


def run(args: argparse.Namespace, model_params: tuple[GPT, Any], prompt_text: str, out: TextIO) -> None:
    model, params = model_params
    prompt = sampling.encode_prompt(prompt_text, model.cfg.vocab_size)

    def tokens(i: int):
        # One sample at a time so each streams as it is produced; seed + i makes each reproducible alone.
        for new in generate(model, params, prompt, 1, args.max_new_tokens, args.temperature, args.top_k,
                            args.seed + i):
            yield new[0]

    sampling.write_samples(out, prompt_text, args.num_samples, tokens)


def main(argv: Sequence[str] | None = None) -> int:
    parser = sampling.build_parser("python -m jax_impl.sample", __doc__, "jax")
    return sampling.main(argv, parser, load_model, run)


if __name__ == "__main__":
    sys.exit(main())
