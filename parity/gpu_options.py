"""What `python -m parity.gpu` and its section modules share: the options every section sees, the report's
file names, the environment of the processes it starts, and a time-out timer. Kept apart from parity/gpu.py
(the command and its orchestration), which runs the section modules, so that nothing imports back.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from common.launch import GLIBC_TUNABLES

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "peaks", "parity", "bench", "train")
REPORT_JSON, REPORT_MD = "gpu-report.json", "gpu-report.md"


@dataclasses.dataclass(frozen=True)
class Options:
    """What every section sees; passed to section processes as the same command-line flags."""
    out: Path
    dry_run: bool
    data_dir: str
    max_micro_batch: int
    parity_steps: int
    train_seconds: float
    time_limit: float
    deadline: float  # wall-clock time (epoch seconds) by which the whole command must be done

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def flags(self) -> list[str]:
        return ["--out", str(self.out), "--data-dir", self.data_dir, "--max-micro-batch", str(self.max_micro_batch),
                "--parity-steps", str(self.parity_steps), "--train-seconds", str(self.train_seconds),
                "--time-limit", str(self.time_limit), "--deadline", repr(self.deadline)] + \
               (["--dry-run"] if self.dry_run else [])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every process this command starts: the repository importable, output unbuffered, and
    JAX growing its GPU memory on demand instead of taking 75% of it up front (torch may share the GPU)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)  # the trainers' allocator settings (common/launch.py)
    env.update(extra or {})
    return env


class Timer:
    """Calls `action` once after `seconds` unless cancelled first; cancel() says whether it fired."""

    def __init__(self, seconds: float, action):
        import threading

        self.fired = False

        def fire():
            self.fired = True
            action()

        self._timer = threading.Timer(seconds, fire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> bool:
        self._timer.cancel()
        return self.fired
