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


class StreamDecoder:
    """Turns a growing id list into printable increments, holding back a split UTF-8 character."""

    def __init__(self, decode):
        self.decode, self.ids, self.printed = decode, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # possibly the first bytes of a character still to come
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def flush(self) -> str:
        text = self.decode(self.ids)
        new, self.printed = text[len(self.printed):], text
        return new


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


class UsageError(ValueError):
    """A bad flag value; the message names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2 (argparse would also print the usage)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jax_impl.sample", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="our checkpoint or run folder, or a HF GPT-2 folder")
    p.add_argument("--prompt", default=None, help="prompt text (default: stdin when piped, else start from EOT)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp64"), default="fp32", help="fp16 is torch-only")
    return p


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--max-new-tokens", args.max_new_tokens, 0),
                             ("--top-k", args.top_k, 0)):
        if value < low:
            raise UsageError(f"{flag} must be ≥ {low}, got {value}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be ≥ 0, got {args.temperature}")
    if not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint: {args.checkpoint} does not exist")


def run(args: argparse.Namespace, prompt_text: str, out: TextIO) -> None:
    import jax

    from common.tokenizer import decode, encode
    from jax_impl.model import GPT, from_common
    from jax_impl.train import DTYPES

    jax.config.update("jax_enable_x64", args.dtype == "fp64")
    cfg, weights = load_weights(Path(args.checkpoint))
    compute, param_dtype = DTYPES[args.dtype]
    model = GPT(cfg, dtype=compute, param_dtype=param_dtype)
    params = from_common(weights, cfg, param_dtype, source=str(args.checkpoint))
    prompt = encode(prompt_text) if prompt_text else []
    bad = [t for t in prompt if t >= cfg.vocab_size]
    if bad:
        raise UsageError(f"--prompt: token id {bad[0]} is outside the model's vocabulary of {cfg.vocab_size}")
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n")
        out.write(prompt_text)
        out.flush()
        stream = StreamDecoder(decode)
        # One sample at a time so each streams as it is produced; seed + i makes each reproducible alone.
        for tokens in generate(model, params, prompt, 1, args.max_new_tokens, args.temperature, args.top_k,
                               args.seed + i):
            out.write(stream.push(tokens[0]))
            out.flush()
        out.write(stream.flush() + "\n")
        out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    from common.checkpoints import CheckpointError
    from common.config import ConfigError
    from common.hf import HFError

    try:
        args = build_parser().parse_args(argv)
        _check(args)  # flags first: a bad one must not wait for a prompt on stdin
        if args.prompt is not None:
            prompt_text = args.prompt
        elif not sys.stdin.isatty():
            prompt_text = sys.stdin.read()
        else:
            prompt_text = ""
        run(args, prompt_text, sys.stdout)
        return 0
    except (UsageError, CheckpointError, HFError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
