"""Token shards: llm.c's `.bin` layout with a self-describing header, plus build-nanogpt's `.npy`.

Byte layout of a `.bin` shard (little-endian), see docs/shard-format.md:
    header: 256 × int32 (1024 bytes)
        [0] magic 20240520   [1] version (1: uint16 tokens)   [2] token count
        [3] vocab size (0 = unknown, as in llm.c's own shards)   [4] EOT id + 1 (0 = unknown)
        [5..255] zero
    body:   token count × uint16
llm.c and modded-nanogpt read only slots 0-2, so our shards load there unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.usage import InputError, first_line

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
MAX_SHARD_TOKENS = int(np.iinfo(np.int32).max)  # the header's token count is one int32
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
DEFAULT_VOCAB = 50257  # assumed for shards that do not record it (llm.c, build-nanogpt .npy)
DEFAULT_EOT = 50256
SHARD_SUFFIXES = (".bin", ".npy")
MANIFEST = "manifest.json"  # common.prepare's record of a folder's shards, written last


class ShardError(InputError):
    """A shard that cannot be used; the message names the file."""


@dataclass(frozen=True)
class ShardHeader:
    version: int
    num_tokens: int
    vocab_size: int  # DEFAULT_VOCAB when the file does not say
    eot: int


def encode_header(num_tokens: int, vocab_size: int = DEFAULT_VOCAB, eot: int = DEFAULT_EOT) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    header[3], header[4] = vocab_size, eot + 1
    return header


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int = DEFAULT_VOCAB,
                eot: int = DEFAULT_EOT) -> None:
    """Write atomically: a reader never sees a half-written shard under the final name."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ShardError(f"{path}: token ids must be in [0, {vocab_size})")
    if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ShardError(f"{path}: vocab size {vocab_size} does not fit uint16 tokens")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(encode_header(tokens.size, vocab_size, eot).tobytes())
        f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: str | os.PathLike) -> ShardHeader:
    path = Path(path)
    if path.suffix == ".npy":
        arr = _open_npy(path)
        return ShardHeader(version=0, num_tokens=int(arr.size), vocab_size=DEFAULT_VOCAB, eot=DEFAULT_EOT)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: too short for a shard header ({size} bytes, need {HEADER_BYTES})")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic number {int(header[0])} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (this reader knows {VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if num_tokens < 0 or size != expected:
        raise ShardError(f"{path}: file is {size} bytes but its header says {num_tokens} tokens "
                         f"({expected} bytes); truncated or corrupted")
    vocab = int(header[3]) or DEFAULT_VOCAB
    eot = int(header[4]) - 1 if header[4] else DEFAULT_EOT
    return ShardHeader(version=int(header[1]), num_tokens=num_tokens, vocab_size=vocab, eot=eot)


def _open_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: not a readable .npy token shard ({first_line(e)})") from None
    if arr.ndim != 1 or arr.dtype not in (np.uint16, np.int32, np.int64, np.uint32):
        raise ShardError(f"{path}: expected a 1-D integer token array, got {arr.dtype} with shape {arr.shape}")
    return arr


def read_shard(path: str | os.PathLike, vocab_size: int | None = None, check_ids: bool = True) -> np.ndarray:
    """Memory-map a shard's tokens after validating it.

    `vocab_size` (the model's) bounds the ids; by default the header's own vocab size does.
    """
    path = Path(path)
    header = read_header(path)
    if path.suffix == ".npy":
        tokens = _open_npy(path)
    else:
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))
    limit = min(header.vocab_size, vocab_size) if vocab_size else header.vocab_size
    if check_ids and tokens.size:
        top, low = int(tokens.max()), int(tokens.min()) if tokens.dtype.kind == "i" else 0
        if top >= limit or low < 0:
            raise ShardError(f"{path}: token id {low if low < 0 else top} is out of range for vocab size {limit} "
                             f"(ids must be in [0, {limit}))")
    return tokens


def list_shards(folder: str | os.PathLike, split: str) -> list[Path]:
    """Shards of one split in a folder, by name order: `*_{split}_*.bin` (ours, llm.c) or `*_{split}_*.npy`.
    A folder common.prepare made holds a manifest: then its shards of the split are exactly those it lists,
    so another preparation's shards left in the folder (another --name) never join the corpus."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: shard folder does not exist")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in SHARD_SUFFIXES and f"_{split}_" in p.name and not p.name.endswith(".tmp"))
    listed = _listed_in_manifest(folder, split)
    if listed is None:
        return files
    missing = sorted(listed - {p.name for p in files})
    if missing:
        raise ShardError(f"{folder / missing[0]}: listed in {MANIFEST} but missing")
    return [p for p in files if p.name in listed]


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest; None when there is none or it cannot be read (cut short by a crash outside
    common.prepare's atomic write)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _listed_in_manifest(folder: Path, split: str) -> set[str] | None:
    """The files of `split` the folder's manifest lists; None without a readable manifest (shards from
    other producers, or a preparation cut short before its manifest, which is written last)."""
    try:
        return {s["file"] for s in read_manifest(folder)["shards"] if s["split"] == split}
    except (KeyError, TypeError):  # no manifest (None), or one without a usable shard list
        return None
