"""Tokenizing documents into shards for common.prepare: worker processes encode chunks of documents, a writer cuts
the token stream into shard files, and the held documents give the val split as a seeded sample of whole
documents. prepare.py decides the folder, the staging and the manifest around them.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from common.shards import write_shard
from common.sources import Document, read_document
from common.tokenizer import EOT, VOCAB_SIZE, get_tokenizer

CHUNK_CHARS = 1 << 20  # per worker task: big enough to amortise IPC, small enough to balance 2+ workers
# A file whose bytes are at least this share not UTF-8 (each run decoded to U+FFFD) is named in a warning:
# likely binary or in another encoding, its tokens are mostly replacement characters.
UNDECODABLE_SHARE = 0.01
# How the splits were chosen, in the manifest's "split"; a manifest without one was made when val was the
# corpus's first --val-tokens tokens and documents kept their input order.
SPLIT_RULE = "random-documents"


def chunks(documents: Iterable[Document]) -> Iterator[list[Document]]:
    chunk, size, budget = [], 0, CHUNK_CHARS
    for doc in documents:
        chunk.append(doc)
        size += doc.stat().st_size if isinstance(doc, Path) else len(doc)
        if size >= budget:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_chunk(chunk: list[Document]) -> tuple[np.ndarray, np.ndarray, list[tuple[str, float]]]:
    """EOT + tokens of each document, concatenated, as uint16 (a cheap array to send back), the documents'
    lengths in tokens (EOT included), and (file, share of its bytes) for files that are largely not UTF-8."""
    tok = get_tokenizer()
    pieces, undecodable = [], []
    for doc in chunk:
        text, share = read_document(doc)
        if share >= UNDECODABLE_SHARE:
            undecodable.append((str(doc), share))
        pieces += [np.array([EOT], dtype=np.uint32), tok.encode_array(text)]
    lengths = np.array([p.size for p in pieces[1::2]], dtype=np.int64) + 1
    return np.concatenate(pieces).astype(np.uint16), lengths, undecodable


def pool_context() -> multiprocessing.context.BaseContext:
    """fork, unless JAX or torch is already loaded here (the trainers prepare the default corpus after
    importing theirs): forking a process whose framework threads are running can deadlock the child, and
    JAX warns that it will. forkserver forks the workers from a fresh single-threaded server instead,
    each loading the tokenizer once (~0.3 s) rather than inheriting it."""
    threaded = any(name in sys.modules for name in ("jax", "torch"))
    return multiprocessing.get_context("forkserver" if threaded else "fork")


class ShardWriter:
    """Writes the val shard (index 0) whole, and train shards (from index 1) shard_size tokens long from a
    stream of tokens, so documents flow across train shard ends."""

    def __init__(self, out_dir: Path, name: str, shard_size: int):
        self.out_dir, self.name = out_dir, name
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.filled, self.index = 0, 1
        self.shards: list[dict] = []

    def write(self, split: str, index: int, tokens: np.ndarray) -> None:
        path = self.out_dir / f"{self.name}_{split}_{index:06d}.bin"
        write_shard(path, tokens, vocab_size=VOCAB_SIZE, eot=EOT)
        self.shards.append({"file": path.name, "split": split, "tokens": int(tokens.size),
                            "documents": int(np.count_nonzero(tokens == EOT)), "sha256": sha256(path)})

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.buf.size - self.filled)
            self.buf[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.buf.size:
                self.close()

    def close(self) -> None:
        if self.filled:
            self.write("train", self.index, self.buf[:self.filled])
            self.index, self.filled = self.index + 1, 0


class Held:
    """Tokenized documents, in input order, kept in a temporary file until the val sample is drawn."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.lengths: list[np.ndarray] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.file.write(tokens.tobytes())
        self.lengths.append(lengths)
        self.tokens += tokens.size

    def place(self, writer: ShardWriter, val_tokens: int, seed: int, shuffle: bool) -> dict:
        """Write the held documents: val is the shortest prefix of a permutation seeded by `seed` that holds
        ≥ val_tokens tokens (a random sample of whole documents), train the others, in that permutation's
        order when shuffling, else in input order. Returns what the manifest records of the split."""
        self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        tokens = np.memmap(self.path, dtype=np.uint16, mode="r") if self.tokens else np.zeros(0, dtype=np.uint16)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        order = np.random.default_rng(seed).permutation(lengths.size)
        k = min(lengths.size, int(np.searchsorted(np.cumsum(lengths[order]), val_tokens)) + 1) if val_tokens else 0
        val, train = order[:k], (order[k:] if shuffle else np.sort(order[k:]))

        def gather(docs: np.ndarray) -> np.ndarray:
            return np.concatenate([tokens[starts[i]:starts[i + 1]] for i in docs] or [tokens[:0]])

        if k:
            writer.write("val", 0, gather(val))
        for i in range(0, train.size, 4096):  # bounded memory whatever the corpus size
            writer.add(gather(train[i:i + 4096]))
        self.discard()
        return {"rule": SPLIT_RULE, "seed": seed, "shuffled": shuffle, "drawn_from_documents": int(lengths.size),
                "val_documents": [int(i) for i in val]}

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
