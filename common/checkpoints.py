"""Checkpoint bookkeeping shared by both backends: naming, retention, code version, errors."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from common.config import Config, ConfigError, config_from_dict, model_shape_diff

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path (entry points exit with 2)."""


def check_model_matches(path: Path, meta: dict[str, Any], cfg: Config) -> None:
    """Refuse, naming the field, a checkpoint whose model shape differs from the config's (before any
    framework meets mismatched tensors); intervals, max_steps and the like may change."""
    try:
        saved = config_from_dict(meta["config"])
    except (KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{path}: meta.json holds no readable config ({e})") from None
    changed = model_shape_diff(saved.model, cfg.model)
    if changed:
        key = changed[0].split(".", 1)[1]
        raise CheckpointError(f"{path}: checkpoint has {changed[0]} = {getattr(saved.model, key)}, "
                              f"the config asks for {getattr(cfg.model, key)}")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_to_keep(entries: list[tuple[int, float | None]], keep_last: int) -> set[int]:
    """Steps to keep among (step, val_loss) entries: the newest `keep_last` plus the best val loss."""
    steps = sorted(s for s, _ in entries)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    scored = [(v, s) for s, v in entries if v is not None]
    if scored:
        keep.add(min(scored)[1])
    return keep


def code_version() -> str:
    """The git commit of this checkout (with '-dirty' when it has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
