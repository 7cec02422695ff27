"""The PyTorch backend of the shared training loop: `python -m torch_impl.train [--config NAME] [--model.n_layer 6 ...]`.

`BACKEND` implements common/backend.py; the loop itself (logging, eval, checkpoint intervals, resume,
NaN stop) is common/loop.py, shared with JAX. Under torchrun each rank runs this same file.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("torch_impl.train")

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from common import loop
from common.backend import DistInfo
from common.checkpoints import CheckpointError, check_model_matches
from common.diagnostics import diagnostic_group, summarize_diagnostics
from common.config import Config
from common.names import check_weights
from common.plan import peak_flops
from common.schedule import lr_at
from torch_impl import checkpoint as ckpt
from torch_impl import dist as tdist
from torch_impl.model import GPT
from torch_impl.optim import build_optimizer, set_lr

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    """Everything one rank trains with; `step` counts optimizer steps done and drives the lr schedule."""
    cfg: Config
    dist: DistInfo
    device: torch.device
    model: GPT  # the bare module: weights, checkpoints, sampling
    train_model: torch.nn.Module  # compiled and/or DDP-wrapped view of `model` for the training step
    eval_model: torch.nn.Module  # compiled view without DDP (evaluation has no backward to sync)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step: int = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.cfg.run.dtype)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def _param_dtype(cfg: Config) -> torch.dtype:
    # Autocast keeps fp32 master weights and optimizer state; only the parity mode runs in float64.
    return torch.float64 if cfg.run.dtype == "fp64" else torch.float32


def _rng_seed(cfg: Config, dist: DistInfo, step: int) -> int:
    # Dropout masks must differ across ranks; the step term re-seeds ranks > 0 after a resume.
    return cfg.run.seed + 1000 * dist.process_index + 7919 * step


def build_state(cfg: Config, dist: DistInfo, weights: dict[str, np.ndarray | torch.Tensor] | None = None
                ) -> TrainState:
    device = torch.device(dist.device)
    model = GPT(cfg.model)
    model.reset_parameters(torch.Generator().manual_seed(cfg.run.seed))  # identical on every rank
    model.to(device=device, dtype=_param_dtype(cfg))
    if weights is not None:
        check_weights(weights, cfg.model, "initial weights")
        model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()}, strict=True)
    torch.manual_seed(_rng_seed(cfg, dist, 0))
    compiled = torch.compile(model) if cfg.run.compile else model
    train_model = tdist.wrap_model(compiled, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.run.dtype == "fp16" else None
    return TrainState(cfg=cfg, dist=dist, device=device, model=model, train_model=train_model, eval_model=compiled,
                      optimizer=build_optimizer(model, cfg), scaler=scaler)


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device, non_blocking=True)


def grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients before clipping; clips in place if max_norm > 0.

    The formula is clip_grad_norm_'s, g · min(1, max_norm / (norm + 1e-6)), but summed more carefully:
    torch's fp32 norm of the whole 50k-row embedding gradient is off by up to 2e-5 (relative) on CPU,
    enough to move the clip coefficient visibly (measured by parity.check). Norms of rows (a few
    hundred to a few thousand elements) are exact to rounding in fp32 and their squares are summed in
    float64, which costs one fp32 read of the gradients instead of an fp64 copy of each.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    rows = [g.reshape(g.shape[0], -1) if g.ndim > 1 else g.reshape(1, -1) for g in grads]
    squares = torch.cat([torch.linalg.vector_norm(r, dim=1).double().square() for r in rows])
    total = squares.sum().sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total.to(grads[0].dtype)


def accumulate_gradients(state: TrainState, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Forward/backward over the (accum, rows, T) micro-batches; returns this rank's mean loss (detached)."""
    model, accum = state.train_model, xs.shape[0]
    loss_sum = torch.zeros((), device=state.device, dtype=_param_dtype(state.cfg))
    for m in range(accum):
        with tdist.no_sync(model, sync=m == accum - 1):
            with state.autocast():
                _, loss = model(xs[m], ys[m])
            loss_sum += loss.detach()
            # Scaling each micro-step by 1/accum makes the summed gradient the full batch's mean.
            scaled = loss / accum
            (state.scaler.scale(scaled) if state.scaler else scaled).backward()
    return loss_sum / accum


def apply_update(state: TrainState) -> tuple[torch.Tensor, float]:
    """Clip, step AdamW at lr_at(state.step), clear the gradients; returns (pre-clip norm, lr)."""
    if state.scaler:
        state.scaler.unscale_(state.optimizer)  # clipping and the norm must see the true gradients
    norm = grad_norm(state.model, state.cfg.optim.grad_clip)
    lr = lr_at(state.step, state.cfg.optim)
    set_lr(state.optimizer, lr)
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return norm, lr


