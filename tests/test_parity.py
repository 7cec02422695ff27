"""parity.check must pass for aligned backends and fail, naming the step and quantity, for a perturbed one."""
from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from common.config import validate
from conftest import tiny_config
from parity import check
from parity.check import TOLERANCES, run_check


def backends():
    # A fresh JAX backend each time: compiled programs must not outlive a monkeypatch.
    from jax_impl.train import JaxBackend
    from torch_impl.train import BACKEND as torch_backend
    return torch_backend, JaxBackend()


def stream(cfg):
    """The stream order's batches: the tolerances' margins on this 256-token model were measured on them
    (parity.check follows data.order; `python -m parity.check` passes on either order)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, order="stream"))


def run(cfg, steps=6, dtype_tol="fp32"):
    return run_check(stream(cfg), steps, TOLERANCES[dtype_tol], log=lambda *_: None, backends=backends())


def test_aligned_backends_pass_in_fp32(tiny_shards):
    report = run(validate(tiny_config(tiny_shards, max_steps=6)))
    assert report["passed"], report["failures"][:3]
    assert len(report["steps"]) == 6
    assert report["logits_max_abs"] < 1e-5
    assert all(r["loss_abs_diff"] < 2e-5 and r["lr_torch"] == pytest.approx(r["lr_jax"]) for r in report["steps"])


def test_aligned_backends_agree_to_1e_10_in_fp64(tiny_shards):
    cfg = tiny_config(tiny_shards, max_steps=6)
    cfg = validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dtype="fp64")))
    report = run(cfg, dtype_tol="fp64")
    assert report["passed"], report["failures"][:3]
    assert report["max"]["loss_abs_diff"] < 1e-12


def test_layernorm_eps_perturbation_fails_at_step_0(tiny_shards, monkeypatch):
    import jax_impl.model
    monkeypatch.setattr(jax_impl.model, "LN_EPS", 1e-6)  # Flax's default
    report = run(validate(tiny_config(tiny_shards, max_steps=6)))
    assert not report["passed"]
    first = report["first_failure"]
    assert first["step"] == 0 and first["quantity"] == "logits (max abs)"
    assert max(first["detail"]["grads"].values()) > TOLERANCES["fp32"].grads  # points at the tensors


def test_erf_gelu_perturbation_is_caught(tiny_shards, monkeypatch):
    import jax_impl.model
    monkeypatch.setattr(jax_impl.model, "gelu_tanh", lambda x: jax.nn.gelu(x, approximate=False))  # torch's default
    report = run(validate(tiny_config(tiny_shards, max_steps=3)))
    assert not report["passed"]
    assert report["first_failure"]["step"] == 0
    gelu_grads = [q["quantity"] for q in report["failures"] if "mlp.c_fc" in q["quantity"]]
    assert gelu_grads, "the MLP gradients must be named"


def test_missing_weight_decay_mask_fails_on_the_loss(tiny_shards, monkeypatch):
    import jax_impl.optim
    monkeypatch.setattr(jax_impl.optim, "decay_mask", lambda params: jax.tree.map(lambda _: True, params))
    report = run(validate(tiny_config(tiny_shards, max_steps=8, warmup_steps=1)))
    assert not report["passed"]
    assert report["first_failure"]["step"] >= 1  # invisible at step 0: decay acts from the first update on
    assert any(f["quantity"] == "loss (abs)" for f in report["failures"])


def test_cli_writes_json_and_exits_1_on_failure(tiny_shards, tmp_path, monkeypatch, capsys):
    from common.config_files import dump_toml
    cfg = stream(tiny_config(tiny_shards, max_steps=3))
    path = tmp_path / "tiny.toml"
    path.write_text(dump_toml(cfg))
    monkeypatch.setattr(check, "load_backends", backends)
    assert check.main(["--config", str(path), "--steps", "3", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "loss torch" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and len(report["steps"]) == 3
    import jax_impl.model
    monkeypatch.setattr(jax_impl.model, "LN_EPS", 1e-6)
    assert check.main(["--config", str(path), "--steps", "3"]) == 1
    assert "FAIL at step 0: logits (max abs)" in capsys.readouterr().out
    assert check.main(["--config", "nope", "--steps", "3"]) == 2
