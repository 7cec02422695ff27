"""The run planner: parameters, FLOPs per token, batch arithmetic, Chinchilla budget and memory per device.

`python -m common.plan --config gpt2-124m` prints it alone; both trainers print it at start.
`python -m common.plan --config gpt2-xl --devices 8 --device-memory 24` adds what each device holds under
ddp and under fsdp, side by side, and whether it fits.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

from common.config import PARALLELISMS, Config, ConfigError, ModelConfig, grad_accum_steps, shard_group_size, validate

from common.config_files import build_parser, parse_args
from common.names import param_shapes
from common.precision import PRECISIONS
from common.usage import UsageError

_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2 ** 30


def _unit(largest: int) -> tuple[str, int]:
    """GiB, or MiB for models whose figures would all round to 0.00 GiB."""
    return ("GiB", GIB) if largest >= GIB else ("MiB", 2 ** 20)


def num_params(cfg: ModelConfig, include_wpe: bool = True) -> int:
    total = 0
    for name, shape in param_shapes(cfg).items():
        if name == "wpe.weight" and not include_wpe:
            continue
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token (nanoGPT/PaLM convention): 6N + 12·L·C·T, N without wpe, tied head once."""
    return 6 * num_params(cfg, include_wpe=False) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


# Dense (no sparsity) peaks of NVIDIA's datasheets, FLOP/s, for MFU on CUDA devices, matched by device name
# (the more specific name first). fp32 runs take TF32 tensor cores on these GPUs (both backends allow it),
# fp64 the FP64 tensor cores. A GPU not listed here gets a probed GEMM peak (the backends' levers.py); CPUs
# always do, since no constant measured on one CPU holds for another.
GPU_DATASHEET = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12, "fp64": 51.2e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 417.5e12, "fp64": 60e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12, "fp64": 66.9e12}),
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12, "fp64": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12, "fp64": 19.5e12}),
)


