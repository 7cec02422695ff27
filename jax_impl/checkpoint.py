"""JAX checkpoints: out_dir/checkpoints/step_XXXXXXXX/{params, opt_state, rng (orbax items), meta.json}.

params and opt_state are the training state's trees as they are, the blocks stacked by layer
(jax_impl/model.py). A checkpoint holding the blocks layer by layer ({"h": {"0": ...}}) is read too,
and stacked on the host, so that such checkpoints keep resuming.

Every process calls save_checkpoint (orbax writes each array's shards from the processes that hold
them). orbax writes into a temporary folder and renames it into place when the save is finalized;
process 0 then writes meta.json (common.checkpoints.write_meta), which is what makes the folder count:
one rule with torch_impl/checkpoint.py, whose folder naming, completion and retention are
common/checkpoints.py's. A folder orbax finalized but that never got its meta.json is deleted by the
next save. Saves are synchronous, so that what the loop resumes from is exactly what was trained.
"""
from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from common.checkpoints import (CHECKPOINT_SUBDIR, CheckpointError, CheckpointMeta, file_hashes, read_meta,
                                retained_steps, step_dir_name, write_meta)
from common.config import Config
from common.precision import PRECISIONS
from common.portable import Portable, read_portable
from common.usage import first_line
from jax_impl import dist
from jax_impl.layout import LAYERS, abstract_params, flatten, stacked, unflatten, unstacked
from jax_impl.model import GPT, from_common, to_common
from jax_impl.optim import build_optimizer

ITEMS = ("params", "opt_state", "rng")


def save_checkpoint(state: Any, out_dir: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """Write checkpoint meta.step of `state` (a jax_impl.train.TrainState), then prune to the run's
    run.keep_checkpoints plus the best val_loss. Every process calls it; returns the folder."""
    folder = Path(out_dir) / CHECKPOINT_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / step_dir_name(meta.step)
    manager = _manager(folder)
    try:
        if meta.step in manager.all_steps():  # a save of this step that never got its meta.json, or a re-save
            manager.delete(meta.step)
        manager.save(meta.step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
            rng=ocp.args.StandardSave({"key": state.rng})), force=True)
        manager.wait_until_finished()
        if jax.process_index() == 0:  # every file orbax wrote, whichever process wrote it, is hashed
            write_meta(target, meta.replace(files=file_hashes(target)))
        # Every process takes the same decision (manager.delete is collective); this also removes
        # finalized folders that never got their meta.json.
        keep = retained_steps(out_dir, meta)
        for s in manager.all_steps():
            if s not in keep:
                manager.delete(s)
    finally:
        manager.close()
    return target


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def params_finite(state: Any) -> bool:
    """Whether every parameter is finite: one reduction on the devices (over the whole array, however it is
    sharded), one scalar to the host."""
    return bool(_all_finite(state.params).addressable_data(0))


def load_checkpoint(folder: str | os.PathLike, state: Any) -> Any:
    """A complete checkpoint folder restored with the shapes, dtypes and shardings of `state` (a TrainState of
    the same config; its values are not used, so Runtime.abstract_state() serves)."""
    folder = Path(folder)
    like = {"params": state.params, "opt_state": state.opt_state, "rng": {"key": state.rng}}
    # A checkpoint of the blocks per layer comes back as stacked numpy arrays, laid out here as `state`'s.
    items = jax.tree.map(lambda a, s: dist.place(a, s.sharding) if isinstance(a, np.ndarray) else a,
                         _restore(folder, like), like)
    step = dist.place(np.int32(read_meta(folder).step), state.step.sharding)
    return state.replace(step=step, params=items["params"], opt_state=items["opt_state"], rng=items["rng"]["key"])


def read_weights(folder: str | os.PathLike, cfg: Config) -> dict[str, np.ndarray]:
    """The checkpoint's weights as common weights, in the dtype they were trained in (numpy arrays: no
    device, and float64 whether or not this process runs JAX in x64)."""
    params = _restore(Path(folder), {"params": _host_template(abstract_params(cfg.model), cfg)})["params"]
    return to_common(params)


def read_moments(folder: str | os.PathLike, cfg: Config) -> dict[str, Any]:
    """AdamW's state of a checkpoint as {"step", "m": {name: array}, "v": {name: array}}."""
    shapes = abstract_params(cfg.model)
    opt_state = jax.eval_shape(build_optimizer(shapes, cfg).init, shapes)
    restored = _restore(Path(folder), {"opt_state": _host_template(opt_state, cfg)})["opt_state"]
    return {"step": read_meta(folder).step, "m": to_common(optax.tree.get(restored, "mu")),
            "v": to_common(optax.tree.get(restored, "nu"))}


class _Expected(logging.Filter):
    """Drops orbax's warning about a step folder without its metadata file: a save killed before orbax
    finalized it leaves one, which the next save deletes (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_Expected())


class _Aftermath(logging.Filter):
    """asyncio's 'Task exception was never retrieved' (or 'Future …') for the reads a failed restore abandoned."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Task exception was never retrieved",
                                                "Future exception was never retrieved"))


