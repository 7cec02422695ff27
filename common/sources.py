"""Where `common.prepare` gets its documents: the Python standard library, local files, Hugging Face.

A document is a text, or a Path that the tokenizing worker reads itself, so file corpora are never
pickled as text. Sources yield documents in a stable order; common.prepare decides the order in the
shards.
"""
from __future__ import annotations

import json
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

from common.usage import InputError, first_line

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")

Document = str | Path  # a Path is read by the worker, so file corpora are never pickled as text


class PrepareError(InputError):
    """Unusable input; the CLI prints it on one line (naming the file) and exits with code 2."""


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
        raise PrepareError(f"{path}: not a readable parquet file ({first_line(e)})") from None
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


_ESCAPED = re.compile("[\udc80-\udcff]")  # how surrogateescape decoding marks each byte that is not UTF-8


def read_document(doc: Document) -> tuple[str, float]:
    """The text of a document and the share of its bytes that were not UTF-8 (each run of them became U+FFFD)."""
    if isinstance(doc, str):
        return doc, 0.0
    try:
        raw = doc.read_bytes()  # bytes, not read_text: keep \r\n as is
    except OSError as e:
        raise PrepareError(f"{doc}: cannot read: {e.strerror}") from None
    try:
        return raw.decode("utf-8"), 0.0
    except UnicodeDecodeError:
        bad = len(_ESCAPED.findall(raw.decode("utf-8", errors="surrogateescape")))
        return raw.decode("utf-8", errors="replace"), bad / len(raw)


def undecodable_warning(files: list[tuple[str, float]]) -> str:
    """The one warning line naming files that are largely not UTF-8: (path, share of its bytes)."""
    named = ", ".join(f"{f} ({share:.0%} of its bytes)" for f, share in files[:3])
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return (f"warning: {len(files)} input file(s) are largely not UTF-8 text (binary, or another encoding); their "
            f"undecodable bytes became U+FFFD: {named}{more}")


def describe(source: str | dict) -> str:
    """The input a preparation read (common.prepare's manifest "source"), for messages."""
    if isinstance(source, dict) and source.get("kind") == "files":
        return ", ".join(source["inputs"])
    if isinstance(source, dict) and source.get("kind") == "huggingface":
        return source["dataset"]
    return "the corpus"


