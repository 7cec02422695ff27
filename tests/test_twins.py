"""What the two backends share by construction: the same modules with the same public functions and signatures
(a literal mirror); one seed gives one set of initial weights, so one config gives one loss curve in both
trainers; and each backend's sampler reads the other's checkpoints."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest

from common.backend import BACKENDS
from common.loop import train
from common.names import init_weights
from common.records import read_records
from conftest import tiny_config, twenty_step_config, with_run
from helpers import backend_of, meta, quiet
from jax_impl import sample as jax_sample
from torch_impl import sample as torch_sample



ROOT = Path(__file__).resolve().parent.parent
# The modules whose public functions are the backends' interface to the loop, the parity tools and the CLIs:
# the same names with the same parameters on both sides. Elsewhere each framework's own arguments differ
# (flax keeps parameters apart from the model; torch places tensors on a device), so those modules share
# their file names and jobs, not signatures.
MIRRORED = ("train", "checkpoint")
# What one side has and the other needs no counterpart for.
ONE_SIDED = {"torch_impl.checkpoint": {"moments_of"},  # JAX reads AdamW's moments off its optax state directly
             "jax_impl.train": {"compiled_part", "runtime_of"}}  # the compiled programs a state belongs to


def _public_functions(module) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(module).items()
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")}


def test_the_backends_are_a_literal_mirror_same_files_functions_and_parameters():
    jax_files = {p.name for p in (ROOT / "jax_impl").glob("*.py")} - {"layout.py"}  # the stacked params tree
    assert {p.name for p in (ROOT / "torch_impl").glob("*.py")} == jax_files
    for stem in MIRRORED:
        torch_fns, jax_fns = (_public_functions(importlib.import_module(f"{side}.{stem}")) for side in
                              ("torch_impl", "jax_impl"))
        shared = set(torch_fns) & set(jax_fns)
        assert set(torch_fns) - shared == ONE_SIDED.get(f"torch_impl.{stem}", set()), stem
        assert set(jax_fns) - shared == ONE_SIDED.get(f"jax_impl.{stem}", set()), stem
        for fn in sorted(shared):  # the same parameters in the same order (their types are each framework's)
            assert list(torch_fns[fn].parameters) == list(jax_fns[fn].parameters), f"{stem}.{fn}"
    train = _public_functions(importlib.import_module("torch_impl.train"))
    assert list(train["train_step"].parameters) == ["state", "x", "y"]
    assert {"init_state", "set_moments", "train_step", "evaluate", "main"} <= set(train)


def initial_weights(name: str, cfg) -> dict[str, np.ndarray]:
    backend = backend_of(name)
    return backend.to_common(backend.init_state(cfg, backend.setup(cfg)))


def test_one_seed_gives_both_backends_the_same_initial_weights(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    common = init_weights(cfg.model, cfg.run.seed)
    for name in BACKENDS:
        weights = initial_weights(name, cfg)
        assert set(weights) == set(common)
        assert all(np.array_equal(weights[k], common[k]) for k in common), name
    other = initial_weights("jax", with_run(cfg, seed=cfg.run.seed + 1))
    assert not np.array_equal(other["wte.weight"], common["wte.weight"])


def test_both_trainers_record_the_same_losses_from_one_config(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path / "{backend}", max_steps=3, warmup_steps=1)
    losses = {}
    for name in BACKENDS:
        out_dir = train(backend_of(name), cfg, log=quiet).out_dir
        assert out_dir == tmp_path / name
        losses[name] = [r["loss"] for r in read_records(out_dir / "metrics.jsonl")]
    t, j = losses["torch"], losses["jax"]
    assert len(t) == len(j) == 3 and t[2] < t[0]
    assert abs(t[0] - j[0]) < 1e-6 and abs(t[2] - j[2]) < 1e-5


@pytest.mark.parametrize("sampler", [torch_sample, jax_sample], ids=BACKENDS)
def test_each_sampler_reads_both_backends_checkpoints_alike(sampler, tmp_path, capsys):
    cfg = twenty_step_config(tmp_path, tmp_path)
    outputs = []
    for name in BACKENDS:  # the same initial weights, saved by each backend
        backend = backend_of(name)
        backend.save_checkpoint(backend.init_state(cfg, backend.setup(cfg)), tmp_path / name, meta(backend, cfg, 1))
        argv = ["--checkpoint", str(tmp_path / name), "--prompt", "a;b", "--max-new-tokens", "12",
                "--temperature", "0", "--device", "cpu"]
        assert sampler.main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("a;b") and len(outputs[0]) > len("a;b\n")
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("name", BACKENDS)
def test_evaluating_no_batches_is_an_error_in_both(name, tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    backend = backend_of(name)
    with pytest.raises(ValueError, match="no batches"):
        backend.evaluate(backend.init_state(cfg, backend.setup(cfg)), iter([]))
