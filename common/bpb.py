"""Bits per byte and perplexity: losses made comparable across tokenizers.

A loss in nats per token depends on how many bytes a token covers; dividing the summed nats by the
UTF-8 bytes of the scored text (and by ln 2) gives bits per byte, which any model on the same text
can be compared on. The bytes of a target are its token's own bytes from the GPT-2 BPE, so a
character split across two tokens is counted once, shared between them, and the sum over a
sequence is exactly the length of its decoded byte string.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from common.tokenizer import EOT, VOCAB_SIZE, get_tokenizer


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    if total_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {total_bytes}")
    return total_nats / total_bytes / math.log(2)


def perplexity(mean_nats: float) -> float:
    """exp(mean loss); inf once that overflows a float (a loss above ~709 nats, a diverged model)."""
    try:
        return math.exp(mean_nats)
    except OverflowError:
        return math.inf


def byte_lengths(decode_bytes: Callable[[int], bytes], vocab_size: int = VOCAB_SIZE) -> np.ndarray:
    """(vocab_size,) int32 table of len(decode_bytes(id)); EOT counts 0 bytes.

    EOT separates documents: it stands for no text, so predicting it is scored (its nats count) but
    adds nothing to the byte total, as in the usual bits-per-byte evaluations of GPT-2-tokenized text.
    """
    table = np.fromiter((len(decode_bytes(i)) for i in range(vocab_size)), dtype=np.int32, count=vocab_size)
    if EOT < vocab_size:
        table[EOT] = 0
    return table


@functools.cache
def token_byte_lengths() -> np.ndarray:
    """byte_lengths of the GPT-2 tokenizer (50257 entries), built once per process."""
    table = byte_lengths(get_tokenizer().encoding.decode_single_token_bytes)
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def utf8_bytes_of_targets(target_ids: np.ndarray, decode_bytes: Callable[[int], bytes] | None = None) -> int:
    """UTF-8 bytes of the text the scored target tokens decode to (EOT: 0 bytes).

    `decode_bytes` (id -> bytes) defaults to the GPT-2 tokenizer's, whose table is cached; another
    callable gets a table built for it on each call.
    """
    ids = np.asarray(target_ids)
    if ids.size == 0:
        return 0
    table = token_byte_lengths() if decode_bytes is None else byte_lengths(decode_bytes)
    if ids.min() < 0 or ids.max() >= len(table):
        raise ValueError(f"target ids must be in [0, {len(table)}), got range [{ids.min()}, {ids.max()}] "
                         f"(padded-vocab ids are never targets)")
    return int(table[ids].sum(dtype=np.int64))


def bpb_of(token_losses: np.ndarray, target_ids: np.ndarray) -> float:
    """Bits per byte of per-token losses (nats) and their target ids, any matching shape."""
    token_losses, target_ids = np.asarray(token_losses), np.asarray(target_ids)
    if token_losses.shape != target_ids.shape:
        raise ValueError(f"losses {token_losses.shape} and targets {target_ids.shape} differ in shape")
    return bits_per_byte(float(token_losses.sum(dtype=np.float64)), utf8_bytes_of_targets(target_ids))
