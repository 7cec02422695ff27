"""torch_impl.evaluate / jax_impl.evaluate: val loss, bits per byte and HellaSwag, and the same numbers from both."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, ModelConfig, validate
from common.data import val_batches
from common.hellaswag import render, score, load_examples
from common.loop import train
from common.tokenizer import encode
from conftest import tiny_config, with_run
from helpers import backend_of, quiet
from jax_impl import evaluate as jax_evaluate
from torch_impl import evaluate as torch_evaluate

EVALUATORS = {"torch": torch_evaluate, "jax": jax_evaluate}


pytestmark = pytest.mark.usefixtures("one_torch_thread")

HELLASWAG_ROWS = [  # the real file's schema, every field; short enough for a 64-token model
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.",
     "ctx_b": "she", "ctx": "A lady walks to a barbell. she", "split": "val", "split_type": "indomain", "label": 0,
     "endings": ["bends down and grabs the pole.", "swings and lands in her arms.", "pulls a rope.", "sits."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Baking cookies", "ctx_a": "A kid is in a kitchen.", "ctx_b": "the kid",
     "ctx": "A kid is in a kitchen. the kid", "split": "val", "split_type": "zeroshot", "label": 2,
     "endings": ["jumps.", "reads a long book about the sea.", "mixes the dough in a bowl.", "sleeps."],
     "source_id": "activitynet~v_-x1"},
]


def run_cli(name, argv, tmp_path, capsys) -> tuple[int, dict | None, str]:
    out = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.json"
    code = EVALUATORS[name].main([*argv, "--json", str(out)])
    err = capsys.readouterr().err
    return code, (json.loads(out.read_text()) if code == 0 else None), err


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory) -> dict:
    """A 3-step tiny run per backend, checkpointed at the end, with the trainer's own val loss recorded."""
    out = {}
    for name in ("torch", "jax"):
        cfg = tiny_config(tiny_shards, tmp_path_factory.mktemp(f"run-{name}"), max_steps=3)
        cfg = with_run(cfg, eval_interval=3, checkpoint_interval=3)
        result = train(backend_of(name), cfg, log=quiet)
        out[name] = (result.out_dir, result.records[-1]["val_loss"])
    return out


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_val_loss_and_bits_per_byte_of_a_checkpoint(name, runs, tmp_path, capsys):
    run_dir, trainer_val = runs[name]
    code, res, err = run_cli(name, ["--checkpoint", str(run_dir)], tmp_path, capsys)
    assert code == 0, err
    assert (res["source"], res["step"], res["tokens"]) == (name, 3, 256)  # val_tokens 256 = 4 batches of 4 × 16
    assert abs(res["val_loss"] - trainer_val) < 1e-6  # the trainer's evaluate() on the same batches
    assert res["perplexity"] == pytest.approx(math.exp(res["val_loss"]), rel=1e-12)
    # Ids 0..255 are GPT-2's single-byte tokens: one byte per target, so bits/byte = nats/token ÷ ln 2.
    assert res["bytes"] == 256
    assert res["bits_per_byte"] == pytest.approx(res["val_loss"] / math.log(2), rel=1e-12)


@pytest.mark.parametrize("source", ["torch", "jax"])
def test_both_backends_score_a_checkpoint_alike(source, runs, tmp_path, capsys):
    run_dir, _ = runs[source]
    results = {}
    for name in ("torch", "jax"):
        code, results[name], err = run_cli(name, ["--checkpoint", str(run_dir), "--batch-size", "2"], tmp_path, capsys)
        assert code == 0, err
    t, j = results["torch"], results["jax"]
    assert t["tokens"] == j["tokens"] == 256 and t["bytes"] == j["bytes"]
    assert abs(t["val_loss"] - j["val_loss"]) < 1e-5
    assert abs(t["bits_per_byte"] - j["bits_per_byte"]) < 1e-5


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny GPT-2 over the real 50257-token vocabulary (HellaSwag tokenizes English), saved as HF does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=2, n_head=2))
    folder = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(folder)
    return folder


def hf_token_losses(folder: Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-token losses from transformers' own GPT-2: an independent reference for our models."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.long)).logits.double()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.as_tensor(y, dtype=torch.long),
                                             reduction="none").numpy()


