"""The metrics record both trainers write (JSON lines) and the console line they print.

One line per optimizer step: {"backend", "step", "loss", "lr", "grad_norm", "ms", "data_ms",
"tokens_per_s", "mfu", "tokens", "elapsed_s"} and "val_loss" on the steps where it was measured. `step`
is the 0-based index of the optimizer step; `tokens` counts tokens trained on after it. `ms` is the
step's share of its flush window's wall time (common/loop.py converts device metrics every
log_interval steps, not every step); `data_ms` is the host time the step spent in the data loader.
common/report.py and the loop's resume read them back through read_records.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from common.usage import InputError


class MetricsLog:
    """Appends records to `path`. On resume the file is first rewritten (atomically) to the records before
    the resumed step, each step once: records a run wrote past its last checkpoint go, and so does a torn
    last line, what a process killed mid-write leaves."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = {}
            for r in read_records(self.path, drop_torn_tail=True):
                if r["step"] < resume_step:
                    kept[r["step"]] = r  # a step written twice (a resume of an older version): the newer
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(kept[s]) + "\n" for s in sorted(kept)))
            os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class RecordsError(InputError):
    """A metrics file that cannot be read; the message names the file and line."""


REQUIRED = ("step", "loss")


def read_records(path: str | Path, drop_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, validated line by line (each a JSON object with a numeric step and loss).

    `drop_torn_tail` skips a last line that is not valid JSON and lacks its newline: the record a writer was
    killed in the middle of (resume drops it; a reader of a finished run should not meet one).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace" if drop_torn_tail else "strict")
    except (OSError, UnicodeDecodeError) as e:
        raise RecordsError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    lines = text.splitlines()
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if drop_torn_tail and lineno == len(lines) and not text.endswith("\n"):
                break
            raise RecordsError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise RecordsError(f"{path}:{lineno}: expected a JSON object per line")
        missing = [k for k in REQUIRED if not isinstance(rec.get(k), (int, float)) or isinstance(rec.get(k), bool)]
        if missing:
            raise RecordsError(f"{path}:{lineno}: missing or non-numeric field(s) {', '.join(missing)}")
        records.append(rec)
    return records


def format_line(rec: dict[str, Any], max_steps: int) -> str:
    width = len(str(max_steps))
    parts = [f"step {rec['step'] + 1:>{width}}/{max_steps}", f"loss {rec['loss']:.4f}"]
    if rec.get("val_loss") is not None:
        parts.append(f"val {rec['val_loss']:.4f}")
    parts += [f"lr {rec['lr']:.2e}", f"norm {rec['grad_norm']:.3f}", f"{rec['ms']:.1f} ms",
              f"{rec['tokens_per_s']:,.0f} tok/s"]
    if rec.get("mfu") is not None and math.isfinite(rec["mfu"]):
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)
