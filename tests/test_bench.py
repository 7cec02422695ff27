"""parity.bench: the pairwise bench (bench.pairwise), the suite (parity.bench_suite: rows, table, flags) and the CLI."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bench import pairwise
from bench.workers import MAKEFILE_TUNABLES
from conftest import tiny_config
from common.config_files import load_toml
from parity import bench
from parity import bench_suite as suite


def bench_report(backends: dict, shape: str, ratio: float | None, rounds: int = 4,
                 pin: str | None = None, flops_per_token: int = 1_000_000) -> dict:
    """The parts of a bench() report the suite reads, with round figures."""
    cfg = pairwise.bench_config("default", shape, [], "fp32", False, 10)
    return {"config": cfg.to_dict(), "rounds": rounds, "window_steps": 3, "warmup_steps": 2, "pinned_cpu": pin,
            "flops_per_token": flops_per_token, "backends": backends,
            **({} if ratio is None else {"jax_over_torch": ratio})}


def figures(tok_s: float, first: float, rss: float, loader_ms: float, share: float) -> dict:
    return {"tokens_per_s": tok_s, "ms_per_step": 1024e3 / tok_s, "first_step_s": first, "peak_rss_mb": rss,
            "loader_ms_per_step": loader_ms, "loader_share": share}


def test_suite_row_gives_mfu_from_the_probe_peak_and_same_round_ratios():
    main = bench_report({"torch": figures(3000, 0.8, 700, 1.5, 0.01), "jax": figures(1500, 4.0, 1400, 2.0, 0.005)},
                        "tiny", ratio=0.5)
    pinned = bench_report({"torch": figures(2000, 1, 1, 1, 0), "jax": figures(800, 1, 1, 1, 0)},
                          "tiny", ratio=0.4, rounds=2, pin="0")
    # 1e6 FLOPs/token × 3,000 tok/s = 3 GFLOP/s: 30% of a 10 GFLOP/s fp32 peak; the bf16 peak is not used.
    row = suite.suite_row("tiny", "fp32", main, pinned, compile_first_s=30.8, peaks={"fp32": 10.0, "bf16": 100.0},
                          pinned_peaks={"fp32": 5.0})
    assert row["backends"]["torch"]["mfu"] == pytest.approx(0.30)
    assert row["single_cpu"]["backends"]["torch"]["mfu"] == pytest.approx(0.40)
    assert row["torch_compile_s"] == pytest.approx(30.0)
    assert suite.format_suite_row(row) == (
        "| tiny L4 H4 C128 T128 B8 | fp32 | 3,000 (30.0%) | 1,500 (15.0%) | 0.50 | 0.80 / 4.00 | 30.0 | "
        "700 / 1,400 | 1.5 (1.0%) / 2.0 (0.5%) | 2,000 / 800 | 0.40 |")
    bf16 = suite.suite_row("tiny", "bf16", main, None, None, peaks={"fp32": 10.0, "bf16": 100.0}, pinned_peaks={})
    assert suite.format_suite_row(bf16).startswith("| tiny L4 H4 C128 T128 B8 | bf16 | 3,000 (3.0%) | 1,500 (1.5%) |")


def test_missing_backend_and_passes_are_dashes_and_the_table_is_rectangular():
    main = bench_report({"torch": figures(293.4, 7.3, 3862, 0.4, 0.0001)}, "gpt2-124m-b1", ratio=None,
                        rounds=3)
    row = suite.suite_row("gpt2-124m", "fp32", main, None, None, peaks={}, pinned_peaks={})
    assert suite.format_suite_row(row) == (
        "| gpt2-124m L12 H12 C768 T1024 B1 | fp32 | 293 | — | — | 7.30 / — | — | 3,862 / — | 0.4 (<0.1%) / — | "
        "— | — |")
    text = suite.format_suite(["machine: m", "date: d"], [row, row], ["a note"])
    lines = text.splitlines()
    assert lines[:3] == ["- machine: m", "- date: d", ""] and lines[-1] == "a note"
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == len(suite.COLUMNS) + 1 for line in table)


@pytest.mark.parametrize("row, dims", [
    ("tiny", (4, 4, 128, 128, 8)),
    ("small", (6, 6, 384, 256, 4)),
    ("gpt2-124m", (12, 12, 768, 1024, 1)),
])
def test_suite_rows_parse_and_validate_to_their_shapes(row, dims):
    cfg = pairwise.bench_config("default", suite.SUITE_ROWS[row].shape, [], "bf16", False, 50)
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, cfg.optim.micro_batch_size) == dims
    assert (m.vocab_size, m.padded_vocab_size, cfg.optim.total_batch_size) == (50257, 50304, 1024)
    assert cfg.run.dtype == "bf16" and cfg.run.compile is False and cfg.run.devices == 1


def test_suite_plan_applies_overrides_over_the_row_shape_and_per_row_timing():
    opts = suite.SuiteOptions(config="default", overrides=("--model.n_layer", "1"), rows=("tiny", "gpt2-124m"),
                              dtypes=("fp32", "bf16"), backends=pairwise.BACKENDS, rounds=None, steps=None, warmup=None,
                              pin=None, pin_rounds=None, compile_time=False, profile=False)
    plan = suite.suite_plan(opts)
    assert [(r, d) for r, d, _, _ in plan] == [("tiny", "fp32"), ("tiny", "bf16"), ("gpt2-124m", "fp32"),
                                               ("gpt2-124m", "bf16")]
    assert all(cfg.model.n_layer == 1 for _, _, cfg, _ in plan)
    assert plan[2][2].model.n_embd == 768 and plan[3][2].run.dtype == "bf16"
    assert [(t.rounds, t.steps, t.warmup) for _, _, _, t in plan[1:3]] == [(4, 3, 2), (3, 1, 1)]
    flagged = suite.suite_plan(dataclasses.replace(opts, rounds=1, steps=1, warmup=0))
    assert {(t.rounds, t.steps, t.warmup) for _, _, _, t in flagged} == {(1, 1, 0)}


@pytest.mark.parametrize("argv, message", [
    (["--suite", "--rows", "tiny,huge"], "error: --rows: expected a subset of tiny,small,gpt2-124m, got 'tiny,huge'"),
    (["--suite", "--dtypes", "fp16"], "error: --dtypes: expected a subset of fp32,bf16, got 'fp16'"),
    (["--rows", "tiny"], "error: --rows needs --suite"),
    (["--suite", "--shape", "tiny"], "error: --shape does not apply to --suite"),
    (["--suite", "--dtype", "bf16"], "error: --dtype does not apply to --suite (use --dtypes)"),
    (["--suite", "--rounds", "0"], "error: --rounds must be ≥ 1"),
    (["--suite", "--backends", "jax", "--compile-time"], "error: --compile-time needs the torch backend"),
    (["--suite", "--rows", "tiny", "--model.n_head", "3"], "error: model.n_embd"),
    (["--suite", "--vs-plain"], "error: --vs-plain does not apply to --suite"),
    (["--vs-plain", "--shape", "tiny", "--dtype", "bf16"], "error: --vs-plain: the plain baselines run fp32 only"),
    (["--vs-plain", "--model.dropout", "0.1"], "error: --vs-plain: the plain baselines have no dropout"),
    (["--backends", "torch,tf"], "error: --backends: expected a subset of torch,jax, got 'torch,tf'"),
])
def test_bad_bench_flags_are_one_line_and_exit_2(argv, message, capsys):
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(message), captured.err
    assert captured.out == ""


def test_worker_times_the_loader_apart(tiny_shards):
    cfg = tiny_config(tiny_shards, max_steps=20)
    report = pairwise.bench(cfg, rounds=2, window=1, warmup=0, backends=("torch",),
                            extra_env={"GLIBC_TUNABLES": MAKEFILE_TUNABLES})
    r = report["backends"]["torch"]
    assert len(r["loader_windows"]) == 2 and 0 < r["loader_ms_per_step"] and 0 < r["loader_share"] < 1
    assert report["flops_per_token"] > 0 and "jax_over_torch" not in report


def test_jax_first_step_shows_the_warm_cache_figure_in_brackets():
    jax = {**figures(1500, 4.0, 1400, 2.0, 0.005), "warm_first_step_s": 0.61}
    main = bench_report({"torch": figures(3000, 0.8, 700, 1.5, 0.01), "jax": jax}, "tiny", ratio=0.5)
    row = suite.suite_row("tiny", "fp32", main, None, None, peaks={"fp32": 10.0}, pinned_peaks={})
    assert "| 0.80 / 4.00 (0.61) |" in suite.format_suite_row(row)


def test_torch_compile_is_timed_with_an_empty_inductor_cache(monkeypatch, tiny_shards, tmp_path):
    """A warm inductor cache would make the figure a cache hit, not the compile a new user waits for."""
    seen = {}

    class FakeWorker:
        def __init__(self, name, cfg_path, weights_path, pin, extra_env=None):
            seen.update(name=name, env=extra_env, compile=load_toml(cfg_path).run.compile)
            cache = Path(extra_env["TORCHINDUCTOR_CACHE_DIR"])
            seen["cache_was_empty"] = not cache.exists() or not any(cache.iterdir())

        def read(self):
            return {"first_step_s": 42.5}

        def close(self):
            return {}

        def kill(self):
            seen["killed"] = True

    monkeypatch.setattr(pairwise, "start_worker", FakeWorker)
    first = suite.torch_compile_first_step(tiny_config(tiny_shards, tmp_path), {"GLIBC_TUNABLES": "x"})
    assert first == 42.5
    assert seen["name"] == "torch" and seen["compile"] is True and seen["cache_was_empty"] and seen["killed"]
    assert seen["env"]["GLIBC_TUNABLES"] == "x"
