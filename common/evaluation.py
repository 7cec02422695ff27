"""The evaluation program both backends run (`python -m torch_impl.evaluate` / `jax_impl.evaluate`).

Each backend supplies only its per-token loss function and how it builds the model; the flags, the
val-loss / perplexity / bits-per-byte arithmetic (common/bpb.py) and HellaSwag (common/hellaswag.py)
live here once, so both score a checkpoint to the same numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.bpb import bits_per_byte, perplexity, utf8_bytes_of_targets
from common.usage import InputError, Parser, UsageError
from common.data import DataError, val_batches
from common.hellaswag import evaluate_hellaswag
from common.outdir import output_file, write_output
from common.portable import Portable
from common.precision import dtypes_for
from common.sampling import DEVICES
from common.tokenizer import VOCAB_SIZE

DEFAULT_BATCH_SIZE = 4  # rows per batch for a Hugging Face folder, whose files record no batch size


LossesFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def val_metrics(losses_fn: LossesFn, folder: str | Path, batch_size: int, block_size: int, val_tokens: int,
                vocab_size: int, order: str) -> dict[str, float | int]:
    """Val loss, perplexity and bits per byte over `val_tokens` of the val split, read in data.order
    `order` as the trainer's evaluation reads them (common.data.val_batches)."""
    nats, tokens, nbytes = 0.0, 0, 0
    for x, y in val_batches(folder, batch_size, block_size, val_tokens, vocab_size=vocab_size, order=order):
        nats += float(np.sum(losses_fn(x, y), dtype=np.float64))
        tokens += y.size
        try:
            nbytes += utf8_bytes_of_targets(y)
        except ValueError as e:  # ids beyond the GPT-2 vocabulary have no bytes to count
            raise DataError(f"{folder}: {e}") from None
    loss = nats / tokens
    return {"tokens": tokens, "bytes": nbytes, "val_loss": loss, "perplexity": perplexity(loss),
            "bits_per_byte": bits_per_byte(nats, nbytes) if nbytes else float("nan")}


def hellaswag_metrics(losses_fn: LossesFn, path: str | Path, vocab_size: int, block_size: int,
                      limit: int | None = None) -> dict[str, float | int]:
    """{"n", "acc", "acc_norm"}: HellaSwag needs a model over GPT-2's tokens (it tokenizes English)."""
    from common.tokenizer import encode

    if vocab_size < VOCAB_SIZE:
        raise UsageError(f"--hellaswag: the model's vocabulary has {vocab_size} tokens; HellaSwag needs GPT-2's "
                         f"{VOCAB_SIZE}")
    return evaluate_hellaswag(path, lambda t: losses_fn(t[:, :-1], t[:, 1:]), encode, limit=limit,
                              block_size=block_size)


def build_parser(backend: str) -> argparse.ArgumentParser:
    p = Parser(prog=f"python -m {backend}_impl.evaluate",
                description="Score a checkpoint: val loss, perplexity, bits per byte, HellaSwag.")
    p.add_argument("--checkpoint", required=True,
                   help="torch or JAX checkpoint or run folder, or a Hugging Face GPT-2 folder")
    p.add_argument("--data", default=None, help="shard folder whose val split is scored (default: the "
                                                "checkpoint's data.dir)")
    p.add_argument("--val-tokens", type=int, default=None,
                   help="val tokens to score (default: the checkpoint's data.val_tokens; 0 = skip)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"rows per batch (default: the checkpoint's micro_batch_size, else {DEFAULT_BATCH_SIZE})")
    p.add_argument("--hellaswag", default=None, metavar="PATH", help="a hellaswag_val.jsonl to score")
    p.add_argument("--hellaswag-limit", type=int, default=None, metavar="N", help="score the first N examples")
    p.add_argument("--dtype", choices=dtypes_for(backend), default="fp32")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    return p


def check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--val-tokens", args.val_tokens, 0), ("--batch-size", args.batch_size, 1),
                             ("--hellaswag-limit", args.hellaswag_limit, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be ≥ {low}, got {value}")
    if not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint: {args.checkpoint} does not exist")
    if args.hellaswag is not None and not Path(args.hellaswag).is_file():
        raise UsageError(f"--hellaswag: {args.hellaswag} is not a file")
    if args.json is not None:
        if not Path(args.json).resolve().parent.is_dir():
            raise UsageError(f"--json: the folder of {args.json} does not exist")
        output_file(args.json, "--json")  # a folder or an unwritable path, refused before scoring


def score(args: argparse.Namespace, losses_fn: LossesFn, portable: Portable, backend: str, device: Any,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Val metrics and HellaSwag of one loaded checkpoint, printed and returned (and written to --json)."""
    cfg, kind = portable.config, portable.kind
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "source": kind, "step": portable.step,
                              "backend": backend, "dtype": args.dtype}
    log(f"checkpoint: {args.checkpoint} ({kind}, step {portable.step}); scoring with {backend} on {device}, "
        f"{args.dtype}")
    is_ours = kind != "hf"
    val_tokens = args.val_tokens if args.val_tokens is not None else cfg.data.val_tokens
    if val_tokens:
        folder = args.data or (cfg.data.dir if is_ours else None)
        if folder is None:
            raise UsageError("--data: a Hugging Face folder records no data folder; give one (or --val-tokens 0)")
        batch = args.batch_size or (cfg.optim.micro_batch_size if is_ours else DEFAULT_BATCH_SIZE)
        val = val_metrics(losses_fn, folder, batch, cfg.model.block_size, val_tokens, cfg.model.vocab_size,
                          cfg.data.order)
        result.update(data=str(folder), **val)
        log(f"val: {val['tokens']:,} tokens ({val['bytes']:,} bytes) of {folder} | loss {val['val_loss']:.4f} | "
            f"perplexity {val['perplexity']:.2f} | bits/byte {val['bits_per_byte']:.4f}")
    if args.hellaswag:
        hs = hellaswag_metrics(losses_fn, args.hellaswag, cfg.model.vocab_size, cfg.model.block_size,
                               args.hellaswag_limit)
        result["hellaswag"] = {"path": str(args.hellaswag), **hs}
        log(f"hellaswag: {hs['n']} examples | acc {hs['acc']:.4f} | acc_norm {hs['acc_norm']:.4f}")
    if args.json:
        write_output(args.json, json.dumps(result, indent=1, allow_nan=True) + "\n")
    return result


def run_cli(backend: str, evaluate: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None) -> int:
    try:
        args = build_parser(backend).parse_args(argv)
        check_args(args)
        evaluate(args)
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
