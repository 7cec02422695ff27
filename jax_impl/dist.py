"""What a JAX process runs on: its devices and mesh, its numeric precision, and jax.distributed.

The device picker and the run.dtype mapping here serve training, sampling and evaluation alike.
The mesh has two axes, ("data", "fsdp"): the batch's rows are split over both; each parameter and AdamW
moment is split over "fsdp" along its largest dimension that the axis divides (replicated when none
does; the stacked blocks within each layer, never along the layer axis) and replicated over "data".
XLA inserts the collectives: under run.parallel ddp the fsdp axis has size 1 and the gradients are
all-reduced, as DDP does in torch; under fsdp the weights are all-gathered where they are used and the
gradients reduce-scattered, as FSDP2 does. Nothing outside this file knows
which axes exist. torch_impl/dist.py is the torch side.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common.backend import DistInfo
from common.config import MAX_HOST_DEVICES, Config, ConfigError, shard_group_size
from common.precision import PRECISIONS, Precision, unsupported
from common.usage import env_int
from jax_impl.layout import in_layer_stack

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
# Compiled programs are kept here across runs unless JAX_COMPILATION_CACHE_DIR names another folder, so
# a config's second run skips compilation.
COMPILATION_CACHE_DIR = Path("~/.cache/gpt2-twin/jax").expanduser()
_initialized_here = False


def pick_devices(want: str, flag: str = "run.device") -> list:
    """auto | cpu | cuda -> the devices of that platform (auto: JAX's default platform)."""
    if want == "cpu":
        return jax.devices("cpu")
    if want == "cuda":
        try:
            return jax.devices("gpu")
        except RuntimeError:
            raise ConfigError(f"{flag} is cuda but JAX sees no GPU (is jax[cuda] installed?)") from None
    return jax.devices()


def precision(name: str) -> Precision:
    """The run.dtype's row of common/precision.py; ConfigError when JAX does not run it."""
    reason = unsupported(name, "jax")
    if reason:
        raise ConfigError(reason)
    return PRECISIONS[name]


def dtypes(name: str) -> tuple[jnp.dtype, jnp.dtype]:
    """run.dtype -> (compute dtype of the matmuls, parameter and optimizer-state dtype)."""
    p = precision(name)
    return jnp.dtype(p.compute), jnp.dtype(p.params)


def set_precision(name: str, exact: bool = False) -> None:
    """float64 (x64) exactly for fp64 runs; full-precision matmuls in fp64 runs (or `exact`, for parity),
    where GPUs and TPUs would otherwise take TF32 / bf16-pass matmuls for fp32. CPUs ignore the latter."""
    set_x64(name)
    jax.config.update("jax_default_matmul_precision", "highest" if exact or precision(name).float64 else None)


def set_x64(name: str) -> None:
    """JAX's float64 switch is per process: on for a run.dtype with float64 in it (fp64), off otherwise."""
    x64 = precision(name).float64
    if jax.config.jax_enable_x64 != x64:
        jax.config.update("jax_enable_x64", x64)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default (JAX_COMPILATION_CACHE_DIR wins if set)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE_DIR))


def setup_distributed(cfg: Config) -> tuple[DistInfo, Mesh]:
    """jax.distributed when launched that way, the precision flags, the compilation cache and the mesh."""
    set_precision(cfg.run.dtype)
    enable_compilation_cache()
    _initialize()
    mesh = make_mesh(cfg)
    return dist_info(mesh), mesh


def _launched_multiprocess() -> bool:
    """True when a launcher started several cooperating processes (explicit env, SLURM or Open MPI)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for var in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env_int(var, 1) > 1:
            return True
    return False


def _initialize() -> bool:
    """jax.distributed.initialize() once, when launched that way; returns whether it is initialized.

    JAX reads JAX_COORDINATOR_ADDRESS itself and detects SLURM / Open MPI; JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (the names common.loop also reads) are passed on explicitly.
    """
    global _initialized_here
    if _initialized_here or not _launched_multiprocess():
        return _initialized_here
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = env_int("JAX_NUM_PROCESSES", 1)
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = env_int("JAX_PROCESS_ID", 0)
    jax.distributed.initialize(**kwargs)
    _initialized_here = True
    return True


def teardown_distributed() -> None:
    """Shut jax.distributed down if this process started it; safe to call twice."""
    global _initialized_here
    if _initialized_here:
        jax.distributed.shutdown()
        _initialized_here = False


def make_mesh(cfg: Config) -> Mesh:
    """The ("data", "fsdp") mesh over every process's first run.devices local devices (0 = all); the fsdp
    axis has shard_group_size devices (1 under ddp), neighbours in device order."""
    devices = pick_devices(cfg.run.device)
    n = cfg.run.devices
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    local = len(by_process.get(jax.process_index(), []))
    if n > local:
        hint = (f"on CPU, launch with --devices {n} so XLA creates them before JAX starts" if n <= MAX_HOST_DEVICES
                else f"on CPU, at most {MAX_HOST_DEVICES} host devices")
        raise ConfigError(f"run.devices is {n} but this process has {local} {devices[0].platform} devices ({hint})")
    chosen = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:n or None]]
    size = shard_group_size(cfg, len(chosen))
    if len(chosen) % size:
        raise ConfigError(f"run.fsdp_size ({size}) does not divide the {len(chosen)} devices")
    return Mesh(np.array(chosen).reshape(len(chosen) // size, size), (DATA_AXIS, FSDP_AXIS))


def dist_info(mesh: Mesh) -> DistInfo:
    devices = list(mesh.devices.flat)
    local = sum(d.process_index == jax.process_index() for d in devices)
    return DistInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                    data_parallel_size=len(devices), local_replicas=local, device=devices[0].platform)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharding_of(mesh: Mesh, shape: tuple[int, ...], first: int = 0) -> NamedSharding:
    """A parameter's or AdamW moment's layout: split over the fsdp axis along its largest dimension from
    `first` on that the axis divides (the first such, on a tie), replicated when none does or the axis has
    one device."""
    size = mesh.shape[FSDP_AXIS]
    dims = [d for d, n in enumerate(shape) if d >= first and size > 1 and n % size == 0]
    if not dims:
        return replicated(mesh)
    split = max(dims, key=lambda d: shape[d])
    return NamedSharding(mesh, P(*(FSDP_AXIS if d == split else None for d in range(len(shape)))))


def state_shardings(mesh: Mesh, tree) -> object:
    """sharding_of every leaf of a tree of arrays or ShapeDtypeStructs (parameters, optimizer state); the
    stacked blocks are split within each layer, never along the layer axis, so that every device holds its
    share of each layer (the one the scan's step gathers) as with unstacked parameters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: sharding_of(mesh, tuple(a.shape), 1 if in_layer_stack(path) else 0), tree)


def bytes_per_device(tree) -> dict[object, int]:
    """Bytes each device holds of a tree of global arrays (a sharded array counts its shards only)."""
    held: dict[object, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(accum, rows, T) training batches: rows split over every device."""
    return NamedSharding(mesh, P(None, (DATA_AXIS, FSDP_AXIS), None))


def eval_sharding(mesh: Mesh) -> NamedSharding:
    """(rows, T) evaluation batches."""
    return NamedSharding(mesh, P((DATA_AXIS, FSDP_AXIS), None))


def place(tree, shardings) -> object:
    """Host arrays -> global arrays laid out as `shardings` (one for every leaf, or a tree matching `tree`);
    works across processes (every host holds the values)."""
    def put(a, sharding):
        host = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: put(a, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def put_batch(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows -> one global array (each process holds its own rows of the global batch)."""
    return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(x))
