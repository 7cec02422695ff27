"""Helpers shared by test files. Fixtures and the tiny data and configs live in conftest.py.

The check_* functions hold the body of a test that torch_impl and jax_impl pass alike: each train test file calls
them with its own backend, so the two sides assert the same things by construction.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from common.checkpoints import CheckpointMeta, complete_checkpoints, latest_checkpoint
from common.config import Config
from common.loop import NonFiniteError, train
from common.names import init_weights
from common.portable import read_portable
from common.records import read_records
from conftest import TINY_VOCAB, twenty_step_config, with_run
from parity.compare import TOLERANCES, update_rel

ROOT = Path(__file__).resolve().parent.parent

# The checkpoint-killing tests save a model this size: large enough that a save is slow to catch mid-flight.
SAVER_MODEL = dict(vocab_size=50257, padded_vocab_size=50304, block_size=64, n_layer=2, n_head=2, n_embd=256)

# Trainer flags for a tiny model on the tiny shards; callers add the batch, steps and intervals they test.
TINY_TRAINER_FLAGS = {"model.vocab_size": TINY_VOCAB, "model.padded_vocab_size": TINY_VOCAB, "model.block_size": 16,
                      "model.n_embd": 32, "optim.micro_batch_size": 4, "optim.warmup_steps": 1, "run.num_samples": 0}


def quiet(*args, **kwargs) -> None:
    pass


def backend_of(name: str):
    """The BACKEND of torch_impl or jax_impl, imported only when a test asks for it."""
    return importlib.import_module(f"{name}_impl.train").BACKEND


def meta(backend, cfg: Config, step: int, val_loss: float | None = None) -> CheckpointMeta:
    """What the loop records with checkpoint `step` of `cfg`, minus loader state and history."""
    return CheckpointMeta(step=step, backend=backend.name, config=cfg.to_dict(), val_loss=val_loss)


def batch(accum: int, rows: int, T: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random (inputs, targets) of shape (accum, rows, T) over the tiny vocabulary, targets shifted by one."""
    buf = np.random.default_rng(seed).integers(0, TINY_VOCAB, (accum * rows * T + 1)).astype(np.int32)
    return buf[:-1].reshape(accum, rows, T), buf[1:].reshape(accum, rows, T)


