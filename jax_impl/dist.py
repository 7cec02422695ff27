"""What a JAX process runs on: its devices and mesh, its numeric precision, and jax.distributed.

The device picker and the run.dtype mapping here serve training, sampling and evaluation alike.
One mesh axis, "data": the batch is split over it and parameters and optimizer state are replicated,
so XLA inserts the gradient all-reduce that DDP does in torch. An FSDP axis would be a second mesh
axis ("data", "fsdp") with `param_sharding` returning P over "fsdp" for large tensors; batch_sharding
would then split rows over both axes. Nothing outside this file knows which axes exist.
torch_impl/dist.py is the torch side.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common.backend import DistInfo
from common.config import Config, ConfigError
from common.precision import PRECISIONS, Precision, unsupported

DATA_AXIS = "data"
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
        if int(os.environ.get(var, "1") or 1) > 1:
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
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
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
    """A 1-D ("data",) mesh over every process's first run.devices local devices (0 = all)."""
    devices = pick_devices(cfg.run.device)
    n = cfg.run.devices
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    local = len(by_process.get(jax.process_index(), []))
    if n > local:
        raise ConfigError(f"run.devices is {n} but this process has {local} {devices[0].platform} devices "
                          f"(on CPU, launch with --devices {n} so XLA creates them before JAX starts)")
    chosen = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:n or None]]
    return Mesh(np.array(chosen), (DATA_AXIS,))


def dist_info(mesh: Mesh) -> DistInfo:
    devices = list(mesh.devices.flat)
    local = sum(d.process_index == jax.process_index() for d in devices)
    return DistInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                    data_parallel_size=len(devices), local_replicas=local, device=devices[0].platform)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh) -> NamedSharding:
    """Parameters and optimizer state: replicated on the data axis (a prefix for the whole tree)."""
    return replicated(mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(accum, rows, T) training batches: rows split over the data axis."""
    return NamedSharding(mesh, P(None, DATA_AXIS, None))


def eval_sharding(mesh: Mesh) -> NamedSharding:
    """(rows, T) evaluation batches."""
    return NamedSharding(mesh, P(DATA_AXIS, None))


def replicate(tree, sharding) -> object:
    """Host arrays -> global arrays with `sharding`; works across processes (every host holds the values)."""
    def put(a):
        host = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(put, tree)


def put_batch(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows -> one global array (each process holds its own rows of the global batch)."""
    return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(x))
