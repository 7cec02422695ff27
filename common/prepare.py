"""Tokenize a corpus into GPT-2 token shards: `python -m common.prepare [--input PATH ... | --hf NAME]`.

With no input the corpus is the Python standard library's own source, which every machine running
this code already has, so the trainers work offline with no download. Each document is prefixed by
EOT (as in build-nanogpt), documents flow across shard ends, shard 0 is the validation split.
`manifest.json` is written last and atomically: its presence means the folder is complete.
See docs/shard-format.md.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import platform
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from common.shards import MAGIC, VERSION, ShardError, write_shard
from common.tokenizer import EOT, VOCAB_SIZE, get_tokenizer

MANIFEST = "manifest.json"
DEFAULT_FOLDER = "data/stdlib"
DEFAULT_SHARD_SIZE = 100_000_000
DEFAULT_VAL_TOKENS = 100_000_000  # build-nanogpt's first shard
STDLIB_VAL_TOKENS = 262_144  # the stdlib is ~15M tokens: a 100M val shard would leave nothing to train on
CHUNK_CHARS = 1 << 20  # per worker task: big enough to amortise IPC, small enough to balance 2+ workers
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")

Document = str | Path  # a Path is read by the worker, so file corpora are never pickled as text


class PrepareError(ValueError):
    """Unusable input; the CLI prints it on one line (naming the file) and exits with code 2."""


# ---- document sources -------------------------------------------------------------------------

def stdlib_documents() -> list[Path]:
    """Every `*.py` of the standard library, sorted by relative path.

    site-packages is excluded: it is third-party code that differs between machines, and would make
    the default corpus differ too. The stdlib's own tests stay in: they are real Python, ~1/3 of it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d != "site-packages"]  # pruned, not filtered: it can be 10x the stdlib
        found += [Path(folder, f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    return [root / rel for rel in sorted(found)]


def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.suffix in INPUT_SUFFIXES and p.is_file()]
        return sorted(found, key=lambda p: p.relative_to(path).as_posix())
    if path.is_file():
        return [path]
    raise PrepareError(f"{path}: input does not exist")


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise PrepareError(f"{path}:{lineno}: no string field '{field}' (use --text-field)")
            yield row[field]


def _check_parquet(path: Path, column: str):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise PrepareError(f"{path}: not a readable parquet file ({e})") from None
    if column not in pf.schema_arrow.names:
        raise PrepareError(f"{path}: no column '{column}' (columns: {', '.join(pf.schema_arrow.names)}); "
                           f"use --text-field")
    return pf


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    pf = _check_parquet(path, column)
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):  # FineWeb files hold ~1M rows
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def input_documents(paths: Sequence[str | Path], text_field: str = "text") -> Iterator[Document]:
    """Documents of local inputs in order. All files are checked before the first is read, so a
    typo fails at once instead of after an hour of tokenizing."""
    files = [f for p in paths for f in _input_files(Path(p))]
    for f in files:
        if f.suffix == ".parquet":
            _check_parquet(f, text_field)
    return _read_inputs(files, text_field)


def _read_inputs(files: list[Path], text_field: str) -> Iterator[Document]:
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_documents(f, text_field)
        elif f.suffix == ".parquet":
            yield from _parquet_documents(f, text_field)
        else:
            yield f


def hf_documents(name: str, config: str | None, split: str, text_field: str = "text") -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise PrepareError("--hf needs the `datasets` package (pip install datasets)") from None
    for row in datasets.load_dataset(name, config, split=split, streaming=True):
        if not isinstance(row.get(text_field), str):
            raise PrepareError(f"{name}: a row has no string field '{text_field}' (use --text-field)")
        yield row[text_field]


# ---- tokenizing -------------------------------------------------------------------------------

def _chunks(documents: Iterable[Document]) -> Iterator[list[Document]]:
    chunk, size, budget = [], 0, CHUNK_CHARS
    for doc in documents:
        chunk.append(doc)
        size += doc.stat().st_size if isinstance(doc, Path) else len(doc)
        if size >= budget:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _read(doc: Document) -> str:
    if isinstance(doc, str):
        return doc
    try:
        return doc.read_bytes().decode("utf-8", errors="replace")  # bytes, not read_text: keep \r\n as is
    except OSError as e:
        raise PrepareError(f"{doc}: cannot read: {e.strerror}") from None


