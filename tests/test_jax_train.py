import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.checkpoints import META, CheckpointError, latest_checkpoint
from common.config import Config, ConfigError, ModelConfig
from common.schedule import lr_at
from conftest import TINY_VOCAB, twenty_step_config, with_optim, with_run
from helpers import (ROOT, SAVER_MODEL, assert_same_three_steps, batch, check_exact_resume, check_generate_is_seeded,
                     check_non_finite_weights_are_never_saved, check_retention, check_sample_cli,
                     check_train_cli_refusals, kill_mid_save, meta, run_python, saver_script,
                     state_after_a_non_finite_loss, trained_three_steps_and_saved, trainer_args)
from jax_impl import checkpoint as ckpt
from jax_impl import sample
from jax_impl.layout import flatten, unflatten, unstacked
from jax_impl.optim import clipping, decay_mask, lr_schedule
from jax_impl.train import BACKEND, main


def new_state(cfg: Config):
    return BACKEND.init_state(cfg, BACKEND.setup(cfg))


def weights_of(state) -> dict[str, np.ndarray]:
    return BACKEND.to_common(state)


def same_tree(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda u, v: bool(np.array_equal(np.asarray(u), np.asarray(v))), a, b))


def test_weight_decay_groups_hold_exactly_the_2d_params(tmp_path):
    state = new_state(twenty_step_config(tmp_path, tmp_path))
    mask = flatten(decay_mask(state.params))
    # Each layer's tensor decides: a stacked LayerNorm gain is 2-D but decays no more than one layer's.
    shapes = {k: v.shape[1:] if k.startswith("h.") else v.shape for k, v in flatten(state.params).items()}
    assert sorted(k for k, m in mask.items() if m) == sorted(k for k, s in shapes.items() if len(s) >= 2)
    assert mask["wte.weight"] and mask["h.attn.c_proj.weight"]
    assert not mask["h.ln_1.weight"] and not mask["h.mlp.c_fc.bias"]
    # A decayed and an undecayed parameter with zero gradient: only the first shrinks, by lr·wd.
    cfg = twenty_step_config(tmp_path, tmp_path)
    from jax_impl.optim import build_optimizer
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = build_optimizer(params, cfg)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    lr0 = lr_at(0, cfg.optim)
    np.testing.assert_allclose(updates["w"], -lr0 * 0.1 * np.ones((2, 2)), rtol=1e-6)
    assert (updates["b"] == 0).all()


def rel_norm_diff(a: dict, b: dict, base: dict) -> float:
    """‖a − b‖ / ‖a − base‖ over all tensors (Adam amplifies near-zero gradients elementwise, so not per element)."""
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
    den = sum(float(np.sum((a[k].astype(np.float64) - base[k]) ** 2)) for k in a)
    return (num / den) ** 0.5


def test_accumulation_matches_the_full_batch(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(1, 8)
    xs, ys = x.reshape(2, 4, 16), y.reshape(2, 4, 16)
    state = new_state(cfg)
    rt = BACKEND.runtime(cfg)
    key = jax.random.PRNGKey(0)
    g_full, l_full = rt.grads(state.params, jnp.asarray(x), jnp.asarray(y), key)
    g_split, l_split = rt.grads(state.params, jnp.asarray(xs), jnp.asarray(ys), key)
    assert l_full.shape == (1,) and l_split.shape == (2,)
    assert abs(float(l_full.mean()) - float(l_split.mean())) < 1e-6
    a, b = flatten(g_full), flatten(g_split)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0, err_msg=k)
    assert abs(float(optax.tree.norm(g_full)) - float(optax.tree.norm(g_split))) < 1e-6
    # One optimizer step on each: Adam amplifies near-zero gradients elementwise, so compare by norm.
    full, m_full = BACKEND.train_step(new_state(cfg), x, y)
    split, m_split = BACKEND.train_step(new_state(cfg), xs, ys)
    assert abs(float(m_full["loss"]) - float(m_split["loss"])) < 1e-6
    assert rel_norm_diff(weights_of(full), weights_of(split), weights_of(new_state(cfg))) < 1e-4


