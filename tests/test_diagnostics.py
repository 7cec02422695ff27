"""Training diagnostics in the shared loop: grad-norm groups and grad/weight ratios, overfit check, log sinks."""
import dataclasses
import sys

import pytest

from common import loggers
from common.config import ConfigError
from common.loop import train
from common.records import read_records
from conftest import tiny_config, with_run
from helpers import backend_of, quiet

GROUPS = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} | {
    f"{p}.{k}" for p in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    for k in ("weight", "bias")}
MATRICES = {g for g in GROUPS if g.endswith(".weight") and not g.startswith(("ln_1", "ln_2", "ln_f"))}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_diagnostics_leave_training_bit_identical_and_fill_records(name, tiny_shards, tmp_path):
    base = tiny_config(tiny_shards, tmp_path / "plain", max_steps=3)
    if name == "torch":  # a diagnostic forward that consumed torch's global RNG would change the step's dropout
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, dropout=0.1))
    plain = train(backend_of(name), base, log=quiet).records
    diag_cfg = with_run(base, out_dir=str(tmp_path / "diag"), diagnostics_interval=2)
    diag = train(backend_of(name), diag_cfg, log=quiet).records
    assert [r["loss"] for r in diag] == [r["loss"] for r in plain]
    assert [r["grad_norm"] for r in diag] == [r["grad_norm"] for r in plain]
    assert [("group_grad_norms" in r, "grad_to_weight" in r) for r in diag] == [(True, True), (False, False),
                                                                                (True, True)]
    for rec in diag[::2]:
        norms, ratios = rec["group_grad_norms"], rec["grad_to_weight"]
        assert set(norms) == GROUPS and set(ratios) == MATRICES
        # The groups partition the parameters, so their norms add up to the step's own pre-clip norm.
        assert sum(v * v for v in norms.values()) ** 0.5 == pytest.approx(rec["grad_norm"], rel=1e-5)
        assert all(0 < v < 10 for v in ratios.values())
    on_disk = read_records(tmp_path / "diag" / "metrics.jsonl")
    assert on_disk[0]["grad_to_weight"] == diag[0]["grad_to_weight"]


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_overfit_single_batch_drives_the_loss_below_0_1(name, tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, max_steps=50, warmup_steps=5, max_lr=1e-2, min_lr=1e-2,
                      weight_decay=0.0)
    records = train(backend_of(name), with_run(cfg, overfit_single_batch=True, log_interval=0), log=quiet).records
    losses = [r["loss"] for r in records]
    assert losses[0] > 5.0  # ln(256) ≈ 5.5 at init
    assert losses[-1] < 0.1, losses[::5]


def test_scalars_flatten_diagnostics_and_drop_non_numbers():
    rec = {"backend": "torch", "step": 4, "loss": 2.5, "val_loss": None, "mfu": float("nan"),
           "grad_to_weight": {"mlp.c_fc.weight": 1e-3}, "tokens": 640}
    assert loggers.scalars(rec) == {"loss": 2.5, "grad_to_weight/mlp.c_fc.weight": 1e-3, "tokens": 640.0}


@pytest.mark.parametrize("flag, module, message", [
    ("tensorboard", "tensorboard", "run.tensorboard: the tensorboard package is not installed"),
    ("wandb", "wandb", "run.wandb: the wandb package is not installed"),
])
def test_a_sink_without_its_package_is_a_one_line_config_error(flag, module, message, tiny_shards, tmp_path,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError, match=message):
        loggers.open_sinks(with_run(tiny_config(tiny_shards, tmp_path), **{flag: True}), tmp_path, "torch")


def test_tensorboard_sink_writes_every_record(tiny_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = with_run(tiny_config(tiny_shards, tmp_path, max_steps=3), tensorboard=True, diagnostics_interval=1)
    records = train(backend_of("torch"), cfg, log=quiet).records
    events = EventAccumulator(str(tmp_path / loggers.TENSORBOARD_SUBDIR))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert len(events.Scalars("grad_to_weight/mlp.c_fc.weight")) == 3


def test_wandb_sink_offline(tiny_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = with_run(tiny_config(tiny_shards, tmp_path, max_steps=2), wandb=True)
    train(backend_of("jax"), cfg, log=quiet)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