def train_step(state: TrainState, x: np.ndarray, y: np.ndarray) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step over this rank's micro-batches x, y of shape (accum, rows, T)."""
    loss = accumulate_gradients(state, _to_device(x, state.device), _to_device(y, state.device))
    norm, lr = apply_update(state)
    return state, {"loss": tdist.all_reduce_mean(loss), "grad_norm": norm, "lr": lr}


@torch.no_grad()
def evaluate(state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean loss over every rank's batches (all ranks must pass the same number of batches)."""
    state.model.eval()
    try:
        total = torch.zeros((), device=state.device, dtype=torch.float64)
        count = 0
        for x, y in batches:
            with state.autocast():
                _, loss = state.eval_model(_to_device(x, state.device), _to_device(y, state.device))
            total += loss.double()
            count += 1
        sums = tdist.all_reduce_sum(torch.stack([total, torch.tensor(float(count), device=state.device,
                                                                     dtype=torch.float64)]))
    finally:
        state.model.train()
    if sums[1] == 0:
        raise ValueError("evaluate() got no batches")
    return float(sums[0] / sums[1])


@torch.no_grad()
def generate(model: GPT, prompt: list[int], num_samples: int, max_new_tokens: int, temperature: float,
             top_k: int, seed: int, autocast: contextlib.AbstractContextManager | None = None
             ) -> Iterator[np.ndarray]:
    """Yield one (num_samples,) array of new token ids per position; temperature 0 is greedy."""
    cfg = model.cfg
    device = next(model.parameters()).device
    for t in prompt:
        if not 0 <= t < cfg.vocab_size:
            raise ValueError(f"prompt token id {t} is outside the model's vocabulary of {cfg.vocab_size}")
    # GPT-2's convention for an empty prompt is to start from EOT, its last vocabulary id.
    start = list(prompt) or [cfg.vocab_size - 1]
    idx = torch.tensor([start] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            with autocast or contextlib.nullcontext():
                logits, _ = model(idx[:, -cfg.block_size:])
            logits = logits[:, -1, :cfg.vocab_size].double()  # padded columns can never be sampled
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k and top_k < cfg.vocab_size:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            yield nxt[:, 0].cpu().numpy()
    finally:
        model.train(was_training)


def _numpy_dtype(cfg: Config) -> type:
    return np.float64 if cfg.run.dtype == "fp64" else np.float32


@torch.no_grad()
def set_moments(state: TrainState, moments: dict[str, Any]) -> None:
    """AdamW's m, v and step from common-named arrays (parity.convert moves them between backends)."""
    step = int(moments["step"])
    for name, p in state.model.named_parameters():
        state.optimizer.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.as_tensor(np.array(moments["m"][name], copy=True)).to(p.device, p.dtype),
            "exp_avg_sq": torch.as_tensor(np.array(moments["v"][name], copy=True)).to(p.device, p.dtype),
        }
    state.step = step


class TorchBackend:
    name = "torch"

    def setup(self, cfg: Config) -> DistInfo:
        return tdist.setup_distributed(cfg)

    def teardown(self) -> None:
        tdist.teardown()

    def init_state(self, cfg: Config, dist: DistInfo, weights: dict[str, np.ndarray] | None = None,
                   moments: dict[str, Any] | None = None) -> TrainState:
        state = build_state(cfg, dist, weights)
        if moments is not None:
            set_moments(state, moments)
        return state

    def train_step(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> tuple[TrainState, dict[str, Any]]:
        return train_step(state, x, y)

    def evaluate(self, state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        return evaluate(state, batches)

    def generate(self, state: TrainState, prompt: list[int], num_samples: int, max_new_tokens: int,
                 temperature: float, top_k: int, seed: int) -> Iterator[np.ndarray]:
        return generate(state.model, prompt, num_samples, max_new_tokens, temperature, top_k, seed, state.autocast())

    def to_common(self, state: TrainState) -> dict[str, np.ndarray]:
        return state.model.to_common(_numpy_dtype(state.cfg))

    def save_checkpoint(self, state: TrainState, out_dir: Path, step: int, meta: dict[str, Any],
                        val_loss: float | None) -> Path | None:
        path = None
        if state.dist.is_main:
            train_state = {
                "step": state.step,
                "optimizer": state.optimizer.state_dict(),
                "scaler": state.scaler.state_dict() if state.scaler else None,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None,
            }
            path = ckpt.save(out_dir, step, dict(state.model.state_dict()), train_state,
                             {**meta, "val_loss": val_loss}, state.cfg.run.keep_checkpoints)
        tdist.barrier()  # other ranks must not run ahead (or exit) while rank 0 writes
        return path

    def load_checkpoint(self, path: Path, cfg: Config, dist: DistInfo) -> tuple[TrainState, dict[str, Any]]:
        folder = ckpt.resolve(path)
        meta = ckpt.read_meta(folder)
        check_model_matches(folder, meta, cfg)
        weights = ckpt.read_weights(folder)
        try:
            check_weights(weights, cfg.model, str(folder / ckpt.WEIGHTS))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        saved = ckpt.read_train_state(folder)
        state = build_state(cfg, dist, weights)
        try:
            state.optimizer.load_state_dict(saved["optimizer"])
            if state.scaler and saved.get("scaler"):
                state.scaler.load_state_dict(saved["scaler"])
            state.step = int(saved["step"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{folder / ckpt.TRAIN_STATE}: optimizer state does not fit this model ({e})") \
                from None
        if dist.is_main:
            torch.set_rng_state(saved["rng_cpu"])
            if state.device.type == "cuda" and saved.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(saved["rng_cuda"], state.device)
        else:
            torch.manual_seed(_rng_seed(cfg, dist, state.step))
        return state, meta

    # --- common.backend.ParityHooks ----------------------------------------------------------------
    @torch.no_grad()
    def logits(self, state: TrainState, x: np.ndarray) -> np.ndarray:
        state.model.eval()
        try:
            with state.autocast():
                logits, _ = state.eval_model(_to_device(x, state.device))
        finally:
            state.model.train()
        return logits[..., :state.cfg.model.vocab_size].detach().to("cpu", torch.float64).numpy().copy()

    def grads(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """The gradient train_step would clip and apply, without applying it."""
        accumulate_gradients(state, _to_device(x, state.device), _to_device(y, state.device))
        dtype = _numpy_dtype(state.cfg)
        out = {name: p.grad.detach().to("cpu", torch.float64).numpy().astype(dtype)
               for name, p in state.model.named_parameters()}
        state.optimizer.zero_grad(set_to_none=True)
        return out

    def optimizer_moments(self, state: TrainState) -> dict[str, Any]:
        dtype = _numpy_dtype(state.cfg)
        moments: dict[str, Any] = {"step": state.step, "m": {}, "v": {}}
        for name, p in state.model.named_parameters():
            slot = state.optimizer.state.get(p, {})
            for kind, key in (("m", "exp_avg"), ("v", "exp_avg_sq")):
                t = slot.get(key)
                moments[kind][name] = (np.zeros(tuple(p.shape), dtype) if t is None
                                       else t.detach().to("cpu", torch.float64).numpy().astype(dtype))
        return moments

    # --- evaluation and diagnostics hooks of common/loop.py (mirrored in jax_impl/train.py) ------------
    def token_losses(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(B, T) float64 per-token cross-entropy of y given x, eval mode, real vocabulary (HellaSwag)."""
        from torch_impl.evaluate import token_losses

        return token_losses(state.model, x, y, state.autocast())

    def diagnostics(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
        """Per-group gradient norms and std(grad) / std(weight) for the step about to run on x, y.

        The gradient is that of train_step's batch, from a separate forward/backward whose RNG state is
        restored afterwards, so train_step draws the same dropout masks and its numbers are unchanged
        bit for bit. Ratios are per group, pooled over the group's layers.
        """
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None
        try:
            accumulate_gradients(state, _to_device(x, state.device), _to_device(y, state.device))
            scale = float(state.scaler.get_scale()) if state.scaler else 1.0  # fp16: undo the loss scale
            sums: dict[str, list[float]] = {}
            with torch.no_grad():
                for name, p in state.model.named_parameters():
                    g, w = p.grad.detach().double() / scale, p.detach().double()
                    moments = torch.stack([g.sum(), g.square().sum(), w.sum(), w.square().sum()]).cpu().tolist()
                    entry = sums.setdefault(diagnostic_group(name), [p.ndim, 0, 0.0, 0.0, 0.0, 0.0])
                    entry[1] += p.numel()
                    entry[2:] = [a + b for a, b in zip(entry[2:], moments)]
        finally:
            state.optimizer.zero_grad(set_to_none=True)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, state.device)
        return summarize_diagnostics(sums)

    def latest_checkpoint(self, out_dir: Path) -> Path | None:
        return ckpt.latest_checkpoint(out_dir)

    def peak_flops(self, cfg: Config, dist: DistInfo) -> tuple[float, str]:
        return peak_flops(torch.device(dist.device).type, cfg.run.dtype, cfg.run.peak_tflops)


BACKEND = TorchBackend()


def main(argv: list[str] | None = None) -> int:
    return loop.main(BACKEND, argv)


if __name__ == "__main__":
    sys.exit(main())
