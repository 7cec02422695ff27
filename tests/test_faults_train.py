"""The fault suite, trainers: each bad input to `python -m torch_impl.train` / `jax_impl.train` is one error line
naming it, exit code 2, no traceback, and no existing checkpoint or record changed (tests/faults.py)."""
from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from common.outdir import hold
from faults import Case, check_case

OTHER = {"torch": "jax", "jax": "torch"}


def environment(**variables: str):
    """A launcher's environment variables, set while the case runs."""
    return mock.patch.dict(os.environ, variables)


def trainer_cases(b: str) -> list[Case]:
    module = f"{b}_impl.train"

    def fresh(*extra, **flags):
        return lambda w, tmp: w.train_argv(b, tmp / "out", **flags) + [str(a) for a in extra]

    def resume(run: str, *extra, **flags):
        return lambda w, tmp: w.train_argv(b, w[run], **flags) + ["--resume", *map(str, extra)]

    def shard_file(folder: str, then: str = ""):
        name = "x_train_000000.npy" if folder.endswith("npy") else "x_train_000000.bin"
        return lambda w, tmp: f"{w[folder] / name}{then}"

    cases = [
        Case(f"{b}-unknown-key", module, fresh("--model.n_layr", 2), "'model.n_layr'"),
        Case(f"{b}-wrong-type", module, fresh("--model.n_layer", "two"), "--model.n_layer: cannot read 'two' as int"),
        Case(f"{b}-not-toml", module, lambda w, tmp: fresh("--config", w["not_toml"])(w, tmp),
             lambda w, tmp: f"{w['not_toml']}: invalid TOML"),
        Case(f"{b}-toml-unknown-key", module, lambda w, tmp: fresh("--config", w["unknown_key"])(w, tmp),
             lambda w, tmp: f"{w['unknown_key']}: unknown key 'model.n_layr'"),
        Case(f"{b}-toml-wrong-type", module, lambda w, tmp: fresh("--config", w["wrong_type"])(w, tmp),
             lambda w, tmp: f"{w['wrong_type']}: cannot read 'x' as float"),
        Case(f"{b}-missing-config", module, fresh("--config", "no-such-preset"), "--config: no preset 'no-such-preset'"),
        Case(f"{b}-zero-width", module, fresh(model__n_embd=0), "model.n_embd must be positive"),
        Case(f"{b}-negative-steps", module, fresh(optim__max_steps=-1), "optim.max_steps must be positive"),
        Case(f"{b}-indivisible-batch", module, fresh(optim__total_batch_size=100), "optim.total_batch_size (100)"),
        Case(f"{b}-nan-lr", module, fresh(optim__max_lr="nan"), "optim.max_lr must be finite"),
        Case(f"{b}-inf-temperature", module, fresh(run__temperature="inf"), "run.temperature must be finite"),
        Case(f"{b}-bad-dtype", module, fresh(run__dtype="fp8"), "run.dtype"),
        Case(f"{b}-unknown-parallel", module, fresh(run__parallel="tp"), "run.parallel must be one of ddp, fsdp"),
        Case(f"{b}-fsdp-size-under-ddp", module, fresh(run__fsdp_size=2), "run.fsdp_size is 2 but run.parallel is ddp"),
        Case(f"{b}-missing-data", module, lambda w, tmp: w.train_argv(b, tmp / "out", data__dir=tmp / "nope"),
             lambda w, tmp: str(tmp / "nope")),
        Case(f"{b}-empty-data", module, lambda w, tmp: w.train_argv(b, tmp / "out", data__dir=w["empty_data"]),
             lambda w, tmp: str(w["empty_data"])),
        Case(f"{b}-out-dir-under-a-file", module, lambda w, tmp: w.train_argv(b, w["a_file"] / "run"),
             lambda w, tmp: f"run.out_dir: cannot create {w['a_file'] / 'run'}: {w['a_file']} is a file"),
        Case(f"{b}-busy-out-dir", module, lambda w, tmp: w.train_argv(b, tmp / "busy"),
             lambda w, tmp: f"run.out_dir: {tmp / 'busy'} is in use by pid",
             during=lambda w, tmp: hold(tmp / "busy", "test")),
        Case(f"{b}-resume-nothing", module, lambda w, tmp: w.train_argv(b, tmp / "out") + ["--resume"],
             "no checkpoint to resume from"),
        Case(f"{b}-resume-a-busy-run-before-its-first-checkpoint", module,
             lambda w, tmp: w.train_argv(b, tmp / "busy") + ["--resume"],
             lambda w, tmp: f"{tmp / 'busy'}: no checkpoint to resume from; it is in use by pid",
             during=lambda w, tmp: hold(tmp / "busy", "test")),
        Case(f"{b}-existing-run-without-resume", module, lambda w, tmp: w.train_argv(b, w[f"{b}_run"]),
             "already holds checkpoints (newest: step_00000002); pass --resume"),
        Case(f"{b}-resume-wrong-shape", module, resume(f"{b}_run", model__n_embd=64), "model.n_embd = 32"),
        Case(f"{b}-resume-into-another-run", module,
             lambda w, tmp: w.train_argv(b, w[f"{b}_garbled"]) + ["--resume", str(w[f"{b}_run"])],
             lambda w, tmp: f"run.out_dir {w[f'{b}_garbled']} already holds another run's checkpoints (newest: "
                            f"step_00000002); --resume alone continues that run"),
        Case(f"{b}-resume-wrong-shape-into-a-new-folder", module,
             lambda w, tmp: fresh("--resume", w[f"{b}_run"], model__n_embd=64)(w, tmp), "model.n_embd = 32"),
        Case(f"{b}-resume-other-batch", module, resume(f"{b}_run", optim__total_batch_size=128),
             "optim.total_batch_size (checkpoint 64, config 128)"),
        Case(f"{b}-resume-busy", module, resume(f"{b}_run"), "is in use by pid",
             during=lambda w, tmp: hold(w[f"{b}_run"], "test")),
        Case(f"{b}-resume-missing-path", module, lambda w, tmp: w.train_argv(b, tmp / "out") + ["--resume",
                                                                                             str(tmp / "none")],
             lambda w, tmp: f"{tmp / 'none'}: no such checkpoint or run folder"),
        Case(f"{b}-resume-other-backend", module,
             lambda w, tmp: w.train_argv(b, tmp / "out") + ["--resume", str(w[f"{OTHER[b]}_run"])],
             lambda w, tmp: f"{w[f'{OTHER[b]}_run'] / 'checkpoints' / 'step_00000002'}: a {OTHER[b]} checkpoint; "
                            f"`python -m parity.convert"),
        Case(f"{b}-malformed-hellaswag", module,
             lambda w, tmp: fresh("--run.hellaswag_path", w["hellaswag_bad"], model__vocab_size=50257,
                                  model__padded_vocab_size=50304)(w, tmp),
             lambda w, tmp: f"run.hellaswag_path: {w['hellaswag_bad']}:1: 'endings' must be a list of 4 strings"),
    ]
    for folder, then in (("bad_magic", ": bad magic"), ("truncated_shard", ": file is 3000 bytes"), ("id_bin", ": token id 300"),
                         ("id_npy", ": token id -5"), ("dtype_npy", ": expected a 1-D integer")):
        cases.append(Case(f"{b}-shard-{folder}", module,
                          lambda w, tmp, f=folder: w.train_argv(b, tmp / "out", data__dir=w[f]),
                          shard_file(folder, then), found_late=folder.startswith("id_")))
    if b == "torch":
        cases += [Case("torch-resume-garbled", module, resume("torch_garbled"), "model.safetensors: sha256"),
                  Case("torch-resume-truncated", module, resume("torch_truncated"), "train_state.pt: sha256"),
                  Case("torch-resume-legacy-truncated", module, resume("torch_legacy_truncated"),
                       "train_state.pt: cannot read optimizer state"),
                  Case("torch-launcher-variable-not-a-number", module, fresh(), "RANK: expected an integer, got 'abc'",
                       during=lambda w, tmp: environment(RANK="abc", WORLD_SIZE="1", LOCAL_RANK="0"))]
    else:
        cases += [Case("jax-resume-garbled", module, resume("jax_garbled"),
                       lambda w, tmp: f"{w['jax_garbled_file']}: sha256"),
                  Case("jax-resume-missing-file", module, resume("jax_missing"),
                       lambda w, tmp: f"{w['jax_missing_file']}: checkpoint file unreadable"),
                  Case("jax-negative-devices", module, fresh("--devices", -1), "--devices must be ≥ 0"),
                  Case("jax-devices-past-the-host-cap", module, fresh("--devices", 2000), "at most 1024 host devices"),
                  Case("jax-launcher-variable-not-a-number", module, fresh(),
                       "JAX_NUM_PROCESSES: expected an integer, got 'two'",
                       during=lambda w, tmp: environment(JAX_NUM_PROCESSES="two"))]
    return cases


