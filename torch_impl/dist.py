"""What a torch process runs on: its device, its numeric precision and torchrun's process group (DDP).

The device picker and the run.dtype mapping here serve training, sampling and evaluation alike.
Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) the distributed parts are no-ops on one
process, so tests and the single-process run share the code path. jax_impl/dist.py is the JAX side.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.backend import DistInfo
from common.config import Config, ConfigError
from common.precision import PRECISIONS, Precision, unsupported

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def pick_device(want: str, local_rank: int = 0, flag: str = "run.device") -> torch.device:
    """auto | cpu | cuda -> the device (auto: this rank's GPU when torch sees one)."""
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} is cuda but torch sees no CUDA device")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def precision(name: str) -> Precision:
    """The run.dtype's row of common/precision.py; ConfigError when torch does not run it."""
    reason = unsupported(name, "torch")
    if reason:
        raise ConfigError(reason)
    return PRECISIONS[name]


def dtypes(name: str) -> tuple[torch.dtype | None, torch.dtype]:
    """run.dtype -> (autocast dtype, None when the model runs in its parameter dtype; parameter dtype)."""
    p = precision(name)
    compute, params = _DTYPES[p.compute], _DTYPES[p.params]
    return (None if compute == params else compute), params


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass of run.dtype `name` runs in (mixed precision: autocast)."""
    compute, _ = dtypes(name)
    return torch.autocast(device_type=device.type, dtype=compute) if compute else contextlib.nullcontext()


def set_precision(name: str, device: torch.device, exact: bool = False) -> None:
    """Matmul precision: TF32 on CUDA for speed, except in fp64 runs (or `exact`, for parity) where every
    bit is compared. CPUs ignore the setting."""
    if device.type != "cuda":
        return
    tf32 = not exact and not precision(name).float64
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def setup_distributed(cfg: Config) -> DistInfo:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU); pick the device and
    set the precision flags."""
    dtypes(cfg.run.dtype)  # refuse an unsupported run.dtype before anything starts
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    rank = int(os.environ["RANK"]) if launched else 0
    world = int(os.environ["WORLD_SIZE"]) if launched else 1
    local_rank = int(os.environ["LOCAL_RANK"]) if launched else 0
    device = pick_device(cfg.run.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched and world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    set_precision(cfg.run.dtype, device)
    return DistInfo(process_index=rank, process_count=world, data_parallel_size=world, local_replicas=1,
                    device=str(device))


def teardown_distributed() -> None:
    """Destroy the process group; safe to call twice."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def rank_seed(seed: int, dist: DistInfo, step: int) -> int:
    """torch's RNG seed on this rank: dropout masks must differ across ranks, and the step term re-seeds
    ranks > 0 after a resume (rank 0 restores its saved RNG state)."""
    return seed + 1000 * dist.process_index + 7919 * step


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP when there are several ranks; the bare model otherwise."""
    if not is_distributed():
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on micro-steps before the last, which then averages the sum once.

    Uses DDP's public context manager (build-nanogpt's private `require_backward_grad_sync` flag
    set at the wrong moment silently broke accumulation).
    """
    if sync or not isinstance(model, DDP):
        return contextlib.nullcontext()
    return model.no_sync()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)  # gloo has no AVG
        value /= tdist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        value = value.clone()
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if is_distributed():
        tdist.barrier()
