"""What `python -m torch_impl.sample` and `python -m jax_impl.sample` share: flags, prompt, streamed output.

Each backend's sample.py supplies the framework parts (building the model, generating token ids); the flags,
their checks, the prompt's source, where generation starts and the streaming of decoded text live here once,
so the two CLIs behave alike. Both read either backend's checkpoints and Hugging Face folders
(common/portable.py). Bad input is one `error: …` line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Iterable, Sequence, TextIO

from common.usage import InputError, Parser, UsageError
from common.config import DEVICES, SEED_LIMIT
from common.precision import dtypes_for



def build_parser(prog: str, doc: str, backend: str) -> argparse.ArgumentParser:
    """The flags of both backends' sample CLIs; --dtype offers what `backend` runs (common/precision.py)."""
    p = Parser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="torch or JAX checkpoint or run folder (its newest checkpoint), or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", default=None, help="text to continue (default: stdin when piped, else start from EOT)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=dtypes_for(backend), default="fp32")
    p.add_argument("--device", choices=DEVICES, default="auto")
    return p


def check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--max-new-tokens", args.max_new_tokens, 0),
                             ("--top-k", args.top_k, 0)):
        if value < low:
            raise UsageError(f"{flag} must be ≥ {low}, got {value}")
    if not math.isfinite(args.temperature):
        raise UsageError(f"--temperature must be a finite number, got {args.temperature}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be ≥ 0, got {args.temperature}")
    if not 0 <= args.seed <= SEED_LIMIT - args.num_samples:  # sample i draws with seed + i
        raise UsageError(f"--seed must be in [0, 2**32 − --num-samples], got {args.seed}")


def read_prompt(flag: str | None) -> str:
    if flag is not None:
        return flag
    return sys.stdin.read() if not sys.stdin.isatty() else ""  # an empty prompt starts from EOT


def context(prompt: Sequence[int], vocab_size: int) -> list[int]:
    """The ids generation starts from: the prompt, or for an empty one GPT-2's convention, EOT (the last
    vocabulary id). ValueError for an id outside the vocabulary."""
    for t in prompt:
        if not 0 <= t < vocab_size:
            raise ValueError(f"prompt token id {t} is outside the model's vocabulary of {vocab_size}")
    return list(prompt) or [vocab_size - 1]


def encode_prompt(text: str, vocab_size: int) -> list[int]:
    """GPT-2 token ids of the prompt; a model with a smaller vocabulary (a test's) must not see larger ids."""
    from common.tokenizer import encode

    prompt = encode(text) if text else []
    bad = [t for t in prompt if t >= vocab_size]
    if bad:
        raise UsageError(f"--prompt: token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    return prompt


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


def write_samples(out: TextIO, prompt_text: str, num_samples: int, tokens: Callable[[int], Iterable[int]]) -> None:
    """Prints each sample as it is produced; `tokens(i)` yields the new token ids of sample i."""
    from common.tokenizer import decode

    for i in range(num_samples):
        if num_samples > 1:
            out.write(("\n" if i else "") + f"--- sample {i + 1} ---\n")
        out.write(prompt_text)
        out.flush()
        stream = StreamDecoder(decode)
        for token in tokens(i):
            out.write(stream.push(token))
            out.flush()
        out.write(stream.flush() + "\n")
        out.flush()


def main(argv: Sequence[str] | None, parser: argparse.ArgumentParser, load: Callable[[argparse.Namespace], Any],
         run: Callable[[argparse.Namespace, Any, str, TextIO], None]) -> int:
    """Flags, then `load(args)` (the model), then the prompt, then `run(args, model, prompt_text, stdout)`.

    Flags and the checkpoint are checked first: a bad one must not wait for a prompt on stdin.
    """
    try:
        args = parser.parse_args(argv)
        check(args)
        model = load(args)
        run(args, model, read_prompt(args.prompt), sys.stdout)
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
