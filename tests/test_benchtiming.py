"""common.benchtiming: the shapes vocabulary every bench takes, and the timing loop and figures both backends'
bench.py report."""
from __future__ import annotations

import pytest

from conftest import tiny_config
from common import benchtiming
from common.config import ConfigError
from common.plan import flops_per_token


def test_time_steps_runs_warmup_then_timed_windows_between_syncs():
    calls = []
    timing = benchtiming.time_steps(lambda: calls.append("step"), steps=3, windows=2, warmup=2,
                                    sync=lambda: calls.append("sync"))
    # the first step, one more warm-up step, then each window's steps between two syncs
    assert calls == ["step", "step"] + ["sync", "step", "step", "step", "sync"] * 2
    assert len(timing.per_step_s) == 2 and timing.first_step_s >= 0 and timing.minflt_per_step >= 0


def test_figures_take_the_median_window_and_one_device_peak_times_devices(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    timing = benchtiming.Timing(first_step_s=2.5, per_step_s=[0.5, 2.0, 1.0], minflt_per_step=7.0)
    f = benchtiming.figures(cfg, 2, timing, peak=1e12, peak_source="test", devices=4)
    tokens = cfg.optim.total_batch_size
    assert f["ms_per_step"] == 1000.0 and f["ms_windows"] == [500.0, 2000.0, 1000.0]
    assert f["tokens_per_step"] == tokens and f["tokens_per_s"] == tokens / 1.0 and f["accum"] == 2
    assert f["mfu"] == pytest.approx(flops_per_token(cfg.model) * tokens / 4e12) and f["peak_tflops"] == 1.0
    assert f["first_step_s"] == 2.5 and f["peak_source"] == "test"
    r = {**f, "mfu": 0.123}
    assert benchtiming.shape_text(r) == f"L{cfg.model.n_layer} C{cfg.model.n_embd} T{cfg.model.block_size} " \
                                        f"B{cfg.optim.micro_batch_size}×2"
    assert benchtiming.speed_text(r) == f"1000.0 ms/step | {tokens:,} tok/s | MFU 12.3% of 1000 GFLOP/s"


def test_gpt2_124m_shape_is_one_full_block_per_replica():
    cfg = benchtiming.shaped_config("default", "gpt2-124m", replicas=2)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (12, 768, 1024)
    assert (cfg.optim.micro_batch_size, cfg.optim.total_batch_size) == (1, 2048)
    assert benchtiming.shaped_config("default", "default") == benchtiming.shaped_config("default", "default", 4)


def test_bench_results_print_as_lines_or_json_and_bad_input_is_one_line(capsys):
    assert benchtiming.print_results(lambda: [{"a": 1}, {"a": 2}], lambda r: f"a={r['a']}", as_json=False) == 0
    assert capsys.readouterr().out == "a=1\na=2\n"
    assert benchtiming.print_results(lambda: [{"a": 1}], str, as_json=True) == 0
    assert capsys.readouterr().out == '{"a": 1}\n'

    def bad():
        raise ConfigError("--steps must be ≥ 1")
    assert benchtiming.print_results(bad, str, as_json=False) == 2
    assert capsys.readouterr().err == "error: --steps must be ≥ 1\n"


@pytest.mark.parametrize("shape, dims", [
    ("tiny", (4, 4, 128, 128, 8)),
    ("small", (6, 6, 384, 256, 4)),
    ("gpt2-124m-b1", (12, 12, 768, 1024, 1)),
])
def test_shapes_set_the_model_and_one_micro_step_per_replica_over_the_config(shape, dims):
    cfg = benchtiming.shaped_config("default", shape, replicas=3, overrides=["--model.n_head", "2"])
    m, o = cfg.model, cfg.optim
    assert (m.n_layer, m.n_embd, m.block_size, o.micro_batch_size) == dims[:1] + dims[2:]
    assert m.n_head == 2  # the user's override wins over the shape
    assert o.total_batch_size == dims[4] * dims[3] * 3
    assert (m.vocab_size, m.padded_vocab_size, cfg.run.seed) == (50257, 50304, 1337)  # the rest is the config's


def test_default_shape_is_the_config_unchanged_and_unknown_shapes_are_named():
    assert benchtiming.apply_shape(tiny_config("d"), "default") == tiny_config("d")
    with pytest.raises(ConfigError, match="--shape: expected one of default, tiny, small, gpt2-124m, gpt2-124m-b1, "
                                          "got 'huge'"):
        benchtiming.apply_shape(tiny_config("d"), "huge")
