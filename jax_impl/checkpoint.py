"""Checkpoints with orbax: out_dir/checkpoints/step_XXXXXXXX/{params,opt_state,rng}/ + meta.json.

orbax's CheckpointManager writes a step into a temporary folder and renames it when finalized, so a
killed save never leaves a folder under the final name. `meta.json` (config, loader state, history,
code version, val_loss; plain JSON for tools without JAX) is written atomically right after and is
the completion marker: a step folder without it is ignored when loading and replaced when saving.
Saves are synchronous so that what the loop resumes from is exactly what was trained.
Retention (newest run.keep_checkpoints plus the best val_loss) is common.checkpoints.checkpoints_to_keep,
the same rule as torch, applied by deleting through the manager.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from common.checkpoints import CHECKPOINT_SUBDIR, CheckpointError, checkpoints_to_keep, step_dir_name

META = "meta.json"
ITEMS = ("params", "opt_state", "rng")
_STEP_DIR = re.compile(r"^step_(\d{8,})$")  # common.checkpoints.step_dir_name


def _manager(folder: Path) -> ocp.CheckpointManager:
    # step_prefix + fixed length 8 gives common.checkpoints.step_dir_name's "step_00000100".
    options = ocp.CheckpointManagerOptions(step_prefix="step", step_format_fixed_length=8, create=True,
                                           enable_async_checkpointing=False, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(folder.resolve(), options=options, item_names=ITEMS)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def _complete_steps(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            found[int(m.group(1))] = p
    return found


def read_meta(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((step_dir / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir / META}: cannot read checkpoint metadata ({e})") from None


def save_checkpoint(params, opt_state, rng, out_dir: Path, step: int, meta: dict[str, Any],
                    val_loss: float | None, keep_last: int) -> Path:
    """Every process calls this (orbax synchronises them); only process 0 writes meta.json."""
    folder = Path(out_dir) / CHECKPOINT_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / step_dir_name(step)
    manager = _manager(folder)
    try:
        if step in manager.all_steps():  # a save of this step that never got its meta.json, or a re-save
            manager.delete(step)
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            rng=ocp.args.StandardSave({"key": rng})), force=True)
        manager.wait_until_finished()
        if jax.process_index() == 0:
            _write_json_atomic(target / META, {**meta, "step": step, "val_loss": val_loss})
        # Every process takes the same decision (manager.delete is collective): older steps' val_loss
        # from their meta.json, this one's from the argument.
        entries = [(s, read_meta(p).get("val_loss")) for s, p in _complete_steps(folder).items() if s != step]
        entries.append((step, val_loss))
        keep = checkpoints_to_keep(entries, keep_last)
        for s in manager.all_steps():  # also removes finalized folders that never got their meta.json
            if s not in keep:
                manager.delete(s)
    finally:
        manager.close()
    return target


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    steps = _complete_steps(Path(out_dir) / CHECKPOINT_SUBDIR)
    return [steps[s] for s in sorted(steps)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = _complete_steps(Path(out_dir) / CHECKPOINT_SUBDIR)
    return steps[max(steps)] if steps else None


def resolve(path: Path) -> Path:
    """A checkpoint folder, or a run folder (or its checkpoints/ folder) -> the newest complete checkpoint."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for folder in (path / CHECKPOINT_SUBDIR, path):
        steps = _complete_steps(folder)
        if steps:
            return steps[max(steps)]
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    raise CheckpointError(f"{path}: no complete checkpoint here (a step folder holds {META} once its save finished)")


def restore(path: Path, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restore the items named in `abstract` ({"params": tree of ShapeDtypeStruct, ...}) from a checkpoint folder."""
    args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(Path(path).resolve(), args=ocp.args.Composite(**args))
    except Exception as e:  # orbax/tensorstore raise many types for missing or corrupt files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
                              ) from None
    return {name: restored[name] for name in abstract}


def read_common_weights(path: Path) -> dict[str, np.ndarray]:
    """The common weights (float32 numpy) of a checkpoint or run folder, for conversion and sampling."""
    from common.config import ConfigError, config_from_dict
    from jax_impl.model import abstract_params, to_common

    folder = resolve(path)
    meta = read_meta(folder)
    try:
        cfg = config_from_dict(meta["config"])
    except (KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{folder / META}: no readable config ({e})") from None
    # fp64 runs save fp64 parameters; without x64 they are read (cast by orbax) as fp32.
    dtype = np.float64 if cfg.run.dtype == "fp64" and jax.config.jax_enable_x64 else np.float32
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shapes = abstract_params(cfg.model, dtype)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), shapes)
    return to_common(restore(folder, {"params": abstract})["params"])
