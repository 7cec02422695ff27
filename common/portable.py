"""Any checkpoint or Hugging Face folder as framework-free arrays: what scoring, sampling and conversion read.

`read_portable(path)` takes a torch or JAX checkpoint folder, either's run folder (its newest complete
checkpoint) or a Hugging Face GPT-2 folder, and returns the run's config and its weights as common
weights (common/names.py). The backend that wrote a checkpoint (meta.json's "backend") reads its files
through `{backend}_impl.checkpoint.read_weights` / `read_moments`, found by name, so common/ imports
no backend. AdamW's moments are read only when asked for (conversion); scoring and sampling need the
weights alone.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.backend import BACKENDS
from common.checkpoints import CheckpointError, CheckpointMeta, read_verified_meta, resolve, step_of
from common.config import Config
from common.hf import is_hf_folder, load_hf_folder


@dataclass
class Portable:
    """What a checkpoint holds independently of the framework."""
    config: Config
    weights: dict[str, np.ndarray]  # common weights, float32 (float64 from an fp64 run)
    kind: str  # where it came from: "torch", "jax" or "hf"
    step: int = 0
    moments: dict[str, Any] | None = None  # {"step": int, "m": {name: array}, "v": {name: array}}
    meta: CheckpointMeta | None = None  # None for a Hugging Face folder


def checkpoint_reader(backend: str):
    """The module that reads `backend`'s checkpoint files ({backend}_impl/checkpoint.py)."""
    return importlib.import_module(f"{backend}_impl.checkpoint")


def read_portable(path: str | os.PathLike, moments: bool = False) -> Portable:
    """The config and weights (and with `moments`, AdamW's state) of any supported checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if is_hf_folder(path):
        model_cfg, weights = load_hf_folder(path)
        return Portable(config=Config(model=model_cfg), weights=weights, kind="hf")
    try:
        folder = resolve(path)
    except CheckpointError:
        if step_of(path) is not None:  # a step folder: its own message says what is missing
            raise
        raise CheckpointError(f"{path}: neither a checkpoint (no meta.json), a run folder nor a Hugging Face "
                              f"GPT-2 folder") from None
    meta = read_verified_meta(folder)
    if meta.backend not in BACKENDS:
        raise CheckpointError(f"{folder / 'meta.json'}: unknown backend {meta.backend!r}")
    cfg = meta.run_config(folder / "meta.json")
    reader = checkpoint_reader(meta.backend)
    return Portable(config=cfg, weights=reader.read_weights(folder, cfg), kind=meta.backend, step=meta.step,
                    moments=reader.read_moments(folder, cfg) if moments else None, meta=meta)
