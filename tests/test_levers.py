"""common/levers.py and the backends' levers.py: the decision rule on fake timings, the cache, the modes and
sources, and (asked for explicitly, on a toy shape) both backends' real probes."""
from __future__ import annotations

import dataclasses
import json

import pytest

from common import launch, levers
from common.config import Config, ConfigError, ModelConfig, OptimConfig, RunConfig
from common.levers import Choice, Machine
from common.loop import train
from common.plan import datasheet_peak
from conftest import tiny_config, with_run
from helpers import backend_of

MACHINE = Machine(cpu="Test CPU 9000", isa=("avx2", "avx512f"), cpus=2)
DEFAULTS = {"loss_chunk_rows": Choice(128, "fixed"), "gemm": Choice("aten", "fixed")}
ORDER = ("gemm", "loss_chunk_rows", "threads")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Each test resolves from scratch, in the mode it sets."""
    monkeypatch.setattr(levers, "_RESOLVED", {})
    monkeypatch.delenv(levers.MODE_ENV, raising=False)


def cfg_with(mode: str = "auto", chunk: int = -1, peak_tflops: float = 0.0) -> Config:
    return Config(run=RunConfig(levers=mode, peak_tflops=peak_tflops, loss_chunk_rows=chunk))


class FakeProbe:
    def __init__(self, values=None, peak=(1.5e11, "fake GEMM")):
        self.values = values or {"loss_chunk_rows": 256, "gemm": "onednn"}
        self.peak = peak
        self.calls = {"probe": 0, "peak": 0}

    def probe(self):
        self.calls["probe"] += 1
        return dict(self.values), {"loss_chunk_rows": {"0": [1.0], "256": [0.5]}}

    def peak_probe(self):
        self.calls["peak"] += 1
        return self.peak


def resolve(cfg: Config, fake: FakeProbe, tmp_path, explicit=None):
    return levers.resolve("torch", cfg, explicit=explicit or levers.config_choices(cfg),
                          fixed={"threads": Choice(2, "fixed", "test")}, defaults=DEFAULTS, entry="fp32 C8 V16 rows64",
                          probe=fake.probe, peak_probe=fake.peak_probe, order=ORDER, machine=MACHINE, root=tmp_path,
                          log=lambda msg: None)


def test_fastest_keeps_the_default_unless_clearly_faster_by_same_round_ratios():
    # Round 2 ran on a busy machine (every candidate 10× slower): same-round ratios cancel it.
    timings = {0: [1.0, 10.0, 1.0], 128: [0.8, 8.0, 0.8], 256: [0.97, 9.7, 0.97]}
    assert levers.fastest(timings, default=0) == 128  # 1.25× > 1 + MARGIN
    assert levers.fastest({0: [1.0, 1.0, 1.0], 128: [0.97, 0.98, 0.96]}, default=0) == 0  # 1.03×: noise
    assert levers.fastest({0: [1.0, 1.0, 1.0], 128: [1.5, 1.5, 1.5]}, default=0) == 0
    with pytest.raises(ValueError, match="default"):
        levers.fastest({128: [1.0]}, default=0)
    with pytest.raises(ValueError, match="one time per round"):
        levers.fastest({0: [1.0, 1.0], 128: [1.0]}, default=0)


def test_interleaved_times_every_candidate_once_per_round_after_a_warm_up():
    calls = []
    seconds = levers.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 4 and {k: len(v) for k, v in seconds.items()} == {"a": 3, "b": 3}
    assert levers.chunk_candidates(512) == [0, 128, 256] and levers.chunk_candidates(128) == [0]


def test_machine_key_names_the_model_cores_and_identity():
    key = MACHINE.key()
    assert key.startswith("test-cpu-9000-2cpu-") and "/" not in key
    assert key != dataclasses.replace(MACHINE, cpus=1).key() != dataclasses.replace(MACHINE, isa=("avx2",)).key()
    assert MACHINE.describe() == "Test CPU 9000 (avx2, avx512f; 2 usable CPUs)"
    assert levers.this_machine().cpus >= 1


def test_first_run_probes_and_caches_then_the_cache_answers(tmp_path):
    fake = FakeProbe()
    first = resolve(cfg_with(), fake, tmp_path)
    assert first.choices["loss_chunk_rows"] == Choice(256, "probe") and first.choices["gemm"] == Choice("onednn", "probe")
    assert first.choices["threads"] == Choice(2, "fixed", "test") and list(first.choices) == list(ORDER)
    assert first.peak_flops == 1.5e11 and first.peak_source == "fake GEMM, probed now"
    data = json.loads(levers.cache_path("torch", MACHINE, tmp_path).read_text())
    assert data["entries"]["fp32 C8 V16 rows64"]["levers"] == {"loss_chunk_rows": 256, "gemm": "onednn"}
    assert resolve(cfg_with(), fake, tmp_path) is first  # once per process
    levers._RESOLVED.clear()
    again = resolve(cfg_with(), fake, tmp_path)
    assert again.choices["loss_chunk_rows"] == Choice(256, "cache") and fake.calls == {"probe": 1, "peak": 1}
    assert again.peak_flops == 1.5e11 and again.peak_source.endswith("(cache)")
    assert "loss_chunk_rows 256 [cache]" in again.line() and again.line().startswith("levers (torch): gemm onednn [cache]")


def test_probe_mode_times_again_and_fixed_mode_times_nothing(tmp_path):
    fake = FakeProbe()
    resolve(cfg_with(), fake, tmp_path)
    levers._RESOLVED.clear()
    fake.values = {"loss_chunk_rows": 0, "gemm": "aten"}
    reprobed = resolve(cfg_with("probe"), fake, tmp_path)
    assert reprobed.choices["loss_chunk_rows"] == Choice(0, "probe") and fake.calls == {"probe": 2, "peak": 2}
    fixed = resolve(cfg_with("fixed"), FakeProbe(), tmp_path / "elsewhere")
    assert fixed.choices["loss_chunk_rows"] == Choice(128, "fixed") and fixed.peak_flops is None
    assert "run.levers fixed" in fixed.peak_source and not (tmp_path / "elsewhere").exists()


def test_explicit_config_values_win_over_cache_and_probe(tmp_path):
    fake = FakeProbe()
    chosen = resolve(cfg_with(chunk=0, peak_tflops=0.25), fake, tmp_path)
    assert chosen.choices["loss_chunk_rows"] == Choice(0, "config")
    assert chosen.choices["gemm"] == Choice("onednn", "probe")  # the levers the config leaves open are probed
    assert (chosen.peak_flops, chosen.peak_source) == (0.25e12, "run.peak_tflops") and fake.calls["peak"] == 0
    everything = resolve(cfg_with("probe", chunk=64), fake, tmp_path / "b",
                         explicit={"loss_chunk_rows": Choice(64, "config"), "gemm": Choice("aten", "config")})
    assert fake.calls["probe"] == 1 and everything.choices["gemm"] == Choice("aten", "config")


def test_the_environment_switches_auto_mode_and_bad_values_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(levers.MODE_ENV, "fixed")
    assert levers.lever_mode(cfg_with()) == "fixed" and levers.lever_mode(cfg_with("probe")) == "probe"
    monkeypatch.setenv(levers.MODE_ENV, "sometimes")
    with pytest.raises(ConfigError, match="GPT2TWIN_LEVERS"):
        levers.lever_mode(cfg_with())


def test_a_cache_of_another_machine_or_version_or_corrupt_is_ignored(tmp_path):
    path = levers.cache_path("torch", MACHINE, tmp_path)
    path.write_text("{not json")
    assert levers.read_cache(path, MACHINE)["entries"] == {}
    path.write_text(json.dumps({"version": levers.CACHE_VERSION, "machine": "another CPU", "entries": {"x": 1}}))
    assert levers.read_cache(path, MACHINE)["entries"] == {}
    assert resolve(cfg_with(), FakeProbe(), tmp_path).choices["loss_chunk_rows"].source == "probe"


def test_cache_entries_and_peaks_no_probe_could_have_written_are_dropped(tmp_path):
    path = levers.cache_path("torch", MACHINE, tmp_path)
    good = {"levers": {"gemm": "onednn", "head_gemm": "aten", "loss_chunk_rows": 256, "threads": 2}}
    peak = {"flops": 2e11, "how": "fp32 GEMM peak", "probed": "2026-11-29"}
    bad = [{"levers": {"threads": 0}}, {"levers": {"threads": "x"}}, {"levers": {"loss_chunk_rows": -7}},
           {"levers": {"gemm": "bogus"}}, {"levers": {"gemm": "auto"}}, {"levers": {"loss_chunk_rows": True}},
           {"levers": []}, "entry"]
    entries = {"good": good, **{f"bad{i}": e for i, e in enumerate(bad)}}
    peaks = {"fp32": peak, "bf16": {"flops": "abc"}, "fp64": {"flops": float("inf"), "how": "", "probed": ""}}
    path.write_text(json.dumps({"version": levers.CACHE_VERSION, "machine": MACHINE.describe(), "entries": entries,
                                "peaks": peaks}))
    data = levers.read_cache(path, MACHINE)
    assert data["entries"] == {"good": good} and data["peaks"] == {"fp32": peak}
    path.write_text(json.dumps({"version": levers.CACHE_VERSION, "machine": MACHINE.describe(), "entries": [],
                                "peaks": []}))
    assert levers.read_cache(path, MACHINE)["entries"] == {} == levers.read_cache(path, MACHINE)["peaks"]


def test_an_empty_cache_dir_variable_means_the_default_not_the_working_folder(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    code = "from common import levers; print(levers.CACHE_DIR)"
    for value, expected in (("", str(levers.Path("~/.cache/gpt2-twin").expanduser())), (str(tmp_path), str(tmp_path))):
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**levers.os.environ, "GPT2TWIN_CACHE_DIR": value})
        assert done.stdout.strip() == expected


def test_gpu_peaks_come_from_the_datasheet_by_name():
    assert datasheet_peak("NVIDIA H200", "bf16")[0] == 989.4e12
    assert datasheet_peak("NVIDIA H100 PCIe", "bf16")[0] == 756e12  # not the SXM part's figure
    flops, source = datasheet_peak("NVIDIA A100-SXM4-80GB", "fp32")
    assert flops == 156e12 and "TF32" in source and "A100-SXM4-80GB" in source
    assert datasheet_peak("NVIDIA GeForce GTX 1080", "bf16") is None


def test_allocator_setting_names_who_set_it(monkeypatch):
    monkeypatch.setattr(launch, "_is_glibc_linux", lambda: True)
    for var in ("GLIBC_TUNABLES", launch.NO_REEXEC, launch.REEXECUTED):
        monkeypatch.delenv(var, raising=False)
    assert launch.allocator_setting()[:2] == ("glibc defaults", "fixed")
    monkeypatch.setenv("GLIBC_TUNABLES", launch.GLIBC_TUNABLES)
    assert launch.allocator_setting()[:2] == ("glibc tunables", "env")
    monkeypatch.setenv(launch.REEXECUTED, "1")
    assert launch.allocator_setting() == ("glibc tunables", "fixed", "set at start-up")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert launch.allocator_setting()[:2] == ("GLIBC_TUNABLES=glibc.malloc.hugetlb=0", "env")
    monkeypatch.setattr(launch, "_is_glibc_linux", lambda: False)
    assert launch.allocator_setting()[0] == "system malloc"


def test_config_values_each_backend_cannot_take_are_refused():
    from jax_impl import levers as jl
    from torch_impl import levers as tl

    with pytest.raises(ConfigError, match="run.cpu_gemm: JAX"):
        jl.explicit_choices(Config(run=RunConfig(cpu_gemm="onednn")))
    with pytest.raises(ConfigError, match="run.cpu_gemm: torch"):
        tl.explicit_choices(Config(run=RunConfig(cpu_gemm="xla")))
    with pytest.raises(ConfigError, match="taskset"):
        jl.explicit_choices(Config(run=RunConfig(threads=levers.this_machine().cpus + 1)))
    chosen = tl.explicit_choices(Config(run=RunConfig(cpu_gemm="aten", threads=1, loss_chunk_rows=0)))
    assert chosen == {"loss_chunk_rows": Choice(0, "config"), "gemm": Choice("aten", "config"),
                      "head_gemm": Choice("aten", "config"), "threads": Choice(1, "config")}


def test_on_cuda_torch_applies_the_configured_threads_and_keeps_cublas(monkeypatch):
    """run.threads sizes the host's pool on a GPU too; run.cpu_gemm is a CPU lever and leaves cuBLAS alone."""
    import torch

    from torch_impl import levers as tl

    monkeypatch.setattr(tl, "accelerator_peak", lambda cfg, device: (989.4e12, "datasheet"))
    before = torch.get_num_threads()
    try:
        chosen = tl.choose(Config(run=RunConfig(threads=before + 1, cpu_gemm="aten")), torch.device("cuda"),
                           log=lambda line: None)
        assert torch.get_num_threads() == chosen.value("threads") == before + 1
        assert chosen.value("gemm") == chosen.value("head_gemm") == "cublas"
    finally:
        torch.set_num_threads(before)


