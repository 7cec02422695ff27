"""One typed configuration schema for both backends: four frozen dataclasses (model, optim, data, run), their
defaults (the default run) and their validation.

common/config_files.py reads them from a TOML file in `configs/` and dotted command-line flags
(`--model.n_layer 6`); there is no exec-style configurator and no global state.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from common.precision import DTYPES, PRECISIONS
from common.usage import InputError

# Host devices a CPU run may ask XLA for (JAX's --devices, parity.bench's replicas); XLA takes minutes to
# create hundreds of thousands.
MAX_HOST_DEVICES = 1024

PARALLELISMS = ("ddp", "fsdp")  # run.parallel
LEVER_MODES = ("auto", "probe", "fixed")  # run.levers (common/levers.py)
GEMM_PATHS = ("auto", "aten", "onednn", "xla")  # run.cpu_gemm: torch takes aten or onednn, JAX xla
AUTO_CHUNK_ROWS = -1  # run.loss_chunk_rows: the machine's choice (common/levers.py)


class ConfigError(InputError):
    """Bad configuration input; entry points print it on one line and exit with code 2."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257  # real tokens (GPT-2 BPE); targets are always < vocab_size
    padded_vocab_size: int = 50304  # embedding rows; padding to a multiple of 64 speeds up matmuls
    block_size: int = 128  # context length T
    n_layer: int = 4  # transformer blocks
    n_head: int = 2  # attention heads per block; n_embd must be divisible by it
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # on attention weights, after each residual branch and on the embeddings
    bias: bool = True  # biases in the linear layers and LayerNorms, as GPT-2 has them


@dataclass(frozen=True)
class OptimConfig:
    total_batch_size: int = 4096  # tokens per optimizer step, summed over ranks and micro-steps
    micro_batch_size: int = 16  # sequences per rank (JAX: per device) per forward/backward
    max_lr: float = 2e-3  # the peak of the schedule, reached after warmup_steps
    min_lr: float = 2e-4  # the floor the cosine decays to at max_steps
    warmup_steps: int = 10  # linear warm-up: lr = max_lr · (step + 1) / warmup_steps
    max_steps: int = 150  # optimizer steps of the run
    weight_decay: float = 0.1  # AdamW's, on parameters of two or more dimensions only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decay rates
    eps: float = 1e-8  # AdamW's, outside the square root
    grad_clip: float = 1.0  # global gradient norm clipped to this before AdamW; 0 disables clipping


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/stdlib"  # folder of shards ({name}_train_*.bin / {name}_val_*.bin, or .npy)
    val_tokens: int = 16384  # tokens scored per evaluation
    # shuffled: each step's rows are block-sized sequences drawn across the corpus in a seeded order per
    # epoch; stream: consecutive tokens, build-nanogpt's order (common/data.py)
    order: str = "shuffled"


