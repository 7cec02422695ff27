"""common/loop.py with a fake backend: step metrics are converted only at flush points."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from common.backend import DistInfo
from common.checkpoints import latest_checkpoint, read_meta, write_meta
from common.levers import Choice, Levers
from common.loop import MAX_PENDING_STEPS, NonFiniteError, train
from common.records import read_records
from conftest import tiny_config
from helpers import backend_of


class Counted:
    """A lazy 'device value': counts its float() conversions in the backend that made it."""

    def __init__(self, value: float, counts: dict[str, int], key: str):
        self.value, self.counts, self.key = value, counts, key

    def __float__(self) -> float:
        self.counts[self.key] += 1
        return self.value


class FakeBackend:
    """What common/loop.py calls, without a model: the state is the number of steps taken.

    Loss is 1 / (step + 1), NaN from optimizer step `nan_at` on (as poisoned weights would stay
    poisoned). `seen[k]` is how many losses had been converted when train_step k was called.
    """
    name = "fake"

    def __init__(self, nan_at: int | None = None, weights_bad_from: int | None = None):
        self.nan_at = nan_at
        self.weights_bad_from = weights_bad_from  # steps taken from which the weights are non-finite
        self.counts = {"loss": 0, "grad_norm": 0, "lr": 0}
        self.seen: list[int] = []
        self.saved: list[int] = []

    def add_arguments(self, parser):
        pass

    def apply_arguments(self, extra, cfg):
        return cfg

    def compile_label(self, cfg):
        return "fake"

    def setup(self, cfg):
        self.cfg = cfg
        return DistInfo()

    def teardown(self):
        pass

    def init_state(self, cfg, dist, weights=None, moments=None):
        return 0

    def train_step(self, state, x, y):
        assert x.shape == y.shape and x.ndim == 3
        self.seen.append(self.counts["loss"])
        loss = float("nan") if self.nan_at is not None and state >= self.nan_at else 1.0 / (state + 1)
        return state + 1, {"loss": Counted(loss, self.counts, "loss"),
                           "grad_norm": Counted(0.5, self.counts, "grad_norm"),
                           "lr": Counted(1e-3, self.counts, "lr")}

    def evaluate(self, state, batches):
        return sum(1 for _ in batches) and 2.0

    def save_checkpoint(self, state, out_dir, meta):
        assert state == meta.step
        folder = Path(out_dir) / "checkpoints" / f"step_{meta.step:08d}"
        folder.mkdir(parents=True)
        write_meta(folder, meta)
        self.saved.append(meta.step)
        return folder

    def params_finite(self, state):
        return self.weights_bad_from is None or state < self.weights_bad_from

    def load_checkpoint(self, path, cfg, dist):
        folder = latest_checkpoint(path) if (Path(path) / "checkpoints").exists() else Path(path)
        meta = read_meta(folder)
        return meta.step, meta

    def levers(self, cfg, dist):
        return Levers("fake", {"threads": Choice(1, "config")}, peak_flops=1e12, peak_source="fake")


def config(tiny_shards, out_dir, max_steps=12, **run):
    cfg = tiny_config(tiny_shards, out_dir, max_steps=max_steps, warmup_steps=1)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **run))


def quiet(*a, **k):
    pass


def test_losses_are_converted_only_at_flush_points(tiny_shards, tmp_path):
    backend = FakeBackend()
    result = train(backend, config(tiny_shards, tmp_path, log_interval=5), log=quiet)
    # Flushes after step 0 (its own window: compilation), 5 and 10 (log_interval) and 11 (the end).
    assert backend.seen == [0, 1, 1, 1, 1, 1, 6, 6, 6, 6, 6, 11]
    assert backend.counts == {"loss": 12, "grad_norm": 12, "lr": 12}
    on_disk = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in on_disk] == list(range(12)) == [r["step"] for r in result.records]
    assert [r["loss"] for r in on_disk] == [1.0 / (s + 1) for s in range(12)]
    assert [r["tokens"] for r in on_disk] == [64 * (s + 1) for s in range(12)]
    for r in on_disk:
        assert {"backend", "step", "loss", "lr", "grad_norm", "ms", "data_ms", "tokens_per_s", "mfu", "tokens",
                "elapsed_s"} <= set(r)
        assert r["data_ms"] >= 0 and r["ms"] > 0
    # ms inside a window is the window's wall time / its steps: equal within each window.
    assert len({r["ms"] for r in on_disk[1:6]}) == 1 and len({r["ms"] for r in on_disk[6:11]}) == 1
    elapsed = [r["elapsed_s"] for r in on_disk]
    assert elapsed == sorted(elapsed)


def test_nan_at_step_7_names_step_7_and_is_never_checkpointed(tiny_shards, tmp_path):
    backend = FakeBackend(nan_at=7)
    cfg = config(tiny_shards, tmp_path, log_interval=5, checkpoint_interval=3)
    with pytest.raises(NonFiniteError, match=r"^step 7: .*last good checkpoint: .*step_00000006"):
        train(backend, cfg, log=quiet)
    # Flushed after step 8 (checkpoint 9 due): steps 6, 7, 8 were pending; no checkpoint past the NaN.
    assert backend.saved == [3, 6]
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_00000003", "step_00000006"]
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == list(range(7))


def test_nan_in_a_long_window_names_the_first_non_finite_step(tiny_shards, tmp_path):
    backend = FakeBackend(nan_at=7)
    with pytest.raises(NonFiniteError, match=r"^step 7: .*last good checkpoint: none"):
        train(backend, config(tiny_shards, tmp_path, log_interval=0), log=quiet)
    assert backend.seen == [0] + [1] * 11  # no flush between step 0 and the end: all 11 converted there
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == list(range(7))


def test_non_finite_weights_after_a_finite_step_are_never_checkpointed(tiny_shards, tmp_path):
    # Step 4's loss and grad norm are finite, the update it applied is not: checkpoint 6 must not be written.
    backend = FakeBackend(weights_bad_from=5)
    cfg = config(tiny_shards, tmp_path, log_interval=1, checkpoint_interval=3)
    with pytest.raises(NonFiniteError, match=r"^step 5: the parameters after it are not finite.*checkpoint 6 not "
                                             r"written.*last good checkpoint: .*step_00000003\)$"):
        train(backend, cfg, log=quiet)
    assert backend.saved == [3]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == list(range(6))


def test_log_interval_zero_still_flushes_every_max_pending_steps(tiny_shards, tmp_path):
    backend = FakeBackend()
    steps = 2 * MAX_PENDING_STEPS + 5
    result = train(backend, config(tiny_shards, tmp_path, max_steps=steps, log_interval=0), log=quiet)
    n = MAX_PENDING_STEPS  # flushes after step 0, then whenever n steps are pending (steps n, 2n), and at the end
    assert backend.seen == [0] + [1] * n + [n + 1] * n + [2 * n + 1] * 4
    assert [r["step"] for r in result.records] == list(range(steps))


def test_eval_and_checkpoint_flush_this_step_and_history_is_complete(tiny_shards, tmp_path):
    backend = FakeBackend()
    cfg = config(tiny_shards, tmp_path, log_interval=5, eval_interval=4, checkpoint_interval=4)
    train(backend, cfg, log=quiet)
    # Flushes after steps 0, 3 (eval + checkpoint 4), 5, 7 (8), 10, 11 (12, the end).
    assert backend.seen == [0, 1, 1, 1, 4, 4, 6, 6, 8, 8, 8, 11]
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [3, 7, 11]
    meta = json.loads((tmp_path / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert [r["step"] for r in meta["history"]] == list(range(8)) and meta["history"][-1]["val_loss"] == 2.0


def test_resume_continues_the_records(tiny_shards, tmp_path):
    cfg = config(tiny_shards, tmp_path, log_interval=5, checkpoint_interval=6)
    full = train(FakeBackend(), with_out_dir(cfg, tmp_path / "a"), log=quiet).records
    train(FakeBackend(), with_out_dir(cfg, tmp_path / "b"), log=quiet)
    # Drop the last checkpoint and resume from step 6: records 6.. are rewritten, history carries on.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000012")
    backend = FakeBackend()
    resumed = train(backend, with_out_dir(cfg, tmp_path / "b"), resume="latest", log=quiet)
    assert backend.seen == [0, 1, 1, 1, 1, 5]  # steps 6..11: flushed after 6 (first), 10 and 11
    assert [r["step"] for r in resumed.records] == list(range(12))
    on_disk = read_records(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in on_disk] == list(range(12))
    assert [r["loss"] for r in on_disk] == [r["loss"] for r in full]


def test_resume_drops_a_torn_last_line_and_the_records_past_the_checkpoint(tiny_shards, tmp_path):
    cfg = config(tiny_shards, tmp_path, log_interval=5, checkpoint_interval=6)
    full = train(FakeBackend(), cfg, log=quiet).records
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000012")
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"backend": "fake", "step": 12, "lo')
    train(FakeBackend(), cfg, resume="latest", log=quiet)
    on_disk = read_records(metrics)
    assert [r["step"] for r in on_disk] == list(range(12))
    assert [r["loss"] for r in on_disk] == [r["loss"] for r in full]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_torn_line_is_dropped_only_at_the_end_and_only_on_resume(tmp_path):
    from common.records import MetricsLog, RecordsError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with pytest.raises(RecordsError, match=r"metrics\.jsonl:3: invalid JSON"):
        read_records(path)  # a reader of a finished run is told
    MetricsLog(path, resume_step=5)
    assert path.read_text() == '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n'
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(RecordsError, match=r"metrics\.jsonl:2: invalid JSON"):
        MetricsLog(path, resume_step=5)  # a broken line in the middle is no torn write: refused, file kept
    assert path.read_text().count("\n") == 3


def test_resume_with_a_changed_schedule_warns_naming_old_and_new_values(tiny_shards, tmp_path, capsys):
    cfg = config(tiny_shards, tmp_path, log_interval=5, checkpoint_interval=6)
    train(FakeBackend(), cfg, log=quiet)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000012")
    capsys.readouterr()
    train(FakeBackend(), cfg, resume="latest", log=quiet)
    assert capsys.readouterr().err == ""  # same schedule: nothing to say
    longer = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=20, max_lr=2e-2))
    train(FakeBackend(), longer, resume="latest", log=quiet)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: resuming ") and "optim.max_lr 0.01 → 0.02, optim.max_steps 12 → 20" in line


def test_a_second_run_into_a_held_folder_exits_2_naming_the_holder(tiny_shards, tmp_path, capsys):
    from common.loop import main
    from common.outdir import hold

    before = sorted(tmp_path.rglob("*"))
    with hold(tmp_path, "run.out_dir"):
        argv = ["--data.dir", str(tiny_shards), "--run.out_dir", str(tmp_path), "--model.vocab_size", "256",
                "--model.padded_vocab_size", "256", "--model.block_size", "16", "--optim.micro_batch_size", "4",
                "--optim.total_batch_size", "64", "--optim.warmup_steps", "1", "--optim.max_steps", "2"]
        assert main(FakeBackend(), argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"error: run.out_dir: {tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()} "
                    f"(lock file {tmp_path / '.lock'}); wait for that run to end or choose another run.out_dir")
    assert sorted(tmp_path.rglob("*")) == before + [tmp_path / ".lock"]
    assert main(FakeBackend(), argv) == 0  # released: the next run proceeds


def with_out_dir(cfg, out_dir):
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out_dir)))


@pytest.mark.parametrize("name, flag, label", [("torch", True, "compile True"), ("torch", False, "compile False"),
                                               ("jax", False, "jit"), ("jax", True, "jit")])
def test_backend_line_says_how_the_step_is_compiled(tiny_shards, tmp_path, name, flag, label):
    backend = FakeBackend()
    backend.name, backend.compile_label = name, backend_of(name).compile_label
    lines = []
    train(backend, config(tiny_shards, tmp_path, max_steps=1, compile=flag), log=lambda *a, **k: lines.append(a[0]))
    [line] = [s for s in lines if s.startswith("backend: ")]
    assert f"dtype fp32, {label}; MFU" in line


def test_launch_rank_reads_rank_first_and_names_a_malformed_variable(monkeypatch):
    from common.loop import launch_rank
    from common.usage import UsageError

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert launch_rank() == 0
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert launch_rank() == 3
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "not-a-number")  # RANK decides: the other is not read
    assert launch_rank() == 1
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UsageError, match="RANK: expected an integer, got 'x'"):
        launch_rank()