def test_on_a_gpu_jax_keeps_xla_for_an_explicit_cpu_gemm(monkeypatch):
    """run.cpu_gemm is a CPU lever: on a GPU the levers line shows XLA's device kernels, as torch shows cuBLAS."""
    from jax_impl import levers as jl

    monkeypatch.setattr(jl, "accelerator_peak", lambda cfg: (989.4e12, "datasheet"))
    chosen = jl.choose(Config(run=RunConfig(cpu_gemm="xla")), "gpu", log=lambda line: None)
    assert chosen.choices["gemm"].source == chosen.choices["head_gemm"].source == "device"
    cpu = jl.choose(Config(run=RunConfig(cpu_gemm="xla", levers="fixed")), "cpu", log=lambda line: None)
    assert cpu.choices["gemm"].source == "config"


TOY = Config(model=ModelConfig(vocab_size=200, padded_vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32),
             optim=OptimConfig(total_batch_size=16 * 32, micro_batch_size=32))


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_the_real_probe_decides_every_lever_among_its_candidates(backend):
    module = __import__(f"{backend}_impl.levers", fromlist=["probe"])
    names = ["gemm", "head_gemm", "loss_chunk_rows", "threads"] if backend == "torch" else ["loss_chunk_rows"]
    values, timings = module.probe(TOY, names)
    assert set(values) == set(names) and timings["rows"] == 512
    assert values["loss_chunk_rows"] in (0, 128, 256) and set(timings["loss_chunk_rows"]) == {"0", "128", "256"}
    assert all(len(v) == levers.PROBE_ROUNDS and min(v) > 0 for v in timings["loss_chunk_rows"].values())
    if backend == "torch":
        assert values["gemm"] in ("aten", "onednn") and 1 <= values["threads"] <= levers.this_machine().cpus
    flops, how = module.gemm_peak("fp32")
    assert flops > 1e8 and "fp32 GEMM peak" in how


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_every_trainer_prints_its_levers_at_start(backend, tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv(levers.MODE_ENV, "fixed")
    lines = []
    cfg = with_run(tiny_config(tiny_shards, tmp_path, max_steps=2, warmup_steps=1), log_interval=1)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, loss_chunk_rows=0))
    train(backend_of(backend), cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    header = next(line for line in lines if line.startswith("levers"))
    assert header.startswith(f"levers ({backend}): gemm ") and "loss_chunk_rows 0 [config]" in header
    assert "threads " in header and "allocator " in header
    assert any("GEMM peak not measured: run.levers fixed" in line for line in lines)