@dataclass(frozen=True)
class RunConfig:
    seed: int = 1337  # weights, data order and dropout all follow from it
    dtype: str = "fp32"  # fp32 | bf16 (fp32 master weights) | fp16 (torch only) | fp64 (parity): common/precision.py
    compile: bool = False  # torch.compile the model (JAX always compiles its step under jit)
    device: str = "auto"  # auto takes a GPU where the framework sees one, else the CPU
    devices: int = 0  # JAX: local devices in the mesh (0 = all)
    # ddp: every device holds all parameters, gradients and AdamW moments; fsdp: they are sharded over
    # run.fsdp_size devices (torch FSDP2, a JAX "fsdp" mesh axis) and gathered layer by layer when used.
    parallel: str = "ddp"
    fsdp_size: int = 0  # devices per shard group with parallel = fsdp (0 = all); the rest replicate (HSDP)
    # console line and float() of the step metrics every N steps: no host sync in between
    log_interval: int = 10
    eval_interval: int = 50  # val loss every N steps and at the end; 0 = never
    sample_interval: int = 0  # 0 = sample only at the end
    checkpoint_interval: int = 50  # a checkpoint every N steps and at the end; 0 = never
    keep_checkpoints: int = 2  # last N kept, plus the best-val one
    out_dir: str = "runs/default/{backend}"  # {backend} becomes torch or jax
    sample_prompt: str = "def "  # the text samples continue; empty starts from EOT
    sample_tokens: int = 64  # new tokens per sample
    num_samples: int = 2  # samples printed at sample_interval and at the end
    top_k: int = 50  # sampling keeps the k most likely tokens; 0 = all
    temperature: float = 1.0  # sampling temperature; 0 = greedy
    peak_tflops: float = 0.0  # MFU denominator; 0 = a stated default for the device and dtype
    hellaswag_path: str = ""  # a hellaswag_val.jsonl scored every hellaswag_interval steps and at the end
    hellaswag_interval: int = 0  # 0 = only at the end (when hellaswag_path is set)
    hellaswag_limit: int = 0  # examples scored per evaluation; 0 = the whole file
    diagnostics_interval: int = 0  # per-group grad norms and grad/weight ratios every N steps; 0 = off
    overfit_single_batch: bool = False  # train on the first batch at every step (the plumbing check)
    wandb: bool = False  # send every metrics record to Weights & Biases (WANDB_MODE=offline works)
    wandb_project: str = "gpt2-twin"  # the Weights & Biases project of run.wandb
    tensorboard: bool = False  # TensorBoard event files under out_dir/tensorboard
    report: bool = True  # when the run ends, its plots (loss, lr, grad norm, tok/s PNGs) into out_dir
    # The speed levers (common/levers.py): auto probes a new machine once, then reads its cache; probe times
    # them again and rewrites the cache; fixed times nothing.
    levers: str = "auto"
    threads: int = 0  # the framework's CPU threads (torch's intra-op threads; JAX: the CPUs XLA may use); 0 = the machine's choice
    cpu_gemm: str = "auto"  # the fp32 GEMM library on CPUs: torch aten (MKL) or onednn, JAX xla; auto = the machine's choice
    # Rows of (B·T) per chunk of the fused tied head + cross-entropy in training; 0 materialises the full
    # (B·T, padded_vocab_size) logits; -1 lets the machine choose (a lever). A compute choice, not a shape:
    # checkpoints move freely between values.
    loss_chunk_rows: int = AUTO_CHUNK_ROWS


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTION_TYPES = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "run": RunConfig}
ORDERS = ("shuffled", "stream")
DEVICES = ("auto", "cpu", "cuda")  # run.device
# The fields that take one of a fixed set of names: validate() refuses anything else, docs/config.md lists them.
CHOICES: dict[str, tuple[str, ...]] = {"data.order": ORDERS, "run.dtype": DTYPES, "run.device": DEVICES,
                                       "run.parallel": PARALLELISMS, "run.levers": LEVER_MODES,
                                       "run.cpu_gemm": GEMM_PATHS}
# Seeds every backend takes as they are: JAX's PRNG keys hold 32 bits unless x64 is on.
SEED_LIMIT = 2**32


