import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from common.checkpoints import META, CheckpointError, latest_checkpoint
from common.config import Config, ModelConfig
from common.portable import read_portable
from common.schedule import lr_at
from conftest import twenty_step_config, with_optim, with_run
from helpers import (SAVER_MODEL, assert_same_three_steps, batch, check_exact_resume, check_generate_is_seeded,
                     check_non_finite_weights_are_never_saved, check_retention, check_sample_cli,
                     check_train_cli_refusals, kill_mid_save, meta, run_python, saver_script,
                     state_after_a_non_finite_loss, trained_three_steps_and_saved, trainer_args)
from torch_impl import checkpoint as ckpt
from torch_impl import sample
from torch_impl.train import BACKEND, _accumulate_gradients, _apply_update, main


def new_state(cfg: Config):
    return BACKEND.init_state(cfg, BACKEND.setup(cfg))


def weights_of(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def test_weight_decay_groups_hold_exactly_the_2d_params(tmp_path):
    state = new_state(twenty_step_config(tmp_path, tmp_path))
    decay, no_decay = state.optimizer.param_groups
    names = {id(p): n for n, p in state.model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        n for n, p in state.model.named_parameters() if p.ndim >= 2)
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        n for n, p in state.model.named_parameters() if p.ndim < 2)
    assert "wte.weight" in {names[id(p)] for p in decay["params"]}
    assert state.optimizer.defaults["betas"] == (0.9, 0.95) and state.optimizer.defaults["eps"] == 1e-8