CASES = trainer_cases("torch") + trainer_cases("jax")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_trainer_refuses_bad_input(case, fault_world, tmp_path, capsys):
    check_case(case, fault_world, tmp_path, capsys)


def test_the_trainer_table_covers_both_backends_alike():
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES) >= 60
    shared = {i.split("-", 1)[1] for i in ids if i.startswith("torch-")} & {i.split("-", 1)[1] for i in ids
                                                                           if i.startswith("jax-")}
    assert len(shared) >= 28


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_checkpoint_of_the_run_itself_resumes_however_it_is_named(backend, fault_world, monkeypatch):
    """An older step folder of run.out_dir's own run (a roll-back), named relative or through its run folder."""
    from types import SimpleNamespace

    from common.checkpoints import complete_checkpoints
    from common.loop import _resume_folder

    run = fault_world[f"{backend}_run"]
    steps = complete_checkpoints(run)
    me = SimpleNamespace(name=backend)
    monkeypatch.chdir(run / "checkpoints")
    assert _resume_folder(me, Path(".."), steps[0].name)[0].resolve() == steps[0].resolve()
    monkeypatch.chdir(run.parent)
    assert _resume_folder(me, Path(run.name), f"{run.name}/checkpoints")[0].resolve() == steps[-1].resolve()
    assert _resume_folder(me, run, "latest")[0] == steps[-1]