def _silence_aftermath() -> None:
    """When a restore fails, tensorstore reads still in flight finish on orbax's closed event loop, on
    their own threads and at any moment from the failure on, and each prints a traceback ('Event loop
    is closed', 'Exception ignored in: <coroutine …>', 'Task/Future exception was never retrieved') around the
    one error line. Installed before each restore, since they can race the error itself; those, and
    only those, are dropped for the rest of the process (nothing else here runs asyncio)."""
    if getattr(sys.excepthook, "_drops_orbax_aftermath", False):
        return
    except_hook, unraisable_hook, thread_hook = sys.excepthook, sys.unraisablehook, threading.excepthook

    def aftermath(exc: BaseException | None, obj: Any = None) -> bool:
        return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or inspect.iscoroutine(obj)

    def excepthook(kind, value, tb):
        if not aftermath(value):
            except_hook(kind, value, tb)

    def unraisablehook(unraisable):
        if not aftermath(unraisable.exc_value, unraisable.object):
            unraisable_hook(unraisable)

    def threadhook(args):
        if not aftermath(args.exc_value):
            thread_hook(args)

    excepthook._drops_orbax_aftermath = True
    sys.excepthook, sys.unraisablehook, threading.excepthook = excepthook, unraisablehook, threadhook
    logging.getLogger("asyncio").addFilter(_Aftermath())


def _manager(folder: Path) -> ocp.CheckpointManager:
    # step_prefix + fixed length 8 gives common.checkpoints.step_dir_name's "step_00000100".
    options = ocp.CheckpointManagerOptions(step_prefix="step", step_format_fixed_length=8, create=True,
                                           enable_async_checkpointing=False, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(folder.resolve(), options=options, item_names=ITEMS)


def _host_template(tree: Any, cfg: Config) -> Any:
    """numpy arrays shaped like `tree`, floating leaves in the run's parameter dtype: orbax restores into
    numpy, on no device and whatever this process's x64 setting."""
    param_dtype = np.dtype(PRECISIONS[cfg.run.dtype].params)
    return jax.tree.map(lambda a: np.empty(a.shape, param_dtype if jnp.issubdtype(a.dtype, jnp.floating)
                                           else a.dtype), tree)


def _saved_per_layer(path: Path) -> bool:
    """Whether the checkpoint holds the blocks layer by layer ({"h": {"0": ...}}) rather than stacked."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            saved = ckptr.metadata(path.resolve() / "params").item_metadata
        return "0" in saved[LAYERS]
    except Exception:  # orbax raises many types; a folder whose metadata cannot be read fails the restore
        return False   # that follows, on every process, and that names what is wrong


def _each_params_tree(fn, tree: Any) -> Any:
    """`tree` with fn applied to every params-shaped dict in it (one holding the blocks under "h"): the
    parameters themselves, or AdamW's moments inside an optax state."""
    def params_shaped(node: Any) -> bool:
        return isinstance(node, dict) and LAYERS in node
    return jax.tree.map(lambda node: fn(node) if params_shaped(node) else node, tree, is_leaf=params_shaped)


def _restore(path: Path, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restore the items named in `abstract` ({"params": tree of arrays or ShapeDtypeStructs, ...}). A
    checkpoint saved with the blocks per layer is read on the host, into numpy arrays of that layout, and
    returned stacked (numpy arrays, whatever `abstract` holds)."""
    if _saved_per_layer(path):
        host = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract)
        per_layer = _each_params_tree(lambda t: unflatten(unstacked(t)), host)
        restored = _restore_items(path, per_layer)
        return _each_params_tree(lambda t: stacked(flatten(t)), restored)
    return _restore_items(path, abstract)


def _restore_items(path: Path, abstract: dict[str, Any]) -> dict[str, Any]:
    args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
    _silence_aftermath()
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(path.resolve(), args=ocp.args.Composite(**args))
    except Exception as e:  # orbax/tensorstore raise many types for missing or corrupt files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first_line(e)[:300]})") from None
    return {name: restored[name] for name in abstract}


def load_model(path: str | Path, device: str, dtype: str) -> tuple[tuple[GPT, Any], Portable]:
    """(GPT, its params on `device`) of any checkpoint, run folder or Hugging Face folder (common/portable.py), in
    `dtype` (auto | cpu | cuda, named --device in errors), and what was read."""
    portable = read_portable(path)
    dist.set_precision(dtype)  # after reading: a checkpoint's own dtype may differ
    compute, param_dtype = dist.dtypes(dtype)
    cfg = portable.config.model
    params = from_common(portable.weights, cfg, param_dtype, source=str(path))
    model = GPT(cfg, dtype=compute, param_dtype=param_dtype)
    return (model, jax.device_put(params, dist.pick_devices(device, flag="--device")[0])), portable
