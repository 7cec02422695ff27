"""parity.bench --suite (rows, table, flags), parity.probe (GEMM peaks), parity.profile (xplane parsing) and
common.benchtiming (the timing loop and figures both backends' bench.py report)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_config
from common import benchtiming
from common.config import ConfigError
from common.plan import flops_per_token
from parity import bench, probe, profile

ROOT = Path(__file__).resolve().parent.parent


def bench_report(backends: dict, config_args: list[str], ratio: float | None, rounds: int = 4,
                 pin: str | None = None, flops_per_token: int = 1_000_000) -> dict:
    """The parts of a bench() report the suite reads, with round figures."""
    cfg = bench.bench_config("default", config_args, [], "fp32", False, 10)
    return {"config": cfg.to_dict(), "rounds": rounds, "window_steps": 3, "warmup_steps": 2, "pinned_cpu": pin,
            "flops_per_token": flops_per_token, "backends": backends,
            **({} if ratio is None else {"jax_over_torch": ratio})}


def figures(tok_s: float, first: float, rss: float, loader_ms: float, share: float) -> dict:
    return {"tokens_per_s": tok_s, "ms_per_step": 1024e3 / tok_s, "first_step_s": first, "peak_rss_mb": rss,
            "loader_ms_per_step": loader_ms, "loader_share": share}


def test_suite_row_gives_mfu_from_the_probe_peak_and_same_round_ratios():
    main = bench_report({"torch": figures(3000, 0.8, 700, 1.5, 0.01), "jax": figures(1500, 4.0, 1400, 2.0, 0.005)},
                        bench.SHAPES["tiny"], ratio=0.5)
    pinned = bench_report({"torch": figures(2000, 1, 1, 1, 0), "jax": figures(800, 1, 1, 1, 0)},
                          bench.SHAPES["tiny"], ratio=0.4, rounds=2, pin="0")
    # 1e6 FLOPs/token × 3,000 tok/s = 3 GFLOP/s: 30% of a 10 GFLOP/s fp32 peak; the bf16 peak is not used.
    row = bench.suite_row("tiny", "fp32", main, pinned, compile_first_s=30.8, peaks={"fp32": 10.0, "bf16": 100.0},
                          pinned_peaks={"fp32": 5.0})
    assert row["backends"]["torch"]["mfu"] == pytest.approx(0.30)
    assert row["single_cpu"]["backends"]["torch"]["mfu"] == pytest.approx(0.40)
    assert row["torch_compile_s"] == pytest.approx(30.0)
    assert bench.format_suite_row(row) == (
        "| tiny L4 H4 C128 T128 B8 | fp32 | 3,000 (30.0%) | 1,500 (15.0%) | 0.50 | 0.80 / 4.00 | 30.0 | "
        "700 / 1,400 | 1.5 (1.0%) / 2.0 (0.5%) | 2,000 / 800 | 0.40 |")
    bf16 = bench.suite_row("tiny", "bf16", main, None, None, peaks={"fp32": 10.0, "bf16": 100.0}, pinned_peaks={})
    assert bench.format_suite_row(bf16).startswith("| tiny L4 H4 C128 T128 B8 | bf16 | 3,000 (3.0%) | 1,500 (1.5%) |")


def test_missing_backend_and_passes_are_dashes_and_the_table_is_rectangular():
    main = bench_report({"torch": figures(293.4, 7.3, 3862, 0.4, 0.0001)}, bench.SHAPES["gpt2-124m-b1"], ratio=None,
                        rounds=3)
    row = bench.suite_row("gpt2-124m", "fp32", main, None, None, peaks={}, pinned_peaks={})
    assert bench.format_suite_row(row) == (
        "| gpt2-124m L12 H12 C768 T1024 B1 | fp32 | 293 | — | — | 7.30 / — | — | 3,862 / — | 0.4 (<0.1%) / — | "
        "— | — |")
    text = bench.format_suite(["machine: m", "date: d"], [row, row], ["a note"])
    lines = text.splitlines()
    assert lines[:3] == ["- machine: m", "- date: d", ""] and lines[-1] == "a note"
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == len(bench.COLUMNS) + 1 for line in table)


@pytest.mark.parametrize("row, dims", [
    ("tiny", (4, 4, 128, 128, 8)),
    ("small", (6, 6, 384, 256, 4)),
    ("gpt2-124m", (12, 12, 768, 1024, 1)),
])
def test_suite_rows_parse_and_validate_to_their_shapes(row, dims):
    cfg = bench.bench_config("default", bench.SHAPES[bench.SUITE_ROWS[row].shape], [], "bf16", False, 50)
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, cfg.optim.micro_batch_size) == dims
    assert (m.vocab_size, m.padded_vocab_size, cfg.optim.total_batch_size) == (50257, 50304, 1024)
    assert cfg.run.dtype == "bf16" and cfg.run.compile is False and cfg.run.devices == 1


def test_suite_plan_applies_overrides_over_the_row_shape_and_per_row_timing():
    opts = bench.SuiteOptions(config="default", overrides=("--model.n_layer", "1"), rows=("tiny", "gpt2-124m"),
                              dtypes=("fp32", "bf16"), backends=bench.BACKENDS, rounds=None, steps=None, warmup=None,
                              pin=None, pin_rounds=None, compile_time=False, profile=False)
    plan = bench.suite_plan(opts)
    assert [(r, d) for r, d, _, _ in plan] == [("tiny", "fp32"), ("tiny", "bf16"), ("gpt2-124m", "fp32"),
                                               ("gpt2-124m", "bf16")]
    assert all(cfg.model.n_layer == 1 for _, _, cfg, _ in plan)
    assert plan[2][2].model.n_embd == 768 and plan[3][2].run.dtype == "bf16"
    assert [(t.rounds, t.steps, t.warmup) for _, _, _, t in plan[1:3]] == [(4, 3, 2), (3, 1, 1)]
    flagged = bench.suite_plan(dataclasses.replace(opts, rounds=1, steps=1, warmup=0))
    assert {(t.rounds, t.steps, t.warmup) for _, _, _, t in flagged} == {(1, 1, 0)}


def test_workers_get_the_makefiles_allocator_settings_unless_the_parent_has_its_own():
    makefile = (ROOT / "Makefile").read_text()
    assert f"GLIBC_TUNABLES ?= {bench.MAKEFILE_TUNABLES}\n" in makefile
    extra, note = bench.allocator_env({})
    assert extra == {"GLIBC_TUNABLES": bench.MAKEFILE_TUNABLES} and "not set in the environment" in note
    extra, note = bench.allocator_env({"GLIBC_TUNABLES": bench.MAKEFILE_TUNABLES})
    assert extra == {} and "(the Makefile's value, in the environment of every worker)" in note
    extra, note = bench.allocator_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert extra == {} and "glibc.malloc.hugetlb=0 (from the environment, not the Makefile's value" in note


@pytest.mark.parametrize("argv, message", [
    (["--suite", "--rows", "tiny,huge"], "error: --rows: expected a subset of tiny,small,gpt2-124m, got 'tiny,huge'"),
    (["--suite", "--dtypes", "fp16"], "error: --dtypes: expected a subset of fp32,bf16, got 'fp16'"),
    (["--rows", "tiny"], "error: --rows needs --suite"),
    (["--suite", "--shape", "tiny"], "error: --shape does not apply to --suite"),
    (["--suite", "--dtype", "bf16"], "error: --dtype does not apply to --suite (use --dtypes)"),
    (["--suite", "--rounds", "0"], "error: --rounds must be ≥ 1"),
    (["--suite", "--backends", "jax", "--compile-time"], "error: --compile-time needs the torch backend"),
    (["--suite", "--rows", "tiny", "--model.n_head", "3"], "error: model.n_embd"),
])
def test_bad_suite_flags_are_one_line_and_exit_2(argv, message, capsys):
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(message), captured.err
    assert captured.out == ""


def test_probe_measures_each_framework_in_its_own_process():
    report = probe.measure_peaks(seconds_budget=0.2, sizes=(64,))
    libraries = {(r["framework"], r["library"]) for r in report["results"]}
    assert {("torch", "aten"), ("jax", "xla")} <= libraries
    assert {r["dtype"] for r in report["results"]} == {"fp32", "bf16"} and {r["n"] for r in report["results"]} == {64}
    assert all(r["gflops"] > 0 and r["ms"] > 0 and r["calls"] >= r["repeats"] >= probe.MIN_REPEATS
               for r in report["results"])
    for dtype in ("fp32", "bf16"):
        best = max((r for r in report["results"] if r["dtype"] == dtype), key=lambda r: r["gflops"])
        assert report["peak_gflops"][dtype] == best["gflops"]
        assert report["peak_source"][dtype] == f"{best['framework']} {best['library']} N=64"
    assert set(report["threads"]) == {"torch", "jax"} and all(t >= 1 for t in report["threads"].values())
    text = probe.format_probe(report)
    assert "| torch | aten | fp32 | 64 |" in text and text.splitlines()[-1].startswith("peak: fp32 ")


def test_probe_gemm_timer_reports_the_median_rate():
    calls = []
    result = probe.time_gemm(lambda: calls.append(1), n=10, budget_s=0.01, repeats=3)
    assert result["repeats"] == 3 and result["calls"] == len(calls) - 2  # two warm-up calls are not timed
    assert result["gflops"] == pytest.approx(2e-6 / (result["ms"] / 1e3))


def test_probe_keeps_slow_gemms_to_the_fewest_windows():
    result = probe.time_gemm(lambda: time.sleep(0.01), n=10, budget_s=0.001)
    assert (result["repeats"], result["calls"]) == (probe.MIN_REPEATS, probe.MIN_REPEATS)
    assert result["ms"] >= 10


@pytest.mark.parametrize("argv, message", [
    (["--frameworks", "tf"], "error: --frameworks: expected a subset of torch,jax, got 'tf'"),
    (["--sizes", "64,x"], "error: --sizes: expected positive integers, got '64,x'"),
    (["--budget", "0"], "error: --budget must be > 0"),
])
def test_bad_probe_flags_are_one_line_and_exit_2(argv, message, capsys):
    assert probe.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_worker_times_the_loader_apart(tiny_shards):
    cfg = tiny_config(tiny_shards, max_steps=20)
    report = bench.bench(cfg, rounds=2, window=1, warmup=0, backends=("torch",),
                         extra_env={"GLIBC_TUNABLES": bench.MAKEFILE_TUNABLES})
    r = report["backends"]["torch"]
    assert len(r["loader_windows"]) == 2 and 0 < r["loader_ms_per_step"] and 0 < r["loader_share"] < 1
    assert report["flops_per_token"] > 0 and "jax_over_torch" not in report


def event(start: int, duration: int, op: str | None, module: str = "jit__train_step") -> SimpleNamespace:
    stats = [("hlo_op", op), ("hlo_module", module)] if op else [("_src", "threadpool_listener.cc")]
    return SimpleNamespace(start_ns=start, duration_ns=duration, name=op or "ThreadpoolListener::Record", stats=stats)


def test_xplane_events_count_by_self_time():
    # while.1 [0, 100) holds fusion.1 [10, 40) and dot.2 [50, 90), which holds copy.3 [60, 70); a marker and
    # an event after the loop.
    events = [event(50, 40, "dot.2"), event(0, 100, "while.1"), event(10, 30, "fusion.1"), event(60, 10, "copy.3"),
              event(20, 0, None), event(120, 5, "fusion.1")]
    got = sorted(profile.xplane_self_times(events))
    assert got == sorted([("jit__train_step", "while.1", 30), ("jit__train_step", "fusion.1", 30),
                          ("jit__train_step", "dot.2", 30), ("jit__train_step", "copy.3", 10),
                          ("jit__train_step", "fusion.1", 5)])


HLO = """HloModule jit__train_step

