"""The run planner: parameters, FLOPs per token, batch arithmetic and Chinchilla budget.

`python -m common.plan --config gpt2-124m` prints it alone; both trainers print it at start.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from common.config import (Config, ConfigError, ModelConfig, build_parser, grad_accum_steps, parse_args,
                           validate)
from common.names import param_shapes
from common.usage import UsageError


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


# Stated peaks for MFU (FLOP/s per replica). CPU figures are a 2-vCPU AMD EPYC's GEMM peaks (other CPUs
# differ: `python -m parity.probe` measures yours, `--run.peak_tflops` uses it); GPU ones are the A100's
# dense tensor-core peaks, nanoGPT's convention.
PEAK_FLOPS = {
    ("cpu", "fp32"): (340e9, "a 2-vCPU AMD EPYC's fp32 GEMM peak; python -m parity.probe measures this CPU's"),
    ("cpu", "fp64"): (170e9, "half the fp32 CPU peak"),
    ("cpu", "bf16"): (750e9, "a 2-vCPU AMD EPYC's avx512_bf16 GEMM peak; python -m parity.probe measures this CPU's"),
    ("cpu", "fp16"): (750e9, "taken as the CPU bf16 peak"),
    ("cuda", "fp32"): (156e12, "A100 TF32 dense"),
    ("cuda", "fp64"): (19.5e12, "A100 FP64 tensor core"),
    ("cuda", "bf16"): (312e12, "A100 bf16 dense"),
    ("cuda", "fp16"): (312e12, "A100 fp16 dense"),
}


def peak_flops(device_kind: str, dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for MFU; `run.peak_tflops` overrides it."""
    if override_tflops > 0:
        return override_tflops * 1e12, "run.peak_tflops"
    kind = "cuda" if device_kind in ("cuda", "gpu") else "cpu"
    return PEAK_FLOPS[(kind, dtype)]


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
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser("python -m common.plan", "Print the run plan of a config.")
        parser.add_argument("--world-size", type=int, default=1, help="data-parallel replicas (GPUs or devices)")
        args = parse_args(argv, parser.prog, parser.description, parser)
        world = args.extra["world_size"]
        cfg = validate(args.config, world)
        train_tokens = None
        try:
            from common.data import TokenStream
            train_tokens = TokenStream(cfg.data.dir, "train").epoch_tokens
        except Exception:  # no data prepared yet: the plan is still useful without it
            pass
        print("\n".join(plan_lines(cfg, world, train_tokens)))
        return 0
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
