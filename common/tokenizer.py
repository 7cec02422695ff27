"""GPT-2 BPE (tiktoken's r50k_base ranks) built from the file shipped in common/assets, never downloaded.

Raw text is always encoded as ordinary text: a document that happens to contain "<|endoftext|>"
must not inject a real EOT (or raise, as tiktoken's `encode` does), because EOT marks document
starts in our shards. The only way to get id 50256 is to add it yourself.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str  # a constant: importing the module fetches nothing

EOT = 50256
VOCAB_SIZE = 50257
NAME = "gpt2"
RANKS_PATH = Path(__file__).resolve().parent / "assets" / "r50k_base.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_REPLACEMENT = "\ufffd".encode()


class TokenizerError(ValueError):
    """The shipped ranks file is missing or not the one we expect; the message names it."""


def file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the GPT-2 BPE ranks file: {e.strerror}") from None


class GPT2Tokenizer:
    """Thin wrapper over a tiktoken Encoding with the three calls the project uses."""

    name = NAME
    eot = EOT
    vocab_size = VOCAB_SIZE
    ranks_sha256 = RANKS_SHA256

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as uint32 numpy, skipping the Python int list (data preparation's hot path). A lone
        surrogate (JSON allows "\\ud800") becomes U+FFFD, as tiktoken's `encode` does it; its numpy path
        would raise UnicodeEncodeError instead."""
        try:
            return self.encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        """Never raises on ids: padded-vocab ids (>= 50257) a model may sample become U+FFFD."""
        out, run = bytearray(), []
        for i in ids:
            i = int(i)
            if 0 <= i < VOCAB_SIZE:
                run.append(i)
                continue
            if run:
                out += self.encoding.decode_bytes(run)
                run = []
            out += _REPLACEMENT
        if run:
            out += self.encoding.decode_bytes(run)
        return out.decode("utf-8", errors="replace")


@functools.cache
def get_tokenizer() -> GPT2Tokenizer:
    actual = file_sha256(RANKS_PATH)
    if actual != RANKS_SHA256:
        raise TokenizerError(f"{RANKS_PATH}: sha256 {actual} does not match the GPT-2 r50k_base ranks "
                             f"({RANKS_SHA256}); restore the file from git (see common/assets/README.md)")
    encoding = tiktoken.Encoding(
        name=NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(RANKS_PATH), expected_hash=RANKS_SHA256),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )
    return GPT2Tokenizer(encoding)


def encode(text: str) -> list[int]:
    return get_tokenizer().encode(text)


def encode_batch(texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
    return get_tokenizer().encode_batch(texts, num_threads=num_threads)


def decode(ids: Iterable[int]) -> str:
    return get_tokenizer().decode(ids)
