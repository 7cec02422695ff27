"""The fault suite's world and its one assertion (tests/test_faults_*.py hold the tables).

`build_world` makes, once per test session, everything a bad-input case points at: a torch and a JAX run
trained through their CLIs, copies of them with garbled, truncated or missing checkpoint files, shard
folders that are wrong in one way each, broken configs, Hugging Face folders with one unsupported config
field each, a malformed HellaSwag file and a run with a torn metrics line. A case runs one CLI's
`main(argv)` in this process and must end with exit code 2, exactly one stderr line starting `error: ` and
naming the file, field or flag, no traceback, and every file of the world byte-identical to before
(lock files aside: a refused run may take and release a folder's lock).
"""
from __future__ import annotations

import collections
import hashlib
import importlib
import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np

from common.checkpoints import latest_checkpoint
from common.config import ModelConfig
from common.hf import save_hf_folder
from common.names import init_weights
from common.outdir import LOCK
from common.portable import read_portable
from common.shards import write_shard
from conftest import TINY_VOCAB
from helpers import trainer_args

# Both fixture runs: one layer, two 4-sequence steps, checkpointed at step 2.
RUN = {"model.n_layer": 1, "optim.total_batch_size": 64, "optim.max_steps": 2, "data.val_tokens": 128,
       "run.checkpoint_interval": 2, "run.eval_interval": 0}
GPT2_VOCAB = {"vocab_size": 50257, "padded_vocab_size": 50304}


@dataclass
class World:
    root: Path
    shards: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Path:
        return self.paths[name]

    def train_argv(self, backend: str, out: Path | str, **flags) -> list[str]:
        """Trainer flags of the fixture runs into `out`, plus `flags` (`model__n_embd=64` for --model.n_embd)."""
        extra = {k.replace("__", "."): v for k, v in flags.items()}
        return trainer_args(self.shards, {**RUN, "run.out_dir": out, **extra})


@dataclass(frozen=True)
class Case:
    id: str
    module: str  # whose main(argv) runs
    argv: Callable[[World, Path], list[str]]  # (world, this case's empty tmp folder) -> argv
    names: Callable[[World, Path], str] | str  # what the error line must contain
    during: Callable[[World, Path], ContextManager] | None = None  # held while main runs (a busy folder)
    # Found only once the work is under way (a bad token id read with its batch):
    # the output folder may exist by then. Every other refusal leaves the case's folder as it was.
    found_late: bool = False


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root by relative path, lock files aside."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}


def entries(root: Path) -> set[str]:
    """Every file and folder under root, lock files included."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as e:  # the benches' parser exits by itself, with the same one line
        code = e.code
    return code, capsys.readouterr().err


def check_case(case: Case, world: World, tmp: Path, capsys) -> None:
    import contextlib

    before = snapshot(world.root)
    with case.during(world, tmp) if case.during else contextlib.nullcontext():
        own = entries(tmp)
        code, err = run_main(case.module, case.argv(world, tmp), capsys)
        assert case.found_late or entries(tmp) == own, "a refused command created files or folders in its folder"
    names = case.names if isinstance(case.names, str) else case.names(world, tmp)
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert names in lines[0], (names, lines[0])
    assert snapshot(world.root) == before, "a refused command changed the world's files"


def _flip(path: Path, at: float = 0.5) -> None:
    """Garble bytes in the middle of a file (its length stays)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + 8] = bytes(b ^ 0xFF for b in data[i:i + 8])
    path.write_bytes(bytes(data))


def _copy_run(world: World, src: str, name: str) -> Path:
    dst = world.root / name
    shutil.copytree(world[src], dst)
    world.paths[name] = dst
    return latest_checkpoint(dst)


def _drop_hashes(step: Path) -> None:
    """meta.json as a checkpoint saved before files were hashed (no `files`)."""
    meta = json.loads((step / "meta.json").read_text())
    meta.pop("files")
    (step / "meta.json").write_text(json.dumps(meta))


