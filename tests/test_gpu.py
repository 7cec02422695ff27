"""parity.gpu: its CPU dry run passes every section and writes the report; sections are isolated (a time-out is
recorded, later sections still run, --only reruns into the report); the verdicts judge real numbers."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from parity import gpu, gpu_bench, gpu_parity, gpu_train
from parity.gpu_report import format_report

ROOT = Path(__file__).resolve().parent.parent


def run_gpu(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "parity.gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small GPT-2-token corpus (the thirty largest stdlib modules), made by the real preparation CLI."""
    src = tmp_path_factory.mktemp("corpus-src")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: -p.stat().st_size)[:30]
    for f in files:
        shutil.copy(f, src / (f.stem + ".txt"))
    out = tmp_path_factory.mktemp("corpus") / "stdlib-small"
    proc = subprocess.run([sys.executable, "-m", "common.prepare", "--input", str(src), "--out", str(out),
                           "--val-tokens", "8192", "--workers", "1"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def dry_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry")
    proc = run_gpu("--dry-run", "--out", str(out), "--data-dir", str(corpus))
    return proc, out


def test_dry_run_passes_every_section_and_writes_the_report(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / gpu.REPORT_JSON).read_text())
    assert report["passed"] and report["dry_run"] and report["device"] == "cpu"
    assert list(report["sections"]) == list(gpu.SECTIONS)
    for name, entry in report["sections"].items():
        assert entry["status"] == "passed", (name, entry["error"])
        assert (out / entry["log"]).read_text().strip()  # every section's output is kept
    s = {name: entry["result"] for name, entry in report["sections"].items()}
    assert s["env"]["versions"]["torch"] and s["env"]["versions"]["jax"] and s["env"]["jax"]["backend"] == "cpu"
    assert s["peaks"]["bf16_peak_tflops"] > 0 and {r["framework"] for r in s["peaks"]["rows"]} == {"torch", "jax"}
    for dtype, tol in gpu_parity.GPU_TOLERANCES.items():
        d = s["parity"]["dtypes"][dtype]
        assert d["passed"] and d["cpu_tolerances_passed"] and d["steps"] == 10
        assert 0 <= d["worst"]["loss"] <= tol.loss and d["worst"]["logits"] <= tol.logits
    bench = s["bench"]
    for name in ("torch", "jax"):
        b = bench["backends"][name]
        assert b["micro_batch"] == 2 and b["accum"] == 2 and b["tokens_per_step"] == 2 * 2 * 64
        assert b["tokens_per_s"] > 0 and 0 < b["mfu"] and b["memory"]["gib"] > 0 and b["first_step_s"] > 0
    assert bench["backends"]["torch"]["attention"]["implementation"].startswith("SDPA")
    assert "attention" in bench["backends"]["jax"]["attention"]["implementation"]
    assert bench["jax_over_torch"] > 0 and len(bench["jax_over_torch_rounds"]) == bench["rounds"]
    for name in ("torch", "jax"):
        t = s["train"]["backends"][name]
        assert t["exit_code"] == 0 and t["steps"] == t["max_steps"] >= 10
        assert t["last_loss_mean"] <= t["first_loss"] - gpu_train.DROP["dry"]
        assert (out / "train" / name / "metrics.jsonl").exists()
    md = (out / gpu.REPORT_MD).read_text()
    assert md.startswith("# parity.gpu report: PASS")
    assert all(f"| {name} | passed |" in md for name in gpu.SECTIONS)
    assert "## bench" in md and "| torch | 2×2 |" in md
    assert "parity.gpu: PASS" in proc.stdout  # the progress lines name the verdict


def test_only_reruns_a_section_into_the_existing_report(dry_run):
    _, out = dry_run
    before = json.loads((out / gpu.REPORT_JSON).read_text())
    proc = run_gpu("--dry-run", "--out", str(out), "--only", "env", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    after = json.loads((out / gpu.REPORT_JSON).read_text())
    assert list(after["sections"]) == list(gpu.SECTIONS)
    assert after["sections"]["env"]["started"] >= before["sections"]["env"]["started"]
    assert after["sections"]["bench"] == before["sections"]["bench"]


def test_a_section_past_its_time_out_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    # env imports torch and JAX: far longer than a hundredth of a second.
    monkeypatch.setitem(gpu.TIMEOUTS, "env", (0.01, 0.01))
    opts = gpu.Options(out=tmp_path, dry_run=True, data_dir="unused", max_micro_batch=2, parity_steps=1,
                       train_seconds=1, time_limit=60, deadline=time.time() + 60)
    (tmp_path / "logs").mkdir()
    entry = gpu.run_section("env", opts, tmp_path, time.time())
    assert entry["status"] == "timeout" and entry["result"] is None and "stopped after" in entry["error"]
    late = gpu.run_section("peaks", dataclasses.replace(opts, deadline=time.time() + 5), tmp_path, time.time())
    assert late["status"] == "skipped" and "not started" in late["error"]


@pytest.mark.parametrize("args, flag", [(["--only", "env,nope"], "--only"), (["--train-seconds", "0"], "--train-seconds"),
                                        (["--max-micro-batch", "-2"], "--max-micro-batch")])
def test_bad_flags_are_one_line_and_exit_2(args, flag, tmp_path):
    proc = run_gpu("--dry-run", "--out", str(tmp_path), *args, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and flag in proc.stderr and "Traceback" not in proc.stderr


def test_only_the_default_corpus_may_be_missing_and_a_given_one_is_resolved(tmp_path, monkeypatch):
    def options(*args):
        return gpu.parse_options(gpu.build_parser().parse_args(["--dry-run", *args]))

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    assert options("--data-dir", "corpus").data_dir == str(tmp_path / "corpus")  # the sections run in ROOT
    monkeypatch.setattr(gpu, "ROOT", tmp_path)  # a checkout whose default corpus is not prepared yet
    default = options()
    assert default.data_dir == "data/stdlib" and options("--data-dir", "data/stdlib").data_dir == \
        str(tmp_path / "data/stdlib")
    assert gpu.parse_options(gpu.build_parser().parse_args(default.flags())).data_dir  # as a section process sees it
    with pytest.raises(gpu.UsageError, match="--data-dir: elsewhere is not a folder"):
        options("--data-dir", "elsewhere")


def parity_report(loss_diffs, logits=1e-6, params=1e-5):
    steps = [{"step": i, "loss_abs_diff": d, "grad_norm_rel_diff": 1e-7, "lr_rel_diff": 0.0, "loss_torch": 10.0}
             for i, d in enumerate(loss_diffs)]
    return {"steps": steps, "logits_max_abs": logits, "grads_step0": {"wte.weight": 1e-6, "h.0.attn.c_attn.bias": 2e-6},
            "params_rel": params, "moments_rel": {"m": 1e-6, "v": 3e-6}}


def test_parity_judge_names_the_quantity_and_the_first_step_over_the_gpu_tolerance():
    fp32 = gpu_parity.GPU_TOLERANCES["fp32"]
    worst, failures = gpu_parity.judge(parity_report([1e-6, 5e-5, 3e-4, 2e-4]), fp32)
    assert worst["loss"] == 3e-4 and worst["grads"] == 2e-6 and worst["moments"] == 3e-6
    assert failures == ["loss 3.000e-04 > 1e-04 (first at step 2)"]
    _, failures = gpu_parity.judge(parity_report([1e-6], logits=1e-3, params=float("nan")), fp32)
    assert [f.split()[0] for f in failures] == ["logits", "params"]  # a NaN fails too
    assert gpu_parity.judge(parity_report([4e-3]), gpu_parity.GPU_TOLERANCES["bf16"])[1] == []


def test_train_judge_wants_the_loss_to_fall_by_the_drop():
    def records(losses):
        return [{"step": i, "loss": v, "tokens_per_s": 100.0 + i, "tokens": 512 * (i + 1), "elapsed_s": i + 1.0}
                for i, v in enumerate(losses)]
    summary, failures = gpu_train.judge(records([10.8, 9.0, 8.0, 7.0, 6.0, 5.0, 5.0, 5.0]), drop=2.0)
    assert failures == [] and summary["last_loss_mean"] == 5.0 and summary["tokens_per_s"] == 104.5
    _, failures = gpu_train.judge(records([10.8, 10.0, 9.5, 9.2]), drop=2.0)
    assert failures == ["loss did not fall by 2.0 nats: first 10.800, last 9.200"]
    assert gpu_train.judge([], drop=2.0)[1] == ["no step records"]


class FakeWorker:
    """Stands in for a bench worker process: out of memory above micro-batch 16."""
    started: list[int] = []

    def __init__(self, name, cfg, opts, work):
        self.cfg = cfg
        FakeWorker.started.append(cfg.optim.micro_batch_size)

    def close(self):
        pass

    def read(self):
        if self.cfg.optim.micro_batch_size > 16:
            return {"status": "oom", "error": "CUDA out of memory. Tried to allocate 3.00 GiB"}
        return {"status": "ready", "first_step_s": 42.0}


def test_the_micro_batch_is_halved_on_out_of_memory_keeping_tokens_per_step(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_bench, "Worker", FakeWorker)
    FakeWorker.started = []
    opts = gpu.Options(out=tmp_path, dry_run=False, data_dir="data/stdlib", max_micro_batch=64, parity_steps=50,
                       train_seconds=60, time_limit=480, deadline=0)
    w, first, tries = gpu_bench.start_fitting("jax", opts, tmp_path)
    assert FakeWorker.started == [64, 32, 16] and first["first_step_s"] == 42.0
    assert [t["status"] for t in tries] == ["oom", "oom", "ready"]
    cfg = w.cfg
    assert cfg.optim.total_batch_size == 2 * 64 * 1024 and cfg.optim.total_batch_size // (16 * 1024) == 8
    assert (cfg.model.n_layer, cfg.model.block_size, cfg.run.dtype, cfg.run.compile, cfg.run.device) == \
        (12, 1024, "bf16", True, "cuda")


def test_the_markdown_report_keeps_a_partial_result_readable(dry_run):
    _, out = dry_run
    report = json.loads((out / gpu.REPORT_JSON).read_text())
    report["sections"]["bench"]["result"]["backends"]["jax"] = {"micro_batch": 64}  # died before timing
    report["sections"]["bench"]["status"] = "failed"
    report["passed"] = False
    md = format_report(report)
    assert md.startswith("# parity.gpu report: FAIL") and "| jax | 64 | — |" in md and "| bench | failed |" in md
