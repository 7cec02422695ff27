"""The fault suite, the other tools: common.prepare, parity.check, the benches, parity.profile, parity.probe,
common.plan, common.report, parity.sweep and parity.gpu. Each bad input is one error line naming it, exit code 2,
no traceback, nothing of the world changed (tests/faults.py)."""
from __future__ import annotations

import pytest

from faults import Case, check_case


def args(*items):
    """argv with {name} standing for a world path and {tmp} for the case's own empty folder."""
    return lambda w, tmp: [str(a).format(**{k: str(v) for k, v in w.paths.items()}, tmp=tmp) for a in items]


def named(text: str):
    return lambda w, tmp: text.format(**{k: str(v) for k, v in w.paths.items()}, tmp=tmp)


PREPARE = "common.prepare"
# Should a check below be lost, the command would start work: these keep that work short (a tiny sweep;
# parity.gpu's dry run of one section, or a --time-limit that skips every section) and its output in {tmp}.
SMALL_SWEEP = ("--shape", "tiny", "--max-batch", 1, "--steps", 1)
GPU = ("--dry-run", "--only", "env", "--out", "{tmp}/gpu")
CASES = [
    Case("prepare-empty-input", PREPARE, args("--input", "{empty_txt}", "--out", "{tmp}/o"),
         named("{empty_txt}: no text to tokenize")),
    Case("prepare-invalid-jsonl", PREPARE, args("--input", "{bad_jsonl}", "--out", "{tmp}/o"),
         named("{bad_jsonl}:2: not valid JSON")),
    Case("prepare-first-row-without-the-text-field", PREPARE, args("--input", "{untexted_jsonl}", "--out", "{tmp}/o"),
         named("{untexted_jsonl}:1: no string field 'text' (use --text-field)")),
    Case("prepare-out-under-a-file", PREPARE, args("--input", "{bad_jsonl}", "--out", "{a_file}/o"),
         named("--out: cannot create {a_file}/o: {a_file} is a file")),
    Case("prepare-missing-input", PREPARE, args("--input", "{tmp}/none.txt", "--out", "{tmp}/o"),
         named("{tmp}/none.txt: input does not exist")),
    Case("prepare-zero-shard-size", PREPARE, args("--input", "{bad_jsonl}", "--out", "{tmp}/o", "--shard-size", 0),
         "--shard-size must be > 0"),
    Case("prepare-bad-name", PREPARE, args("--input", "{bad_jsonl}", "--out", "{tmp}/o", "--name", "a_b"),
         "--name 'a_b'"),
    Case("prepare-negative-seed", PREPARE, args("--input", "{bad_jsonl}", "--out", "{tmp}/o", "--seed", -1),
         "--seed must be >= 0"),
    Case("prepare-huge-shard-size", PREPARE, args("--input", "{bad_jsonl}", "--out", "{tmp}/o", "--shard-size",
                                                  99999999999), "--shard-size must be ≤ 2,147,483,647"),
    Case("prepare-huge-val-tokens", PREPARE, args("--input", "{bad_jsonl}", "--out", "{tmp}/o", "--val-tokens",
                                                  2 ** 31), "--val-tokens must be ≤ 2,147,483,647"),
    Case("prepare-zero-workers", PREPARE, args("--input", "{bad_jsonl}", "--out", "{tmp}/o", "--workers", 0),
         "--workers must be ≥ 1"),
    Case("prepare-negative-workers", PREPARE, args("--input", "{bad_jsonl}", "--out", "{tmp}/o", "--workers", -2),
         "--workers must be ≥ 1"),
    Case("prepare-wrong-type", PREPARE, args("--workers", "two"), "argument --workers: invalid int value"),
    Case("prepare-two-sources", PREPARE, args("--input", "{empty_txt}", "--hf", "x"), "argument --hf: not allowed"),
    Case("check-unknown-dtype", "parity.check", args("--dtype", "fp8"), "argument --dtype: invalid choice: 'fp8'"),
    Case("check-zero-steps", "parity.check", args("--steps", 0), "--steps must be ≥ 1"),
    Case("check-unknown-key", "parity.check", args("--model.n_layr", 2), "unknown key 'model.n_layr'"),
    Case("check-json-under-a-file", "parity.check", args("--json", "{a_file}/r.json"), named("--json: cannot create")),
    Case("check-not-toml", "parity.check", args("--config", "{not_toml}"), named("{not_toml}: invalid TOML")),
    Case("check-overridden-dtype", "parity.check", args("--run.dtype", "fp16"), "--run.dtype: parity.check sets it"),
    Case("bench-unknown-backend", "parity.bench", args("--backends", "torch,mx"), "--backends: expected a subset"),
    Case("bench-zero-rounds", "parity.bench", args("--rounds", 0), "--rounds must be ≥ 1"),
    Case("bench-suite-flag-alone", "parity.bench", args("--rows", "tiny"), "--rows needs --suite"),
    Case("bench-unknown-key", "parity.bench", args("--model.n_layr", 2), "unknown key 'model.n_layr'"),
    Case("bench-wrong-type", "parity.bench", args("--rounds", "x"), "argument --rounds: invalid int value"),
    Case("bench-unknown-parallel", "parity.bench", args("--parallel", "tp"), "argument --parallel: invalid choice"),
    Case("bench-negative-warmup", "parity.bench", args("--warmup", -1), "--warmup must be ≥ 0"),
    Case("bench-pin-absent-cpu", "parity.bench", args("--vs-plain", "--pin", 4096),
         "--pin 4096: CPU 4096 is not one this process may run on"),
    Case("bench-pin-not-a-list", "parity.bench", args("--pin", "0-a"), "--pin: expected a CPU list"),
    Case("bench-plot-a-folder", "parity.bench", args("--plot", "{tmp}"), named("--plot: {tmp} is a folder")),
    Case("suite-pin-absent-cpu", "parity.bench", args("--suite", "--pin", 4096), "--pin 4096: CPU 4096"),
    Case("profile-wrong-type", "parity.profile", args("--top", "x"), "argument --top: invalid int value"),
    Case("profile-json-under-a-file", "parity.profile", args("--json", "{a_file}/r.json"),
         named("--json: cannot create")),
    Case("probe-wrong-type", "parity.probe", args("--budget", "x"), "argument --budget: invalid float value"),
    Case("probe-pin-absent-cpu", "parity.probe", args("--pin", 4096), "--pin 4096: CPU 4096"),
    Case("prepare-bench-zero-repeats", "bench.prepare", args("--repeats", 0), "--repeats must be ≥ 1"),
    Case("torch-bench-unknown-shape", "torch_impl.bench", args("--shape", "huge"), "argument --shape: invalid choice"),
    Case("torch-bench-missing-config", "torch_impl.bench", args("--config", "nope"), "--config: no preset 'nope'"),
    Case("jax-bench-wrong-type", "jax_impl.bench", args("--steps", "x"), "argument --steps: invalid int value"),
    Case("jax-bench-fp16", "jax_impl.bench", args("--config", "parity", "--shape", "tiny", "--dtype", "fp16"),
         "argument --dtype: invalid choice: 'fp16'"),
    Case("plan-missing-config", "common.plan", args("--config", "nope"), "--config: no preset 'nope'"),
    Case("plan-wrong-type", "common.plan", args("--world-size", "x"), "argument --devices/--world-size: invalid int"),
    Case("plan-unknown-parallel", "common.plan", args("--parallel", "tp"), "argument --parallel: invalid choice: 'tp'"),
    Case("plan-indivisible-heads", "common.plan", args("--model.n_head", 3), "model.n_embd (128) is not divisible"),
    Case("report-torn-metrics", "common.report", args("{torn_metrics}"), named("{torn_metrics}/metrics.jsonl:3: invalid")),
    Case("report-missing-run", "common.report", args("{tmp}/none"), named("{tmp}/none: no such run folder")),
    Case("report-labels", "common.report", args("{torch_run}", "--labels", "a,b"), "--labels: 2 label(s) for 1 run(s)"),
    Case("report-empty-label", "common.report", args("{torch_run}", "{torch_run}", "--labels", "a, ", "--out", "{tmp}/r"),
         "--labels: label 2 is empty"),
    Case("report-wrong-type", "common.report", args("{torch_run}", "--target", "low"), "argument --target"),
    Case("report-infinite-target", "common.report", args("{torch_run}", "--out", "{tmp}/o", "--target", "inf"),
         "--target must be a finite val loss, got inf"),
    Case("report-nan-target", "common.report", args("{torch_run}", "--out", "{tmp}/o", "--target", "nan"),
         "--target must be a finite val loss, got nan"),
    Case("sweep-nan-rss", "parity.sweep", args("--backend", "torch", *SMALL_SWEEP, "--max-rss-gb", "nan"),
         "--max-rss-gb must be a finite number > 0, got nan"),
    Case("sweep-infinite-rss", "parity.sweep", args("--backend", "torch", *SMALL_SWEEP, "--max-rss-gb", "inf"),
         "--max-rss-gb must be a finite number > 0, got inf"),
    Case("sweep-zero-batch", "parity.sweep", args("--backend", "torch", "--max-batch", 0), "--max-batch must be ≥ 1"),
    Case("sweep-unknown-backend", "parity.sweep", args("--backend", "mx"), "argument --backend: invalid choice"),
    Case("sweep-jax-fp16", "parity.sweep", args("--backend", "jax", "--dtype", "fp16"), "--dtype fp16 is torch-only"),
    Case("gpu-zero-micro-batch", "parity.gpu", args(*GPU, "--time-limit", 1, "--max-micro-batch", 0),
         "--max-micro-batch must be ≥ 1, got 0"),
    Case("gpu-zero-parity-steps", "parity.gpu", args(*GPU, "--time-limit", 1, "--parity-steps", 0),
         "--parity-steps must be ≥ 1, got 0"),
    Case("gpu-zero-time-limit", "parity.gpu", args(*GPU, "--time-limit", 0), "--time-limit must be a finite"),
    Case("gpu-nan-time-limit", "parity.gpu", args(*GPU, "--time-limit", "nan"), "--time-limit must be a finite"),
    Case("gpu-nan-train-seconds", "parity.gpu", args(*GPU, "--time-limit", 1, "--train-seconds", "nan"),
         "--train-seconds must be a finite"),
    Case("gpu-out-under-a-file", "parity.gpu", args("--time-limit", 1, "--out", "{a_file}/x"),
         named("--out: cannot create {a_file}/x: {a_file} is a file")),
    Case("gpu-out-a-file", "parity.gpu", args("--time-limit", 1, "--out", "{a_file}"),
         named("--out: cannot create {a_file}: {a_file} is a file")),
    Case("gpu-missing-data-dir", "parity.gpu", args(*GPU, "--time-limit", 1, "--data-dir", "{tmp}/none"),
         named("--data-dir: {tmp}/none is not a folder")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tools_refuse_bad_input(case, fault_world, tmp_path, capsys):
    check_case(case, fault_world, tmp_path, capsys)
