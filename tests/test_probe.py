"""parity.probe: this machine's GEMM peaks, each framework measured in its own process."""
from __future__ import annotations

import time

import pytest

from parity import probe


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
