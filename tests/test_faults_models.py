"""The fault suite, what reads checkpoints: both samplers and evaluators, and parity.convert. Each bad input is
one error line naming it, exit code 2, no traceback, nothing of the world changed (tests/faults.py)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from common.outdir import hold
from faults import Case, check_case
from helpers import ROOT

# (id, checkpoint in the world, what the line names): every reader refuses these alike
BAD_CHECKPOINTS = [
    ("torch-garbled", "torch_garbled", "model.safetensors: sha256"),
    ("torch-truncated", "torch_truncated", "train_state.pt: sha256"),
    ("jax-garbled", "jax_garbled", "{jax_garbled_file}: sha256"),
    ("jax-missing-file", "jax_missing", "{jax_missing_file}: checkpoint file unreadable"),
    ("hf-untied-head", "hf_untied", "tie_word_embeddings is false and lm_head.weight differs"),
    ("hf-inverse-layer-idx", "hf_inverse_idx", "scale_attn_by_inverse_layer_idx is true"),
    ("hf-unscaled", "hf_unscaled", "scale_attn_weights is false"),
    ("hf-relu", "hf_relu", "activation_function 'relu'"),
    ("hf-eps", "hf_eps", "layer_norm_epsilon 1e-06"),
]


def named(text: str):
    return lambda w, tmp: text.format(**{k: str(v) for k, v in w.paths.items()})


def reader_cases(b: str) -> list[Case]:
    sample, evaluate = f"{b}_impl.sample", f"{b}_impl.evaluate"

    def ck(run: str, *extra):
        return lambda w, tmp: ["--checkpoint", str(w[run]), *map(str, extra)]

    cases = [Case(f"{b}-sample-{i}", sample, ck(run), named(text)) for i, run, text in BAD_CHECKPOINTS]
    cases += [Case(f"{b}-evaluate-{i}", evaluate, ck(run), named(text)) for i, run, text in BAD_CHECKPOINTS[:4]]
    cases += [
        Case(f"{b}-sample-nan-temperature", sample, ck("torch_run", "--temperature", "nan"),
             "--temperature must be a finite number, got nan"),
        Case(f"{b}-sample-inf-temperature", sample, ck("torch_run", "--temperature", "inf"),
             "--temperature must be a finite number, got inf"),
        Case(f"{b}-sample-negative-top-k", sample, ck("torch_run", "--top-k", "-1"), "--top-k must be ≥ 0"),
        Case(f"{b}-sample-zero-samples", sample, ck("torch_run", "--num-samples", "0"), "--num-samples must be ≥ 1"),
        Case(f"{b}-sample-huge-seed", sample, ck("torch_run", "--seed", str(2**70)), "--seed must be in [0, 2**32 − "),
        Case(f"{b}-sample-seeds-past-32-bits", sample, ck("torch_run", "--seed", str(2**32 - 1), "--num-samples", 2),
             "--seed must be in [0, 2**32 − --num-samples], got 4294967295"),
        Case(f"{b}-sample-bad-device", sample, ck("torch_run", "--device", "tpu"), "argument --device"),
        Case(f"{b}-sample-missing", sample, lambda w, tmp: ["--checkpoint", str(tmp / "none")],
             lambda w, tmp: f"{tmp / 'none'}: does not exist"),
        Case(f"{b}-sample-not-a-checkpoint", sample, ck("empty_data"), named("{empty_data}: neither a checkpoint")),
        Case(f"{b}-evaluate-zero-batch", evaluate, ck("torch_run", "--batch-size", "0"), "--batch-size must be ≥ 1"),
        Case(f"{b}-evaluate-missing-data", evaluate, lambda w, tmp: ck("jax_run", "--data", tmp / "nope")(w, tmp),
             lambda w, tmp: f"{tmp / 'nope'}: shard folder does not exist"),
        Case(f"{b}-evaluate-bad-shard", evaluate, lambda w, tmp: ck("torch_run", "--data", w["bad_val"])(w, tmp),
             named("{bad_val}/x_val_000000.bin: token id 300")),
        Case(f"{b}-evaluate-malformed-hellaswag", evaluate,
             lambda w, tmp: ck("hf_gpt2", "--val-tokens", 0, "--hellaswag", w["hellaswag_bad"])(w, tmp),
             named("{hellaswag_bad}:1: 'endings' must be a list of 4 strings")),
        Case(f"{b}-evaluate-hf-without-data", evaluate, ck("hf_gpt2"), "--data: a Hugging Face folder records no data"),
        Case(f"{b}-evaluate-json-folder-missing", evaluate,
             lambda w, tmp: ck("torch_run", "--json", tmp / "no" / "r.json")(w, tmp), "--json: the folder of"),
        Case(f"{b}-evaluate-json-a-folder", evaluate, lambda w, tmp: ck("torch_run", "--json", tmp)(w, tmp),
             lambda w, tmp: f"--json: {tmp} is a folder"),
    ]
    return cases


def convert(*args):
    return lambda w, tmp: [str(a).format(**{k: str(v) for k, v in w.paths.items()}, tmp=tmp) for a in args]


CONVERT_CASES = [
    Case("convert-unknown-target", "parity.convert", convert("{torch_run}", "{tmp}/x", "--to", "tf"),
         "argument --to: invalid choice: 'tf'"),
    Case("convert-hf-under-a-file", "parity.convert", convert("{torch_run}", "{a_file}/x", "--to", "hf"),
         named("DST: cannot create {a_file}/x: {a_file} is a file")),
    Case("convert-jax-under-a-file", "parity.convert", convert("{torch_run}", "{a_file}/x", "--to", "jax"),
         named("DST: cannot create {a_file}/x: {a_file} is a file")),
    Case("convert-missing-source", "parity.convert", convert("{tmp}/none", "{tmp}/x", "--to", "jax"), "none: does not exist"),
    Case("convert-garbled-source", "parity.convert", convert("{torch_garbled}", "{tmp}/x", "--to", "jax"),
         "model.safetensors: sha256"),
    Case("convert-legacy-truncated", "parity.convert", convert("{torch_legacy_truncated}", "{tmp}/x", "--to", "jax"),
         "train_state.pt: cannot read optimizer state"),
    Case("convert-legacy-foreign-pickle", "parity.convert",
         convert("{torch_legacy_foreign}", "{tmp}/x", "--to", "jax"), "train_state.pt: cannot read optimizer state"),
    Case("convert-into-its-own-run", "parity.convert", convert("{torch_run}", "{torch_run}", "--to", "jax"),
         named("DST: {torch_run} already holds checkpoints (newest: step_00000002)")),
    Case("convert-into-another-run", "parity.convert", convert("{jax_run}", "{torch_run}", "--to", "torch"),
         named("DST: {torch_run} already holds checkpoints")),
    Case("convert-hf-into-a-checkpoint", "parity.convert",
         convert("{torch_run}", "{torch_run}/checkpoints/step_00000002", "--to", "hf"), "is not empty"),
    Case("convert-through-a-link-to-a-step-folder", "parity.convert", convert("{jax_run}", "{tmp}/link", "--to", "torch"),
         "a checkpoint's own folder",
         during=lambda w, tmp: (tmp / "link").symlink_to(w["torch_run"] / "checkpoints" / "step_00000002")
         or contextlib.nullcontext()),
    Case("convert-into-a-step-folder", "parity.convert",
         convert("{jax_run}", "{torch_run}/checkpoints/step_00000002", "--to", "torch"), "a checkpoint's own folder"),
    Case("convert-untied-hf", "parity.convert", convert("{hf_untied}", "{tmp}/x", "--to", "torch"),
         "tie_word_embeddings is false"),
    Case("convert-busy-destination", "parity.convert", convert("{torch_run}", "{tmp}/busy", "--to", "jax"),
         "DST: ", during=lambda w, tmp: hold(tmp / "busy", "test")),
]
CASES = reader_cases("torch") + reader_cases("jax") + CONVERT_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_readers_refuse_bad_input(case, fault_world, tmp_path, capsys):
    check_case(case, fault_world, tmp_path, capsys)


@pytest.mark.parametrize("module", ["torch_impl.evaluate", "jax_impl.evaluate"])
def test_a_truncated_unhashed_jax_checkpoint_is_one_line_in_a_fresh_process(module, fault_world):
    # Checkpoints saved before files were hashed reach orbax, whose reads still in flight when the restore fails
    # can print tracebacks around the error line, at random and late: the process itself is the subject here.
    argv = [sys.executable, "-m", module, "--checkpoint", str(fault_world["jax_legacy_truncated"]), "--val-tokens", "0"]
    for _ in range(2):
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
        assert done.stderr.startswith(f"error: {fault_world['jax_legacy_truncated'] / 'checkpoints'}")
