"""parity.sweep: micro-batch doubling in fresh subprocesses, with clean stops (max batch, memory guard)."""
import re

import pytest

from common.config_files import dump_toml
from conftest import tiny_config
from parity import sweep

ROW = re.compile(r"^\s+(\d+) \|\s+([\d,]+) \|\s+([\d.]+) \|\s+([\d,]+) \| ([\d.]+) GiB")


@pytest.fixture
def tiny_toml(tiny_shards, tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(dump_toml(tiny_config(tiny_shards)))
    return path


@pytest.mark.parametrize("backend, max_batch", [("torch", 4), ("jax", 2)])  # jax: seconds of start-up per size
def test_sweep_prints_a_row_per_batch_size(backend, max_batch, tiny_toml, capsys):
    code = sweep.main(["--backend", backend, "--config", str(tiny_toml), "--max-batch", str(max_batch),
                       "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [ROW.match(line) for line in out.splitlines()]
    rows = [m.groups() for m in rows if m]
    sizes = [1, 2, 4][:len(rows)]
    assert [int(r[0]) for r in rows] == sizes and len(rows) == max_batch.bit_length()
    assert [int(r[1].replace(",", "")) for r in rows] == [16 * b for b in sizes]  # block_size 16
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)
    assert f"stopped: --max-batch {max_batch} reached" in out


def test_sweep_stops_cleanly_at_the_memory_guard(tiny_toml, capsys):
    # 50 MiB: the child passes it while importing torch and is stopped by its own watchdog.
    code = sweep.main(["--backend", "torch", "--config", str(tiny_toml), "--max-rss-gb", "0.05"])
    out = capsys.readouterr().out
    assert code == 0
    assert "stopped: micro-batch 1 crossed the 0.05 GiB memory guard" in out
    assert not any(ROW.match(line) for line in out.splitlines())


def test_memory_prediction_stops_before_a_size_that_would_not_fit():
    rows = [{"micro_batch": 4, "peak_bytes": 3 * 2**30}, {"micro_batch": 8, "peak_bytes": 5 * 2**30}]
    assert sweep.predict_peak(rows, 16) == 9 * 2**30  # 1 + 0.5 GiB per sequence
    assert sweep.predict_peak(rows[:1], 8) is None


@pytest.mark.parametrize("argv, message", [
    (["--backend", "tf"], "--backend"),
    (["--backend", "torch", "--max-batch", "0"], "--max-batch must be ≥ 1"),
    (["--backend", "jax", "--dtype", "fp16"], "--dtype fp16 is torch-only"),
    (["--backend", "torch", "--model.n_head", "3"], "model.n_embd"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_oom_errors_are_recognised():
    assert sweep.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert sweep.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert sweep.is_oom(MemoryError())
    assert not sweep.is_oom(ValueError("shapes do not match"))
