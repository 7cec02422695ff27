"""Score a checkpoint: `python -m jax_impl.evaluate --checkpoint PATH [--data DIR] [--hellaswag FILE] ...`.

Prints val loss, perplexity and bits per byte on the val split of a shard folder, and HellaSwag
accuracy (common/hellaswag.py) when a file is given. PATH is a torch or JAX checkpoint or run folder
or a Hugging Face GPT-2 folder (config.json + model.safetensors), read as weights alone
(common/portable.py), so either backend scores the other's runs. torch_impl/evaluate.py is the same
program in PyTorch; both score a checkpoint to the same numbers (tests/test_evaluate.py).

Bits per byte = summed nats over the scored target tokens ÷ UTF-8 bytes those targets decode to ÷
ln 2 (common/bpb.py), so the figure compares across tokenizers.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from common.evaluation import run_cli, score
from jax_impl import dist
from jax_impl.checkpoint import load_model
from jax_impl.model import GPT


@functools.lru_cache(maxsize=16)
def _losses_fn(model: GPT):
    V = model.cfg.vocab_size

    @jax.jit
    def losses(params, x, y):
        logits = model.apply({"params": params}, x)[..., :V]  # real vocabulary only, at least fp32
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return losses


def token_losses(model: GPT, params, x: np.ndarray, y: np.ndarray,
                 put: Callable[[np.ndarray], Any] | None = None) -> np.ndarray:
    """(B, T) float64 cross-entropy (nats) of each target y[b, t] given x[b, :t+1], in eval mode.

    Only the real-vocabulary logits enter the softmax, in fp32 (fp64 for an fp64 model), as in the
    training loss. Rows are right-padded to block_size so one compiled program serves every length
    (HellaSwag's vary per example); causal attention keeps the padding out of the scored positions.
    `put` places the host arrays (the trainer replicates them over its mesh).
    """
    x, y = np.asarray(x, dtype=np.int32), np.asarray(y, dtype=np.int32)
    T = x.shape[1]
    pad = ((0, 0), (0, model.cfg.block_size - T))
    x, y = np.pad(x, pad), np.pad(y, pad)
    if put is not None:
        x, y = put(x), put(y)
    out = _losses_fn(model)(params, x, y)
    # addressable_data: a replicated result of a multi-process mesh is not "fully addressable".
    return np.asarray(out.addressable_data(0), dtype=np.float64)[:, :T]


def evaluate(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    (model, params), portable = load_model(args.checkpoint, args.device, args.dtype)

    def losses_fn(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return token_losses(model, params, x, y)

    return score(args, losses_fn, portable, "jax", dist.pick_devices(args.device, flag="--device")[0].platform, log)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("jax", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
