import math

import numpy as np
import pytest

from common.bpb import (bits_per_byte, bpb_of, byte_lengths, perplexity, token_byte_lengths,
                        utf8_bytes_of_targets)
from common.tokenizer import EOT, encode

HELLO, WORLD = 15496, 995  # "Hello" (5 bytes), " world" (6 bytes)


def test_hello_world_byte_counts():
    assert encode("Hello world") == [HELLO, WORLD]
    assert utf8_bytes_of_targets([HELLO, WORLD]) == 11
    assert utf8_bytes_of_targets(np.array([[HELLO], [WORLD]], dtype=np.int32)) == 11  # any shape
    assert utf8_bytes_of_targets([HELLO, EOT, WORLD, EOT]) == 11  # EOT is no text
    assert utf8_bytes_of_targets([]) == 0


def test_bits_per_byte_hand_computed():
    # 11 bytes scored with 22·ln 2 nats in total = 22 bits = exactly 2 bits per byte.
    assert bits_per_byte(22 * math.log(2), 11) == pytest.approx(2.0, rel=1e-15)
    losses = np.array([10 * math.log(2), 12 * math.log(2)])  # per-token nats for "Hello", " world"
    assert bpb_of(losses, np.array([HELLO, WORLD])) == pytest.approx(2.0, rel=1e-15)
    # The EOT's loss still counts, its bytes do not: (22 + 11) bits over 11 bytes.
    assert bpb_of(np.append(losses, 11 * math.log(2)), np.array([HELLO, WORLD, EOT])) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        bpb_of(np.zeros(3), np.zeros(2, dtype=np.int32))


def test_perplexity():
    assert perplexity(math.log(4.0)) == pytest.approx(4.0, rel=1e-15)
    assert perplexity(0.0) == 1.0


def test_table_is_cached_and_matches_the_tokenizer():
    table = token_byte_lengths()
    assert table is token_byte_lengths()
    assert table.dtype == np.int32 and table.shape == (50257,)
    assert table[:256].tolist() == [1] * 256  # GPT-2's byte-level base tokens
    assert (table[HELLO], table[WORLD], table[EOT]) == (5, 6, 0)
    assert table[:EOT].min() >= 1
    assert not table.flags.writeable


def test_bytes_equal_the_decoded_text_including_split_characters():
    # Multi-byte characters (CJK, emoji) are split over byte-level tokens; the per-token sum is exact.
    text = "naïve café — 日本語 🙂 ok"
    ids = encode(text)
    assert utf8_bytes_of_targets(ids) == len(text.encode("utf-8")) == 34


def test_custom_decode_bytes_and_out_of_range_ids():
    assert byte_lengths(lambda i: b"x" * (i % 3), vocab_size=6).tolist() == [0, 1, 2, 0, 1, 2]
    assert utf8_bytes_of_targets([1, 2, 5], decode_bytes=lambda i: b"ab") == 6
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 50257\)"):
        utf8_bytes_of_targets([HELLO, 50300])
    with pytest.raises(ValueError, match="target ids"):
        utf8_bytes_of_targets([-1])


def test_perplexity_of_a_diverged_model_is_inf_not_an_error():
    assert perplexity(709.0) == pytest.approx(math.exp(709.0))
    assert perplexity(710.0) == math.inf and perplexity(1e6) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_val_metrics_of_a_huge_loss_report_inf_perplexity(tiny_shards):
    from common.evaluation import val_metrics

    val = val_metrics(lambda x, y: np.full(y.shape, 1000.0), tiny_shards, 4, 16, 128, 256, "stream")
    assert val["val_loss"] == 1000.0 and val["perplexity"] == math.inf and val["tokens"] == 128
