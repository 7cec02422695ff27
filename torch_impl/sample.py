"""Sample text from a checkpoint: `python -m torch_impl.sample --checkpoint PATH [--prompt TEXT] ...`.

PATH is one of our checkpoints, a run folder (its newest checkpoint) or a Hugging Face GPT-2 folder
(config.json + model.safetensors). Without --prompt the prompt is read from stdin when it is not a
terminal; an empty prompt starts from EOT. Text is printed as tokens are produced.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence, TextIO

import torch

from common.checkpoints import CheckpointError
from common.config import ConfigError, ModelConfig, config_from_dict
from common.hf import HFError, is_hf_folder, load_hf_folder
from torch_impl import checkpoint as ckpt
from torch_impl.model import GPT
from torch_impl.train import AUTOCAST_DTYPES, generate


class UsageError(ValueError):
    """A bad flag value; the message names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2 (argparse would also print the usage)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m torch_impl.sample", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder, or HF GPT-2 folder")
    p.add_argument("--prompt", default=None, help="text to continue (default: stdin when piped, else EOT)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "fp64"), default="fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def load_model(path: str | Path, dtype: str = "fp32", device: str = "cpu") -> GPT:
    """Our checkpoint (or run folder) or a HF GPT-2 folder, as an eval-mode GPT."""
    if is_hf_folder(path):
        cfg, weights = load_hf_folder(path)
        model = GPT.from_common(weights, cfg, source=str(path))
    else:
        folder = ckpt.resolve(path)
        meta = ckpt.read_meta(folder)
        try:
            cfg: ModelConfig = config_from_dict(meta["config"]).model
        except (KeyError, TypeError, AttributeError, ConfigError) as e:
            raise CheckpointError(f"{folder / ckpt.META}: no readable config ({e})") from None
        model = GPT(cfg)
        try:
            model.load_state_dict(ckpt.read_weights(folder), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / ckpt.WEIGHTS}: weights do not fit the model of its config ({e})") \
                from None
    return model.to(device=device, dtype=torch.float64 if dtype == "fp64" else torch.float32).eval()


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


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--max-new-tokens", args.max_new_tokens, 0),
                             ("--top-k", args.top_k, 0)):
        if value < low:
            raise UsageError(f"{flag} must be ≥ {low}, got {value}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be ≥ 0, got {args.temperature}")


def _device(flag: str) -> str:
    if flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    return "cuda" if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()) else "cpu"


def run(args: argparse.Namespace, model: GPT, prompt_text: str, out: TextIO) -> None:
    from common.tokenizer import decode, encode

    device = next(model.parameters()).device.type
    prompt = encode(prompt_text) if prompt_text else []
    bad = [t for t in prompt if t >= model.cfg.vocab_size]
    if bad:
        raise UsageError(f"--prompt: token id {bad[0]} is outside the model's vocabulary of {model.cfg.vocab_size}")
    dtype = AUTOCAST_DTYPES.get(args.dtype)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(("\n" if i else "") + f"--- sample {i + 1} ---\n")
        out.write(prompt_text)
        out.flush()
        autocast = torch.autocast(device_type=device, dtype=dtype) if dtype else None
        stream = StreamDecoder(decode)
        # One sample at a time so each streams as it is produced; seed + i makes each reproducible alone.
        for tokens in generate(model, prompt, 1, args.max_new_tokens, args.temperature, args.top_k,
                               args.seed + i, autocast):
            out.write(stream.push(tokens[0]))
            out.flush()
        out.write(stream.flush() + "\n")
        out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check(args)
        model = load_model(args.checkpoint, args.dtype, _device(args.device))
        if args.prompt is not None:
            prompt_text = args.prompt
        elif not sys.stdin.isatty():
            prompt_text = sys.stdin.read()
        else:
            prompt_text = ""
        run(args, model, prompt_text, sys.stdout)
        return 0
    except (UsageError, CheckpointError, HFError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
