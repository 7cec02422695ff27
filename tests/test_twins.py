"""What the two backends share by construction: one seed gives one set of initial weights, so one config
gives one loss curve in both trainers; and each backend's sampler reads the other's checkpoints."""
from __future__ import annotations

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
