"""What a backend provides to the shared training loop (common/loop.py), sampler and evaluator.

`torch_impl.train.BACKEND` and `jax_impl.train.BACKEND` implement this protocol with the same
semantics, so the loop, logging, eval/checkpoint intervals, NaN stop and resume are written once.
All arrays crossing this boundary are numpy; weights cross it as common weights (common/names.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np

from common.config import Config


@dataclass(frozen=True)
class DistInfo:
    """What distributed set-up gave this process.

    The loader splits data over processes (`process_index` of `process_count`), each process reading
    `local_replicas × micro_batch_size` rows per micro-step; `data_parallel_size` is the total number of
    replicas (torch: ranks; JAX: devices in the mesh) and divides total_batch_size in validation.
    """
    process_index: int = 0
    process_count: int = 1
    data_parallel_size: int = 1
    local_replicas: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


class Backend(Protocol):
    name: str  # "torch" | "jax"

    def setup(self, cfg: Config) -> DistInfo:
        """Distributed init (torchrun env / jax.distributed), device choice, precision flags."""

    def teardown(self) -> None:
        """Destroy the process group or shut jax.distributed down; safe to call twice."""

    def init_state(self, cfg: Config, dist: DistInfo, weights: dict[str, np.ndarray] | None = None,
                   moments: dict[str, Any] | None = None) -> Any:
        """Model + optimizer (+ scaler, RNG) at step 0; from `weights` (common layout) when given,
        else the GPT-2 init seeded with cfg.run.seed. `moments` ({"step": int, "m": {name: array},
        "v": {name: array}}, as optimizer_moments returns) restores AdamW's state and step counter."""

    def train_step(self, state: Any, x: np.ndarray, y: np.ndarray) -> tuple[Any, dict[str, Any]]:
        """One optimizer step on this process's micro-batches x, y of shape (accum, rows, T) (int32).

        Uses lr = common.schedule.lr_at(step) for the state's own step counter, clips at
        optim.grad_clip, and returns metrics {"loss", "grad_norm", "lr"} as scalars that `float()`
        accepts (they may be lazy device values); loss is the mean over the global batch (all ranks)
        and grad_norm the global norm before clipping."""

    def evaluate(self, state: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        """Mean loss over all processes' (B, T) batches, without touching the training state."""

    def generate(self, state: Any, prompt: list[int], num_samples: int, max_new_tokens: int,
                 temperature: float, top_k: int, seed: int) -> Iterator[np.ndarray]:
        """Sample: yields one (num_samples,) int array of new token ids per position; padded-vocab
        ids are never produced; the context is cropped to block_size."""

    def to_common(self, state: Any) -> dict[str, np.ndarray]:
        """The model's weights as common weights: fresh numpy copies (never aliases), float32, or
        float64 in fp64 runs."""

    def save_checkpoint(self, state: Any, out_dir: Path, step: int, meta: dict[str, Any],
                        val_loss: float | None) -> Path:
        """Atomically write checkpoint `step` (steps completed) under out_dir/checkpoints with
        `meta` (JSON-able: config, loader state, history, code version); keep the newest
        cfg.run.keep_checkpoints plus the best val_loss one. Returns its path."""

    def load_checkpoint(self, path: Path, cfg: Config, dist: DistInfo) -> tuple[Any, dict[str, Any]]:
        """(state, meta) from a checkpoint folder or from a run folder's newest checkpoint.
        Raises common.checkpoints.CheckpointError (message names the path) if none is readable."""

    def latest_checkpoint(self, out_dir: Path) -> Path | None:
        """The newest complete checkpoint under out_dir/checkpoints, or None."""

    def peak_flops(self, cfg: Config, dist: DistInfo) -> tuple[float, str]:
        """(FLOP/s per replica for MFU, a description of where the figure comes from)."""


class ParityHooks(Protocol):
    """Extra views the parity suite needs, beyond training (both backends' BACKEND provide them)."""

    def logits(self, state: Any, x: np.ndarray) -> np.ndarray:
        """(B, T, vocab_size) logits of the model in eval mode, real-vocab columns only, as numpy."""

    def grads(self, state: Any, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Gradient of the step's mean loss for x, y of shape (accum, rows, T), as common-named numpy
        arrays, before clipping and without changing the state."""

    def optimizer_moments(self, state: Any) -> dict[str, Any]:
        """AdamW's state as {"step": optimizer steps taken, "m": {name: array}, "v": {name: array}}."""

    def token_losses(self, state: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(B, T) float64 per-token cross-entropy of y given x in eval mode (HellaSwag, bits per byte)."""

    def diagnostics(self, state: Any, x: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
        """{"group_grad_norms", "grad_to_weight"} for the step about to run on x, y, without changing
        what train_step then computes (common/diagnostics.py)."""