%fused_computation.2 (param_0.4: f32[128,128], param_1.4: f32[50257,128]) -> f32[128,50257] {
  %param_0.4 = f32[128,128]{1,0} parameter(0)
  %param_1.4 = f32[50257,128]{1,0} parameter(1)
  %dot.1 = f32[128,50257]{1,0} dot(%param_0.4, %param_1.4), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %reduce.2 = f32[128]{0} reduce(%dot.1, %c), dimensions={1}, to_apply=%region_14.25
}

%wrapped_broadcast_computation (param_0.9: f32[]) -> f32[50257,128] {
  %param_0.9 = f32[] parameter(0)
  ROOT %broadcast.3 = f32[50257,128]{1,0} broadcast(%param_0.9), dimensions={}, metadata={op_name="jit(_train_step)/while/body/closed_call/jvp(GPT.loss)/broadcast_in_dim"}
}

ENTRY %main.3 (x.1: f32[128,128], w: f32[50257,128]) -> (f32[128], s32[]) {
  %ynn_fusion.2 = f32[128,50257]{1,0} fusion(%x.1, %w), kind=kCustom, calls=%fused_computation.2, metadata={op_name="jit(_train_step)/while/body/closed_call/jvp(GPT.loss)/while/body/closed_call/jit(log_softmax)/reduce_max" stack_frame_id=305}
  %while.25 = (s32[], f32[50257,128]{1,0}) while(%tuple.32), condition=%c, body=%b, metadata={op_name="jit(_train_step)/while"}
  %wrapped_broadcast = f32[50257,128]{1,0} fusion(%c), kind=kLoop, calls=%wrapped_broadcast_computation
  ROOT %copy.7 = f32[128,128]{1,0} copy(%x.1), metadata={op_name="jit(_train_step)/while/body/closed_call/transpose(jvp(GPT.loss))/GPT.features/h/0/ln_2/mul"}
}
"""


def test_hlo_instructions_are_described_for_the_jax_table():
    hlo = profile.parse_hlo(HLO)
    assert profile.describe("ynn_fusion.2", hlo) == (
        "f32[128,50257] fusion[dot,reduce] · GPT.loss/log_softmax/reduce_max")
    assert profile.describe("copy.7", hlo) == "f32[128,128] copy · bwd h/0/ln_2/mul"
    # A fusion without metadata of its own: the contents are its only op, the path is its root's.
    assert profile.describe("wrapped_broadcast", hlo) == (
        "f32[50257,128] fusion[broadcast] · GPT.loss/broadcast_in_dim")
    assert hlo.instructions["while.25"]["type"] == "tuple" and hlo.instructions["while.25"]["opcode"] == "while"
    assert [profile.op_kind(op, hlo) for op in ("ynn_fusion.2", "while.25", "copy.7", "wrapped_broadcast")] == [
        "dot", "control flow", "copy/layout", "elementwise"]
    assert profile.describe("missing.1", hlo) == "" and profile.op_kind("missing.1", hlo) == "other"


def test_profile_table_lists_the_top_ops_against_the_step_time():
    result = {"backend": "jax", "source": "src", "steps": 2, "warmup": 2, "step_ms": 200.0,
              "ops": [{"name": "ynn_fusion.2", "ms_per_step": 50.0, "calls_per_step": 8, "detail": "f32[1] dot"},
                      {"name": "copy.7", "ms_per_step": 10.0, "calls_per_step": 1, "detail": ""}],
              "kinds": {"dot": 50.0, "copy/layout": 10.0, "other": 0.1}}
    text = profile.format_profile(result, top=1)
    assert "| ynn_fusion.2 | 50.00 | 25.0% | 8 | f32[1] dot |" in text and "copy.7" not in text
    assert "all ops sum to 60.0 ms/step (30% of the step" in text
    assert text.splitlines()[-1] == "by kind: dot 25%, copy/layout 5%"


def test_bad_profile_flags_are_one_line_and_exit_2(capsys):
    assert profile.main(["--backends", "torch,tf"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --backends: expected a subset of torch,jax, got 'torch,tf'\n"


def test_jax_first_step_shows_the_warm_cache_figure_in_brackets():
    jax = {**figures(1500, 4.0, 1400, 2.0, 0.005), "warm_first_step_s": 0.61}
    main = bench_report({"torch": figures(3000, 0.8, 700, 1.5, 0.01), "jax": jax}, bench.SHAPES["tiny"], ratio=0.5)
    row = bench.suite_row("tiny", "fp32", main, None, None, peaks={"fp32": 10.0}, pinned_peaks={})
    assert "| 0.80 / 4.00 (0.61) |" in bench.format_suite_row(row)


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


def test_torch_compile_is_timed_with_an_empty_inductor_cache(monkeypatch, tiny_shards, tmp_path):
    """A warm inductor cache would make the figure a cache hit (11-25 s instead of 24-56 s measured here)."""
    seen = {}

    class FakeWorker:
        def __init__(self, name, cfg_path, weights_path, pin, extra_env=None):
            seen.update(name=name, env=extra_env, compile=bench.load_toml(cfg_path).run.compile)
            cache = Path(extra_env["TORCHINDUCTOR_CACHE_DIR"])
            seen["cache_was_empty"] = not cache.exists() or not any(cache.iterdir())

        def read(self):
            return {"first_step_s": 42.5}

        def close(self):
            return {}

    monkeypatch.setattr(bench, "Worker", FakeWorker)
    first = bench.torch_compile_first_step(tiny_config(tiny_shards, tmp_path), {"GLIBC_TUNABLES": "x"})
    assert first == 42.5
    assert seen["name"] == "torch" and seen["compile"] is True and seen["cache_was_empty"]
    assert seen["env"]["GLIBC_TUNABLES"] == "x"