def test_schedule_is_applied_every_step(tmp_path):
    cfg = with_optim(twenty_step_config(tmp_path, tmp_path), warmup_steps=3, max_steps=8, min_lr=1e-4)
    schedule = lr_schedule(cfg.optim, jnp.float32)
    state = new_state(cfg)
    x, y = batch(1, 2)
    for step in range(10):  # past max_steps the schedule holds min_lr
        assert float(schedule(step)) == np.float32(lr_at(step, cfg.optim))
        before = weights_of(state)["ln_f.bias"]
        state, m = BACKEND.train_step(state, x, y)
        assert float(m["lr"]) == np.float32(lr_at(step, cfg.optim))
        if step == 0:  # Adam's first step moves every parameter with a gradient by ±lr (no decay on biases)
            moved = np.abs(weights_of(state)["ln_f.bias"] - before)
            np.testing.assert_allclose(moved, lr_at(0, cfg.optim), rtol=1e-3)
    assert int(state.step) == 10
    assert lr_at(0, cfg.optim) == pytest.approx(1e-3) and lr_at(9, cfg.optim) == 1e-4


def test_clip_uses_torch_formula_and_reports_the_pre_clip_norm():
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # global norm 5
    tx = clipping(1.0)
    clipped, state = tx.update(grads, tx.init(grads))
    assert float(state.grad_norm) == 5.0
    coef = np.float32(1.0) / (np.float32(5.0) + np.float32(1e-6))
    np.testing.assert_array_equal(clipped["a"], np.array([3.0, 0.0], np.float32) * coef)
    unclipped, state = clipping(10.0).update(grads, tx.init(grads))
    np.testing.assert_array_equal(unclipped["b"], grads["b"])  # min(1, ...) never scales up
    assert optax.tree.norm(clipped) < 1.0


def test_grad_clip_zero_reports_the_norm_without_clipping(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(1, 4)
    clipped, m1 = BACKEND.train_step(new_state(with_optim(cfg, grad_clip=1e-3)), x, y)
    free, m2 = BACKEND.train_step(new_state(with_optim(cfg, grad_clip=0.0)), x, y)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-6)
    assert float(m1["grad_norm"]) > 1e-3  # so the first one did clip...
    init = weights_of(new_state(cfg))["wte.weight"]
    moved_clipped = np.abs(weights_of(clipped)["wte.weight"] - init).max()
    moved_free = np.abs(weights_of(free)["wte.weight"] - init).max()
    assert moved_clipped < moved_free  # ...and it changed the update


def same_weights(a, b) -> bool:
    wa, wb = weights_of(a), weights_of(b)
    return all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_exact_resume_through_the_loop(tmp_path, tiny_shards):
    check_exact_resume(BACKEND, tiny_shards, tmp_path, same_weights)


def test_checkpoint_roundtrip_restores_the_optimizer(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    state, path = trained_three_steps_and_saved(BACKEND, cfg, x, y, tmp_path)
    assert path.name == "step_00000003" and (path / "meta.json").is_file()
    assert {p.name for p in path.iterdir()} >= {"params", "opt_state", "rng", "meta.json"}
    common = ckpt.read_weights(path, cfg)  # the weights come back under the common names
    assert all(np.array_equal(common[k], v) for k, v in weights_of(state).items())
    loaded, saved = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))  # a run folder: its newest
    assert saved.step == 3 and saved.val_loss == 2.5 and int(loaded.step) == 3
    assert latest_checkpoint(tmp_path) == path
    assert same_tree(state.opt_state, loaded.opt_state) and same_tree(state.rng, loaded.rng)
    state, m1 = BACKEND.train_step(state, x, y)
    loaded, m2 = BACKEND.train_step(loaded, x, y)
    assert float(m1["loss"]) == float(m2["loss"]) and float(m1["grad_norm"]) == float(m2["grad_norm"])
    assert same_tree(state.params, loaded.params)


