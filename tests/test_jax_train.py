import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.checkpoints import CheckpointError
from common.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig
from common.loop import NonFiniteError, train
from common.records import read_records
from common.schedule import lr_at
from common.shards import write_shard
from jax_impl import checkpoint as ckpt
from jax_impl import sample
from jax_impl.model import flatten, unflatten
from jax_impl.optim import clip_by_global_norm_torch, decay_mask, lr_schedule
from jax_impl.train import BACKEND, main

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 256


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    # A learnable stream (a noisy repeating pattern) so losses move visibly in a few steps.
    pattern = rng.integers(0, VOCAB, 97)
    train_tokens = np.tile(pattern, 400)[:30000]
    noise = rng.random(train_tokens.size) < 0.1
    train_tokens[noise] = rng.integers(0, VOCAB, noise.sum())
    write_shard(folder / "tiny_train_000000.bin", train_tokens, vocab_size=VOCAB)
    write_shard(folder / "tiny_val_000000.bin", np.tile(pattern, 30), vocab_size=VOCAB)
    return folder


def tiny_config(data_dir: Path, out_dir: Path, **run) -> Config:
    return Config(
        model=ModelConfig(vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32),
        optim=OptimConfig(total_batch_size=128, micro_batch_size=4, max_lr=3e-3, min_lr=3e-4, warmup_steps=5,
                          max_steps=20),
        data=DataConfig(dir=str(data_dir), val_tokens=256),
        run=RunConfig(**{"eval_interval": 10, "checkpoint_interval": 10, "num_samples": 0, "log_interval": 0,
                         "progress": False, "out_dir": str(out_dir), **run}),
    )


def with_optim(cfg: Config, **kw) -> Config:
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **kw))


def with_run(cfg: Config, **kw) -> Config:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **kw))


def batch(accum: int, rows: int, T: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    buf = np.random.default_rng(seed).integers(0, VOCAB, (accum * rows * T + 1)).astype(np.int32)
    return buf[:-1].reshape(accum, rows, T), buf[1:].reshape(accum, rows, T)


def new_state(cfg: Config):
    return BACKEND.init_state(cfg, BACKEND.setup(cfg))


def weights_of(state) -> dict[str, np.ndarray]:
    return BACKEND.to_common(state)


def same_tree(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda u, v: bool(np.array_equal(np.asarray(u), np.asarray(v))), a, b))


def test_weight_decay_groups_hold_exactly_the_2d_params(tmp_path):
    state = new_state(tiny_config(tmp_path, tmp_path))
    mask = flatten(decay_mask(state.params))
    shapes = {k: v.shape for k, v in flatten(state.params).items()}
    assert sorted(k for k, m in mask.items() if m) == sorted(k for k, s in shapes.items() if len(s) >= 2)
    assert mask["wte.weight"] and mask["h.0.attn.c_proj.weight"]
    assert not mask["h.0.ln_1.weight"] and not mask["h.0.mlp.c_fc.bias"]
    # A decayed and an undecayed parameter with zero gradient: only the first shrinks, by lr·wd.
    cfg = tiny_config(tmp_path, tmp_path)
    from jax_impl.optim import build_optimizer
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = build_optimizer(params, cfg)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    lr0 = lr_at(0, cfg.optim)
    np.testing.assert_allclose(updates["w"], -lr0 * 0.1 * np.ones((2, 2)), rtol=1e-6)
    assert (updates["b"] == 0).all()


def rel_norm_diff(a: dict, b: dict, base: dict) -> float:
    """‖a − b‖ / ‖a − base‖ over all tensors (parity-notes: Adam amplifies near-zero gradients elementwise)."""
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
    den = sum(float(np.sum((a[k].astype(np.float64) - base[k]) ** 2)) for k in a)
    return (num / den) ** 0.5


