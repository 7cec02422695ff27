"""torch FSDP2 (run.parallel fsdp) under torchrun: the same run as one process and as 2-rank DDP, and its
gathered checkpoints resume on 1 rank and on 2 sharded ranks.

One torchrun launch runs every 2-rank part: this file is also the ranks' script (`ranks_main`, run as
`python -m torch.distributed.run ... tests/test_fsdp_torch.py CONFIG_DIR OUT`), so start-up is paid once.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from common.checkpoints import complete_checkpoints, latest_checkpoint
from common.config import Config
from common.config_files import dump_toml, load_toml
from common.loop import NonFiniteError, train
from conftest import twenty_step_config, with_optim, with_run
from helpers import PoisonedAt, assert_same_steps, quiet, run_python

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POISONED_AT = 12  # the poisoned run stops here; its last checkpoint is step 10


def configs(data_dir: Path, out: Path) -> dict[str, Config]:
    """20 steps of 8 sequences, 2 micro-steps per rank on 2 ranks (4 in one process), checkpoints at 10 and 20."""
    base = with_optim(twenty_step_config(data_dir, out / "one"), micro_batch_size=2)
    fsdp = with_run(base, parallel="fsdp")
    return {"one": base, "ddp": with_run(base, out_dir=str(out / "ddp")),
            "fsdp": with_run(fsdp, out_dir=str(out / "fsdp")),
            "poisoned": with_run(fsdp, out_dir=str(out / "poisoned")),
            "resumed-1": with_run(fsdp, out_dir=str(out / "resumed-1"))}


def ranks_main(config_dir: Path, out: Path) -> None:
    """Every rank: the fsdp and ddp runs, then a fsdp run poisoned with NaN weights before step POISONED_AT and
    resumed from its last checkpoint on 2 sharded ranks; what each rank saw goes to out/rank{N}.json."""
    import torch

    from torch_impl import dist
    from torch_impl.train import BACKEND

    cfgs = {name: load_toml(config_dir / f"{name}.toml") for name in ("fsdp", "ddp", "poisoned")}
    fsdp = train(BACKEND, cfgs["fsdp"], log=quiet)
    train(BACKEND, cfgs["ddp"], log=quiet)

    def poison(state):
        with torch.no_grad():
            for p in state.model.parameters():
                dist.local(p).fill_(float("nan"))
        return state

    stopped = ""
    try:
        train(PoisonedAt(BACKEND, POISONED_AT, poison), cfgs["poisoned"], log=quiet)
    except NonFiniteError as e:
        stopped = str(e)
    train(BACKEND, cfgs["poisoned"], resume="latest", log=quiet)
    shards = {name: list(dist.local(p).shape) for name, p in fsdp.state.model.named_parameters()}
    (out / f"rank{fsdp.dist.process_index}.json").write_text(json.dumps(
        {"stopped": stopped, "shards": shards}))
    BACKEND.teardown()


def test_fsdp_on_two_ranks_matches_one_process_and_ddp_and_resumes_anywhere(tmp_path, tiny_shards):
    from torch_impl.train import BACKEND

    cfgs = configs(tiny_shards, tmp_path)
    for name, cfg in cfgs.items():
        (tmp_path / f"{name}.toml").write_text(dump_toml(cfg))
    run_python(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(Path(__file__)),
                str(tmp_path), str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    train(BACKEND, cfgs["one"], log=quiet)
    # The fsdp run's step-10 checkpoint resumed on one process (unsharded: the files are the same either way).
    train(BACKEND, cfgs["resumed-1"], resume=str(tmp_path / "fsdp" / "checkpoints" / "step_00000010"), log=quiet)

    assert_same_steps(tmp_path / "fsdp", tmp_path / "one")
    assert_same_steps(tmp_path / "fsdp", tmp_path / "ddp")
    assert_same_steps(tmp_path / "resumed-1", tmp_path / "fsdp", first_step=10)
    # No lost work: the NaN stopped both ranks at the poisoned step, the step-10 checkpoint was kept, and the
    # run resumed from it on 2 sharded ranks continues the fsdp run's steps.
    assert_same_steps(tmp_path / "poisoned", tmp_path / "fsdp")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for info in ranks:
        assert f"step {POISONED_AT}" in info["stopped"] and "step_00000010" in info["stopped"]
    # Each rank held half the rows of every tensor: sharded, not replicated.
    assert ranks[0]["shards"]["wte.weight"] == ranks[1]["shards"]["wte.weight"] == [128, 32]
    assert ranks[0]["shards"]["h.0.mlp.c_fc.weight"] == [16, 128]
    # Gathered checkpoints: the same files as DDP's, readable as plain weights.
    for step in ("step_00000010", "step_00000020"):
        assert (sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / step).iterdir())
                == sorted(p.name for p in (tmp_path / "ddp" / "checkpoints" / step).iterdir()))
    assert [c.name for c in complete_checkpoints(tmp_path / "poisoned")] == ["step_00000010", "step_00000020"]
    assert latest_checkpoint(tmp_path / "resumed-1").name == "step_00000020"


if __name__ == "__main__":
    ranks_main(Path(sys.argv[1]), Path(sys.argv[2]))
