"""Distributed set-up for JAX: jax.distributed, the device mesh and the shardings, never in the model.

One mesh axis, "data": the batch is split over it and parameters and optimizer state are replicated,
so XLA inserts the gradient all-reduce that DDP does in torch. An FSDP axis would be a second mesh
axis ("data", "fsdp") with `param_sharding` returning P over "fsdp" for large tensors; batch_sharding
would then split rows over both axes. Nothing outside this file knows which axes exist.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common.backend import DistInfo
from common.config import Config, ConfigError

DATA_AXIS = "data"
_initialized_here = False


def _launched_multiprocess() -> bool:
    """True when a launcher started several cooperating processes (explicit env, SLURM or Open MPI)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for var in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def initialize_distributed() -> bool:
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


def shutdown_distributed() -> None:
    global _initialized_here
    if _initialized_here:
        jax.distributed.shutdown()
        _initialized_here = False


def _platform_devices(cfg: Config) -> list:
    want = cfg.run.device
    if want == "cpu":
        return jax.devices("cpu")
    if want == "cuda":
        try:
            return jax.devices("gpu")
        except RuntimeError:
            raise ConfigError("run.device is cuda but JAX sees no GPU (is jax[cuda] installed?)") from None
    return jax.devices()


def make_mesh(cfg: Config) -> Mesh:
    """A 1-D ("data",) mesh over every process's first run.devices local devices (0 = all)."""
    devices = _platform_devices(cfg)
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


def put_batch(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This process's rows -> one global array (each process holds its own rows of the global batch)."""
    return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(x))