def _encode_chunk(chunk: list[Document]) -> np.ndarray:
    """EOT + tokens of each document, concatenated, as uint16 (a cheap array to send back)."""
    tok = get_tokenizer()
    pieces = []
    for doc in chunk:
        pieces += [np.array([EOT], dtype=np.uint32), tok.encode_array(_read(doc))]
    return np.concatenate(pieces).astype(np.uint16)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork, unless JAX or torch is already loaded here (the trainers prepare the default corpus after
    importing theirs): forking a process whose framework threads are running can deadlock the child, and
    JAX warns that it will. forkserver forks the workers from a fresh single-threaded server instead,
    each loading the tokenizer once (~0.3 s) rather than inheriting it."""
    threaded = any(name in sys.modules for name in ("jax", "torch"))
    return multiprocessing.get_context("forkserver" if threaded else "fork")


class _ShardWriter:
    """Fills shard-sized buffers from a token stream; shard 0 (val_tokens long) is the val split."""

    def __init__(self, out_dir: Path, name: str, shard_size: int, val_tokens: int):
        self.out_dir, self.name, self.shard_size, self.val_tokens = out_dir, name, shard_size, val_tokens
        self.index = 0 if val_tokens > 0 else 1
        self.buf = np.empty(self._capacity(), dtype=np.uint16)
        self.filled = 0
        self.shards: list[dict] = []

    def _capacity(self) -> int:
        return self.val_tokens if self.index == 0 else self.shard_size

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.buf.size - self.filled)
            self.buf[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.buf.size:
                self._flush()

    def _flush(self) -> None:
        split = "val" if self.index == 0 else "train"
        path = self.out_dir / f"{self.name}_{split}_{self.index:06d}.bin"
        tokens = self.buf[:self.filled]
        write_shard(path, tokens, vocab_size=VOCAB_SIZE, eot=EOT)
        self.shards.append({"file": path.name, "split": split, "tokens": int(tokens.size),
                            "documents": int(np.count_nonzero(tokens == EOT)), "sha256": _sha256(path)})
        self.index += 1
        if self.buf.size != self._capacity():
            self.buf = np.empty(self._capacity(), dtype=np.uint16)
        self.filled = 0

    def close(self) -> None:
        if self.filled:
            self._flush()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _clear(out_dir: Path, name: str) -> None:
    """Remove what a previous run left: its manifest first, so the folder never looks complete."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    pattern = re.compile(rf"{re.escape(name)}_(val|train)_\d{{6}}\.bin(\.tmp)?|{MANIFEST}\.tmp")
    for p in out_dir.iterdir():
        if pattern.fullmatch(p.name):
            p.unlink()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(documents: Iterable[Document], out_dir: str | Path, name: str, shard_size: int = DEFAULT_SHARD_SIZE,
            val_tokens: int = DEFAULT_VAL_TOKENS, workers: int | None = None, source: str | dict = "",
            verbose: bool = True) -> dict:
    """Tokenize `documents` (texts, or Paths read as UTF-8) into shards + manifest; returns the manifest.

    The output is byte-identical for any worker count: `imap` returns chunks in input order.
    """
    if not re.fullmatch(r"[A-Za-z0-9.-]+", name):
        raise PrepareError(f"--name {name!r}: use letters, digits, '.' and '-' (shard names use '_' as separator)")
    if shard_size <= 0 or val_tokens < 0:
        raise PrepareError(f"--shard-size must be > 0 and --val-tokens >= 0 (got {shard_size}, {val_tokens})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir, name)
    workers = max(1, workers or os.cpu_count() or 1)
    tok = get_tokenizer()  # built before forking so workers inherit it instead of each loading the ranks
    writer = _ShardWriter(out_dir, name, shard_size, val_tokens)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workers == 1:
            encoded = map(_encode_chunk, _chunks(documents))
        else:
            pool = stack.enter_context(_pool_context().Pool(workers))
            encoded = pool.imap(_encode_chunk, _chunks(documents))
        bar = stack.enter_context(tqdm(unit="tok", unit_scale=True, desc=f"tokenizing {name}", disable=not verbose,
                                       file=sys.stderr, mininterval=0.5))
        try:
            for tokens in encoded:
                writer.add(tokens)
                bar.update(tokens.size)
            writer.close()
        except (PrepareError, ShardError):
            _clear(out_dir, name)
            raise
    seconds = time.perf_counter() - start
    shards = writer.shards
    totals = {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
              "shards": len(shards), "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
              "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train")}
    manifest = {
        "name": name,
        "source": source,
        "tokenizer": {"name": tok.name, "ranks_sha256": tok.ranks_sha256, "vocab_size": VOCAB_SIZE, "eot": EOT},
        "python": platform.python_version(),
        "format": {"magic": MAGIC, "version": VERSION, "dtype": "uint16", "eot_before_each_document": True},
        "shard_size": shard_size,
        "val_shard_tokens": val_tokens,
        "shards": shards,
        "totals": totals,
    }
    _write_json_atomic(out_dir / MANIFEST, manifest)
    if verbose:
        rate = totals["tokens"] / max(seconds, 1e-9)
        print(f"{out_dir}: {_stats(manifest)} in {seconds:.1f} s ({rate:,.0f} tokens/s)")
    if not totals["train_tokens"]:
        print(f"{out_dir}: warning: no train shard, the corpus is smaller than --val-tokens ({val_tokens})")
    return manifest


