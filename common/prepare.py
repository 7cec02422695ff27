"""Tokenize a corpus into GPT-2 token shards: `python -m common.prepare [--input PATH ... | --hf NAME]`.

With no input the corpus is the Python standard library's own source, which every machine running
this code already has, so the trainers work offline with no download. Each document is prefixed by
EOT (as in build-nanogpt). Shard 0 is the validation split, a seeded random sample of whole
documents; the train shards hold the others in a seeded random order (`--no-shuffle`: input order,
the default for Hugging Face datasets, which are shuffled already), flowing across shard ends.
`manifest.json` is written last and atomically: its presence means the folder is complete.
See docs/shard-format.md.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import platform
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from common.outdir import make_output_dir, output_file
from common.shard_writing import SPLIT_RULE, Held, ShardWriter, chunks, encode_chunk, pool_context
from common.shards import MAGIC, MANIFEST, MAX_SHARD_TOKENS, VERSION, read_manifest
from common.sources import (Document, PrepareError, describe, hf_documents, input_documents, stdlib_documents,
                            undecodable_warning)
from common.tokenizer import EOT, VOCAB_SIZE, GPT2Tokenizer, get_tokenizer
from common.usage import InputError, Parser

DEFAULT_FOLDER = "data/stdlib"
DEFAULT_SHARD_SIZE = 100_000_000
DEFAULT_VAL_TOKENS = 100_000_000  # build-nanogpt's first shard
DEFAULT_SEED = 1337
STDLIB_VAL_TOKENS = 262_144  # the stdlib is ~15M tokens: a 100M val shard would leave nothing to train on
VAL_POOL = 4  # unshuffled sources: the val documents are drawn from the first VAL_POOL × val_tokens tokens


def _clear(out_dir: Path, name: str) -> None:
    """Remove what a previous run left: its manifest first, so the folder never looks complete."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    pattern = re.compile(rf"{re.escape(name)}_(val|train)_\d{{6}}\.bin(\.tmp)?|{MANIFEST}\.tmp|"
                         rf"{re.escape(name)}\.documents\.tmp")
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


def check_options(name: str, shard_size: int, val_tokens: int, workers: int | None, seed: int) -> None:
    """PrepareError naming the flag of a value prepare() cannot use; `workers` None means all cores."""
    if not re.fullmatch(r"[A-Za-z0-9.-]+", name):
        raise PrepareError(f"--name {name!r}: use letters, digits, '.' and '-' (shard names use '_' as separator)")
    if shard_size <= 0 or val_tokens < 0:
        raise PrepareError(f"--shard-size must be > 0 and --val-tokens >= 0 (got {shard_size}, {val_tokens})")
    # a shard's header holds its token count in an int32; the train buffer is allocated whole up front
    for flag, tokens in (("--shard-size", shard_size), ("--val-tokens", val_tokens)):
        if tokens > MAX_SHARD_TOKENS:
            raise PrepareError(f"{flag} must be ≤ {MAX_SHARD_TOKENS:,} (a shard header's int32 token count), "
                               f"got {tokens:,}")
    if workers is not None and workers < 1:
        raise PrepareError(f"--workers must be ≥ 1 (got {workers})")
    if seed < 0:
        raise PrepareError(f"--seed must be >= 0 (got {seed})")


def _tokenize_into(staging: Path, documents: Iterable[Document], name: str, shard_size: int, val_tokens: int,
                   workers: int | None, source: str | dict, verbose: bool, shuffle: bool, seed: int
                   ) -> tuple[GPT2Tokenizer, ShardWriter, dict, list[tuple[str, float]]]:
    """Tokenize `documents` into shards in `staging`: (tokenizer, writer with its shards, the split's
    record, and the files with undecodable bytes with their share of them)."""
    workers = workers or os.cpu_count() or 1
    tok = get_tokenizer()  # built before forking so workers inherit it instead of each loading the ranks
    writer = ShardWriter(staging, name, shard_size)
    held = Held(staging / f"{name}.documents.tmp")
    held_limit = None if shuffle else VAL_POOL * val_tokens
    split = None  # the manifest's record of the split, once drawn
    text_tokens, undecodable = 0, []
    with contextlib.ExitStack() as stack:
        stack.callback(held.discard)
        if workers == 1:
            encoded = map(encode_chunk, chunks(documents))
        else:
            pool = stack.enter_context(pool_context().Pool(workers))
            encoded = pool.imap(encode_chunk, chunks(documents))
        # disable=None: no bar when stderr is not a terminal, so a log or an error holds whole lines only
        bar = stack.enter_context(tqdm(unit="tok", unit_scale=True, desc=f"tokenizing {name}",
                                       disable=None if verbose else True, file=sys.stderr, mininterval=0.5))
        try:
            for tokens, lengths, bad_files in encoded:
                text_tokens += tokens.size - lengths.size  # all but each document's EOT
                undecodable += bad_files
                if split is not None:
                    writer.add(tokens)
                else:
                    held.add(tokens, lengths)
                    if held_limit is not None and held.tokens >= held_limit:
                        split = held.place(writer, val_tokens, seed, shuffle)
                bar.update(tokens.size)
            if not text_tokens:
                raise PrepareError(f"{describe(source)}: no text to tokenize (every document is empty)")
            if split is None:
                split = held.place(writer, val_tokens, seed, shuffle)
            writer.close()
        except BaseException:
            bar.leave = False  # on a terminal: the bar's line is cleared, so the error stands alone
            raise
    return tok, writer, split, undecodable


