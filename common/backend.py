"""What a backend provides to the shared training loop (common/loop.py) and to the parity tools.

`torch_impl.train.BACKEND` and `jax_impl.train.BACKEND` implement `Backend` (and `ParityHooks`) with the
same semantics, so the loop, logging, eval/checkpoint intervals, NaN stop and resume are written once.
The loop calls exactly these methods. All arrays crossing this boundary are numpy; weights cross it as
common weights (common/names.py). Checkpoint folders are common/checkpoints.py's bookkeeping.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np

from common.checkpoints import CheckpointMeta
from common.config import Config
from common.levers import Levers

BACKENDS = ("torch", "jax")  # the two implementations, as `{name}_impl` packages


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
    # What the backend's own functions need of the set-up beyond the above (JAX: its mesh and the programs
    # compiled for it; torch: nothing), so that both backends' init_state take (cfg, dist_info).
    context: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


class Backend(Protocol):
    name: str  # "torch" | "jax": names the CLI (`python -m {name}_impl.train`), records and run folders

    # --- command line (common.loop.main) ------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags of this backend's trainer beyond --config, --resume and the dotted config overrides."""

    def apply_arguments(self, extra: dict[str, Any], cfg: Config) -> Config:
        """`cfg` with those flags' values (`extra`: the parsed values by dest) applied."""

    def compile_label(self, cfg: Config) -> str:
        """How the training step is compiled, for the start-up line ("compile False", "jit")."""

    # --- training -------------------------------------------------------------------------------------
    def setup(self, cfg: Config) -> DistInfo:
        """Distributed init (torchrun env / jax.distributed), device choice, precision flags; refuses
        (ConfigError naming run.dtype) a run.dtype the backend does not run."""

    def teardown(self) -> None:
        """Destroy the process group or shut jax.distributed down; safe to call twice."""

    def init_state(self, cfg: Config, dist: DistInfo, weights: dict[str, np.ndarray] | None = None,
                   moments: dict[str, Any] | None = None) -> Any:
        """Model + optimizer (+ scaler, RNG) at step 0; from `weights` (common layout) when given,
        else common.names.init_weights(cfg.model, cfg.run.seed), the same arrays in both backends.
        `moments` ({"step": int, "m": {name: array}, "v": {name: array}}, as optimizer_moments returns)
        restores AdamW's state and step counter."""

    def train_step(self, state: Any, x: np.ndarray, y: np.ndarray) -> tuple[Any, dict[str, Any]]:
        """One optimizer step on this process's micro-batches x, y of shape (accum, rows, T) (int32).

        Uses lr = common.schedule.lr_at(step) for the state's own step counter, clips at
        optim.grad_clip, and returns metrics {"loss", "grad_norm", "lr"} as scalars that `float()`
        accepts (they may be lazy device values); loss is the mean over the global batch (all ranks)
        and grad_norm the global norm before clipping."""

    def evaluate(self, state: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        """Mean loss over all processes' (B, T) batches, without touching the training state; ValueError
        when there are none."""

    def token_losses(self, state: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(B, T) float64 per-token cross-entropy of y given x in eval mode (HellaSwag)."""

    def diagnostics(self, state: Any, x: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
        """{"group_grad_norms", "grad_to_weight"} for the step about to run on x, y, without changing
        what train_step then computes (common/diagnostics.py)."""

    def generate(self, state: Any, prompt: list[int], num_samples: int, max_new_tokens: int,
                 temperature: float, top_k: int, seed: int) -> Iterator[np.ndarray]:
        """Sample: yields one (num_samples,) int array of new token ids per position; padded-vocab
        ids are never produced; the context is cropped to block_size; an empty prompt starts from EOT
        (common.sampling.context)."""

    def to_common(self, state: Any) -> dict[str, np.ndarray]:
        """The model's weights as common weights: fresh numpy copies (never aliases), float32, or
        float64 in fp64 runs."""

    def save_checkpoint(self, state: Any, out_dir: Path, meta: CheckpointMeta) -> Path | None:
        """Atomically write checkpoint meta.step (steps completed) under out_dir/checkpoints, then keep
        the config's run.keep_checkpoints newest plus the best val_loss. Every process calls it; returns
        its folder (None on processes that do not write)."""

    def params_finite(self, state: Any) -> bool:
        """Whether every parameter of the whole model (all ranks' shards) is finite: checked on the device
        before each save, so that no checkpoint holds a NaN or inf weight. Every process calls it."""

    def load_checkpoint(self, path: Path, cfg: Config, dist: DistInfo) -> tuple[Any, CheckpointMeta]:
        """(state, meta) from a checkpoint folder or from a run folder's newest checkpoint.
        Raises common.checkpoints.CheckpointError (message names the path) if none is readable or its
        model is not cfg's."""

    def levers(self, cfg: Config, dist: DistInfo) -> Levers:
        """The speed levers the run trains with (common/levers.py: each value and where it came from), and
        the GEMM peak per replica MFU is measured against (None when nothing was measured). The same object
        init_state chose for `cfg`: asking again probes nothing."""


class ParityHooks(Protocol):
    """Extra views the parity suite needs, beyond training (both backends' BACKEND provide them)."""

    def logits(self, state: Any, x: np.ndarray) -> np.ndarray:
        """(B, T, vocab_size) logits of the model in eval mode, real-vocab columns only, as numpy."""

    def grads(self, state: Any, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Gradient of the step's mean loss for x, y of shape (accum, rows, T), as common-named numpy
        arrays in the parameter dtype, before clipping and without changing the state."""

    def optimizer_moments(self, state: Any) -> dict[str, Any]:
        """AdamW's state as {"step": optimizer steps taken, "m": {name: array}, "v": {name: array}}."""


def load_backend(name: str) -> Backend:
    """`{name}_impl.train.BACKEND`, found by name so that common/ never imports a backend."""
    return importlib.import_module(f"{name}_impl.train").BACKEND
