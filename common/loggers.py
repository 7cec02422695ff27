"""Optional metrics sinks beyond metrics.jsonl: Weights & Biases and TensorBoard.

Both are off by default (`--run.wandb`, `--run.tensorboard`) and receive every record the loop
writes (common/records.py), on the main process only. Nested diagnostics ({"grad_to_weight":
{"mlp.c_fc.weight": ...}}) become one scalar each, "grad_to_weight/mlp.c_fc.weight". Steps are
optimizer steps completed (record step + 1), the numbering of the console and the checkpoints.
Neither package is a dependency: setting a flag without its package is a one-line ConfigError.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from common.config import Config, ConfigError
from common.usage import first_line
from common.numbers import is_finite_number

TENSORBOARD_SUBDIR = "tensorboard"


class MetricsSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a record, nested dicts flattened with "/"; strings and None dropped."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            for sub, v in scalars(value).items():
                out[f"{key}/{sub}"] = v
        elif is_finite_number(value):
            out[key] = float(value)
    return out


class TensorBoardSink:
    """Event files under out_dir/tensorboard, flushed per record so a crash loses nothing logged.

    Written with the tensorboard package's own event writer (what torch.utils.tensorboard wraps), so a
    JAX run never imports torch.
    """

    def __init__(self, log_dir: str | Path):
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            raise ConfigError("run.tensorboard: the tensorboard package is not installed "
                              "(pip install tensorboard)") from None
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._event, self._summary = Event, Summary
        self.writer = EventFileWriter(str(self.log_dir))

    def log(self, record: dict[str, Any]) -> None:
        values = [self._summary.Value(tag=key, simple_value=value) for key, value in scalars(record).items()]
        self.writer.add_event(self._event(wall_time=time.time(), step=int(record["step"]) + 1,
                                          summary=self._summary(value=values)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per training run; WANDB_MODE=offline writes it under out_dir/wandb for a later sync."""

    def __init__(self, cfg: Config, out_dir: str | Path, backend: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError("run.wandb: the wandb package is not installed (pip install wandb)") from None
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        try:
            # "runs/default/torch" -> "default-torch": the run folder names the experiment and backend.
            self.run = wandb.init(project=cfg.run.wandb_project, dir=str(out_dir), config=cfg.to_dict(),
                                  name="-".join(Path(out_dir).resolve().parts[-2:]), tags=[backend])
        except Exception as e:  # wandb raises its own types (no API key, no network, bad project)
            raise ConfigError(f"run.wandb: cannot start a W&B run ({first_line(e)}); WANDB_MODE=offline logs "
                              f"locally") from None

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]) + 1)

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """The sinks a run asked for, fed and closed together."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_sinks(cfg: Config, out_dir: str | Path, backend: str) -> Sinks:
    sinks: list[MetricsSink] = []
    try:
        if cfg.run.tensorboard:
            sinks.append(TensorBoardSink(Path(out_dir) / TENSORBOARD_SUBDIR))
        if cfg.run.wandb:
            sinks.append(WandbSink(cfg, out_dir, backend))
    except ConfigError:
        Sinks(sinks).close()
        raise
    return Sinks(sinks)