def prepare(documents: Iterable[Document], out_dir: str | Path, name: str, shard_size: int = DEFAULT_SHARD_SIZE,
            val_tokens: int = DEFAULT_VAL_TOKENS, workers: int | None = None, source: str | dict = "",
            verbose: bool = True, shuffle: bool = True, seed: int = DEFAULT_SEED) -> dict:
    """Tokenize `documents` (texts, or Paths read as UTF-8) into shards + manifest; returns the manifest.

    The val shard is a random sample of whole documents, the first of a permutation seeded by `seed`
    that hold ≥ val_tokens tokens. Train holds the other documents, in that permutation's order when
    `shuffle`, else in input order. Shuffling holds every document in a temporary file until the end;
    without it only the first VAL_POOL × val_tokens tokens are held and the val sample is drawn from
    them (an unshuffled source is one that is shuffled already), so a corpus of any size streams.
    The output is byte-identical for any worker count (`imap` returns chunks in input order) and, for
    the same inputs and seed, between runs.
    """
    check_options(name, shard_size, val_tokens, workers, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The new shards are written aside and replace the folder's old ones only once all are written, so a
    # redo (--force) that fails keeps the last good preparation.
    staging = out_dir / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
    start = time.perf_counter()
    try:
        staging.mkdir()
        tok, writer, split, undecodable = _tokenize_into(staging, documents, name, shard_size, val_tokens,
                                                         workers, source, verbose, shuffle, seed)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _clear(out_dir, name)
    for shard in writer.shards:
        os.replace(staging / shard["file"], out_dir / shard["file"])
    staging.rmdir()
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
        "split": split,
        "shards": shards,
        "totals": totals,
    }
    _write_json_atomic(out_dir / MANIFEST, manifest)
    if verbose:
        rate = totals["tokens"] / max(seconds, 1e-9)
        print(f"{out_dir}: {_stats(manifest)} in {seconds:.1f} s ({rate:,.0f} tokens/s)")
    if undecodable:
        print(undecodable_warning(undecodable), file=sys.stderr)
    if not totals["train_tokens"]:
        print(f"{out_dir}: warning: no train shard, the corpus is smaller than --val-tokens ({val_tokens})",
              file=sys.stderr)
    return manifest


def _stats(manifest: dict) -> str:
    t = manifest["totals"]
    return (f"{t['documents']:,} documents, {t['tokens']:,} tokens in {t['shards']} shards "
            f"({t['val_tokens']:,} val, {t['train_tokens']:,} train)")


@contextlib.contextmanager
def _locked(out_dir: Path):
    """One preparer per folder: under torchrun every rank calls ensure_default_data at once. A refused run
    removes the folder it created, lock file included, while it holds the lock (_remove_made): a run that
    was waiting then holds a lock on a file no longer there, so it makes the folder and its lock again."""
    lock = out_dir / ".prepare.lock"
    while True:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            f = open(lock, "a")  # "a": no truncation, so a no-op re-run changes no mtime
        except FileNotFoundError:  # the folder was removed between the two calls
            continue
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    with f:
        yield


def is_current(folder: str | Path) -> bool:
    """Whether `folder` holds a complete preparation made by this version's split rule."""
    manifest = read_manifest(Path(folder))
    return manifest is not None and (manifest.get("split") or {}).get("rule") == SPLIT_RULE