def test_a_checkpoint_saved_with_the_blocks_per_layer_loads_stacked(tmp_path):
    """A checkpoint holding the blocks layer by layer (h.0, h.1, ...) resumes, and its weights and moments
    read, as the same numbers as the stacked one."""
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    state, _ = trained_three_steps_and_saved(BACKEND, cfg, x, y, tmp_path / "stacked")
    def per_layer(tree):
        return ckpt._each_params_tree(lambda t: unflatten(unstacked(t)), tree)
    old = state.replace(params=per_layer(state.params), opt_state=per_layer(state.opt_state))
    assert "0" in old.params["h"] and "0" in old.opt_state[1][0].mu["h"]
    path = ckpt.save_checkpoint(old, tmp_path / "per-layer", meta(BACKEND, cfg, 3))
    loaded, _ = BACKEND.load_checkpoint(path, cfg, BACKEND.setup(cfg))
    assert same_tree(state.params, loaded.params) and same_tree(state.opt_state, loaded.opt_state)
    assert loaded.params["h"]["attn"]["c_attn"]["weight"].shape[0] == cfg.model.n_layer
    common = ckpt.read_weights(path, cfg)
    assert all(np.array_equal(common[k], v) for k, v in weights_of(state).items())
    moments = ckpt.read_moments(path, cfg)
    assert all(np.array_equal(moments["v"][k], v) for k, v in BACKEND.optimizer_moments(state)["v"].items())
    state, m1 = BACKEND.train_step(state, x, y)
    loaded, m2 = BACKEND.train_step(loaded, x, y)
    assert float(m1["loss"]) == float(m2["loss"]) and same_tree(state.params, loaded.params)


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    check_retention(BACKEND, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004", "step_00000005"]


def test_bad_checkpoints_raise_checkpoint_error_naming_the_path(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    state = new_state(cfg)
    dist = BACKEND.setup(cfg)
    with pytest.raises(CheckpointError, match="nowhere"):
        BACKEND.load_checkpoint(tmp_path / "nowhere", cfg, dist)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        BACKEND.load_checkpoint(tmp_path, cfg, dist)
    path = BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 1))
    (path / META).unlink()  # what a save killed between orbax's rename and meta.json looks like
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        BACKEND.load_checkpoint(path, cfg, dist)
    assert latest_checkpoint(tmp_path) is None
    path = BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 1))  # replaces it
    assert latest_checkpoint(tmp_path) == path
    for f in (path / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(path)):
        BACKEND.load_checkpoint(path, cfg, dist)


def test_checkpoint_of_another_shape_refuses_to_load_naming_the_field(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    state = new_state(cfg)
    BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 1))
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=64))
    with pytest.raises(CheckpointError, match=r"model\.n_embd = 32.*64"):
        BACKEND.load_checkpoint(tmp_path, wider, BACKEND.setup(wider))


def test_atomic_save_survives_sigkill(tmp_path):
    # Kill while a later save is in flight: orbax's temporary folder exists then.
    kill_mid_save(saver_script("jax_impl.train"), tmp_path, lambda p: "tmp" in p.name, poll=0.002)
    root = tmp_path / "checkpoints"
    steps = [p for p in root.iterdir() if p.name.startswith("step_") and "tmp" not in p.name]
    assert steps and any("tmp" in p.name for p in root.iterdir())  # the killed save's leftovers...
    newest = latest_checkpoint(tmp_path)
    assert newest is not None and (newest / "meta.json").is_file()  # ...never look complete
    cfg = Config(model=ModelConfig(**SAVER_MODEL))
    state, saved = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))
    assert saved.step == int(newest.name.split("_")[1]) >= 1
    assert state.params["wte"]["weight"].shape == (50304, 256)
    # The next save cleans the leftovers up.
    BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 1000))
    assert not any("tmp" in p.name for p in root.iterdir())


def poison(state):
    flat = flatten(state.params)
    flat["h.mlp.c_fc.weight"] = flat["h.mlp.c_fc.weight"].at[0, 0, 0].set(jnp.inf)  # layer 0's
    return state.replace(params=unflatten(flat))


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_shards):
    state = state_after_a_non_finite_loss(BACKEND, poison, tiny_shards, tmp_path)
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(state.params))


