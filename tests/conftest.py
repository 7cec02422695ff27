"""Fixtures shared across test files: tiny shards and a tiny config, so no test needs real data."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from common.shards import write_shard

TINY_VOCAB = 256
# Documents for common.prepare's tests: empty, multi-line, non-ASCII, and the EOT marker as plain text.
DOCS = ["Hello world", "Second document.\nWith two lines.", "<|endoftext|> is text here", "", "中文 🚀"]

# One JAX compilation cache for this test session (and its subprocesses), not the user's ~/.cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gpt2-twin-jax-cache-"))
# The speed levers' fixed choices: no probe in the tiny runs, nothing read from or written to a levers
# cache (tests/test_levers.py asks for the probe itself).
os.environ["GPT2TWIN_LEVERS"] = "fixed"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A learnable stream (a noisy repeating pattern) over a 256-token vocabulary: train + val shards."""
    folder = tmp_path_factory.mktemp("tiny-shards")
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, TINY_VOCAB, 97)
    train = np.tile(pattern, 400)[:30000]
    noise = rng.random(train.size) < 0.1
    train[noise] = rng.integers(0, TINY_VOCAB, noise.sum())
    write_shard(folder / "tiny_train_000000.bin", train, vocab_size=TINY_VOCAB)
    write_shard(folder / "tiny_val_000000.bin", np.tile(pattern, 30), vocab_size=TINY_VOCAB)
    return folder


def tiny_config(data_dir: Path, out_dir: Path | str = "unused", **optim) -> Config:
    """L2 C32 H2 T16 over the tiny vocabulary; 4 sequences per step unless `optim` says otherwise."""
    base = OptimConfig(total_batch_size=64, micro_batch_size=4, max_lr=1e-2, min_lr=1e-3, warmup_steps=2,
                       max_steps=10)
    return Config(model=ModelConfig(vocab_size=TINY_VOCAB, padded_vocab_size=TINY_VOCAB, block_size=16, n_layer=2,
                                    n_head=2, n_embd=32),
                  optim=dataclasses.replace(base, **optim),
                  data=DataConfig(dir=str(data_dir), val_tokens=256),
                  run=RunConfig(out_dir=str(out_dir), num_samples=0, log_interval=1, eval_interval=0,
                                checkpoint_interval=0, devices=1, report=False))


def twenty_step_config(data_dir: Path, out_dir: Path) -> Config:
    """tiny_config at 8 sequences a step for 20 steps, evaluated and checkpointed every 10: long enough to learn
    visibly and to resume from the middle. It runs on all local devices, as a plain run does (devices=0)."""
    cfg = tiny_config(data_dir, out_dir, total_batch_size=128, max_lr=3e-3, min_lr=3e-4, warmup_steps=5,
                      max_steps=20)
    return with_run(cfg, eval_interval=10, checkpoint_interval=10, log_interval=0, devices=0)


def with_optim(cfg: Config, **kw) -> Config:
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **kw))


def with_run(cfg: Config, **kw) -> Config:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **kw))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and two OpenMP threads stall when the VM's vCPUs are time-sliced;
    the setting is restored for the next module. A module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fault_world(tiny_shards, tmp_path_factory):
    """What the fault suite's cases point at (tests/faults.py), built once per session."""
    from faults import build_world

    return build_world(tmp_path_factory.mktemp("fault-world"), tiny_shards)


@pytest.fixture
def txt_dir(tmp_path):
    """A folder of DOCS as .txt files, named in DOCS order, one in a subfolder, beside a file prepare skips."""
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    for i, text in enumerate(DOCS):
        (src / ("sub" if i == 4 else ".") / f"{i}.txt").write_text(text, encoding="utf-8")
    (src / "ignored.bin").write_bytes(b"\xff")
    return src
