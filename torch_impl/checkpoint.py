"""torch checkpoints: out_dir/checkpoints/step_XXXXXXXX/{model.safetensors, train_state.pt, meta.json}.

A save writes its files into a hidden temp folder, fsyncs them, writes meta.json last
(common.checkpoints.write_meta) and renames the folder into place (atomic on POSIX), so a crash at any
moment leaves the previous checkpoints or the new one; folder naming, the completion rule and retention
are common/checkpoints.py's, shared with jax_impl/checkpoint.py. The weights are plain safetensors
under the common names (common/names.py), readable without torch.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.checkpoints import (CHECKPOINT_SUBDIR, CheckpointError, CheckpointMeta, file_hashes, fsync_dir, fsync_file,
                                prune, retained_steps, step_dir_name, write_meta)
from common.config import Config
from common.names import check_weights, decay_groups, param_shapes
from common.precision import PRECISIONS
from common.portable import Portable, read_portable
from common.usage import first_line
from torch_impl import dist
from torch_impl.model import GPT, from_common

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
_TEMP_PREFIXES = (".tmp-", ".old-")


def save_checkpoint(state: Any, out_dir: str | os.PathLike, meta: CheckpointMeta) -> Path | None:
    """Write checkpoint meta.step of `state` (a torch_impl.train.TrainState) on the main rank, then prune to
    the run's run.keep_checkpoints plus the best val_loss. Every rank calls it; returns the folder on the
    main rank, None on the others. A sharded (FSDP2) state is gathered to the main rank first, so the
    files are the same whatever the parallelism and resume on any number of ranks, sharded or not."""
    path = None
    weights = dist.full_model_state(state.model)  # collectives when sharded: every rank takes part
    optimizer = dist.full_optimizer_state(state.model, state.optimizer)
    if state.dist.is_main:
        train_state = {
            "step": state.step,
            "optimizer": optimizer,
            "scaler": state.scaler.state_dict() if state.scaler else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None,
        }
        path = _write(Path(out_dir), meta, weights, train_state)
    dist.barrier()  # other ranks must not run ahead (or exit) while rank 0 writes
    return path


@torch.no_grad()
def params_finite(state: Any) -> bool:
    """Whether every parameter is finite, on all ranks (each checks its own shard of a sharded parameter, the
    counts are summed over ranks); one flag per tensor on the device, one transfer to the host."""
    flags = torch.stack([torch.isfinite(dist.local(p)).all() for p in state.model.parameters()])
    bad = (~flags).sum().to(torch.float32)
    return float(dist.all_reduce_sum(bad)) == 0


def load_checkpoint(folder: str | os.PathLike, state: Any) -> Any:
    """Restore a complete checkpoint folder's optimizer, loss scaler, step and RNG into `state`, a state
    built from the same folder's weights (read_weights); returns it."""
    folder = Path(folder)
    saved = _read_train_state(folder)
    try:
        dist.load_optimizer_state(state.model, state.optimizer, saved["optimizer"])
        if state.scaler and saved.get("scaler"):
            state.scaler.load_state_dict(saved["scaler"])
        state.step = int(saved["step"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder / TRAIN_STATE}: optimizer state does not fit this model ({first_line(e)})") from None
    if state.dist.is_main:
        torch.set_rng_state(saved["rng_cpu"])
        if state.device.type == "cuda" and saved.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"], state.device)
    else:
        torch.manual_seed(dist.rank_seed(state.cfg.run.seed, state.dist, state.step))
    return state


def read_weights(folder: str | os.PathLike, cfg: Config) -> dict[str, np.ndarray]:
    """The checkpoint's weights as common weights, in the dtype they were trained in."""
    from safetensors.numpy import load_file

    path = Path(folder) / WEIGHTS
    try:
        weights = load_file(str(path))
    except Exception as e:  # safetensors has its own error types for missing or corrupt files
        raise CheckpointError(f"{path}: cannot read model weights ({first_line(e)})") from None
    try:
        check_weights(weights, cfg.model, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return weights


def read_moments(folder: str | os.PathLike, cfg: Config) -> dict[str, Any]:
    """AdamW's state of a checkpoint as {"step", "m": {name: array}, "v": {name: array}}."""
    path = Path(folder) / TRAIN_STATE
    saved = _read_train_state(Path(folder))
    try:
        return moments_of(saved["optimizer"], cfg, int(saved["step"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit the model of its config ({first_line(e)})") from None


def moments_of(optimizer_state: dict[str, Any], cfg: Config, step: int) -> dict[str, Any]:
    """AdamW's m and v under the common names from an optimizer state_dict, whose parameters are numbered
    in the order of torch_impl.optim.param_groups; zeros where a parameter has no state yet."""
    shapes = param_shapes(cfg.model)
    moments: dict[str, Any] = {"step": step, "m": {}, "v": {}}
    for group, names in zip(optimizer_state["param_groups"], decay_groups(cfg.model), strict=True):
        for index, name in zip(group["params"], names, strict=True):
            slot = optimizer_state["state"].get(index, {})
            for kind, key in (("m", "exp_avg"), ("v", "exp_avg_sq")):
                t = slot.get(key)
                if t is None:
                    moments[kind][name] = np.zeros(shapes[name], PRECISIONS[cfg.run.dtype].params)
                else:
                    moments[kind][name] = t.detach().to("cpu").numpy().copy()
    return moments


def _write(out_dir: Path, meta: CheckpointMeta, weights: dict[str, torch.Tensor], train_state: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    root = out_dir / CHECKPOINT_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / step_dir_name(meta.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(train_state, tmp / TRAIN_STATE)
    for name in (WEIGHTS, TRAIN_STATE):
        fsync_file(tmp / name)
    write_meta(tmp, meta.replace(files=file_hashes(tmp)))  # last: what makes the folder count
    if final.exists():  # saving a step again (e.g. after resuming at it): swap, never delete first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    prune(out_dir, retained_steps(out_dir, meta))
    return final


def _remove_leftovers(root: Path) -> None:
    """Temp folders of saves killed mid-way; only the main process of one run writes here."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_TEMP_PREFIXES):
            shutil.rmtree(p, ignore_errors=True)


def _read_train_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAIN_STATE
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle before refusing it: one line only
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: cannot read optimizer state ({first_line(e)})") from None


def load_model(path: str | Path, device: str, dtype: str) -> tuple[GPT, Portable]:
    """The eval-mode GPT of any checkpoint, run folder or Hugging Face folder (common/portable.py), in `dtype`'s
    parameter dtype on `device` (auto | cpu | cuda, named --device in errors), and what was read."""
    portable = read_portable(path)
    _, param_dtype = dist.dtypes(dtype)
    model = from_common(portable.weights, portable.config.model, param_dtype, dist.pick_device(device, flag="--device"),
                        source=str(path))
    return model.eval(), portable
