"""Atomic checkpoints: out_dir/checkpoints/step_XXXXXXXX/{model.safetensors, train_state.pt, meta.json, COMPLETE}.

A checkpoint is written into a hidden temp folder, every file fsynced, the COMPLETE marker written
last, then the folder is renamed into place (rename is atomic on POSIX). A crash at any moment thus
leaves either the previous set of checkpoints or the new one; only folders holding COMPLETE count.
The weights are plain safetensors under the common names (common/names.py), readable without torch.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.checkpoints import CHECKPOINT_SUBDIR, CheckpointError, checkpoints_to_keep, step_dir_name

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
META = "meta.json"
COMPLETE = "COMPLETE"
_STEP_PREFIX = step_dir_name(0).rstrip("0")  # "step_"
_TEMP_PREFIXES = (".tmp-", ".old-")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_of(folder: Path) -> int | None:
    name = folder.name
    if not name.startswith(_STEP_PREFIX) or not name[len(_STEP_PREFIX):].isdigit():
        return None
    return int(name[len(_STEP_PREFIX):])


def is_complete(folder: Path) -> bool:
    return _step_of(folder) is not None and (folder / COMPLETE).is_file()


def complete_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / CHECKPOINT_SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=_step_of)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder as given, or the newest complete one of a run folder (or of its checkpoints/)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if _step_of(p) is not None:
        if not is_complete(p):
            raise CheckpointError(f"{p}: incomplete checkpoint (no {COMPLETE} marker; the save was interrupted)")
        return p
    for run_dir in (p, p.parent if p.name == CHECKPOINT_SUBDIR else None):
        if run_dir is not None and (latest := latest_checkpoint(run_dir)) is not None:
            return latest
    raise CheckpointError(f"{p}: no complete checkpoint in this folder")


def save(out_dir: str | os.PathLike, step: int, weights: dict[str, torch.Tensor], train_state: dict[str, Any],
         meta: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then prune to the newest `keep_last` plus the best val_loss."""
    from safetensors.torch import save_file

    root = Path(out_dir) / CHECKPOINT_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(train_state, tmp / TRAIN_STATE)
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    for name in (WEIGHTS, TRAIN_STATE, META):
        _fsync_file(tmp / name)
    (tmp / COMPLETE).write_text(f"{step}\n")
    _fsync_file(tmp / COMPLETE)
    _fsync_dir(tmp)
    if final.exists():  # saving a step again (e.g. after resuming at it): swap, never delete first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last, protect=step)
    return final


def _remove_leftovers(root: Path) -> None:
    """Temp folders of saves killed mid-way; only the main process of one run writes here."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_TEMP_PREFIXES):
            shutil.rmtree(p, ignore_errors=True)


def _prune(root: Path, keep_last: int, protect: int) -> None:
    found = complete_checkpoints(root.parent)
    entries = [(_step_of(p), _val_loss(p)) for p in found]
    keep = checkpoints_to_keep(entries, keep_last) | {protect}
    for p in found:
        if _step_of(p) not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _val_loss(folder: Path) -> float | None:
    try:
        return read_meta(folder).get("val_loss")
    except CheckpointError:  # unreadable metadata: the checkpoint can still be pruned by age
        return None


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / META
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({e})") from None


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's weights under the common names, in the dtype they were trained in."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors has its own error types for missing or corrupt files
        raise CheckpointError(f"{path}: cannot read model weights ({e})") from None


def read_common_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Float32 numpy copies of a checkpoint's weights (what another backend or a HF export takes)."""
    return {k: v.to(torch.float32).numpy().copy() for k, v in read_weights(folder).items()}


def read_train_state(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: cannot read optimizer state ({e})") from None