def test_accumulation_matches_the_full_batch(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(1, 8, seed=1)
    full, split = new_state(cfg), new_state(cfg)
    loss_full = _accumulate_gradients(full, torch.from_numpy(x).long(), torch.from_numpy(y).long())
    loss_split = _accumulate_gradients(split, torch.from_numpy(x.reshape(2, 4, 16)).long(),
                                      torch.from_numpy(y.reshape(2, 4, 16)).long())
    assert abs(loss_full.item() - loss_split.item()) < 1e-6
    grads = {}
    for (name, a), b in zip(full.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0, msg=name)
        grads[name] = (a.grad.clone(), (a.grad - b.grad).abs())
    norm_full, _ = _apply_update(full)
    lr, eps = full.optimizer.param_groups[0]["lr"], cfg.optim.eps  # the step's own lr, set by _apply_update
    norm_split, _ = _apply_update(split)
    assert abs(norm_full.item() - norm_split.item()) < 1e-6
    for (name, a), b in zip(full.model.named_parameters(), split.model.parameters()):
        # Adam's first step moves a weight by lr·g/(|g| + eps), whose slope in g is lr·eps/(|g| + eps)²: where |g|
        # is a few eps, a rounding-level gradient difference (another GEMM library sums in another order) moves
        # the weight by far more than rounding. The bound is that slope times the measured difference, twice.
        g, dg = grads[name]
        bound = 1e-6 + 2 * lr * eps * dg / (g.abs() + eps) ** 2
        worst = ((a - b).abs() - bound).max().item()
        assert worst <= 0, f"{name}: {worst:.3g} over the bound"


def test_schedule_is_applied_every_step(tmp_path):
    cfg = with_optim(twenty_step_config(tmp_path, tmp_path), warmup_steps=3, max_steps=8, min_lr=1e-4)
    state = new_state(cfg)
    x, y = batch(1, 2)
    for step in range(10):  # past max_steps the schedule holds min_lr
        state, m = BACKEND.train_step(state, x, y)
        assert m["lr"] == lr_at(step, cfg.optim)
        assert all(g["lr"] == lr_at(step, cfg.optim) for g in state.optimizer.param_groups)
    assert state.step == 10
    assert lr_at(0, cfg.optim) == pytest.approx(1e-3) and lr_at(9, cfg.optim) == 1e-4


def test_grad_clip_zero_reports_the_norm_without_clipping(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(1, 4)
    clipped, free = new_state(with_optim(cfg, grad_clip=1e-3)), new_state(with_optim(cfg, grad_clip=0.0))
    _, m1 = BACKEND.train_step(clipped, x, y)
    _, m2 = BACKEND.train_step(free, x, y)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-6)
    assert float(m1["grad_norm"]) > 1e-3  # so the first one did clip...
    moved_clipped = (clipped.model.wte.weight - new_state(cfg).model.wte.weight).abs().max()
    moved_free = (free.model.wte.weight - new_state(cfg).model.wte.weight).abs().max()
    assert moved_clipped < moved_free  # ...and it changed the update


def same_weights(a, b) -> bool:
    wa, wb = weights_of(a), weights_of(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exact_resume_through_the_loop(tmp_path, tiny_shards):
    check_exact_resume(BACKEND, tiny_shards, tmp_path, same_weights)


def test_checkpoint_roundtrip_restores_the_optimizer(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    state, path = trained_three_steps_and_saved(BACKEND, cfg, x, y, tmp_path)
    # The weights are plain safetensors under the common names.
    common = ckpt.read_weights(path, cfg)
    assert all(np.array_equal(common[k], v.numpy()) for k, v in weights_of(state).items())
    assert set(common) == set(BACKEND.to_common(state))
    loaded, saved = BACKEND.load_checkpoint(tmp_path, cfg, state.dist)  # a run folder: its newest
    assert saved.step == 3 and saved.val_loss == 2.5 and loaded.step == 3
    assert latest_checkpoint(tmp_path) == path
    _, m1 = BACKEND.train_step(state, x, y)
    _, m2 = BACKEND.train_step(loaded, x, y)
    assert float(m1["loss"]) == float(m2["loss"]) and float(m1["grad_norm"]) == float(m2["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), loaded.model.parameters()))


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    check_retention(BACKEND, tmp_path)


def test_bad_checkpoints_raise_checkpoint_error_naming_the_path(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    state = new_state(cfg)
    dist = state.dist
    with pytest.raises(CheckpointError, match="nowhere"):
        BACKEND.load_checkpoint(tmp_path / "nowhere", cfg, dist)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        BACKEND.load_checkpoint(tmp_path, cfg, dist)
    path = BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 1))
    (path / META).rename(tmp_path / META)  # what a save killed before its meta.json looks like
    with pytest.raises(CheckpointError, match="incomplete"):
        BACKEND.load_checkpoint(path, cfg, dist)
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / META).rename(path / META)
    (path / ckpt.TRAIN_STATE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        BACKEND.load_checkpoint(path, cfg, dist)


def test_checkpoint_of_another_shape_refuses_to_load_naming_the_field(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    state = new_state(cfg)
    BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 1))
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=64))
    with pytest.raises(CheckpointError, match=r"model\.n_embd = 32.*64"):
        BACKEND.load_checkpoint(tmp_path, wider, state.dist)


# AdamW's moments populated, so saves are full-size.
SAVER = saver_script("torch_impl.train", """
    for p in state.model.parameters():
        state.optimizer.state[p] = {"step": __import__("torch").tensor(1.0), "exp_avg": p.detach().clone(),
                                    "exp_avg_sq": p.detach().clone()}
    """)


def test_atomic_save_survives_sigkill(tmp_path):
    # A save is brief: poll often enough to catch one in flight.
    kill_mid_save(SAVER, tmp_path, lambda p: p.name.startswith(".tmp-"), poll=0.005)
    root = tmp_path / "checkpoints"
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the killed save's leftovers...
    steps = [p for p in root.iterdir() if p.name.startswith("step_")]
    assert steps and all((p / META).is_file() for p in steps)  # ...never look complete
    newest = latest_checkpoint(tmp_path)
    cfg = Config(model=ModelConfig(**SAVER_MODEL))
    state, saved = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))
    assert saved.step == int(newest.name.split("_")[1]) >= 1
    assert state.model.wte.weight.shape == (50304, 256)


def poison(state):
    with torch.no_grad():
        state.model.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    return state


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_shards):
    state = state_after_a_non_finite_loss(BACKEND, poison, tiny_shards, tmp_path)
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


def test_non_finite_weights_after_a_finite_step_are_never_checkpointed(tmp_path, tiny_shards):
    state = check_non_finite_weights_are_never_saved(BACKEND, poison, tiny_shards, tmp_path)
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


