"""`python -m parity.convert SRC DST --to torch|jax|hf`: move a checkpoint between backends and HF.

Sources: a torch checkpoint, a JAX (orbax) checkpoint, either's run folder (newest checkpoint), or a
Hugging Face GPT-2 folder (`config.json` + `model.safetensors`). Model weights always move; AdamW's
moments and step move between the two backends (a Hugging Face folder holds weights only). Weights
pass through common weights (common/names.py), which neither side transposes, so torch → JAX → torch
is bit-identical.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.checkpoints import CHECKPOINT_SUBDIR, CheckpointError
from common.config import Config, ConfigError, config_from_dict
from common.hf import HFError, is_hf_folder, load_hf_folder, save_hf_folder

BACKENDS = ("torch", "jax")


@dataclass
class Portable:
    """What a checkpoint holds independently of the framework."""
    config: Config
    weights: dict[str, np.ndarray]
    step: int = 0
    moments: dict[str, Any] | None = None  # {"step": int, "m": {...}, "v": {...}}
    meta: dict[str, Any] = field(default_factory=dict)


def get_backend(name: str):
    if name == "torch":
        from torch_impl.train import BACKEND
    elif name == "jax":
        from jax_impl.train import BACKEND
    else:
        raise ConfigError(f"--to: unknown target '{name}' (torch, jax or hf)")
    return BACKEND


def find_meta(path: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder and its meta.json, for a checkpoint or a run folder."""
    candidates = [path]
    ckpt_root = path / CHECKPOINT_SUBDIR
    if ckpt_root.is_dir():
        candidates = sorted((p for p in ckpt_root.iterdir() if (p / "meta.json").is_file()),
                            key=lambda p: p.name, reverse=True) or candidates
    for c in candidates:
        meta_path = c / "meta.json"
        if meta_path.is_file():
            try:
                return c, json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    raise CheckpointError(f"{path}: neither a checkpoint (no meta.json), a run folder nor a Hugging Face GPT-2 folder")


def read_portable(path: str | Path) -> tuple[Portable, str]:
    """(contents, source kind) of any supported checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if is_hf_folder(path):
        model_cfg, weights = load_hf_folder(path)
        return Portable(config=Config(model=model_cfg), weights=weights), "hf"
    ckpt, meta = find_meta(path)
    kind = meta.get("backend")
    if kind not in BACKENDS:
        raise CheckpointError(f"{ckpt / 'meta.json'}: unknown backend {kind!r}")
    cfg = config_from_dict(meta["config"])
    backend = get_backend(kind)
    # Reading needs no training mesh: a run trained on N JAX devices loads in a 1-device process.
    local = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, devices=1))
    dist = backend.setup(local)
    state, meta = backend.load_checkpoint(ckpt, local, dist)
    return Portable(config=cfg, weights=backend.to_common(state), step=int(meta["step"]),
                    moments=backend.optimizer_moments(state), meta=meta), kind


def write_portable(p: Portable, dst: str | Path, target: str) -> Path:
    """Write `p` as a checkpoint of `target` under run folder `dst` (or as a HF folder at `dst`)."""
    dst = Path(dst)
    if target == "hf":
        return save_hf_folder(dst, p.config.model, p.weights)
    backend = get_backend(target)
    dist = backend.setup(p.config)
    state = backend.init_state(p.config, dist, weights=p.weights, moments=p.moments)
    meta = dict(p.meta) or {"step": p.step, "config": p.config.to_dict(), "history": []}
    meta.update(step=p.step, backend=target, config=p.config.to_dict())
    meta.setdefault("loader", None)
    return backend.save_checkpoint(state, dst, p.step, meta, meta.get("val_loss"))


def convert(src: str | Path, dst: str | Path, target: str) -> Path:
    portable, _ = read_portable(src)
    return write_portable(portable, dst, target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.convert", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="torch or JAX checkpoint / run folder, or a HF GPT-2 folder")
    p.add_argument("dst", type=Path, help="run folder to write the checkpoint into (for --to hf: the HF folder)")
    p.add_argument("--to", required=True, choices=("torch", "jax", "hf"))
    args = p.parse_args(argv)
    try:
        portable, kind = read_portable(args.src)
        out = write_portable(portable, args.dst, args.to)
        moved = "weights + optimizer state" if portable.moments and args.to != "hf" else "weights"
        print(f"{kind} {args.src} → {args.to} {out} (step {portable.step}, {moved})")
        return 0
    except (CheckpointError, ConfigError, HFError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
