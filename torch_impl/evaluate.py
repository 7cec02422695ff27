"""Score a checkpoint: `python -m torch_impl.evaluate --checkpoint PATH [--data DIR] [--hellaswag FILE] ...`.

Prints val loss, perplexity and bits per byte on the val split of a shard folder, and HellaSwag
accuracy (common/hellaswag.py) when a file is given. PATH is a torch or JAX checkpoint or run folder
or a Hugging Face GPT-2 folder (config.json + model.safetensors), read as weights alone
(common/portable.py), so either backend scores the other's runs. jax_impl/evaluate.py is the same
program in JAX; both score a checkpoint to the same numbers (tests/test_evaluate.py).

Bits per byte = summed nats over the scored target tokens ÷ UTF-8 bytes those targets decode to ÷
ln 2 (common/bpb.py), so the figure compares across tokenizers.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.evaluation import run_cli, score
from torch_impl import dist
from torch_impl.checkpoint import load_model
from torch_impl.model import GPT


@torch.no_grad()
def token_losses(model: GPT, x: np.ndarray, y: np.ndarray,
                 autocast: contextlib.AbstractContextManager | None = None) -> np.ndarray:
    """(B, T) float64 cross-entropy (nats) of each target y[b, t] given x[b, :t+1], in eval mode.

    Only the real-vocabulary logits enter the softmax, in fp32 (fp64 for an fp64 model), as in the
    training loss; T may be shorter than block_size.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        xt = torch.from_numpy(np.asarray(x, dtype=np.int64)).to(device)
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(xt)
        V = model.cfg.vocab_size
        real = logits[..., :V]
        real = real if real.dtype == torch.float64 else real.float()
        losses = F.cross_entropy(real.reshape(-1, V), yt.reshape(-1), reduction="none")
    finally:
        model.train(was_training)
    return losses.view(yt.shape).to("cpu", torch.float64).numpy()


def evaluate(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    model, portable = load_model(args.checkpoint, args.device, args.dtype)
    device = next(model.parameters()).device

    def losses_fn(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return token_losses(model, x, y, dist.autocast(args.dtype, device))

    return score(args, losses_fn, portable, "torch", device, log)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("torch", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