def datasheet_peak(device_name: str, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, where the figure comes from) of a GPU named `device_name` in `dtype`, or None if not listed."""
    for name, peaks in GPU_DATASHEET:
        if name.lower() in device_name.lower() and dtype in peaks:
            kind = {"fp32": "TF32", "fp64": "FP64 tensor core"}.get(dtype, dtype)
            return peaks[dtype], f"{name} datasheet {kind} dense peak ({device_name})"
    return None


@dataclass(frozen=True)
class Plan:
    params: int
    flops_per_token: int
    tokens_per_step: int
    grad_accum: int
    total_tokens: int
    chinchilla_tokens: int
    steps_per_epoch: float | None


def make_plan(cfg: Config, world_size: int = 1, train_tokens: int | None = None) -> Plan:
    params = num_params(cfg.model)
    total = cfg.optim.total_batch_size * cfg.optim.max_steps
    return Plan(params=params, flops_per_token=flops_per_token(cfg.model),
                tokens_per_step=cfg.optim.total_batch_size, grad_accum=grad_accum_steps(cfg, world_size),
                total_tokens=total, chinchilla_tokens=20 * params,
                steps_per_epoch=train_tokens / cfg.optim.total_batch_size if train_tokens else None)


def device_memory(cfg: Config, world_size: int, parallel: str) -> dict[str, int]:
    """Estimated bytes one device holds at the peak of a training step, by kind, under `parallel`.

    Parameters, gradients and AdamW's two moments are in the parameter dtype, whole under ddp and
    1/shard_group_size of it under fsdp, which also holds whole weights while they are used: the root
    (embeddings and tied head, ln_f) and two blocks (the one computing and the one prefetched) in the
    compute dtype. Activations are one micro-batch's, saved for the backward pass without
    recomputation, per layer and token 16·C values (Korthikanti et al. 2022 with fused attention and
    no dropout masks): the two LayerNorm inputs in the parameter dtype (the residual stream), the rest
    in the compute dtype; plus the head's fp32 logits and their gradient, for all rows or one chunk
    of run.loss_chunk_rows (all rows when the machine chooses: the most it can be). Allocator slack,
    workspaces and the framework itself come on top.
    """
    m, p = cfg.model, PRECISIONS[cfg.run.dtype]
    pb, cb = _BYTES[p.params], _BYTES[p.compute]
    n = num_params(m)
    shards = shard_group_size(cfg, world_size, parallel)
    block = sum(math.prod(shape) for name, shape in param_shapes(m).items() if name.startswith("h.0."))
    tokens = cfg.optim.micro_batch_size * m.block_size
    rows = tokens if cfg.run.loss_chunk_rows <= 0 else min(tokens, cfg.run.loss_chunk_rows)
    return {
        "parameters": n * pb // shards,
        "gradients": n * pb // shards,
        "AdamW moments": 2 * n * pb // shards,
        "gathered weights": 0 if shards == 1 else (n - m.n_layer * block) * pb + 2 * block * cb,
        "activations": m.n_layer * tokens * m.n_embd * (14 * cb + 2 * pb) + rows * m.padded_vocab_size * 4 * 2,
    }


def memory_lines(cfg: Config, world_size: int, device_gib: float = 0.0) -> list[str]:
    """The device_memory table under ddp and fsdp for `world_size` devices; with `device_gib`, whether each fits."""
    table = {par: device_memory(cfg, world_size, par) for par in PARALLELISMS}
    shards = shard_group_size(cfg, world_size, "fsdp")
    o, m = cfg.optim, cfg.model
    heads = {"ddp": "ddp", "fsdp": f"fsdp ({shards}-way)"}
    totals = {par: sum(table[par].values()) for par in PARALLELISMS}
    unit, size = _unit(max(totals.values()))
    lines = [f"memory per device, estimated: {world_size} devices, run.dtype {cfg.run.dtype}, micro-batch "
             f"{o.micro_batch_size} × {m.block_size} tokens (this run: {cfg.run.parallel})",
             f"| {unit} | " + " | ".join(heads[par] for par in PARALLELISMS) + " |",
             "|---|" + "---|" * len(PARALLELISMS)]
    for kind in table["ddp"]:
        lines.append(f"| {kind} | " + " | ".join(f"{table[par][kind] / size:.2f}" for par in PARALLELISMS) + " |")
    lines.append("| total | " + " | ".join(f"{totals[par] / size:.2f}" for par in PARALLELISMS) + " |")
    accum = grad_accum_steps(cfg, world_size)
    if accum > 1 and shards > 1:
        extra = table["ddp"]["gradients"] - table["fsdp"]["gradients"]
        totals["torch fsdp"] = totals["fsdp"] + extra
        lines.append(f"torch's fsdp accumulates {accum} micro-steps in whole gradients, reduce-scattered after the "
                     f"last: +{extra / size:.2f} {unit} = {totals['torch fsdp'] / size:.2f} {unit}")
    if device_gib > 0:
        lines.append(f"fits in {device_gib:g} GiB: " + ", ".join(
            f"{name} {'yes' if total <= device_gib * GIB else 'no'}" for name, total in totals.items()))
    return lines


def plan_lines(cfg: Config, world_size: int = 1, train_tokens: int | None = None) -> list[str]:
    p = make_plan(cfg, world_size, train_tokens)
    m, o = cfg.model, cfg.optim
    meets = "meets" if p.total_tokens >= p.chinchilla_tokens else "is below"
    lines = [
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}, "
        f"vocab {m.vocab_size} (padded {m.padded_vocab_size})",
        f"parameters: {p.params:,} ({p.params / 1e6:.2f}M)",
        f"FLOPs per token: {p.flops_per_token / 1e6:,.1f} M (6N + 12·L·C·T)",
        f"tokens per step: {p.tokens_per_step:,} = {o.micro_batch_size} seqs × {m.block_size} tokens × "
        f"{world_size} replicas × {p.grad_accum} accumulation steps",
        f"steps: {o.max_steps:,} → {p.total_tokens:,} tokens; Chinchilla (20 × params) = "
        f"{p.chinchilla_tokens:,}: the run {meets} it ({p.total_tokens / p.chinchilla_tokens:.2f}×)",
    ]
    if p.steps_per_epoch is not None:
        lines.append(f"data: {train_tokens:,} train tokens = {p.steps_per_epoch:,.1f} steps per epoch")
    memory = device_memory(cfg, world_size, cfg.run.parallel)
    unit, size = _unit(sum(memory.values()))
    lines.append(f"memory per device ({cfg.run.parallel}, estimated): {sum(memory.values()) / size:.2f} {unit} = "
                 + " + ".join(f"{kind} {b / size:.2f}" for kind, b in memory.items() if b))
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser("python -m common.plan", "Print the run plan of a config.")
        parser.add_argument("--devices", "--world-size", dest="world_size", type=int, default=1,
                            help="devices (GPUs, ranks) the run trains on")
        parser.add_argument("--parallel", choices=PARALLELISMS, default=None, help="run.parallel (default: the config's)")
        parser.add_argument("--device-memory", type=float, default=0.0, metavar="GIB",
                            help="memory of one device: say whether the run fits under ddp and fsdp")
        args = parse_args(argv, parser.prog, parser.description, parser)
        world = args.extra["world_size"]
        if world < 1:
            raise ConfigError(f"--devices must be ≥ 1, got {world}")
        cfg = args.config
        if args.extra["parallel"]:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, parallel=args.extra["parallel"]))
        cfg = validate(cfg, world)
        train_tokens = None
        try:
            from common.data import TokenStream
            train_tokens = TokenStream(cfg.data.dir, "train").epoch_tokens
        except Exception:  # no data prepared yet: the plan is still useful without it
            pass
        print("\n".join(plan_lines(cfg, world, train_tokens) + memory_lines(cfg, world, args.extra["device_memory"])))
        return 0
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