def test_non_finite_weights_after_a_finite_step_are_never_checkpointed(tmp_path, tiny_shards):
    state = check_non_finite_weights_are_never_saved(BACKEND, poison, tiny_shards, tmp_path)
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(state.params))


def test_bf16_autocast_runs_on_cpu_close_to_fp32(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    fp32, bf16 = new_state(cfg), new_state(with_run(cfg, dtype="bf16"))
    for _ in range(3):
        fp32, m32 = BACKEND.train_step(fp32, x, y)
        bf16, m16 = BACKEND.train_step(bf16, x, y)
        assert np.isfinite(float(m16["loss"])) and abs(float(m16["loss"]) - float(m32["loss"])) < 0.05
        assert m16["loss"].dtype == jnp.float32
    # master weights and Adam's moments stay fp32 (the other leaves are integer step counters)
    leaves = jax.tree.leaves((bf16.params, bf16.opt_state))
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in leaves)
    assert sum(leaf.dtype == jnp.float32 for leaf in leaves) > 3 * len(jax.tree.leaves(bf16.params))


def test_fp16_is_refused_and_fp64_mode_runs(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="run.dtype"):
        BACKEND.setup(with_run(cfg, dtype="fp16"))
    x, y = batch(2, 4)
    _, m32 = BACKEND.train_step(new_state(cfg), x, y)
    cfg64 = with_run(cfg, dtype="fp64")
    try:
        fp64, m64 = BACKEND.train_step(new_state(cfg64), x, y)
        assert jax.config.jax_enable_x64
        assert fp64.params["wte"]["weight"].dtype == jnp.float64 and m64["loss"].dtype == jnp.float64
        assert abs(float(m64["loss"]) - float(m32["loss"])) < 1e-5
        path = BACKEND.save_checkpoint(fp64, tmp_path, meta(BACKEND, cfg64, 1))
        loaded, _ = BACKEND.load_checkpoint(path, cfg64, BACKEND.setup(cfg64))
        assert same_tree(fp64.params, loaded.params)
    finally:
        BACKEND.setup(cfg)  # back to x64 off for the other tests
    assert not jax.config.jax_enable_x64


