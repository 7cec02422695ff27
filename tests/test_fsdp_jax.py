"""JAX with an fsdp mesh axis (run.parallel fsdp) on 4 XLA host devices: fsdp 2 (a 2 × 2 mesh) and 4 train as one
device does, the saved state is sharded, each device holds 1/fsdp_size of the parameters, and a checkpoint
of 4 sharded devices resumes on 2 and on 1.

XLA fixes the host device count when JAX starts, so the runs happen in one fresh process: this file is also
its script (`devices_main`, run as `python tests/test_fsdp_jax.py OUT` with XLA_FLAGS set).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from common.config import Config
from conftest import twenty_step_config, with_optim, with_run
from helpers import assert_same_steps, quiet, run_python

DEVICES = 4


def configs(data_dir: Path, out: Path) -> dict[str, Config]:
    """20 steps of 8 sequences: 2 per device on 4 devices (4 micro-steps on one), checkpoints at 10 and 20."""
    base = with_optim(twenty_step_config(data_dir, out), micro_batch_size=2)
    fsdp = with_run(base, devices=DEVICES, parallel="fsdp")
    return {"one": with_run(base, devices=1), "fsdp2": with_run(fsdp, fsdp_size=2), "fsdp4": fsdp,
            "resumed-2": with_run(fsdp, devices=2), "resumed-1": with_run(base, devices=1)}


def devices_main(data_dir: Path, out: Path) -> None:
    """Every run, each on its own backend (mesh); the resumed ones from fsdp4's step-10 checkpoint. What the
    devices held goes to out/devices.json."""
    import jax

    from common.loop import train
    from jax_impl import dist
    from jax_impl.train import JaxBackend

    report = {}
    for name, cfg in configs(data_dir, out).items():
        backend = JaxBackend()
        resume = str(out / "fsdp4" / "checkpoints" / "step_00000010") if name.startswith("resumed") else None
        result = train(backend, with_run(cfg, out_dir=str(out / name)), resume=resume, log=quiet)
        state, rt = result.state, backend.runtime(cfg)
        restored, _ = backend.load_checkpoint(out / name, cfg, result.dist)  # its step-20 checkpoint
        batch = dist.put_batch(jax.numpy.zeros((1, 8, cfg.model.block_size), "int32"), rt.batch_sharding)
        memory = rt.train_step.lower(state, batch, batch).compile().memory_analysis()
        leaves = jax.tree.leaves((state.params, state.opt_state))
        report[name] = {
            "param_bytes": sorted(dist.bytes_per_device(state.params).values()),
            "state_bytes": sorted(dist.bytes_per_device((state.params, state.opt_state)).values()),
            "whole_state_bytes": sum(leaf.nbytes for leaf in leaves),
            "replicated_state_bytes": sum(leaf.nbytes for leaf in leaves if leaf.sharding.is_fully_replicated),
            "step_argument_bytes": memory.argument_size_in_bytes, "step_temp_bytes": memory.temp_size_in_bytes,
            "specs": {k: list(leaf.sharding.spec) for k, leaf in _flat(state.params).items()},
            "restored_specs": {k: list(leaf.sharding.spec) for k, leaf in _flat(restored.params).items()},
            "replicated": sorted(k for k, leaf in _flat(state.params).items() if leaf.sharding.is_fully_replicated),
        }
    (out / "devices.json").write_text(json.dumps(report, indent=1))


def _flat(params) -> dict:
    from jax_impl.layout import flatten
    return flatten(params)


def test_fsdp_over_four_devices_matches_one_device_and_resumes_on_fewer(tmp_path, tiny_shards):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    run_python([str(Path(__file__)), str(tiny_shards), str(tmp_path)], env=env, timeout=900)
    report = json.loads((tmp_path / "devices.json").read_text())
    for name in ("fsdp2", "fsdp4"):
        assert_same_steps(tmp_path / name, tmp_path / "one")
    for name in ("resumed-2", "resumed-1"):
        assert_same_steps(tmp_path / name, tmp_path / "fsdp4", first_step=10)

    # Every tensor of the tiny model has a dimension 2 and 4 divide: all are split, along their largest one.
    whole = report["one"]["param_bytes"]
    assert len(whole) == 1 and report["one"]["specs"]["wte.weight"] == []
    for name, size in (("fsdp2", 2), ("fsdp4", 4), ("resumed-2", 2)):
        r = report[name]
        assert r["replicated"] == [], name
        assert r["param_bytes"] == [whole[0] // size] * len(r["param_bytes"]), name
        # AdamW's moments are split like the parameters; only the optimizer's scalars are on every device.
        rep = r["replicated_state_bytes"]
        assert r["state_bytes"] == [(r["whole_state_bytes"] - rep) // size + rep] * len(r["state_bytes"]), name
        assert rep < 64, name
        assert r["specs"]["wte.weight"] == ["fsdp", None]  # (256, 32): the 256
        # The blocks, stacked (2 layers, ...), are split within each layer, never along the layer axis.
        assert r["specs"]["h.mlp.c_fc.weight"] == [None, None, "fsdp"]  # (2, 32, 128): the 128
        assert r["specs"]["h.attn.c_attn.bias"] == [None, "fsdp"]  # (2, 96)
        assert r["specs"]["h.ln_1.weight"] == [None, "fsdp"]  # (2, 32), though 2 divides the layer axis too
        assert r["restored_specs"] == r["specs"]  # orbax restored the saved state split the same way
    assert report["resumed-1"]["specs"] == report["resumed-1"]["restored_specs"] == report["one"]["specs"]


if __name__ == "__main__":
    devices_main(Path(sys.argv[1]), Path(sys.argv[2]))