def hf_gpt2(vocab: int = 250):
    """A seeded transformers GPT-2 the shape of the model tests' TINY config, without dropout, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def trainer_args(data_dir: Path, flags: dict) -> list[str]:
    """Command-line flags for the trainer: TINY_TRAINER_FLAGS on the tiny shards, plus or overridden by `flags`."""
    merged = {"data.dir": data_dir, **TINY_TRAINER_FLAGS, **flags}
    return [arg for name, value in merged.items() for arg in (f"--{name}", str(value))]


def run_python(args: list[str], env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process at the repository root; a non-zero exit fails the test with its stderr."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_three_steps(a: Path, b: Path) -> None:
    """Two 3-step runs in folders a and b logged the same losses, grad norms and val loss, and saved the same
    weights, to 1e-5 (a reduction over more devices or ranks sums in another order)."""
    ra, rb = read_records(a / "metrics.jsonl"), read_records(b / "metrics.jsonl")
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5 * y["grad_norm"]
    assert abs(ra[-1]["val_loss"] - rb[-1]["val_loss"]) < 1e-5
    wa, wb = read_portable(a).weights, read_portable(b).weights
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-5, rtol=0, err_msg=k)


# Sharded runs against their references (tests/test_fsdp_*.py): per-step loss (abs) and grad norm (rel) in fp32,
# and the final weights as ‖θ − θ_ref‖ / ‖θ_ref − θ₀‖ over all tensors, parity.check's fp32 bound (per element, a
# weight whose gradient is rounding noise, the attention key bias, moves by Adam-sized steps either way).
STEP_TOL = 2e-6
PARAMS_TOL = TOLERANCES["fp32"].params


def assert_same_steps(run: Path, reference: Path, first_step: int = 0, steps: int = 20) -> None:
    """Run folder `run` logged the steps of `reference` from `first_step` on (one record each, to `steps`) with the
    same losses, grad norms and final val loss to STEP_TOL, and ended on the same weights to PARAMS_TOL."""
    got, want = read_records(run / "metrics.jsonl"), read_records(reference / "metrics.jsonl")[first_step:]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(first_step, steps)), run
    for a, b in zip(got, want):
        assert abs(a["loss"] - b["loss"]) <= STEP_TOL, (run, a["step"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= STEP_TOL * b["grad_norm"], (run, a["step"])
    assert abs(got[-1]["val_loss"] - want[-1]["val_loss"]) <= STEP_TOL
    final, ref = read_portable(run), read_portable(reference)
    init = init_weights(ref.config.model, ref.config.run.seed)
    assert update_rel(ref.weights, final.weights, init) <= PARAMS_TOL, run


def check_exact_resume(backend, data_dir: Path, out: Path, same_weights: Callable) -> None:
    """A 20-step run, and one resumed from its step-10 checkpoint in another folder, end bit-identical."""
    straight = train(backend, twenty_step_config(data_dir, out / "a"), log=quiet)
    assert [c.name for c in complete_checkpoints(out / "a")] == ["step_00000010", "step_00000020"]
    # Stopping after step 10 leaves exactly what this run saved at step 10: resume from a copy of it.
    (out / "b" / "checkpoints").mkdir(parents=True)
    os.rename(out / "a" / "checkpoints" / "step_00000010", out / "b" / "checkpoints" / "step_00000010")
    resumed = train(backend, twenty_step_config(data_dir, out / "b"), resume="latest", log=quiet)
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in straight.records]
    assert [r["grad_norm"] for r in resumed.records] == [r["grad_norm"] for r in straight.records]
    assert resumed.records[-1]["val_loss"] == straight.records[-1]["val_loss"]
    assert same_weights(straight.state, resumed.state)
    assert straight.records[-1]["loss"] < straight.records[0]["loss"] - 0.5  # it learned something
    saved = json.loads((out / "b" / "checkpoints" / "step_00000020" / "meta.json").read_text())
    assert saved["step"] == 20 and saved["val_loss"] == straight.records[-1]["val_loss"]
    assert [r["step"] for r in read_records(out / "b" / "metrics.jsonl")] == list(range(10, 20))


def check_retention(backend, out: Path) -> None:
    """With keep_checkpoints=2, five saves leave the newest two and the best-val one."""
    cfg = with_run(twenty_step_config(out, out), keep_checkpoints=2)
    state = backend.init_state(cfg, backend.setup(cfg))
    for step, val in zip(range(1, 6), [3.0, 1.0, 4.0, None, 6.0]):
        backend.save_checkpoint(state, out, meta(backend, cfg, step, val))
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000002", "step_00000004", "step_00000005"]


def trained_three_steps_and_saved(backend, cfg, x: np.ndarray, y: np.ndarray, out: Path):
    """A fresh state after three steps on (x, y), saved in `out` as step 3 with val_loss 2.5: (state, its path)."""
    state = backend.init_state(cfg, backend.setup(cfg))
    for _ in range(3):
        state, _ = backend.train_step(state, x, y)
    return state, backend.save_checkpoint(state, out, meta(backend, cfg, 3, 2.5))


def check_train_cli_refusals(backend, main: Callable, data_dir: Path, out: Path) -> list[str]:
    """A 2-step run through the trainer CLI, then a misspelled flag and a second run into the same folder without
    --resume, both refused with exit code 2 (their one-line errors are left on stderr). Returns the run's args."""
    args = trainer_args(data_dir, {"run.out_dir": out, "model.n_layer": 1, "optim.total_batch_size": 64,
                                   "optim.max_steps": 2, "data.val_tokens": 128})
    assert main(args) == 0
    assert latest_checkpoint(out).name == "step_00000002"
    assert main(args + ["--model.n_layr", "2"]) == 2
    assert main(args) == 2  # the folder already holds a run and --resume was not given
    return args


class PoisonedAt:
    """`backend`, with `poison(state) -> state` applied right before optimizer step `at`."""

    def __init__(self, backend, at: int, poison: Callable):
        self.backend, self.at, self.poison = backend, at, poison

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def train_step(self, state, x, y):
        if int(state.step) == self.at:
            state = self.poison(state)
        return self.backend.train_step(state, x, y)


def state_after_a_non_finite_loss(backend, poison: Callable, data_dir: Path, out: Path):
    """Trains with the weights poisoned before step 5: the loop must stop there and keep step 4's checkpoint,
    which is returned loaded."""
    cfg = with_run(twenty_step_config(data_dir, out), checkpoint_interval=2, eval_interval=0)
    with pytest.raises(NonFiniteError, match="step 5"):
        train(PoisonedAt(backend, 5, poison), cfg, log=quiet)
    good = latest_checkpoint(out)
    assert good.name == "step_00000004"
    state, saved = backend.load_checkpoint(out, cfg, backend.setup(cfg))
    assert saved.step == 4
    return state


