"""The PyTorch backend of the shared training loop: `python -m torch_impl.train [--config NAME] [--model.n_layer 6 ...]`.

`BACKEND` implements common/backend.py; the loop itself (logging, eval, checkpoint intervals, resume,
NaN stop) is common/loop.py, shared with JAX. Under torchrun each rank runs this same file.
jax_impl/train.py is the same module in JAX, in the same order.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch/jax load: glibc reads GLIBC_TUNABLES only at process start
    from common.launch import ensure_allocator_env
    ensure_allocator_env("torch_impl.train")

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from common import loop
from common.backend import DistInfo
from common.checkpoints import CheckpointMeta, open_checkpoint
from common.config import Config
from common.diagnostics import summarize_diagnostics
from common.levers import Levers, configured
from common.names import init_weights
from common.schedule import lr_at
from torch_impl import checkpoint, dist, levers
from torch_impl.evaluate import token_losses
from torch_impl.model import GPT, from_common, to_common
from torch_impl.optim import build_optimizer, clip_by_global_norm, set_lr
from torch_impl.sample import generate


@dataclass
class TrainState:
    """Everything one rank trains with; `step` counts optimizer steps done and drives the lr schedule."""
    cfg: Config
    dist: DistInfo
    device: torch.device
    model: GPT  # the bare module (FSDP2-sharded in place under run.parallel fsdp): weights, checkpoints, sampling
    train_model: torch.nn.Module  # compiled and/or DDP-wrapped view of `model` for the training step
    eval_model: torch.nn.Module  # compiled view without DDP (evaluation has no backward to sync)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step: int = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return dist.autocast(self.cfg.run.dtype, self.device)


def init_state(cfg: Config, dist_info: DistInfo, weights: dict[str, np.ndarray] | None = None,
               moments: dict[str, Any] | None = None) -> TrainState:
    """Model + optimizer (+ loss scaler) at step 0, from `weights` or the common GPT-2 init of run.seed
    (the same arrays as the JAX backend's); `moments` restores AdamW's state and step. The levers of
    this machine are chosen (probed the first time) and applied first."""
    device = torch.device(dist_info.device)
    chosen = levers.choose(cfg, device)
    cfg = configured(cfg, chosen)
    _, param_dtype = dist.dtypes(cfg.run.dtype)
    source = "initial weights" if weights is not None else "init"
    model = from_common(init_weights(cfg.model, cfg.run.seed) if weights is None else weights, cfg.model,
                        param_dtype, device, source)
    model.loss_chunk_rows = cfg.run.loss_chunk_rows
    torch.manual_seed(dist.rank_seed(cfg.run.seed, dist_info, 0))
    dist.shard_model(model, cfg, device)  # before compiling, and before the optimizer sees the parameters
    compiled = torch.compile(model) if cfg.run.compile else model
    scaler = torch.amp.GradScaler(device.type) if dist.precision(cfg.run.dtype).loss_scaling else None
    state = TrainState(cfg=cfg, dist=dist_info, device=device, model=model, train_model=dist.wrap_model(compiled, device),
                       eval_model=compiled, optimizer=build_optimizer(model, cfg), scaler=scaler)
    return set_moments(state, moments) if moments is not None else state


@torch.no_grad()
def set_moments(state: TrainState, moments: dict[str, Any]) -> TrainState:
    """`state` with AdamW's m, v and step set from common-named arrays (parity.convert moves them between
    backends)."""
    step = int(moments["step"])
    name_of = {p: name for name, p in state.model.named_parameters()}
    names = [name_of[p] for group in state.optimizer.param_groups for p in group["params"]]
    slots = {i: {"step": torch.tensor(float(step)),
                 "exp_avg": torch.as_tensor(np.array(moments["m"][name], copy=True)),
                 "exp_avg_sq": torch.as_tensor(np.array(moments["v"][name], copy=True))} for i, name in enumerate(names)}
    dist.load_optimizer_state(state.model, state.optimizer,
                              {"state": slots, "param_groups": state.optimizer.state_dict()["param_groups"]})
    state.step = step
    return state


def train_step(state: TrainState, x: np.ndarray, y: np.ndarray) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step over this rank's micro-batches x, y of shape (accum, rows, T)."""
    loss = _accumulate_gradients(state, _to_device(x, state.device), _to_device(y, state.device))
    norm, lr = _apply_update(state)
    return state, {"loss": dist.all_reduce_mean(loss), "grad_norm": norm, "lr": lr}


@torch.no_grad()
def evaluate(state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean loss over every rank's batches (all ranks pass the same number of batches; none is an error)."""
    state.model.eval()
    try:
        total = torch.zeros((), device=state.device, dtype=torch.float64)
        count = 0
        for x, y in batches:
            with state.autocast():
                _, loss = state.eval_model(_to_device(x, state.device), _to_device(y, state.device))
            total += loss.double()
            count += 1
        sums = dist.all_reduce_sum(torch.stack([total, torch.tensor(float(count), device=state.device,
                                                                    dtype=torch.float64)]))
    finally:
        state.model.train()
    if sums[1] == 0:
        raise ValueError("evaluate() got no batches")
    return float(sums[0] / sums[1])


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device, non_blocking=True)


