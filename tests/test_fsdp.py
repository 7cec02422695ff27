"""run.parallel and run.fsdp_size: validation, common.plan's memory per device, and parity.bench --parallel's
flags and report (the sharded training itself: tests/test_fsdp_torch.py and tests/test_fsdp_jax.py)."""
from __future__ import annotations

import pytest

from bench import pairwise
from common.config import Config, ConfigError, shard_group_size, validate
from common.config_files import apply_overrides, load_toml, resolve_config_path
from common.plan import GIB, device_memory, main as plan_main, num_params
from conftest import with_run
from parity import bench


@pytest.mark.parametrize("overrides, world, message", [
    (["--run.parallel", "zero3"], 1, "run.parallel must be one of ddp, fsdp, got 'zero3'"),
    (["--run.fsdp_size", "2"], 2, "run.fsdp_size is 2 but run.parallel is ddp"),
    (["--run.parallel", "fsdp", "--run.fsdp_size", "3"], 4, r"run.fsdp_size \(3\) does not divide the 4 devices"),
    (["--run.parallel", "fsdp", "--run.fsdp_size", "-1"], 4, "run.fsdp_size must be ≥ 0, got -1"),
])
def test_bad_parallel_settings_name_the_field(overrides, world, message):
    cfg = apply_overrides(Config(), overrides + ["--optim.micro_batch_size", "1"])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_shard_group_size_is_one_under_ddp_and_all_devices_unless_fsdp_size_says_otherwise():
    fsdp = with_run(Config(), parallel="fsdp")
    assert shard_group_size(Config(), 8) == 1
    assert shard_group_size(fsdp, 8) == 8 and shard_group_size(with_run(fsdp, fsdp_size=2), 8) == 2
    assert shard_group_size(fsdp, 8, "ddp") == 1 and shard_group_size(Config(), 8, "fsdp") == 8


def test_gpt2_xl_memory_per_device_on_eight_devices():
    cfg = load_toml(resolve_config_path("gpt2-xl"))
    n = num_params(cfg.model)
    assert n == 1_557_611_200 + 47 * 1600  # GPT-2 XL with 50257 rows; padding to 50304 adds 47 × 1600
    ddp, fsdp = device_memory(cfg, 8, "ddp"), device_memory(cfg, 8, "fsdp")
    # fp32 parameters, gradients and the two AdamW moments: 16 bytes per parameter, all of them or an eighth.
    assert ddp["parameters"] == ddp["gradients"] == 4 * n and ddp["AdamW moments"] == 8 * n
    assert fsdp["parameters"] == 4 * n // 8 and fsdp["AdamW moments"] == 8 * n // 8
    assert ddp["gathered weights"] == 0
    # The root (embeddings, ln_f) in fp32 and two blocks in bf16 while they compute.
    block = 12 * 1600 ** 2 + 13 * 1600
    assert fsdp["gathered weights"] == (n - 48 * block) * 4 + 2 * block * 2
    # One micro-batch of 4 × 1024 tokens: 48 layers × (14 bf16 + 2 fp32 values) × 1600, and the fp32 logits and
    # their gradient over the padded vocabulary.
    assert ddp["activations"] == fsdp["activations"] == 48 * 4096 * 1600 * (14 * 2 + 2 * 4) + 4096 * 50304 * 8
    assert sum(ddp.values()) > 24 * GIB > sum(fsdp.values())


def test_plan_cli_prints_both_columns_and_what_fits(capsys):
    assert plan_main(["--config", "gpt2-xl", "--devices", "8", "--device-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "| GiB | ddp | fsdp (8-way) |" in out and "| AdamW moments | 11.61 | 1.45 |" in out
    assert "fits in 24 GiB: ddp no, fsdp yes, torch fsdp yes" in out
    assert "torch's fsdp accumulates 16 micro-steps in whole gradients" in out
    assert "memory per device (fsdp, estimated): 15.40 GiB" in out
    assert plan_main(["--config", "gpt2-xl", "--devices", "8", "--parallel", "ddp"]) == 0
    assert "memory per device (ddp, estimated): 35.29 GiB" in capsys.readouterr().out
    for bad in (["--devices", "0"], ["--config", "gpt2-xl", "--devices", "8", "--run.fsdp_size", "3"]):
        assert plan_main(bad) == 2
        assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("argv, message", [
    (["--devices", "2"], "--devices needs --parallel"),
    (["--parallel", "fsdp", "--devices", "0"], "--devices needs --parallel and must be in [1, 1024]"),
    (["--parallel", "fsdp", "--devices", "100000"], "must be in [1, 1024]"),
    (["--parallel", "fsdp", "--suite"], "--parallel does not apply to --suite"),
    (["--parallel", "fsdp", "--vs-plain"], "--parallel does not apply to --vs-plain"),
])
def test_bench_parallel_flags_are_checked(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_parallel_report_gives_fsdp_over_ddp_per_backend():
    cfg = pairwise.bench_config("default", "tiny", [], "fp32", False, 10, devices=2)
    assert cfg.run.devices == 2 and cfg.optim.total_batch_size == 2 * 8 * 128  # one micro-step per replica
    worker = {"tokens_per_s": 1000.0, "ms_per_step": 2.0, "mfu": 0.1, "peak_flops": 1e9, "first_step_s": 1.0,
              "startup_s": 2.0, "peak_rss_mb": 100.0}
    report = {"config": cfg.to_dict(), "rounds": 2, "window_steps": 3, "pinned_cpu": None,
              "backends": {"torch ddp": worker, "torch fsdp": worker},
              "fsdp_over_ddp": {"torch": pairwise.ratio_summary(pairwise.same_round_ratios([2.0, 4.0], [1.0, 1.0]))}}
    text = pairwise.format_table(report)
    assert "; 2 replicas each" in text.splitlines()[0] and "| torch fsdp | 1,000 |" in text
    assert "torch fsdp / ddp tokens/s: 0.38 (median of same-round ratios 0.50, 0.25)" in text
