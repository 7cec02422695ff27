"""What a torch process runs on: its device, its numeric precision, torchrun's process group, and how the
model is spread over the ranks: DDP (run.parallel = ddp) or FSDP2 (fsdp).

The device picker and the run.dtype mapping here serve training, sampling and evaluation alike.
Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) the distributed parts are no-ops on one
process, so tests and the single-process run share the code path. Under FSDP2 parameters, gradients and
AdamW's moments are DTensors sharded on their first dimension; the functions at the end of this file are
everything else in torch_impl that sees a shard: local views, sums over the shard group, and full
(gathered) state dicts in the bare model's layout. jax_impl/dist.py is the JAX side.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.backend import DistInfo
from common.config import Config, ConfigError, shard_group_size
from common.precision import PRECISIONS, Precision, unsupported
from common.usage import env_int

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


def dtypes(name: str) -> tuple[torch.dtype, torch.dtype]:
    """run.dtype -> (compute dtype of the matmuls, parameter and optimizer-state dtype); where they differ
    the forward runs under autocast."""
    p = precision(name)
    return _DTYPES[p.compute], _DTYPES[p.params]


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass of run.dtype `name` runs in (mixed precision: autocast)."""
    compute, params = dtypes(name)
    return torch.autocast(device_type=device.type, dtype=compute) if compute != params else contextlib.nullcontext()


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
    rank = env_int("RANK", None) if launched else 0  # set by torchrun: each one is needed
    world = env_int("WORLD_SIZE", None) if launched else 1
    local_rank = env_int("LOCAL_RANK", None) if launched else 0
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


@functools.cache
def _fsdp() -> Any:
    """FSDP2's module: public as torch.distributed.fsdp since torch 2.6; the floor, 2.5, has it under _composable."""
    import torch.distributed.fsdp as fsdp
    if hasattr(fsdp, "fully_shard"):
        return fsdp
    import torch.distributed._composable.fsdp as fsdp2
    return fsdp2


@functools.cache
def _dtensor() -> type:
    from torch.distributed.tensor import DTensor
    return DTensor


