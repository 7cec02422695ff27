import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoints import CheckpointError
from common.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from common.loop import NonFiniteError, train
from common.records import read_records
from common.schedule import lr_at
from common.shards import write_shard
from torch_impl import checkpoint as ckpt
from torch_impl import sample
from torch_impl.train import BACKEND, accumulate_gradients, apply_update, main

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


def weights_of(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def test_weight_decay_groups_hold_exactly_the_2d_params(tmp_path):
    state = new_state(tiny_config(tmp_path, tmp_path))
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
    cfg = tiny_config(tmp_path, tmp_path)
    x, y = batch(1, 8)
    full, split = new_state(cfg), new_state(cfg)
    loss_full = accumulate_gradients(full, torch.from_numpy(x).long(), torch.from_numpy(y).long())
    loss_split = accumulate_gradients(split, torch.from_numpy(x.reshape(2, 4, 16)).long(),
                                      torch.from_numpy(y.reshape(2, 4, 16)).long())
    assert abs(loss_full.item() - loss_split.item()) < 1e-6
    for (name, a), b in zip(full.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0, msg=name)
    norm_full, _ = apply_update(full)
    norm_split, _ = apply_update(split)
    assert abs(norm_full.item() - norm_split.item()) < 1e-6
    for (name, a), b in zip(full.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_schedule_is_applied_every_step(tmp_path):
    cfg = with_optim(tiny_config(tmp_path, tmp_path), warmup_steps=3, max_steps=8, min_lr=1e-4)
    state = new_state(cfg)
    x, y = batch(1, 2)
    for step in range(10):  # past max_steps the schedule holds min_lr
        state, m = BACKEND.train_step(state, x, y)
        assert m["lr"] == lr_at(step, cfg.optim)
        assert all(g["lr"] == lr_at(step, cfg.optim) for g in state.optimizer.param_groups)
    assert state.step == 10
    assert lr_at(0, cfg.optim) == pytest.approx(1e-3) and lr_at(9, cfg.optim) == 1e-4


def test_grad_clip_zero_reports_the_norm_without_clipping(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    x, y = batch(1, 4)
    clipped, free = new_state(with_optim(cfg, grad_clip=1e-3)), new_state(with_optim(cfg, grad_clip=0.0))
    _, m1 = BACKEND.train_step(clipped, x, y)
    _, m2 = BACKEND.train_step(free, x, y)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-6)
    assert float(m1["grad_norm"]) > 1e-3  # so the first one did clip...
    moved_clipped = (clipped.model.wte.weight - new_state(cfg).model.wte.weight).abs().max()
    moved_free = (free.model.wte.weight - new_state(cfg).model.wte.weight).abs().max()
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
    assert all(torch.equal(a[k], b[k]) for k in a)
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
    # The weights are plain safetensors under the common names.
    common = ckpt.read_common_weights(path)
    assert all(np.array_equal(common[k], v.numpy()) for k, v in weights_of(state).items())
    assert set(common) == set(BACKEND.to_common(state))
    loaded, meta = BACKEND.load_checkpoint(tmp_path, cfg, state.dist)  # a run folder: its newest
    assert meta["step"] == 3 and meta["val_loss"] == 2.5 and loaded.step == 3
    assert BACKEND.latest_checkpoint(tmp_path) == path
    _, m1 = BACKEND.train_step(state, x, y)
    _, m2 = BACKEND.train_step(loaded, x, y)
    assert float(m1["loss"]) == float(m2["loss"]) and float(m1["grad_norm"]) == float(m2["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), loaded.model.parameters()))


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    cfg = with_run(tiny_config(tmp_path, tmp_path), keep_checkpoints=2)
    state = new_state(cfg)
    for step, val in zip(range(1, 6), [3.0, 1.0, 4.0, None, 6.0]):
        BACKEND.save_checkpoint(state, tmp_path, step, {"config": cfg.to_dict(), "step": step}, val)
    assert [c.name for c in ckpt.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004",
                                                                      "step_00000005"]


def test_bad_checkpoints_raise_checkpoint_error_naming_the_path(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    state = new_state(cfg)
    dist = state.dist
    with pytest.raises(CheckpointError, match="nowhere"):
        BACKEND.load_checkpoint(tmp_path / "nowhere", cfg, dist)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        BACKEND.load_checkpoint(tmp_path, cfg, dist)
    path = BACKEND.save_checkpoint(state, tmp_path, 1, {"config": cfg.to_dict(), "step": 1}, None)
    (path / ckpt.COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        BACKEND.load_checkpoint(path, cfg, dist)
    assert BACKEND.latest_checkpoint(tmp_path) is None
    (path / ckpt.COMPLETE).write_text("1\n")
    (path / ckpt.TRAIN_STATE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        BACKEND.load_checkpoint(path, cfg, dist)


def test_checkpoint_of_another_shape_refuses_to_load_naming_the_field(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    state = new_state(cfg)
    BACKEND.save_checkpoint(state, tmp_path, 1, {"config": cfg.to_dict(), "step": 1}, None)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=64))
    with pytest.raises(CheckpointError, match=r"model\.n_embd = 32.*64"):
        BACKEND.load_checkpoint(tmp_path, wider, state.dist)


SAVER = """
import sys, dataclasses
from pathlib import Path
from common.config import Config, ModelConfig, RunConfig
from torch_impl.train import BACKEND
cfg = Config(model=ModelConfig(vocab_size=50257, padded_vocab_size=50304, block_size=64, n_layer=2, n_head=2,
                               n_embd=256), run=RunConfig(keep_checkpoints=1))
state = BACKEND.init_state(cfg, BACKEND.setup(cfg))
for p in state.model.parameters():  # populate AdamW's moments so saves are full-size
    state.optimizer.state[p] = {"step": __import__("torch").tensor(1.0), "exp_avg": p.detach().clone(),
                                "exp_avg_sq": p.detach().clone()}
out = Path(sys.argv[1])
step = 0
while True:
    step += 1
    BACKEND.save_checkpoint(state, out, step, {"config": cfg.to_dict(), "step": step}, None)
    print(step, flush=True)
"""


def test_atomic_save_survives_sigkill(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        interrupted = False
        # Kill while a later save is in flight: a temp folder exists then (a save takes ~0.1-0.5 s).
        deadline = time.time() + 60
        while time.time() < deadline:
            root = tmp_path / "checkpoints"
            if any(p.name.startswith(".tmp-") for p in root.iterdir()):
                proc.send_signal(signal.SIGKILL)
                interrupted = True
                break
            time.sleep(0.005)
        assert interrupted
    finally:
        proc.kill()
        proc.wait()
    root = tmp_path / "checkpoints"
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the killed save's leftovers...
    steps = [p for p in root.iterdir() if p.name.startswith("step_")]
    assert steps and all((p / ckpt.COMPLETE).is_file() for p in steps)  # ...never look complete
    newest = BACKEND.latest_checkpoint(tmp_path)
    cfg = Config(model=ModelConfig(vocab_size=50257, padded_vocab_size=50304, block_size=64, n_layer=2, n_head=2,
                                   n_embd=256))
    state, meta = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))
    assert meta["step"] == int(newest.name.split("_")[1]) >= 1
    assert state.model.wte.weight.shape == (50304, 256)


class InjectNaN:
    """The torch backend, with the weights poisoned right before optimizer step `at`."""

    def __init__(self, at: int):
        self.at = at

    def __getattr__(self, name):
        return getattr(BACKEND, name)

    def train_step(self, state, x, y):
        if state.step == self.at:
            with torch.no_grad():
                state.model.h[0].mlp.c_fc.weight[0, 0] = float("inf")
        return BACKEND.train_step(state, x, y)


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    cfg = with_run(tiny_config(data_dir, tmp_path), checkpoint_interval=2, eval_interval=0)
    with pytest.raises(NonFiniteError, match="step 5"):
        train(InjectNaN(at=5), cfg, log=lambda *a: None)
    good = BACKEND.latest_checkpoint(tmp_path)
    assert good.name == "step_00000004"
    state, meta = BACKEND.load_checkpoint(tmp_path, cfg, BACKEND.setup(cfg))
    assert meta["step"] == 4 and all(torch.isfinite(p).all() for p in state.model.parameters())


def test_bf16_autocast_runs_on_cpu_close_to_fp32(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    fp32, bf16 = new_state(cfg), new_state(with_run(cfg, dtype="bf16"))
    for _ in range(3):
        _, m32 = BACKEND.train_step(fp32, x, y)
        _, m16 = BACKEND.train_step(bf16, x, y)
        assert np.isfinite(float(m16["loss"])) and abs(float(m16["loss"]) - float(m32["loss"])) < 0.05
    assert bf16.model.wte.weight.dtype == torch.float32  # master weights stay fp32
    assert bf16.optimizer.state[bf16.model.wte.weight]["exp_avg"].dtype == torch.float32


def test_fp16_with_grad_scaler_and_fp64_modes(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
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
    path = BACKEND.save_checkpoint(fp64, tmp_path, 1, {"config": fp64.cfg.to_dict(), "step": 1}, None)
    loaded, _ = BACKEND.load_checkpoint(path, fp64.cfg, fp64.dist)
    assert all(torch.equal(a, b) for a, b in zip(fp64.model.parameters(), loaded.model.parameters()))


def test_evaluate_is_the_mean_batch_loss_and_leaves_training_mode(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    state = new_state(cfg)
    x, y = batch(3, 4)
    val = BACKEND.evaluate(state, zip(x, y))
    with torch.no_grad():
        losses = [state.model(torch.from_numpy(a).long(), torch.from_numpy(b).long())[1].item() for a, b in zip(x, y)]
    assert val == pytest.approx(np.mean(losses), abs=1e-6)
    assert state.model.training


def test_generate_is_seeded_and_crops_the_context(tmp_path):
    state = new_state(tiny_config(tmp_path, tmp_path))
    a = np.stack(list(BACKEND.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=7)))
    b = np.stack(list(BACKEND.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=7)))
    c = np.stack(list(BACKEND.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=8)))
    assert a.shape == (40, 3)  # 3 + 40 tokens > block_size 16: the context was cropped
    assert np.array_equal(a, b) and not np.array_equal(a, c)


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
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err) and "n_layr" in err[0]


def test_sample_cli_from_checkpoint_and_hf_folder(tmp_path, capsys):
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


def test_two_process_ddp_matches_one_process(tmp_path, data_dir):
    common = ["--data.dir", str(data_dir), "--model.vocab_size", "256", "--model.padded_vocab_size", "256",
              "--model.block_size", "16", "--model.n_layer", "2", "--model.n_embd", "32",
              "--optim.total_batch_size", "128", "--optim.micro_batch_size", "4", "--optim.max_steps", "3",
              "--optim.warmup_steps", "1", "--data.val_tokens", "128", "--run.eval_interval", "3",
              "--run.num_samples", "0", "--run.checkpoint_interval", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                               "-m", "torch_impl.train", *common, "--run.out_dir", str(tmp_path / "ddp")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert main([*common, "--run.out_dir", str(tmp_path / "one")]) == 0
    ddp, one = read_records(tmp_path / "ddp" / "metrics.jsonl"), read_records(tmp_path / "one" / "metrics.jsonl")
    assert len(ddp) == len(one) == 3
    for a, b in zip(ddp, one):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * b["grad_norm"]
    assert abs(ddp[-1]["val_loss"] - one[-1]["val_loss"]) < 1e-5
    wa = ckpt.read_common_weights(BACKEND.latest_checkpoint(tmp_path / "ddp"))
    wb = ckpt.read_common_weights(BACKEND.latest_checkpoint(tmp_path / "one"))
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-5, rtol=0, err_msg=k)


def test_compiled_step_matches_eager(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    x, y = batch(2, 4)
    eager, compiled = new_state(cfg), new_state(with_run(cfg, compile=True))
    for _ in range(2):
        _, me = BACKEND.train_step(eager, x, y)
        _, mc = BACKEND.train_step(compiled, x, y)
        assert abs(float(me["loss"]) - float(mc["loss"])) < 1e-5
        assert abs(float(me["grad_norm"]) - float(mc["grad_norm"])) < 1e-5 * float(me["grad_norm"])
    assert BACKEND.evaluate(compiled, zip(x, y)) == pytest.approx(BACKEND.evaluate(eager, zip(x, y)), abs=1e-5)


def test_sample_module_reads_the_prompt_from_stdin(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    BACKEND.save_checkpoint(new_state(cfg), tmp_path, 1, {"config": cfg.to_dict(), "step": 1}, None)
    done = subprocess.run([sys.executable, "-m", "torch_impl.sample", "--checkpoint", str(tmp_path),
                           "--max-new-tokens", "4", "--top-k", "5"], input="x,y", cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("x,y") and len(done.stdout) > len("x,y\n")