def test_bf16_autocast_runs_on_cpu_close_to_fp32(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    fp32, bf16 = new_state(cfg), new_state(with_run(cfg, dtype="bf16"))
    for _ in range(3):
        _, m32 = BACKEND.train_step(fp32, x, y)
        _, m16 = BACKEND.train_step(bf16, x, y)
        assert np.isfinite(float(m16["loss"])) and abs(float(m16["loss"]) - float(m32["loss"])) < 0.05
    assert bf16.model.wte.weight.dtype == torch.float32  # master weights stay fp32
    assert bf16.optimizer.state[bf16.model.wte.weight]["exp_avg"].dtype == torch.float32


def test_fp16_with_grad_scaler_and_fp64_modes(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    fp32 = new_state(cfg)
    _, m32 = BACKEND.train_step(fp32, x, y)
    fp16 = new_state(with_run(cfg, dtype="fp16"))
    assert fp16.scaler is not None
    _, m16 = BACKEND.train_step(fp16, x, y)
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05
    fp64 = new_state(with_run(cfg, dtype="fp64"))
    _, m64 = BACKEND.train_step(fp64, x, y)
    assert fp64.model.wte.weight.dtype == torch.float64 and m64["loss"].dtype == torch.float64
    assert abs(float(m64["loss"]) - float(m32["loss"])) < 1e-5
    path = BACKEND.save_checkpoint(fp64, tmp_path, meta(BACKEND, fp64.cfg, 1))
    loaded, _ = BACKEND.load_checkpoint(path, fp64.cfg, fp64.dist)
    assert all(torch.equal(a, b) for a, b in zip(fp64.model.parameters(), loaded.model.parameters()))


def test_evaluate_is_the_mean_batch_loss_and_leaves_training_mode(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    state = new_state(cfg)
    x, y = batch(3, 4)
    val = BACKEND.evaluate(state, zip(x, y))
    with torch.no_grad():
        losses = [state.model(torch.from_numpy(a).long(), torch.from_numpy(b).long())[1].item() for a, b in zip(x, y)]
    assert val == pytest.approx(np.mean(losses), abs=1e-6)
    assert state.model.training


def test_generate_is_seeded_and_crops_the_context(tmp_path):
    check_generate_is_seeded(BACKEND, new_state(twenty_step_config(tmp_path, tmp_path)))


def test_train_cli_and_bad_flags(tmp_path, tiny_shards, capsys):
    check_train_cli_refusals(BACKEND, main, tiny_shards, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err) and "n_layr" in err[0]


def test_sample_cli_from_checkpoint_and_hf_folder(tmp_path, capsys):
    check_sample_cli(BACKEND, sample.main, tmp_path, capsys)


def test_two_process_ddp_matches_one_process(tmp_path, tiny_shards):
    common = trainer_args(tiny_shards, {"model.n_layer": 2, "optim.total_batch_size": 128, "optim.max_steps": 3,
                                        "data.val_tokens": 128, "run.eval_interval": 3, "run.checkpoint_interval": 3})
    run_python(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "torch_impl.train",
                *common, "--run.out_dir", str(tmp_path / "ddp")], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert main([*common, "--run.out_dir", str(tmp_path / "one")]) == 0
    assert_same_three_steps(tmp_path / "ddp", tmp_path / "one")


def test_compiled_step_matches_eager(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    eager, compiled = new_state(cfg), new_state(with_run(cfg, compile=True))
    for _ in range(2):
        _, me = BACKEND.train_step(eager, x, y)
        _, mc = BACKEND.train_step(compiled, x, y)
        assert abs(float(me["loss"]) - float(mc["loss"])) < 1e-5
        assert abs(float(me["grad_norm"]) - float(mc["grad_norm"])) < 1e-5 * float(me["grad_norm"])
    assert BACKEND.evaluate(compiled, zip(x, y)) == pytest.approx(BACKEND.evaluate(eager, zip(x, y)), abs=1e-5)


def test_sample_module_reads_the_prompt_from_stdin(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    BACKEND.save_checkpoint(new_state(cfg), tmp_path, meta(BACKEND, cfg, 1))
    done = run_python(["-m", "torch_impl.sample", "--checkpoint", str(tmp_path), "--max-new-tokens", "4",
                       "--top-k", "5"], timeout=120, input="x,y")
    assert done.stdout.startswith("x,y") and len(done.stdout) > len("x,y\n")


def test_a_checkpoint_of_the_previous_layout_still_loads(tmp_path):
    """Earlier saves also wrote a COMPLETE file, and their config held run.progress (since removed)."""
    cfg = twenty_step_config(tmp_path, tmp_path)
    state = new_state(cfg)
    path = BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 1))
    old = json.loads((path / META).read_text())
    old["config"]["run"]["progress"] = True
    (path / META).write_text(json.dumps(old))
    (path / "COMPLETE").write_text("1\n")
    loaded, saved = BACKEND.load_checkpoint(tmp_path, cfg, state.dist)
    assert saved.step == 1 and same_weights(state, loaded)
    assert set(read_portable(tmp_path).weights) == set(weights_of(state))
