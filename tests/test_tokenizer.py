import hashlib

import pytest

from common import tokenizer
from common.tokenizer import EOT, RANKS_PATH, RANKS_SHA256, VOCAB_SIZE, decode, encode, encode_batch, get_tokenizer

SAMPLES = [
    "Hello world",
    "",
    "emoji 👩‍👩‍👧‍👦 🚀 and flags 🇫🇷",
    "中文字符和日本語のテキスト, 한국어",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "control \x00\x01\x07\t\r\n\x1b[0m\x7f end",
    "  leading and trailing spaces  \n\n\n",
    "def f(x):\n    return x ** 2  # comment\n",
]


def test_known_ids():
    assert encode("Hello world") == [15496, 995]
    assert decode([15496, 995]) == "Hello world"


def test_constants():
    assert EOT == 50256 and VOCAB_SIZE == 50257
    tok = get_tokenizer()
    assert tok.encoding.eot_token == EOT
    assert tok.encoding.n_vocab == VOCAB_SIZE


def test_endoftext_in_raw_text_is_ordinary_text():
    ids = encode("a <|endoftext|> b")
    assert EOT not in ids
    assert decode(ids) == "a <|endoftext|> b"
    assert EOT not in get_tokenizer().encode_array("<|endoftext|>").tolist()


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_encode_array_matches_encode():
    tok = get_tokenizer()
    for text in SAMPLES + ["<|endoftext|> x"]:
        assert tok.encode_array(text).tolist() == tok.encode(text)


def test_encode_batch_matches_encode():
    assert encode_batch(SAMPLES, num_threads=2) == [encode(t) for t in SAMPLES]


def test_decode_tolerates_padded_vocab_ids():
    assert decode([15496, 50300, 995]) == "Hello\ufffd world"
    assert decode([50303, -1]) == "\ufffd\ufffd"
    assert decode([EOT]) == "<|endoftext|>"


def test_decode_replaces_split_utf8():
    ids = encode("🚀")
    assert len(ids) > 1  # one emoji is several byte-level tokens
    assert "\ufffd" in decode(ids[:1])


def test_ranks_file_checksum():
    assert hashlib.sha256(RANKS_PATH.read_bytes()).hexdigest() == RANKS_SHA256


def test_wrong_checksum_names_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_bytes(RANKS_PATH.read_bytes()[:-10])
    monkeypatch.setattr(tokenizer, "RANKS_PATH", bad)
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(tokenizer.TokenizerError, match="r50k_base.tiktoken"):
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()


def test_encode_array_replaces_lone_surrogates_as_encode_does():
    tok = get_tokenizer()
    for text in ["a\ud800b", "\udfff", "x \ud83d", "\ud800\ud800 y"]:
        ids = tok.encode_array(text).tolist()
        assert ids == tok.encode(text) == tok.encode(text.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd")
                                                       .replace("\ud83d", "\ufffd"))
        assert decode(ids).count("\ufffd") == text.count("\ud800") + text.count("\udfff") + text.count("\ud83d")