class PoisonedAfter(PoisonedAt):
    """`backend`, with `poison(state) -> state` applied to the state optimizer step `at` returns (its loss and grad
    norm stay finite: an update that made the weights non-finite)."""

    def train_step(self, state, x, y):
        state, metrics = self.backend.train_step(state, x, y)
        return (self.poison(state) if int(state.step) == self.at + 1 else state), metrics


def check_non_finite_weights_are_never_saved(backend, poison: Callable, data_dir: Path, out: Path):
    """Weights poisoned right after step 3: checkpoint 4 is refused before a byte is written, the run stops naming
    step 2's checkpoint, and that checkpoint loads; returns its state."""
    cfg = with_run(twenty_step_config(data_dir, out), checkpoint_interval=2, eval_interval=0)
    with pytest.raises(NonFiniteError, match=r"^step 3: the parameters after it are not finite .*checkpoint 4 not "
                                             r"written; .*last good checkpoint: .*step_00000002\)$"):
        train(PoisonedAfter(backend, 3, poison), cfg, log=quiet)
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step_00000002"]  # no temp folder either
    assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [0, 1, 2, 3]
    state, saved = backend.load_checkpoint(out, cfg, backend.setup(cfg))
    assert saved.step == 2 and backend.params_finite(state)
    return state


def saver_script(train_module: str, fill_state: str = "") -> str:
    """A script that saves SAVER_MODEL's checkpoint into argv[1] again and again, printing each step saved;
    `fill_state` is code run on `state` first."""
    return textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from common.checkpoints import CheckpointMeta
        from common.config import Config, ModelConfig, RunConfig
        from {train_module} import BACKEND
        cfg = Config(model=ModelConfig(**{SAVER_MODEL!r}), run=RunConfig(keep_checkpoints=1))
        state = BACKEND.init_state(cfg, BACKEND.setup(cfg))
        """) + textwrap.dedent(fill_state) + textwrap.dedent("""
        out = Path(sys.argv[1])
        step = 0
        while True:
            step += 1
            BACKEND.save_checkpoint(state, out, CheckpointMeta(step=step, backend=BACKEND.name, config=cfg.to_dict()))
            print(step, flush=True)
        """)


def kill_mid_save(script: str, out: Path, is_temporary: Callable[[Path], bool], poll: float) -> None:
    """Runs a saver_script into `out` and SIGKILLs it while a save after the first is in flight, which is when
    a temporary folder stands in out/checkpoints."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    root = out / "checkpoints"
    try:
        assert proc.stdout.readline().strip() == "1"
        interrupted = False
        deadline = time.time() + 60
        while time.time() < deadline:
            if any(is_temporary(p) for p in root.iterdir()):
                proc.send_signal(signal.SIGKILL)
                interrupted = True
                break
            time.sleep(poll)
        assert interrupted
    finally:
        proc.kill()
        proc.wait()


def check_generate_is_seeded(backend, state) -> np.ndarray:
    """Sampling 40 tokens after a 3-token prompt repeats under a seed and differs under another; returns a sample."""
    a = np.stack(list(backend.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=7)))
    b = np.stack(list(backend.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=7)))
    c = np.stack(list(backend.generate(state, [1, 2, 3], 3, 40, 1.0, 20, seed=8)))
    assert a.shape == (40, 3)  # 3 + 40 tokens > block_size 16: the context was cropped
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    return a


def check_sample_cli(backend, sample_main: Callable, tmp_path: Path, capsys) -> None:
    """The sample CLI reads one of our checkpoints and a HF GPT-2 folder, is seeded, and refuses bad input with
    one error line."""
    import torch
    import transformers

    cfg = twenty_step_config(tmp_path, tmp_path)
    state = backend.init_state(cfg, backend.setup(cfg))
    backend.save_checkpoint(state, tmp_path / "run", meta(backend, cfg, 1))
    argv = ["--checkpoint", str(tmp_path / "run"), "--prompt", "a;b", "--num-samples", "2",
            "--max-new-tokens", "5", "--seed", "3"]
    assert sample_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("a;b") >= 2
    assert sample_main(argv) == 0 and capsys.readouterr().out == out  # seeded
    # a HF GPT-2 folder with the real vocabulary
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32,
                                                              n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    assert sample_main(["--checkpoint", str(tmp_path / "hf"), "--prompt", "Hello, world",
                        "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello, world")
    for bad in (["--checkpoint", str(tmp_path / "missing")],
                ["--checkpoint", str(tmp_path / "run"), "--top-k", "-1"],
                ["--checkpoint", str(tmp_path / "run"), "--prompt", "€ outside a 256-token vocabulary"],
                ["--checkpoint", str(tmp_path / "run"), "--temperature", "hot"]):
        assert sample_main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
