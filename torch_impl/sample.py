"""Sample text from a checkpoint: `python -m torch_impl.sample --checkpoint PATH [--prompt TEXT] ...`.

PATH is a torch or JAX checkpoint, either's run folder (its newest checkpoint) or a Hugging Face GPT-2
folder (config.json + model.safetensors). Without --prompt the prompt is read from stdin when it is not a
terminal; an empty prompt starts from EOT. Text is printed as tokens are produced. jax_impl/sample.py is
the same program in JAX, with the same flags.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, Sequence, TextIO

import numpy as np
import torch

from common import sampling
from torch_impl import checkpoint, dist
from torch_impl.model import GPT


@torch.no_grad()
def generate(model: GPT, prompt: list[int], num_samples: int, max_new_tokens: int, temperature: float,
             top_k: int, seed: int, autocast: contextlib.AbstractContextManager | None = None
             ) -> Iterator[np.ndarray]:
    """Yield one (num_samples,) array of new token ids per position; temperature 0 is greedy."""
    cfg = model.cfg
    device = next(model.parameters()).device
    idx = torch.tensor([sampling.context(prompt, cfg.vocab_size)] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            with autocast or contextlib.nullcontext():
                logits, _ = model(idx[:, -cfg.block_size:])
            logits = logits[:, -1, :cfg.vocab_size].double()  # padded columns can never be sampled
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k and top_k < cfg.vocab_size:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            yield nxt[:, 0].cpu().numpy()
    finally:
        model.train(was_training)


def load_model(args: argparse.Namespace) -> GPT:
    """The eval-mode GPT of --checkpoint in --dtype's parameter dtype on --device."""
    return checkpoint.load_model(args.checkpoint, args.device, args.dtype)[0]


def run(args: argparse.Namespace, model: GPT, prompt_text: str, out: TextIO) -> None:
    prompt = sampling.encode_prompt(prompt_text, model.cfg.vocab_size)
    device = next(model.parameters()).device

    def tokens(i: int):
        # One sample at a time so each streams as it is produced; seed + i makes each reproducible alone.
        for new in generate(model, prompt, 1, args.max_new_tokens, args.temperature, args.top_k, args.seed + i,
                            dist.autocast(args.dtype, device)):
            yield new[0]

    sampling.write_samples(out, prompt_text, args.num_samples, tokens)


def main(argv: Sequence[str] | None = None) -> int:
    parser = sampling.build_parser("python -m torch_impl.sample", __doc__, "torch")
    return sampling.main(argv, parser, load_model, run)


if __name__ == "__main__":
    sys.exit(main())