def _prepare_once(out_dir: Path, force: bool, redo_older: bool = False, made: Path | None = None,
                  **kwargs) -> dict:
    """Prepare unless a manifest is there; `redo_older` also redoes one made by an older split rule. `made`:
    the outermost folder of out_dir this run created, removed again if the preparation fails."""
    with _locked(out_dir):
        for stale in out_dir.glob(".*.staging"):  # a killed run's: no other run is preparing here now
            shutil.rmtree(stale, ignore_errors=True)
        manifest = read_manifest(out_dir)
        if manifest is not None and not force:
            older = not is_current(out_dir)
            if not (older and redo_older):
                note = " by an older rule (val = the first tokens, documents in input order)" if older else ""
                print(f"{out_dir}: already prepared{note}: {_stats(manifest)} (delete {MANIFEST} or pass --force "
                      f"to redo)")
                return manifest
            print(f"{out_dir}: prepared by an older rule (val = the first tokens, documents in input order); "
                  f"preparing it again")
        try:
            return prepare(out_dir=out_dir, **kwargs)
        except BaseException:
            if made is not None:
                _remove_made(out_dir, made)
            raise


def _stdlib_source() -> dict:
    return {"kind": "python-stdlib", "root": sysconfig.get_paths()["stdlib"], "python": platform.python_version()}


def ensure_default_data(folder: str | Path = DEFAULT_FOLDER) -> Path:
    """The default corpus (stdlib source) in `folder`, prepared if its manifest is missing or older than
    the current split rule."""
    folder = Path(folder)
    _prepare_once(folder, force=False, redo_older=True, documents=stdlib_documents(), name="stdlib",
                  shard_size=DEFAULT_SHARD_SIZE, val_tokens=STDLIB_VAL_TOKENS, workers=os.cpu_count(),
                  source=_stdlib_source())
    return folder


# ---- CLI --------------------------------------------------------------------------------------

def _first_read(documents: Iterable[Document]) -> Iterator[Document]:
    """`documents` with the first one already read, so that a source failing at once (a first row without
    the text field, `datasets` not installed) is refused before the output folder exists."""
    it = iter(documents)
    first = next(it, None)
    return it if first is None else itertools.chain([first], it)


def _first_missing(out: Path) -> Path | None:
    """The outermost folder of `out` (itself or a parent) that does not exist yet: what this run creates.
    Found on the real path (`x/../y` is `y`, through any links), as mkdir will walk it."""
    out = Path(os.path.realpath(out))
    missing = None
    for p in (out, *out.parents):
        if p.exists():
            return missing
        missing = p
    return missing


def _remove_made(out: Path, made: Path) -> None:
    """Remove the folders a refused run created, from `out` up to `made`, if it wrote nothing in them but its
    lock (prepare() has already removed its shards), so an error found mid-stream leaves nothing behind.
    Called under the lock (see _locked)."""
    out = Path(os.path.realpath(out))
    try:
        if any(e.name != ".prepare.lock" for e in out.iterdir()):
            return
        (out / ".prepare.lock").unlink(missing_ok=True)
    except OSError:
        return
    for p in (out, *out.parents):
        try:
            p.rmdir()  # only an empty folder
        except OSError:
            return
        if p == made:
            return


def _derived_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.") or "data"


def main(argv: Sequence[str] | None = None) -> int:
    ap = Parser(prog="python -m common.prepare", description=__doc__.splitlines()[0])
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
    ap.add_argument("--shuffle", action=argparse.BooleanOptionalAction,
                    help="write the documents in a seeded random order (default: yes for the stdlib and --input, "
                         "no for --hf, whose datasets such as FineWeb are shuffled already)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the document order and the val sample")
    ap.add_argument("--force", action="store_true", help="redo even if the folder has a manifest")
    try:
        args = ap.parse_args(argv)
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
        val_tokens = default_val if args.val_tokens is None else args.val_tokens
        # checked here too: a folder prepared already is otherwise kept without looking at the flags
        check_options(name, args.shard_size, val_tokens, args.workers, args.seed)
        out = Path(args.out or (DEFAULT_FOLDER if name == "stdlib" and not (args.input or args.hf) else f"data/{name}"))
        if args.force or read_manifest(out) is None:  # the source will be read (a prepared folder is kept unread)
            output_file(out / MANIFEST, "--out")  # --out can be made: checked before the source is opened
            documents = _first_read(documents)
        made = _first_missing(out)
        make_output_dir(out, "--out")
        _prepare_once(out, args.force, made=made, documents=documents, name=name, shard_size=args.shard_size,
                      val_tokens=val_tokens, workers=args.workers, source=source,
                      shuffle=not args.hf if args.shuffle is None else args.shuffle, seed=args.seed)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
