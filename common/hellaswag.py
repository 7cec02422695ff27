"""HellaSwag as build-nanogpt scores it: the ending with the lowest average token loss wins.

Each example is a context and four endings. All four rows (context + " " + ending) go through the
model at once; the loss of predicting each ending token is summed (`acc`) or averaged over the
ending's tokens (`acc_norm`, build-nanogpt's headline number, which does not favour short endings).
This module is framework-free: a backend supplies only `token_losses_fn`, the per-token
cross-entropy of a (4, L) batch, and the backends' `evaluate.py` CLIs call `evaluate_hellaswag`.

Reads the official `hellaswag_val.jsonl` (https://github.com/rowanz/hellaswag) from a local path;
nothing is downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.numbers import is_int
from common.usage import InputError

NUM_ENDINGS = 4
REQUIRED_FIELDS = ("ind", "ctx", "label", "endings")


class HellaSwagError(InputError):
    """A HellaSwag file or example that cannot be scored; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    ind: int
    ctx: str
    endings: tuple[str, ...]
    label: int
    where: str  # "file:line", for error messages about this example


def _parse(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise HellaSwagError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise HellaSwagError(f"{where}: missing field(s) {', '.join(missing)}")
    ind, ctx, label, endings = row["ind"], row["ctx"], row["label"], row["endings"]
    if not isinstance(ctx, str):
        raise HellaSwagError(f"{where}: 'ctx' must be a string")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise HellaSwagError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if not is_int(label) or not 0 <= label < NUM_ENDINGS:  # a label of `true` is a broken file, not ending 1
        raise HellaSwagError(f"{where}: 'label' must be an integer in 0..{NUM_ENDINGS - 1}, got {label!r}")
    if not is_int(ind):
        raise HellaSwagError(f"{where}: 'ind' must be an integer, got {ind!r}")
    return Example(ind=ind, ctx=ctx, endings=tuple(endings), label=label, where=where)


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The first `limit` examples (all when None) of a HellaSwag jsonl file; blank lines are skipped.

    Extra fields of the real file (activity_label, ctx_a, ctx_b, source_id, split, split_type) are
    accepted and ignored.
    """
    path = Path(path)
    if limit is not None and limit <= 0:
        raise HellaSwagError(f"{path}: limit must be positive, got {limit}")
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise HellaSwagError(f"{path}: cannot open HellaSwag file: {e.strerror}") from None
    examples: list[Example] = []
    with f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                examples.append(_parse(line, f"{path}:{lineno}"))
                if limit is not None and len(examples) == limit:
                    break
        except UnicodeDecodeError:
            raise HellaSwagError(f"{path}: not UTF-8 text") from None
    if not examples:
        raise HellaSwagError(f"{path}: no examples")
    return examples


def render(example: Example, encode: Callable[[str], list[int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens (4, L) int32, mask (4, L) int8 with 1 on ending tokens, label), as build-nanogpt renders.

    Row i is encode(ctx) + encode(" " + ending_i): the space goes with the ending because GPT-2's BPE
    folds a leading space into the next word. Rows are zero-padded on the right to the longest.
    """
    ctx_tokens = list(encode(example.ctx))
    rows = [ctx_tokens + list(encode(" " + ending)) for ending in example.endings]
    length = max(len(r) for r in rows)
    tokens = np.zeros((NUM_ENDINGS, length), dtype=np.int32)
    mask = np.zeros((NUM_ENDINGS, length), dtype=np.int8)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        mask[i, len(ctx_tokens):len(row)] = 1
    return tokens, mask, example.label


def crop(tokens: np.ndarray, mask: np.ndarray, block_size: int, where: str = "example"
         ) -> tuple[np.ndarray, np.ndarray]:
    """Fit rows longer than block_size by dropping context tokens from the left.

    The same columns go from every row, so each ending stays whole and keeps the context nearest to
    it, which is what a model with a block_size window would see anyway. At least one context token
    must remain to predict an ending's first token, so an ending of block_size tokens or more is an
    error rather than a silently shortened score.
    """
    length = tokens.shape[1]
    if length <= block_size:
        return tokens, mask
    ctx_len = int(np.argmax(mask.any(axis=0)))  # first ending column, shared by all rows
    drop = length - block_size
    if drop >= ctx_len:
        longest = length - ctx_len
        raise HellaSwagError(f"{where}: an ending of {longest} tokens does not fit block_size {block_size} "
                             f"with at least one context token")
    return tokens[:, drop:], mask[:, drop:]


def score(losses: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """(pred, pred_norm) from per-token losses (4, L-1) of predicting tokens[:, 1:] and the (4, L) mask.

    pred is the argmin of each ending's summed loss, pred_norm of its mean loss per ending token.
    Ties go to the lower index (numpy's argmin), as in build-nanogpt's torch argmin.
    """
    losses = np.asarray(losses, dtype=np.float64)
    shift_mask = np.asarray(mask)[:, 1:].astype(np.float64)  # loss[t] predicts token t + 1
    if losses.shape != shift_mask.shape:
        raise ValueError(f"losses have shape {losses.shape}, expected {shift_mask.shape} (mask {np.shape(mask)})")
    counts = shift_mask.sum(axis=1)
    if (counts == 0).any():
        raise ValueError("an ending has no scored tokens (its mask is empty after the shift)")
    # Padding may hold any value (even inf from a padded position): select, don't multiply.
    total = np.where(shift_mask > 0, losses, 0.0).sum(axis=1)
    return int(np.argmin(total)), int(np.argmin(total / counts))


def evaluate_hellaswag(path: str | Path, token_losses_fn: Callable[[np.ndarray], np.ndarray],
                       encode: Callable[[str], list[int]], limit: int | None = None,
                       block_size: int | None = None) -> dict[str, float | int]:
    """{"n", "acc", "acc_norm"} over the first `limit` examples of `path`.

    token_losses_fn(tokens (4, L) int32) -> (4, L-1) per-token cross-entropy (nats) of predicting
    tokens[:, 1:] from the prefix, computed on the real-vocab logits. L varies per example; a jitted
    backend may right-pad to a fixed length inside the function and slice the result back, since
    causal attention keeps padding from changing earlier positions. With `block_size`, longer
    examples are cropped from the left (see `crop`).
    """
    examples = load_examples(path, limit)
    correct = correct_norm = 0
    for ex in examples:
        tokens, mask, label = render(ex, encode)
        if block_size is not None:
            tokens, mask = crop(tokens, mask, block_size, ex.where)
        losses = np.asarray(token_losses_fn(tokens))
        if losses.shape != (tokens.shape[0], tokens.shape[1] - 1):
            raise ValueError(f"{ex.where}: token_losses_fn returned shape {losses.shape} for tokens "
                             f"{tokens.shape}; expected {(tokens.shape[0], tokens.shape[1] - 1)}")
        try:
            pred, pred_norm = score(losses, mask)
        except ValueError as e:
            raise HellaSwagError(f"{ex.where}: {e}") from None
        correct += pred == label
        correct_norm += pred_norm == label
    n = len(examples)
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n}
