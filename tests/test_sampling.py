"""common.sampling: the flags, prompt and streamed output both backends' sample.py share."""
from __future__ import annotations

import io

import pytest

from common import sampling
from common.checkpoints import CheckpointError
from common.tokenizer import encode


def test_stream_decoder_holds_back_a_split_utf8_character():
    stream = sampling.StreamDecoder(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    assert stream.push(ord("a")) == "a"
    assert stream.push(0xC3) == ""  # the first byte of "é"
    assert stream.push(0xA9) == "é"
    assert stream.push(0xC3) == "" and stream.flush() == "\ufffd"  # at the end a lone byte is printed as is


def test_samples_are_numbered_only_when_there_are_several():
    ids = encode(" world")
    out = io.StringIO()
    sampling.write_samples(out, "Hello", 2, lambda i: iter(ids))
    assert out.getvalue() == "--- sample 1 ---\nHello world\n\n--- sample 2 ---\nHello world\n"
    out = io.StringIO()
    sampling.write_samples(out, "", 1, lambda i: iter(ids))
    assert out.getvalue() == " world\n"


def test_prompt_outside_the_vocabulary_names_the_flag():
    assert sampling.encode_prompt("", 256) == []
    assert sampling.encode_prompt("ab", 50257) == encode("ab")
    with pytest.raises(sampling.UsageError, match="--prompt: token id .* outside the model's vocabulary of 256"):
        sampling.encode_prompt("€", 256)


def test_main_loads_before_reading_the_prompt_from_stdin(monkeypatch, capsys):
    events = []
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))

    def load(args):
        events.append("load")
        return "model"

    def run(args, model, prompt_text, out):
        events.append((model, prompt_text, args.seed))

    parser = sampling.build_parser("prog", "doc", "torch")
    assert sampling.main(["--checkpoint", "x", "--seed", "3"], parser, load, run) == 0
    assert events == ["load", ("model", "from stdin", 3)]
    assert sampling.main(["--checkpoint", "x", "--prompt", "given"], parser, load, run) == 0
    assert events[-1] == ("model", "given", 1337)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --checkpoint"),
    (["--checkpoint", "x", "--num-samples", "0"], "--num-samples must be ≥ 1, got 0"),
    (["--checkpoint", "x", "--temperature", "-1"], "--temperature must be ≥ 0, got -1.0"),
    (["--checkpoint", "x", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--checkpoint", "x", "--temperature=-inf"], "--temperature must be a finite number, got -inf"),
    (["--checkpoint", "x", "--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
    (["--checkpoint", "missing"], "missing: no such checkpoint"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys):
    def load(args):
        raise CheckpointError(f"{args.checkpoint}: no such checkpoint")

    parser = sampling.build_parser("prog", "doc", "torch")
    assert sampling.main(argv, parser, load, lambda *a: None) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
