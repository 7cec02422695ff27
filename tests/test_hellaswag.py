import json
import numpy as np
import pytest

from common.hellaswag import (Example, HellaSwagError, crop, evaluate_hellaswag, load_examples, render,
                              score)
from common.tokenizer import encode

# The example quoted in build-nanogpt's hellaswag.py: a line with every field of the real file.
REAL_LINE = {
    "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def minimal(ind=0, label=0, endings=("a", "b", "c", "d"), ctx="ctx"):
    return {"ind": ind, "ctx": ctx, "label": label, "endings": list(endings)}


def test_load_accepts_the_real_files_fields(tmp_path):
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", [REAL_LINE, "", minimal(ind=7, label=1)])
    examples = load_examples(path)
    assert len(examples) == 2
    ex = examples[0]
    assert (ex.ind, ex.ctx, ex.label, ex.endings) == (24, REAL_LINE["ctx"], 3, tuple(REAL_LINE["endings"]))
    assert ex.where == f"{path}:1"
    assert examples[1].where == f"{path}:3"  # blank line 2 skipped but counted
    assert [e.ind for e in load_examples(path, limit=1)] == [24]


@pytest.mark.parametrize("bad, why", [
    ('{"ind": 1, "ctx": "x", ', "invalid JSON"),
    (json.dumps({"ind": 1, "ctx": "x", "label": 0}), "missing field(s) endings"),
    (json.dumps(minimal(endings=("a", "b", "c"))), "list of 4 strings"),
    (json.dumps(minimal(endings=("a", "b", "c", 4))), "list of 4 strings"),
    (json.dumps(minimal(label=4)), "label"),
    (json.dumps(minimal(label=-1)), "label"),
    (json.dumps(minimal(label=True)), "label"),
    (json.dumps(minimal(label="1")), "label"),
    (json.dumps(minimal(ctx=None)), "ctx"),
    ("[1, 2]", "JSON object"),
])
def test_load_rejects_bad_lines_naming_file_and_line(tmp_path, bad, why):
    path = write_jsonl(tmp_path / "h.jsonl", [minimal(), bad])
    with pytest.raises(HellaSwagError) as e:
        load_examples(path)
    message = str(e.value)
    assert message.startswith(f"{path}:2: ") and why in message
    assert "\n" not in message


def test_load_missing_or_empty_file(tmp_path):
    with pytest.raises(HellaSwagError, match="cannot open"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(HellaSwagError, match="no examples"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_render_exact_tokens_with_the_gpt2_tokenizer():
    ex = Example(ind=24, ctx=REAL_LINE["ctx"], endings=tuple(REAL_LINE["endings"]), label=3, where="t")
    tokens, mask, label = render(ex, encode)
    ctx = [32, 582, 318, 5586, 319, 257, 9753, 13, 339]  # "A man is sitting on a roof. he"
    endings = [[318, 1262, 14441, 284, 14441, 257, 5166, 286, 1341, 271, 13],  # " is using wrap to wrap a ..."
               [318, 34759, 1241, 19867, 572, 13],
               [318, 4769, 257, 6437, 1134, 338, 23441, 13],
               [4940, 10427, 510, 9753, 278, 319, 257, 9753, 13]]
    assert label == 3
    assert tokens.shape == mask.shape == (4, 9 + 11)
    assert tokens.dtype == np.int32 and mask.dtype == np.int8
    for i, end in enumerate(endings):
        pad = 11 - len(end)
        assert tokens[i].tolist() == ctx + end + [0] * pad
        assert mask[i].tolist() == [0] * 9 + [1] * len(end) + [0] * pad


def test_score_sum_and_average_disagree():
    # Row 0: long ending of 4 tokens at 1.0 each (sum 4, mean 1); row 1: one token at 2.0 (sum 2, mean 2).
    mask = np.array([[0, 0, 1, 1, 1, 1],
                     [0, 0, 1, 0, 0, 0],
                     [0, 0, 1, 1, 0, 0],
                     [0, 0, 1, 1, 0, 0]], dtype=np.int8)
    losses = np.full((4, 5), 9.0)
    losses[0, 1:5] = 1.0
    losses[1, 1] = 2.0
    losses[1, 2:] = np.nan  # padding: never read
    losses[2, 1:3] = 5.0
    losses[3, 1:3] = 6.0
    assert score(losses, mask) == (1, 0)


def test_score_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        score(np.zeros((4, 6)), np.ones((4, 6), dtype=np.int8))


def char_encode(text):
    return [ord(c) for c in text]


def fake_token_losses(tokens):
    """0.5 nats for predicting an upper-case letter, 2.0 for anything else, NaN for padding (id 0)."""
    targets = tokens[:, 1:]
    losses = np.where((targets >= ord("A")) & (targets <= ord("Z")), 0.5, 2.0)
    return np.where(targets == 0, np.nan, losses)


def test_evaluate_hellaswag_acc_and_acc_norm(tmp_path):
    rows = [
        minimal(ind=0, label=2, endings=("abc", "def", "GHI", "jkl")),  # right by sum and by mean
        minimal(ind=1, label=0, endings=("XYZW", "pqrs", "tuvw", "mnop")),  # right by sum and by mean
        # Label 1: " ABCDEFGH" costs 2.0 + 8 × 0.5 = 6.0 (mean 0.67); " x" costs 4.0 (mean 2.0): the
        # sum picks the short wrong ending, the mean the long right one.
        minimal(ind=2, label=1, endings=("x", "ABCDEFGH", "yyyy", "zzzz")),
    ]
    path = write_jsonl(tmp_path / "h.jsonl", rows)
    result = evaluate_hellaswag(path, fake_token_losses, char_encode)
    assert result["n"] == 3
    assert result["acc"] == pytest.approx(2 / 3)
    assert result["acc_norm"] == 1.0
    assert evaluate_hellaswag(path, fake_token_losses, char_encode, limit=2) == {"n": 2, "acc": 1.0, "acc_norm": 1.0}


def test_crop_keeps_endings_and_the_nearest_context():
    ex = Example(ind=0, ctx="0123456789", endings=("AB", "C", "DEF", "G"), label=2, where="t")
    tokens, mask, _ = render(ex, char_encode)  # width 10 + 4 (" DEF")
    cropped, cmask = crop(tokens, mask, block_size=8, where="t")
    assert cropped.shape == cmask.shape == (4, 8)
    assert cropped[2].tolist() == char_encode("6789 DEF")
    assert cropped[1].tolist() == char_encode("6789 C") + [0, 0]
    assert cmask.sum(axis=1).tolist() == mask.sum(axis=1).tolist()  # every ending token kept
    same = crop(tokens, mask, block_size=14)  # fits: untouched
    assert same[0] is tokens and same[1] is mask
    with pytest.raises(HellaSwagError, match=r"t: an ending of 4 tokens does not fit block_size 4"):
        crop(tokens, mask, block_size=4, where="t")


def test_evaluate_crops_to_block_size(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [minimal(ctx="a long context " * 5, label=3,
                                                      endings=("xx", "yy", "zz", "WW"))])
    widths = []

    def losses(tokens):
        widths.append(tokens.shape[1])
        return fake_token_losses(tokens)

    assert evaluate_hellaswag(path, losses, char_encode, block_size=16) == {"n": 1, "acc": 1.0, "acc_norm": 1.0}
    assert widths == [16]
    with pytest.raises(HellaSwagError, match=f"{path}:1: an ending of 3 tokens"):
        evaluate_hellaswag(path, losses, char_encode, block_size=3)


def test_evaluate_checks_the_loss_shape(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [minimal()])
    with pytest.raises(ValueError, match=r"returned shape \(4, 5\)"):
        evaluate_hellaswag(path, lambda t: np.zeros((4, t.shape[1])), char_encode)


def test_evaluate_with_the_gpt2_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [REAL_LINE])
    seen = []
    right = encode(" " + REAL_LINE["endings"][3])

    def losses(tokens):
        seen.append(tokens.copy())
        return np.where(np.isin(tokens[:, 1:], right), 0.0, 1.0)  # only ending 3 is all "known" tokens

    assert evaluate_hellaswag(path, losses, encode) == {"n": 1, "acc": 1.0, "acc_norm": 1.0}
    assert len(seen) == 1 and seen[0].shape == (4, 20) and seen[0].dtype == np.int32
