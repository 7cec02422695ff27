"""Distributed set-up for torchrun (DDP), kept out of the model and the training step's math.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) everything here is a no-op on one
process, so tests and the single-process run share the code path.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.backend import DistInfo
from common.config import Config, ConfigError


def _device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but torch sees no CUDA device")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_precision_flags(cfg: Config, device: torch.device) -> None:
    """TF32 matmuls on CUDA for speed, except in fp64 / parity runs where every bit is compared."""
    if device.type != "cuda":
        return
    tf32 = cfg.run.dtype != "fp64"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def setup_distributed(cfg: Config) -> DistInfo:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU); pick the device."""
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    rank = int(os.environ["RANK"]) if launched else 0
    world = int(os.environ["WORLD_SIZE"]) if launched else 1
    local_rank = int(os.environ["LOCAL_RANK"]) if launched else 0
    device = _device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched and world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    set_precision_flags(cfg, device)
    return DistInfo(process_index=rank, process_count=world, data_parallel_size=world, local_replicas=1,
                    device=str(device))


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


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