def shard_model(model: torch.nn.Module, cfg: Config, device: torch.device) -> None:
    """FSDP2 in place when run.parallel is fsdp and there are several ranks.

    Each transformer block is one all-gather/reduce-scatter unit, the root (embeddings, which the tied
    head also uses, and ln_f) another. run.fsdp_size below the world size shards within groups of that
    many ranks and replicates across the groups (HSDP, a ("data", "fsdp") mesh like JAX's). The blocks
    gather their weights in run.dtype's compute dtype, which autocast would cast them to anyway, and reduce
    gradients in the parameter dtype; their inputs are not cast, so the residual stream keeps the
    parameter dtype as under DDP, and the root's weights stay in it (the embeddings feed that stream).
    """
    world = tdist.get_world_size() if is_distributed() else 1
    size = shard_group_size(cfg, world)
    if size == 1:
        return
    from torch.distributed.device_mesh import init_device_mesh

    mesh = (init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",)) if size == world else
            init_device_mesh(device.type, (world // size, size), mesh_dim_names=("data", "fsdp")))
    fsdp = _fsdp()
    compute, params = dtypes(cfg.run.dtype)
    keep = fsdp.MixedPrecisionPolicy(reduce_dtype=params, cast_forward_inputs=False)
    cast = fsdp.MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=params, cast_forward_inputs=False)
    for block in model.h:
        if compute != params:  # LayerNorms compute in the parameter dtype (CPU autocast refuses bf16 weights)
            fsdp.fully_shard(block.ln_1, mesh=mesh, mp_policy=keep)
            fsdp.fully_shard(block.ln_2, mesh=mesh, mp_policy=keep)
        fsdp.fully_shard(block, mesh=mesh, mp_policy=cast)
    fsdp.fully_shard(model, mesh=mesh, mp_policy=keep)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` (or the module torch.compile wraps) is FSDP2-sharded."""
    return is_distributed() and isinstance(getattr(model, "_orig_mod", model), _fsdp().FSDPModule)


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP when there are several ranks and shard_model did not shard; `model` itself otherwise."""
    if not is_distributed() or is_sharded(model):
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on micro-steps before the last, which then
    averages the sum once.

    Uses DDP's public context manager (build-nanogpt's private `require_backward_grad_sync` flag
    set at the wrong moment silently broke accumulation) and FSDP2's set_requires_gradient_sync, which
    keeps the unsharded gradients between micro-steps.
    """
    if is_sharded(model):
        getattr(model, "_orig_mod", model).set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
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


# --- sharded tensors (FSDP2's DTensors); plain tensors pass through unchanged ----------------------------
def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `t`, sharing its storage (in-place changes reach `t`); `t` when not sharded."""
    return t.to_local() if isinstance(t, _dtensor()) else t


def _shard_group(t: torch.Tensor) -> tuple[Any, int]:
    """(process group, its size) of the mesh dimension that shards `t`."""
    dim = next(i for i, placement in enumerate(t.placements) if placement.is_shard())
    return t.device_mesh.get_group(dim), t.device_mesh.size(dim)


def sum_over_shards(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value`, a sum over this rank's shards of tensors sharded like `like`, summed over the shard group
    (not over HSDP's replicas, which hold the same shards): the sum over the whole tensors."""
    if not isinstance(like, _dtensor()):
        return value
    value = value.clone()
    tdist.all_reduce(value, op=tdist.ReduceOp.SUM, group=_shard_group(like)[0])
    return value


def whole_rows(pieces: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """One value per row of each whole tensor in `like`, from `pieces`, one value per row of this rank's shard
    (gathered in float64), with one all-gather over the shard group; `pieces` itself when not sharded.

    FSDP2 shards the first dimension in chunks of ceil(rows / ranks), in rank order, so padding each
    piece to its chunk and reading the gathered chunks rank by rank gives the rows in order.
    """
    if not pieces or not isinstance(like[0], _dtensor()):
        return pieces
    group, size = _shard_group(like[0])
    chunks = [-(-t.shape[0] // size) for t in like]
    mine = torch.cat([torch.nn.functional.pad(p.double(), (0, c - p.numel())) for p, c in zip(pieces, chunks)])
    gathered = [torch.empty_like(mine) for _ in range(size)]
    tdist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered)  # (ranks, sum of chunks)
    rows, offset = [], 0
    for t, c in zip(like, chunks):
        rows.append(table[:, offset:offset + c].reshape(-1)[:t.shape[0]])
        offset += c
    return rows


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a shard); `t` when not sharded."""
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def _gather_options(everywhere: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)


def full_model_state(model: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The model's state_dict with whole tensors, named as the bare model's, whatever the parallelism.

    Sharded, every rank must call it: the tensors are gathered one at a time onto rank 0's CPU (the
    other ranks get {}) or, with `everywhere`, onto every rank's device. Unsharded, the live state_dict.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_gather_options(everywhere))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, everywhere: bool = False
                         ) -> dict[str, Any]:
    """The optimizer's state_dict with whole tensors, in the unsharded optimizer's own layout (state numbered
    by the parameters' order in param_groups); gathered like full_model_state."""
    if not is_sharded(model) or not optimizer.state:
        # Empty, there is nothing to gather, and DCP would first create the state with an lr-0 step, which
        # counts as Adam's step 1.
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_gather_options(everywhere))
    if not named:
        return {}
    names = [n for group in named["param_groups"] for n in group["params"]]
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: slot for n, slot in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """optimizer.load_state_dict of a state_dict in the unsharded layout (full_optimizer_state's), sharding its
    tensors like the parameters when the model is sharded (every rank calls it with the whole state)."""
    if not is_sharded(model) or not saved["state"]:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for group in optimizer.param_groups for p in group["params"]]
    named = {"state": {names[i]: slot for i, slot in saved["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