def test_accumulation_matches_the_full_batch(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
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
    cfg = with_optim(tiny_config(tmp_path, tmp_path), warmup_steps=3, max_steps=8, min_lr=1e-4)
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
    tx = clip_by_global_norm_torch(1.0)
    clipped, state = tx.update(grads, tx.init(grads))
    assert float(state.grad_norm) == 5.0
    coef = np.float32(1.0) / (np.float32(5.0) + np.float32(1e-6))
    np.testing.assert_array_equal(clipped["a"], np.array([3.0, 0.0], np.float32) * coef)
    unclipped, state = clip_by_global_norm_torch(10.0).update(grads, tx.init(grads))
    np.testing.assert_array_equal(unclipped["b"], grads["b"])  # min(1, ...) never scales up
    assert optax.tree.norm(clipped) < 1.0


def test_grad_clip_zero_reports_the_norm_without_clipping(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    x, y = batch(1, 4)
    clipped, m1 = BACKEND.train_step(new_state(with_optim(cfg, grad_clip=1e-3)), x, y)
    free, m2 = BACKEND.train_step(new_state(with_optim(cfg, grad_clip=0.0)), x, y)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-6)
    assert float(m1["grad_norm"]) > 1e-3  # so the first one did clip...
    init = weights_of(new_state(cfg))["wte.weight"]
    moved_clipped = np.abs(weights_of(clipped)["wte.weight"] - init).max()
    moved_free = np.abs(weights_of(free)["wte.weight"] - init).max()
    assert moved_clipped < moved_free  # ...and it changed the update


def test_exact_resume_through_the_loop(tmp_path, data_dir):
    straight = train(BACKEND, tiny_config(data_dir, tmp_path / "a"), log=lambda *a: None)
    assert [c.name for c in ckpt.complete_checkpoints(tmp_path / "a")] == ["step_00000010", "step_00000020"]
    # Stopping after step 10 leaves exactly what this run saved at step 10: resume from a copy of it.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "a" / "checkpoints" / "step_00000010", tmp_path / "b" / "checkpoints" / "step_00000010")
    resumed = train(BACKEND, tiny_config(data_dir, tmp_path / "b"), resume="latest", log=lambda *a: None)
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in straight.records]
    assert [r["grad_norm"] for r in resumed.records] == [r["grad_norm"] for r in straight.records]
    assert resumed.records[-1]["val_loss"] == straight.records[-1]["val_loss"]
    a, b = weights_of(straight.state), weights_of(resumed.state)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert straight.records[-1]["loss"] < straight.records[0]["loss"] - 0.5  # it learned something
    meta = json.loads((tmp_path / "b" / "checkpoints" / "step_00000020" / "meta.json").read_text())
    assert meta["step"] == 20 and meta["val_loss"] == straight.records[-1]["val_loss"]
    assert [r["step"] for r in read_records(tmp_path / "b" / "metrics.jsonl")] == list(range(10, 20))


def test_checkpoint_roundtrip_restores_the_optimizer(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    state = new_state(cfg)
    x, y = batch(2, 4)
    for _ in range(3):
        state, _ = BACKEND.train_step(state, x, y)
    path = BACKEND.save_checkpoint(state, tmp_path, 3, {"config": cfg.to_dict(), "step": 3}, 2.5)
    assert path.name == "step_00000003" and (path / "meta.json").is_file()
    assert {p.name for p in path.iterdir()} >= {"params", "opt_state", "rng", "meta.json"}
    common = ckpt.read_common_weights(path)  # the weights come back under the common names
    assert all(np.array_equal(common[k], v) for k, v in weights_of(state).items())
    loaded, meta = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))  # a run folder: its newest
    assert meta["step"] == 3 and meta["val_loss"] == 2.5 and int(loaded.step) == 3
    assert BACKEND.latest_checkpoint(tmp_path) == path
    assert same_tree(state.opt_state, loaded.opt_state) and same_tree(state.rng, loaded.rng)
    state, m1 = BACKEND.train_step(state, x, y)
    loaded, m2 = BACKEND.train_step(loaded, x, y)
    assert float(m1["loss"]) == float(m2["loss"]) and float(m1["grad_norm"]) == float(m2["grad_norm"])
    assert same_tree(state.params, loaded.params)


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    cfg = with_run(tiny_config(tmp_path, tmp_path), keep_checkpoints=2)
    state = new_state(cfg)
    for step, val in zip(range(1, 6), [3.0, 1.0, 4.0, None, 6.0]):
        BACKEND.save_checkpoint(state, tmp_path, step, {"config": cfg.to_dict(), "step": step}, val)
    assert [c.name for c in ckpt.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004",
                                                                      "step_00000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004", "step_00000005"]