def write_hellaswag(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_ROWS))
    return path


def test_hf_folder_val_loss_and_hellaswag_match_transformers(hf_folder, tiny_shards, tmp_path, capsys):
    hs_path = write_hellaswag(tmp_path / "hellaswag_val.jsonl")
    expected_nats = sum(hf_token_losses(hf_folder, x, y).sum()
                        for x, y in val_batches(tiny_shards, 4, 64, 512, vocab_size=50257))
    preds = []
    for ex in load_examples(hs_path):
        tokens, mask, label = render(ex, encode)
        preds.append(score(hf_token_losses(hf_folder, tokens[:, :-1], tokens[:, 1:]), mask))
    labels = [r["label"] for r in HELLASWAG_ROWS]
    acc = np.mean([p == lab for (p, _), lab in zip(preds, labels)])
    acc_norm = np.mean([p == lab for (_, p), lab in zip(preds, labels)])
    for name in ("torch", "jax"):
        code, res, err = run_cli(name, ["--checkpoint", str(hf_folder), "--data", str(tiny_shards), "--val-tokens",
                                        "512", "--hellaswag", str(hs_path)], tmp_path, capsys)
        assert code == 0, err
        assert (res["source"], res["tokens"]) == ("hf", 512)
        assert abs(res["val_loss"] - expected_nats / 512) < 1e-5
        assert res["hellaswag"]["n"] == 3
        assert (res["hellaswag"]["acc"], res["hellaswag"]["acc_norm"]) == pytest.approx((acc, acc_norm), abs=1e-12)


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_hellaswag_every_n_steps_during_training(name, tiny_shards, tmp_path, capsys):
    hs_path = write_hellaswag(tmp_path / "hellaswag_val.jsonl")
    cfg = tiny_config(tiny_shards, tmp_path / "run", max_steps=3, total_batch_size=128)
    cfg = dataclasses.replace(
        cfg, model=ModelConfig(vocab_size=50257, padded_vocab_size=50304, block_size=32, n_layer=2, n_head=2, n_embd=16),
        run=dataclasses.replace(cfg.run, hellaswag_path=str(hs_path), hellaswag_interval=2, checkpoint_interval=3))
    lines = []
    records = train(backend_of(name), cfg, log=lines.append).records
    assert [("hellaswag_acc" in r, r.get("hellaswag_n")) for r in records] == [(False, None), (True, 3), (True, 3)]
    assert sum(line.startswith("hellaswag at step") for line in lines) == 2
    # The number the loop records for the last step is the evaluator's on the saved checkpoint.
    code, res, err = run_cli(name, ["--checkpoint", str(tmp_path / "run"), "--val-tokens", "0", "--hellaswag",
                                    str(hs_path)], tmp_path, capsys)
    assert code == 0, err
    assert (records[-1]["hellaswag_acc"], records[-1]["hellaswag_acc_norm"]) == (
        res["hellaswag"]["acc"], res["hellaswag"]["acc_norm"])


def test_hellaswag_config_errors_name_the_field(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path)
    with pytest.raises(ConfigError, match="run.hellaswag_interval"):
        validate(with_run(cfg, hellaswag_interval=5))
    hs = write_hellaswag(tmp_path / "hs.jsonl")
    with pytest.raises(ConfigError, match="run.hellaswag_path: HellaSwag needs .* model.vocab_size is 256"):
        train(backend_of("torch"), with_run(cfg, hellaswag_path=str(hs)), log=quiet)


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_bad_input_is_one_line_and_exit_2(name, runs, tmp_path, capsys):
    run_dir, _ = runs[name]
    hs = write_hellaswag(tmp_path / "hs.jsonl")
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "--checkpoint"),
        (["--checkpoint", str(run_dir), "--batch-size", "0"], "--batch-size"),
        (["--checkpoint", str(run_dir), "--hellaswag", str(hs)], "--hellaswag: the model's vocabulary has 256"),
        (["--checkpoint", str(run_dir), "--data", str(tmp_path)], "no 'val' shards"),
        (["--checkpoint", str(run_dir), "--bogus"], "unrecognized arguments"),
    ]
    for argv, message in cases:
        code = EVALUATORS[name].main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