def _stats(manifest: dict) -> str:
    t = manifest["totals"]
    return (f"{t['documents']:,} documents, {t['tokens']:,} tokens in {t['shards']} shards "
            f"({t['val_tokens']:,} val, {t['train_tokens']:,} train)")


@contextlib.contextmanager
def _locked(out_dir: Path):
    """One preparer per folder: under torchrun every rank calls ensure_default_data at once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".prepare.lock", "a") as f:  # "a": no truncation, so a no-op re-run changes no mtime
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _prepare_once(out_dir: Path, force: bool, **kwargs) -> dict:
    with _locked(out_dir):
        manifest_path = out_dir / MANIFEST
        if manifest_path.exists() and not force:
            manifest = json.loads(manifest_path.read_text())
            print(f"{out_dir}: already prepared: {_stats(manifest)} (delete {MANIFEST} or pass --force to redo)")
            return manifest
        return prepare(out_dir=out_dir, **kwargs)


def _stdlib_source() -> dict:
    return {"kind": "python-stdlib", "root": sysconfig.get_paths()["stdlib"], "python": platform.python_version()}


def ensure_default_data(folder: str | Path = DEFAULT_FOLDER) -> Path:
    """The default corpus (stdlib source) in `folder`, prepared only if its manifest is missing."""
    folder = Path(folder)
    _prepare_once(folder, force=False, documents=stdlib_documents(), name="stdlib", shard_size=DEFAULT_SHARD_SIZE,
                  val_tokens=STDLIB_VAL_TOKENS, workers=os.cpu_count(), source=_stdlib_source())
    return folder


# ---- CLI --------------------------------------------------------------------------------------

def _derived_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.") or "data"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.prepare", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", metavar="PATH", help=".txt/.jsonl/.parquet files or folders of them")
    src.add_argument("--hf", metavar="NAME", help="a Hugging Face dataset, streamed with `datasets`")
    ap.add_argument("--hf-name", metavar="CONFIG", help="dataset config, e.g. sample-10BT")
    ap.add_argument("--hf-split", default="train")
    ap.add_argument("--text-field", default="text", help="jsonl field / parquet column / dataset column")
    ap.add_argument("--out", help=f"output folder (default {DEFAULT_FOLDER} or data/NAME)")
    ap.add_argument("--name", help="shard name prefix (default stdlib, or derived from the input)")
    ap.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per train shard")
    ap.add_argument("--val-tokens", type=int, help=f"tokens in the val shard (default {DEFAULT_VAL_TOKENS:,}; "
                                                   f"{STDLIB_VAL_TOKENS:,} for the stdlib)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    ap.add_argument("--force", action="store_true", help="redo even if the folder has a manifest")
    args = ap.parse_args(argv)
    try:
        if args.input:
            paths = [Path(p) for p in args.input]
            for p in paths:
                if not p.exists():
                    raise PrepareError(f"{p}: input does not exist")
            documents = input_documents(paths, args.text_field)
            name = args.name or _derived_name(paths[0].stem if paths[0].is_file() else paths[0].resolve().name)
            source = {"kind": "files", "inputs": [str(p) for p in paths], "text_field": args.text_field}
        elif args.hf:
            documents = hf_documents(args.hf, args.hf_name, args.hf_split, args.text_field)
            name = args.name or _derived_name(args.hf.split("/")[-1] + (f"-{args.hf_name}" if args.hf_name else ""))
            source = {"kind": "huggingface", "dataset": args.hf, "config": args.hf_name, "split": args.hf_split,
                      "text_field": args.text_field}
        else:
            documents, name, source = stdlib_documents(), args.name or "stdlib", _stdlib_source()
        default_val = STDLIB_VAL_TOKENS if not (args.input or args.hf) else DEFAULT_VAL_TOKENS
        out = Path(args.out or (DEFAULT_FOLDER if name == "stdlib" and not (args.input or args.hf) else f"data/{name}"))
        _prepare_once(out, args.force, documents=documents, name=name, shard_size=args.shard_size,
                      val_tokens=default_val if args.val_tokens is None else args.val_tokens, workers=args.workers,
                      source=source)
    except (PrepareError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