def test_bad_checkpoints_raise_checkpoint_error_naming_the_path(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    state = new_state(cfg)
    dist = BACKEND.setup(cfg)
    with pytest.raises(CheckpointError, match="nowhere"):
        BACKEND.load_checkpoint(tmp_path / "nowhere", cfg, dist)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        BACKEND.load_checkpoint(tmp_path, cfg, dist)
    path = BACKEND.save_checkpoint(state, tmp_path, 1, {"config": cfg.to_dict(), "step": 1}, None)
    (path / ckpt.META).unlink()  # what a save killed between orbax's rename and meta.json looks like
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        BACKEND.load_checkpoint(path, cfg, dist)
    assert BACKEND.latest_checkpoint(tmp_path) is None
    path = BACKEND.save_checkpoint(state, tmp_path, 1, {"config": cfg.to_dict(), "step": 1}, None)  # replaces it
    assert BACKEND.latest_checkpoint(tmp_path) == path
    for f in (path / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(path)):
        BACKEND.load_checkpoint(path, cfg, dist)


def test_checkpoint_of_another_shape_refuses_to_load_naming_the_field(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    state = new_state(cfg)
    BACKEND.save_checkpoint(state, tmp_path, 1, {"config": cfg.to_dict(), "step": 1}, None)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=64))
    with pytest.raises(CheckpointError, match=r"model\.n_embd = 32.*64"):
        BACKEND.load_checkpoint(tmp_path, wider, BACKEND.setup(wider))


SAVER = """
import sys
from pathlib import Path
from common.config import Config, ModelConfig, RunConfig
from jax_impl.train import BACKEND
cfg = Config(model=ModelConfig(vocab_size=50257, padded_vocab_size=50304, block_size=64, n_layer=2, n_head=2,
                               n_embd=256), run=RunConfig(keep_checkpoints=1))
state = BACKEND.init_state(cfg, BACKEND.setup(cfg))
out = Path(sys.argv[1])
step = 0
while True:
    step += 1
    BACKEND.save_checkpoint(state, out, step, {"config": cfg.to_dict(), "step": step}, None)
    print(step, flush=True)
"""


def test_atomic_save_survives_sigkill(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    root = tmp_path / "checkpoints"
    try:
        assert proc.stdout.readline().strip() == "1"
        interrupted = False
        # Kill while a later save is in flight: orbax's temporary folder exists then.
        deadline = time.time() + 60
        while time.time() < deadline:
            if any("tmp" in p.name for p in root.iterdir()):
                proc.send_signal(signal.SIGKILL)
                interrupted = True
                break
            time.sleep(0.002)
        assert interrupted
    finally:
        proc.kill()
        proc.wait()
    steps = [p for p in root.iterdir() if p.name.startswith("step_") and "tmp" not in p.name]
    assert steps and any("tmp" in p.name for p in root.iterdir())  # the killed save's leftovers...
    newest = BACKEND.latest_checkpoint(tmp_path)
    assert newest is not None and (newest / "meta.json").is_file()  # ...never look complete
    cfg = Config(model=ModelConfig(vocab_size=50257, padded_vocab_size=50304, block_size=64, n_layer=2, n_head=2,
                                   n_embd=256))
    state, meta = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))
    assert meta["step"] == int(newest.name.split("_")[1]) >= 1
    assert state.params["wte"]["weight"].shape == (50304, 256)
    # The next save cleans the leftovers up.
    BACKEND.save_checkpoint(state, tmp_path, 1000, {"config": cfg.to_dict(), "step": 1000}, None)
    assert not any("tmp" in p.name for p in root.iterdir())


class InjectNaN:
    """The jax backend, with the weights poisoned right before optimizer step `at`."""

    def __init__(self, at: int):
        self.at = at

    def __getattr__(self, name):
        return getattr(BACKEND, name)

    def train_step(self, state, x, y):
        if int(state.step) == self.at:
            flat = flatten(state.params)
            flat["h.0.mlp.c_fc.weight"] = flat["h.0.mlp.c_fc.weight"].at[0, 0].set(jnp.inf)
            state = state.replace(params=unflatten(flat))
        return BACKEND.train_step(state, x, y)


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    cfg = with_run(tiny_config(data_dir, tmp_path), checkpoint_interval=2, eval_interval=0)
    with pytest.raises(NonFiniteError, match="step 5"):
        train(InjectNaN(at=5), cfg, log=lambda *a: None)
    good = BACKEND.latest_checkpoint(tmp_path)
    assert good.name == "step_00000004"
    state, meta = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))
    assert meta["step"] == 4 and all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(state.params))


def test_bf16_autocast_runs_on_cpu_close_to_fp32(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
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
    cfg = tiny_config(tmp_path, tmp_path)
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
        path = BACKEND.save_checkpoint(fp64, tmp_path, 1, {"config": cfg64.to_dict(), "step": 1}, None)
        loaded, _ = BACKEND.load_checkpoint(path, cfg64, BACKEND.setup(cfg64))
        assert same_tree(fp64.params, loaded.params)
    finally:
        BACKEND.setup(cfg)  # back to x64 off for the other tests
    assert not jax.config.jax_enable_x64


def test_evaluate_is_the_mean_batch_loss(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
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
    state = new_state(tiny_config(tmp_path, tmp_path))
    a = np.stack(list(BACKEND.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=7)))
    b = np.stack(list(BACKEND.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=7)))
    c = np.stack(list(BACKEND.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=8)))
    assert a.shape == (40, 3)  # 3 + 40 tokens > block_size 16: the context was cropped
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.max() < VOCAB