def _biggest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _runs(world: World) -> None:
    from jax_impl.train import main as jax_main
    from torch_impl.train import main as torch_main

    for name, main in (("torch", torch_main), ("jax", jax_main)):
        world.paths[f"{name}_run"] = world.root / f"{name}_run"
        assert main(world.train_argv(name, world.root / f"{name}_run")) == 0
    step = _copy_run(world, "torch_run", "torch_garbled")
    _flip(step / "model.safetensors")
    step = _copy_run(world, "torch_run", "torch_truncated")
    (step / "train_state.pt").write_bytes((step / "train_state.pt").read_bytes()[:1000])
    step = _copy_run(world, "torch_run", "torch_legacy_truncated")
    _drop_hashes(step)
    (step / "train_state.pt").write_bytes((step / "train_state.pt").read_bytes()[:1000])
    step = _copy_run(world, "torch_run", "torch_legacy_foreign")  # a pickle torch's weights-only reader refuses
    _drop_hashes(step)
    (step / "train_state.pt").write_bytes(pickle.dumps(collections.OrderedDict(step=collections.Counter())))
    step = _copy_run(world, "jax_run", "jax_garbled")
    world.paths["jax_garbled_file"] = _biggest(step / "params")
    _flip(world["jax_garbled_file"])
    step = _copy_run(world, "jax_run", "jax_missing")
    world.paths["jax_missing_file"] = _biggest(step / "opt_state")
    world["jax_missing_file"].unlink()
    step = _copy_run(world, "jax_run", "jax_legacy_truncated")
    _drop_hashes(step)
    big = _biggest(step / "params")
    big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])
    torn = _copy_run(world, "torch_run", "torn_metrics").parent.parent / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"backend": "torch", "step": 2, "lo')


def _shards(world: World) -> None:
    good = np.arange(3000) % TINY_VOCAB
    bad = {
        "bad_magic": lambda d: (d / "x_train_000000.bin").write_bytes(b"\0" * 2048),
        "truncated_shard": lambda d: (d / "x_train_000000.bin").write_bytes(
            (world.shards / "tiny_train_000000.bin").read_bytes()[:3000]),
        "id_bin": lambda d: write_shard(d / "x_train_000000.bin", np.full(3000, 300), vocab_size=512),
        "id_npy": lambda d: np.save(d / "x_train_000000.npy", np.where(good == 7, -5, good).astype(np.int32)),
        "dtype_npy": lambda d: np.save(d / "x_train_000000.npy", good.astype(np.float32)),
        "empty_data": lambda d: None,
        "bad_val": lambda d: write_shard(d / "x_train_000000.bin", good, vocab_size=TINY_VOCAB),
    }
    for name, make in bad.items():
        folder = world.root / name
        folder.mkdir()
        make(folder)
        if name == "bad_val":
            write_shard(folder / "x_val_000000.bin", np.full(3000, 300), vocab_size=512)
        elif name != "empty_data":
            write_shard(folder / "x_val_000000.bin", good, vocab_size=TINY_VOCAB)
        world.paths[name] = folder


def _configs_and_files(world: World) -> None:
    files = {"not_toml": "model = [", "unknown_key": "[model]\nn_layr = 2\n", "wrong_type": "[optim]\nmax_lr = 'x'\n",
             "a_file": "a regular file where a folder should be\n",
             "hellaswag_bad": '{"ind": 1, "ctx": "A man", "label": 0, "endings": ["a", "b"]}\n',
             "empty_txt": "", "bad_jsonl": '{"text": "fine"}\n{"text": \n', "untexted_jsonl": '{"body": "x"}\n'}
    names = {"not_toml": "c.toml", "unknown_key": "k.toml", "wrong_type": "t.toml", "hellaswag_bad": "hs.jsonl",
             "empty_txt": "empty.txt", "bad_jsonl": "bad.jsonl", "untexted_jsonl": "untexted.jsonl", "a_file": "a_file"}
    for key, text in files.items():
        world.paths[key] = world.root / names[key]
        world.paths[key].write_text(text)


def _hf_folders(world: World) -> None:
    tiny = read_portable(world["torch_run"])
    for name, change in (("hf_untied", {"tie_word_embeddings": False}),
                         ("hf_inverse_idx", {"scale_attn_by_inverse_layer_idx": True}),
                         ("hf_unscaled", {"scale_attn_weights": False}),
                         ("hf_relu", {"activation_function": "relu"}),
                         ("hf_eps", {"layer_norm_epsilon": 1e-6})):
        folder = save_hf_folder(world.root / name, tiny.config.model, tiny.weights)
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        world.paths[name] = folder
    from safetensors.numpy import load_file, save_file

    untied = world["hf_untied"] / "model.safetensors"
    tensors = load_file(str(untied))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    save_file(tensors, str(untied))
    model = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, **GPT2_VOCAB)
    world.paths["hf_gpt2"] = save_hf_folder(world.root / "hf_gpt2", model, init_weights(model, 0))


def build_world(root: Path, shards: Path) -> World:
    world = World(root=root, shards=shards)
    _runs(world)
    _shards(world)
    _configs_and_files(world)
    _hf_folders(world)
    return world