def validate_model(m: ModelConfig, names: Mapping[str, str] | None = None) -> ModelConfig:
    """The model section's own checks (shapes that exist); also what a Hugging Face config.json is held to.
    Messages name each field `model.<field>`, or `names[field]` where given (a config.json's own keys)."""
    def name(key: str) -> str:
        return (names or {}).get(key, f"model.{key}")

    for key in ("vocab_size", "padded_vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"{name(key)} must be positive, got {getattr(m, key)}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"{name('n_embd')} ({m.n_embd}) is not divisible by {name('n_head')} ({m.n_head})")
    if m.padded_vocab_size < m.vocab_size:
        raise ConfigError(f"{name('padded_vocab_size')} ({m.padded_vocab_size}) is smaller than "
                          f"{name('vocab_size')} ({m.vocab_size})")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"{name('dropout')} must be in [0, 1), got {m.dropout}")
    return m


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Check relations between fields; `world_size` is data-parallel ranks (or JAX devices)."""
    o, r = cfg.optim, cfg.run
    for section, values in cfg.to_dict().items():  # NaN passes every comparison below: refused first
        for key, value in values.items():
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple)
                                                                            else (value,))):
                raise ConfigError(f"{section}.{key} must be finite, got {value}")
    m = validate_model(cfg.model)
    if m.vocab_size > 65535 + 1:
        raise ConfigError(f"model.vocab_size ({m.vocab_size}) does not fit the uint16 shard format")
    if o.micro_batch_size <= 0 or o.total_batch_size <= 0:
        raise ConfigError("optim.micro_batch_size and optim.total_batch_size must be positive")
    per_micro = o.micro_batch_size * m.block_size * world_size
    if o.total_batch_size % per_micro:
        raise ConfigError(
            f"optim.total_batch_size ({o.total_batch_size}) is not divisible by micro_batch_size × block_size × "
            f"world size ({o.micro_batch_size} × {m.block_size} × {world_size} = {per_micro})")
    if o.max_steps <= 0:
        raise ConfigError(f"optim.max_steps must be positive, got {o.max_steps}")
    if not 0 <= o.warmup_steps <= o.max_steps:
        raise ConfigError(f"optim.warmup_steps ({o.warmup_steps}) must be in [0, max_steps={o.max_steps}]")
    if o.min_lr > o.max_lr or o.max_lr <= 0:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) must be ≤ optim.max_lr ({o.max_lr}), and max_lr > 0")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas must be in [0, 1), got {o.betas}")
    if o.eps <= 0:
        raise ConfigError(f"optim.eps must be > 0, got {o.eps}")
    for name in ("weight_decay", "grad_clip"):
        if getattr(o, name) < 0:
            raise ConfigError(f"optim.{name} must be ≥ 0, got {getattr(o, name)}")
    for dotted, allowed in CHOICES.items():
        section, _, key = dotted.partition(".")
        if (value := getattr(getattr(cfg, section), key)) not in allowed:
            raise ConfigError(f"{dotted} must be one of {', '.join(allowed)}, got '{value}'")
    if not 0 <= r.seed < SEED_LIMIT:
        raise ConfigError(f"run.seed must be in [0, 2**32), got {r.seed}")
    if not r.out_dir.strip():
        raise ConfigError("run.out_dir is empty (give a folder, e.g. runs/default/{backend})")
    for name in ("log_interval", "eval_interval", "checkpoint_interval", "sample_interval", "keep_checkpoints",
                 "devices", "fsdp_size", "hellaswag_interval", "hellaswag_limit", "diagnostics_interval",
                 "num_samples", "sample_tokens", "top_k", "temperature", "peak_tflops"):
        if getattr(r, name) < 0:
            raise ConfigError(f"run.{name} must be ≥ 0, got {getattr(r, name)}")
    if r.loss_chunk_rows < AUTO_CHUNK_ROWS:
        raise ConfigError(f"run.loss_chunk_rows must be ≥ 0 (0 = unfused head) or -1 (the machine's choice), "
                          f"got {r.loss_chunk_rows}")
    if r.threads < 0:
        raise ConfigError(f"run.threads must be ≥ 0 (0 = the machine's choice), got {r.threads}")
    if r.parallel == "ddp" and r.fsdp_size > 1:
        raise ConfigError(f"run.fsdp_size is {r.fsdp_size} but run.parallel is ddp (set run.parallel = fsdp)")
    if r.fsdp_size and world_size % r.fsdp_size:
        raise ConfigError(f"run.fsdp_size ({r.fsdp_size}) does not divide the {world_size} devices")
    if PRECISIONS[r.dtype].loss_scaling and shard_group_size(cfg, world_size) > 1:
        raise ConfigError(f"run.dtype {r.dtype} with run.parallel fsdp: a loss scaler's skipped steps would not "
                          f"agree across shards; use bf16")
    if r.hellaswag_interval and not r.hellaswag_path:
        raise ConfigError("run.hellaswag_interval is set but run.hellaswag_path is empty (give the jsonl file)")
    if cfg.data.val_tokens < 0:
        raise ConfigError(f"data.val_tokens must be ≥ 0, got {cfg.data.val_tokens}")
    return cfg


def grad_accum_steps(cfg: Config, world_size: int = 1) -> int:
    o = cfg.optim
    return o.total_batch_size // (o.micro_batch_size * cfg.model.block_size * world_size)


def shard_group_size(cfg: Config, world_size: int, parallel: str | None = None) -> int:
    """Devices that share one sharded copy of the parameters under `parallel` (default run.parallel): 1
    under ddp, run.fsdp_size (0 = all) under fsdp."""
    return 1 if (parallel or cfg.run.parallel) == "ddp" else (cfg.run.fsdp_size or world_size)


def model_shape_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields that change the parameter shapes or the function computed (refused on resume)."""
    return [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)
            if f.name != "dropout" and getattr(a, f.name) != getattr(b, f.name)]