def _accumulate_gradients(state: TrainState, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Forward/backward over the (accum, rows, T) micro-batches; returns this rank's mean loss (detached)."""
    model, accum = state.train_model, xs.shape[0]
    loss_sum = torch.zeros((), device=state.device, dtype=dist.dtypes(state.cfg.run.dtype)[1])
    for m in range(accum):
        with dist.no_sync(model, sync=m == accum - 1):
            with state.autocast():
                _, loss = model(xs[m], ys[m])
            loss_sum += loss.detach()
            # Scaling each micro-step by 1/accum makes the summed gradient the full batch's mean.
            scaled = loss / accum
            (state.scaler.scale(scaled) if state.scaler else scaled).backward()
    return loss_sum / accum


def _apply_update(state: TrainState) -> tuple[torch.Tensor, float]:
    """Clip, step AdamW at lr_at(state.step), clear the gradients; returns (pre-clip norm, lr)."""
    if state.scaler:
        state.scaler.unscale_(state.optimizer)  # clipping and the norm must see the true gradients
    norm = clip_by_global_norm(state.model, state.cfg.optim.grad_clip)
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


class TorchBackend:
    """common.backend.Backend and ParityHooks over the functions above."""
    name = "torch"

    # --- command line ---------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """No flags beyond the config's: data parallelism is torchrun's (`--nproc_per_node`)."""

    def apply_arguments(self, extra: dict[str, Any], cfg: Config) -> Config:
        return cfg

    def compile_label(self, cfg: Config) -> str:
        return f"compile {cfg.run.compile}"

    # --- training -------------------------------------------------------------------------------------
    def setup(self, cfg: Config) -> DistInfo:
        return dist.setup_distributed(cfg)

    def teardown(self) -> None:
        dist.teardown_distributed()

    def init_state(self, cfg: Config, dist_info: DistInfo, weights: dict[str, np.ndarray] | None = None,
                   moments: dict[str, Any] | None = None) -> TrainState:
        return init_state(cfg, dist_info, weights, moments)

    def train_step(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> tuple[TrainState, dict[str, Any]]:
        return train_step(state, x, y)

    def evaluate(self, state: TrainState, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        return evaluate(state, batches)

    def token_losses(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return token_losses(state.model, x, y, state.autocast())

    def diagnostics(self, state: TrainState, x: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
        """The gradient of train_step's batch, from a separate forward/backward whose RNG state is restored
        afterwards, so train_step draws the same dropout masks and its numbers are unchanged bit for bit."""
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(state.device) if state.device.type == "cuda" else None
        try:
            _accumulate_gradients(state, _to_device(x, state.device), _to_device(y, state.device))
            scale = float(state.scaler.get_scale()) if state.scaler else 1.0  # fp16: undo the loss scale
            tensors = {}
            with torch.no_grad():
                for name, p in state.model.named_parameters():
                    g, w = dist.local(p.grad).detach().double() / scale, dist.local(p).detach().double()
                    sums = torch.stack([g.sum(), g.square().sum(), w.sum(), w.square().sum()])
                    tensors[name] = (p.ndim, p.numel(), dist.sum_over_shards(sums, p).cpu().tolist())
        finally:
            state.optimizer.zero_grad(set_to_none=True)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, state.device)
        return summarize_diagnostics(tensors)

    def generate(self, state: TrainState, prompt: list[int], num_samples: int, max_new_tokens: int,
                 temperature: float, top_k: int, seed: int) -> Iterator[np.ndarray]:
        return generate(state.model, prompt, num_samples, max_new_tokens, temperature, top_k, seed, state.autocast())

    def to_common(self, state: TrainState) -> dict[str, np.ndarray]:
        if not dist.is_sharded(state.model):
            return to_common(state.model)
        return {k: v.to("cpu").numpy().copy() for k, v in dist.full_model_state(state.model, everywhere=True).items()}

    def save_checkpoint(self, state: TrainState, out_dir: Path, meta: CheckpointMeta) -> Path | None:
        return checkpoint.save_checkpoint(state, out_dir, meta)

    def params_finite(self, state: TrainState) -> bool:
        return checkpoint.params_finite(state)

    def load_checkpoint(self, path: Path, cfg: Config, dist_info: DistInfo) -> tuple[TrainState, CheckpointMeta]:
        folder, meta = open_checkpoint(path, cfg)
        state = init_state(cfg, dist_info, weights=checkpoint.read_weights(folder, cfg))
        return checkpoint.load_checkpoint(folder, state), meta

    def levers(self, cfg: Config, dist_info: DistInfo) -> Levers:
        return levers.choose(cfg, torch.device(dist_info.device))

    # --- common.backend.ParityHooks -------------------------------------------------------------------
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
        """The gradient train_step would clip and apply, without applying it, in the parameter dtype."""
        _accumulate_gradients(state, _to_device(x, state.device), _to_device(y, state.device))
        out = {name: dist.full(p.grad).detach().to("cpu").numpy().copy() for name, p in state.model.named_parameters()}
        state.optimizer.zero_grad(set_to_none=True)
        return out

    def optimizer_moments(self, state: TrainState) -> dict[str, Any]:
        return checkpoint.moments_of(dist.full_optimizer_state(state.model, state.optimizer, everywhere=True),
                                     state.cfg, state.step)


BACKEND = TorchBackend()


def main(argv: list[str] | None = None) -> int:
    return loop.main(BACKEND, argv)


if __name__ == "__main__":
    sys.exit(main())
