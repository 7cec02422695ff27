"""parity.convert: torch ⇄ JAX ⇄ Hugging Face; a run trained in one backend evaluates the same in the other."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from common.config import validate
from common.data import val_batches
from common.loop import train
from common.portable import read_portable
from conftest import tiny_config
from parity.convert import get_backend, main as convert_main, write_portable


@pytest.fixture(scope="module")
def torch_run(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torch-run")
    cfg = tiny_config(tiny_shards, out, max_steps=4)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, checkpoint_interval=4))
    train(get_backend("torch"), validate(cfg), log=lambda *_: None)
    return out


def val_loss(backend_name: str, run_dir: Path) -> float:
    backend = get_backend(backend_name)
    cfg = read_portable(run_dir).config
    state, _ = backend.load_checkpoint(run_dir, cfg, backend.setup(cfg))
    return backend.evaluate(state, val_batches(cfg.data.dir, 4, cfg.model.block_size, 256,
                                               vocab_size=cfg.model.vocab_size))


def test_torch_to_jax_to_torch_is_bit_identical(torch_run, tmp_path):
    src = read_portable(torch_run, moments=True)
    assert src.kind == "torch" and src.step == 4 and src.moments["step"] == 4
    jax_ckpt = write_portable(src, tmp_path / "jax", "jax")
    via_jax = read_portable(jax_ckpt, moments=True)
    assert via_jax.kind == "jax" and via_jax.step == 4
    back = read_portable(write_portable(via_jax, tmp_path / "torch", "torch"), moments=True)
    for name, w in src.weights.items():
        assert np.array_equal(w, back.weights[name]), name
        for kind in ("m", "v"):
            assert np.array_equal(src.moments[kind][name], back.moments[kind][name]), (kind, name)
    assert back.meta.loader == src.meta.loader  # a converted run can resume where it stopped


def test_converted_run_scores_the_same_val_loss_in_jax(torch_run, tmp_path):
    assert convert_main([str(torch_run), str(tmp_path / "jax"), "--to", "jax"]) == 0
    torch_loss, jax_loss = val_loss("torch", torch_run), val_loss("jax", tmp_path / "jax")
    assert 2.0 < torch_loss < 6.0  # trained a little from ln(256) = 5.55
    assert jax_loss == pytest.approx(torch_loss, abs=1e-5)


def test_hf_export_keeps_real_vocab_rows(torch_run, tmp_path):
    assert convert_main([str(torch_run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = read_portable(tmp_path / "hf", moments=True)
    src = read_portable(torch_run)
    assert hf.kind == "hf" and hf.moments is None
    for name, w in src.weights.items():
        assert np.array_equal(w, hf.weights[name]), name  # vocab 256 has no padded rows to drop


def test_bad_source_exits_2(tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "jax"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert_main([str(tmp_path / "empty"), str(tmp_path / "out"), "--to", "torch"]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