def test_evaluate_is_the_mean_batch_loss(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    state = new_state(cfg)
    x, y = batch(3, 4)
    val = BACKEND.evaluate(state, zip(x, y))
    rt = BACKEND.runtime(cfg)
    losses = [float(rt.eval_loss(state.params, jnp.asarray(a), jnp.asarray(b))) for a, b in zip(x, y)]
    assert val == pytest.approx(np.mean(losses), abs=1e-6)
    # evaluation does not touch the training state: the next step is the same as without it
    _, m1 = BACKEND.train_step(state, x[:1], y[:1])
    _, m2 = BACKEND.train_step(new_state(cfg), x[:1], y[:1])
    assert float(m1["loss"]) == float(m2["loss"])


def test_generate_is_seeded_and_crops_the_context(tmp_path):
    a = check_generate_is_seeded(BACKEND, new_state(twenty_step_config(tmp_path, tmp_path)))
    assert a.max() < TINY_VOCAB


def test_train_cli_and_bad_flags(tmp_path, tiny_shards, capsys):
    args = check_train_cli_refusals(BACKEND, main, tiny_shards, tmp_path)
    assert main(args + ["--resume", "--devices", "64"]) == 2  # more devices than this process has
    assert main(args + ["--run.dtype", "fp16", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err) and "n_layr" in err[0]
    assert "run.devices" in err[2] and "run.dtype" in err[3]


def test_sample_cli_from_checkpoint_and_hf_folder(tmp_path, capsys):
    check_sample_cli(BACKEND, sample.main, tmp_path, capsys)


def test_four_devices_match_one_device(tmp_path, tiny_shards):
    common = trainer_args(tiny_shards, {"model.n_layer": 2, "optim.total_batch_size": 256, "optim.max_steps": 3,
                                        "data.val_tokens": 256, "run.eval_interval": 3, "run.checkpoint_interval": 3})
    # The device count is fixed when JAX starts, so 4 host devices need a fresh process; `--devices 4`
    # makes jax_impl set XLA_FLAGS before importing JAX. 4 devices × 1 micro-step vs 1 device × 4.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launched = run_python(["-m", "jax_impl.train", *common, "--devices", "4", "--run.out_dir", str(tmp_path / "four")],
                          env=env)
    assert "4 replicas" in launched.stdout
    assert main([*common, "--run.out_dir", str(tmp_path / "one")]) == 0
    assert_same_three_steps(tmp_path / "four", tmp_path / "one")


def test_two_processes_launched_as_the_readme_says_match_one_process(tmp_path, tiny_shards):
    readme = (ROOT / "README.md").read_text()
    assert "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m jax_impl.train" in readme
    common = trainer_args(tiny_shards, {"model.n_layer": 2, "optim.total_batch_size": 128, "optim.max_steps": 3,
                                        "data.val_tokens": 128, "run.eval_interval": 3, "run.checkpoint_interval": 3})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "jax_impl.train", *common, "--run.out_dir", str(tmp_path / "two")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "PYTHONPATH": str(ROOT), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "(2 replicas, 2 processes)" in outputs[0][0]
    assert main([*common, "--run.out_dir", str(tmp_path / "one")]) == 0
    assert_same_three_steps(tmp_path / "two", tmp_path / "one")


def test_parity_hooks_logits_grads_and_moments_roundtrip(tmp_path):
    cfg = twenty_step_config(tmp_path, tmp_path)
    state = new_state(cfg)
    x, y = batch(2, 4)
    logits = BACKEND.logits(state, x[0])
    assert logits.shape == (4, 16, TINY_VOCAB) and logits.dtype == np.float32
    grads = BACKEND.grads(state, x, y)
    assert {k: v.shape for k, v in grads.items()} == {k: v.shape for k, v in weights_of(state).items()}
    state, m = BACKEND.train_step(state, x, y)
    norm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
    assert norm == pytest.approx(float(m["grad_norm"]), rel=1e-6)  # grads() is what the step applied
    state, _ = BACKEND.train_step(state, x, y)
    moments = BACKEND.optimizer_moments(state)
    assert moments["step"] == 2 and set(moments["m"]) == set(moments["v"]) == set(grads)
    assert all(np.any(v != 0) for v in moments["v"].values() if v.size > 1)
    # Weights + moments are all a training state is (dropout 0): a rebuilt state continues identically.
    rebuilt = BACKEND.init_state(cfg, BACKEND.setup(cfg), weights=weights_of(state), moments=moments)
    assert int(rebuilt.step) == 2 and BACKEND.optimizer_moments(rebuilt)["step"] == 2
    state, m1 = BACKEND.train_step(state, x, y)
    rebuilt, m2 = BACKEND.train_step(rebuilt, x, y)
    assert float(m1["lr"]) == float(m2["lr"]) == np.float32(lr_at(2, cfg.optim))
    assert float(m1["loss"]) == float(m2["loss"])
    assert same_tree(state.params, rebuilt.params)


def test_a_folder_left_by_a_killed_save_draws_no_orbax_warning(tmp_path, caplog):
    # A save killed after orbax renamed its folder but before it wrote its metadata leaves this; the next save
    # deletes it (the rest of the run is unaffected), so orbax's warning about it is noise.
    cfg = Config(model=ModelConfig(vocab_size=256, padded_vocab_size=256, block_size=16, n_layer=1, n_head=2,
                                   n_embd=32))
    state = BACKEND.init_state(cfg, BACKEND.setup(cfg))
    first = BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 1))
    leftover = first.parent / "step_00000002"
    shutil.copytree(first, leftover)
    (leftover / "_CHECKPOINT_METADATA").unlink()
    (leftover / "meta.json").unlink()
    with caplog.at_level(logging.INFO):
        state, _ = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))
        BACKEND.save_checkpoint(state, tmp_path, meta(BACKEND, cfg, 3))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert [p.name for p in sorted(first.parent.iterdir())] == ["step_00000001", "step_00000003"]
