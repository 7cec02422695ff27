"""Tokens/s of `common.prepare` on the stdlib corpus (1 worker and all cores) against tiktoken's raw
single-process `encode_ordinary` on the same texts: `python -m bench.prepare [--repeats N]`.

The raw figure excludes file reading and shard writing, so the ratio is a conservative speed-up.
Each figure is the best of --repeats runs, since the machine may be shared.
"""
from __future__ import annotations

import os
import tempfile
import time

from common.prepare import STDLIB_VAL_TOKENS, prepare, stdlib_documents
from common.tokenizer import get_tokenizer
from common.usage import ExitingParser


def raw_tokens_per_s(texts: list[str]) -> float:
    encoding = get_tokenizer().encoding
    start = time.perf_counter()
    n = sum(len(encoding.encode_ordinary(t)) for t in texts)
    return n / (time.perf_counter() - start)


def prepare_tokens_per_s(workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        manifest = prepare(stdlib_documents(), out, "stdlib", val_tokens=STDLIB_VAL_TOKENS, workers=workers,
                           verbose=False)
        return manifest["totals"]["tokens"] / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = ExitingParser(prog="python -m bench.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each kind; the fastest is reported")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be ≥ 1, got {args.repeats}")
    docs = stdlib_documents()
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in docs]
    cores = os.cpu_count() or 1
    raw = max(raw_tokens_per_s(texts) for _ in range(args.repeats))
    one = max(prepare_tokens_per_s(1) for _ in range(args.repeats))
    many = max(prepare_tokens_per_s(cores) for _ in range(args.repeats))
    print(f"stdlib corpus: {len(docs):,} files, {sum(map(len, texts)) / 1e6:.1f} M characters, {cores} cores")
    print(f"tiktoken encode_ordinary, 1 process : {raw / 1e6:6.2f} M tokens/s")
    print(f"common.prepare, workers=1           : {one / 1e6:6.2f} M tokens/s  ({one / raw:.2f}x raw)")
    print(f"common.prepare, workers={cores:<2}          : {many / 1e6:6.2f} M tokens/s  ({many / raw:.2f}x raw)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