def test_train_cli_and_bad_flags(tmp_path, data_dir, capsys):
    args = ["--data.dir", str(data_dir), "--run.out_dir", str(tmp_path), "--model.vocab_size", "256",
            "--model.padded_vocab_size", "256", "--model.block_size", "16", "--model.n_layer", "1",
            "--model.n_embd", "32", "--optim.total_batch_size", "64", "--optim.micro_batch_size", "4",
            "--optim.max_steps", "2", "--optim.warmup_steps", "1", "--data.val_tokens", "128",
            "--run.num_samples", "0"]
    assert main(args) == 0
    assert BACKEND.latest_checkpoint(tmp_path).name == "step_00000002"
    assert main(args + ["--model.n_layr", "2"]) == 2
    assert main(args) == 2  # the folder already holds a run and --resume was not given
    assert main(args + ["--resume", "--devices", "64"]) == 2  # more devices than this process has
    assert main(args + ["--run.dtype", "fp16", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err) and "n_layr" in err[0]
    assert "run.devices" in err[2] and "run.dtype" in err[3]


def test_sample_cli_from_checkpoint_and_hf_folder(tmp_path, capsys):
    import torch
    import transformers

    cfg = tiny_config(tmp_path, tmp_path)
    state = new_state(cfg)
    BACKEND.save_checkpoint(state, tmp_path / "run", 1, {"config": cfg.to_dict(), "step": 1}, None)
    argv = ["--checkpoint", str(tmp_path / "run"), "--prompt", "a;b", "--num-samples", "2",
            "--max-new-tokens", "5", "--seed", "3"]
    assert sample.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("a;b") >= 2
    assert sample.main(argv) == 0 and capsys.readouterr().out == out  # seeded
    # a HF GPT-2 folder with the real vocabulary
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32,
                                                              n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    assert sample.main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "Hello, world",
                        "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello, world")
    for bad in (["--checkpoint", str(tmp_path / "missing")],
                ["--checkpoint", str(tmp_path / "run"), "--top-k", "-1"],
                ["--checkpoint", str(tmp_path / "run"), "--prompt", "€ outside a 256-token vocabulary"],
                ["--checkpoint", str(tmp_path / "run"), "--temperature", "hot"]):
        assert sample.main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")


def test_four_devices_match_one_device(tmp_path, data_dir):
    common = ["--data.dir", str(data_dir), "--model.vocab_size", "256", "--model.padded_vocab_size", "256",
              "--model.block_size", "16", "--model.n_layer", "2", "--model.n_embd", "32",
              "--optim.total_batch_size", "256", "--optim.micro_batch_size", "4", "--optim.max_steps", "3",
              "--optim.warmup_steps", "1", "--data.val_tokens", "256", "--run.eval_interval", "3",
              "--run.num_samples", "0", "--run.checkpoint_interval", "3"]
    # The device count is fixed when JAX starts, so 4 host devices need a fresh process; `--devices 4`
    # makes jax_impl set XLA_FLAGS before importing JAX. 4 devices × 1 micro-step vs 1 device × 4.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launched = subprocess.run([sys.executable, "-m", "jax_impl.train", *common, "--devices", "4",
                               "--run.out_dir", str(tmp_path / "four")],
                              cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "4 replicas" in launched.stdout
    assert main([*common, "--run.out_dir", str(tmp_path / "one")]) == 0
    four, one = read_records(tmp_path / "four" / "metrics.jsonl"), read_records(tmp_path / "one" / "metrics.jsonl")
    assert len(four) == len(one) == 3
    for a, b in zip(four, one):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * b["grad_norm"]
    assert abs(four[-1]["val_loss"] - one[-1]["val_loss"]) < 1e-5
    wa = ckpt.read_common_weights(BACKEND.latest_checkpoint(tmp_path / "four"))
    wb = ckpt.read_common_weights(BACKEND.latest_checkpoint(tmp_path / "one"))
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-5, rtol=0, err_msg=k)


def test_parity_hooks_logits_grads_and_moments_roundtrip(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    state = new_state(cfg)
    x, y = batch(2, 4)
    logits = BACKEND.logits(state, x[0])
    assert logits.shape == (4, 16, VOCAB) and logits.dtype == np.float32
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
