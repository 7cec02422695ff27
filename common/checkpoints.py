"""Checkpoint folder bookkeeping, written once for both backends.

A run keeps its checkpoints under out_dir/checkpoints/step_XXXXXXXX (steps completed). A step folder
counts once it holds meta.json, which every backend writes last and atomically (temp file, fsync,
rename, fsync of the folder): torch writes its files into a hidden temp folder and renames it into
place, JAX lets orbax finalize its folder, and both then hold their meta.json. So a crash at any
moment leaves either the previous set of checkpoints or the new one. What each backend stores next
to meta.json is its own (torch_impl/checkpoint.py, jax_impl/checkpoint.py).

meta.json also records the sha256 of every other file of its folder (`files`), so bytes changed on
disk after the save (a bad disk, a partial copy) are refused by name rather than trained on:
open_checkpoint and common/portable.py check them before any backend reads a file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from common.config import Config, ConfigError, model_shape_diff

from common.config_files import config_from_dict
from common.usage import InputError, first_line

CHECKPOINT_SUBDIR = "checkpoints"
META = "meta.json"
STEP_PREFIX = "step_"


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names the path (entry points exit with 2)."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What meta.json holds. A field added here is written by every save and defaults when reading
    an older checkpoint; keys this version does not know are ignored."""
    step: int  # optimizer steps completed
    backend: str  # "torch" | "jax": which backend's files sit next to meta.json
    config: dict[str, Any]  # Config.to_dict() of the run
    loader: dict[str, Any] | None = None  # DataLoader.state_dict(); None: the data order follows from step
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics records so far
    code_version: str = "unknown"
    val_loss: float | None = None
    # sha256 of every other file of the step folder by relative path; None: saved before this was recorded
    files: dict[str, str] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CheckpointMeta:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read checkpoint metadata ({first_line(e)})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in data]
        if missing:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def run_config(self, where: str | os.PathLike = META) -> Config:
        """The run's Config; CheckpointError naming `where` when it cannot be read."""
        try:
            return config_from_dict(self.config)
        except (TypeError, AttributeError, ConfigError) as e:
            raise CheckpointError(f"{where}: holds no readable config ({first_line(e)})") from None

    def replace(self, **changes: Any) -> CheckpointMeta:
        return dataclasses.replace(self, **changes)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(folder: Path) -> int | None:
    """The step a step_XXXXXXXX folder name stands for; None for any other name."""
    digits = folder.name[len(STEP_PREFIX):]
    return int(digits) if folder.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def is_complete(folder: Path) -> bool:
    return step_of(folder) is not None and (folder / META).is_file()


def complete_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = Path(out_dir) / CHECKPOINT_SUBDIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), key=step_of)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def resolve(path: str | os.PathLike) -> Path:
    """A complete checkpoint folder as given, or the newest one of a run folder (or of its checkpoints/)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if step_of(p) is not None:
        if not is_complete(p):
            raise CheckpointError(f"{p}: no complete checkpoint here (incomplete: a step folder counts once its "
                                  f"{META}, written last, exists; the save was interrupted)")
        return p
    for run_dir in (p, p.parent if p.name == CHECKPOINT_SUBDIR else None):
        if run_dir is not None and (latest := latest_checkpoint(run_dir)) is not None:
            return latest
    raise CheckpointError(f"{p}: no complete checkpoint in this folder")


def read_meta(folder: str | os.PathLike) -> CheckpointMeta:
    return CheckpointMeta.from_json(Path(folder) / META)


def check_model_matches(path: Path, meta: CheckpointMeta, cfg: Config) -> None:
    """Refuse, naming the field, a checkpoint whose model shape differs from the config's (before any
    framework meets mismatched tensors); intervals, max_steps and the like may change."""
    saved = meta.run_config(Path(path) / META)
    changed = model_shape_diff(saved.model, cfg.model)
    if changed:
        key = changed[0].split(".", 1)[1]
        raise CheckpointError(f"{path}: checkpoint has {changed[0]} = {getattr(saved.model, key)}, "
                              f"the config asks for {getattr(cfg.model, key)}")


def file_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under a step folder except meta.json, by POSIX path relative to it: what a save
    records in meta.json's `files`."""
    folder = Path(folder)
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in (META, META + ".tmp"):
            continue
        with open(path, "rb") as f:
            hashes[rel] = hashlib.file_digest(f, "sha256").hexdigest()
    return hashes


def verify_files(folder: str | os.PathLike, meta: CheckpointMeta) -> None:
    """CheckpointError naming the first file of the folder that is missing or whose bytes are not those
    saved; a checkpoint saved before hashes were recorded (meta.files None) passes unchecked."""
    if meta.files is None:
        return
    folder = Path(folder)
    if not isinstance(meta.files, dict):
        raise CheckpointError(f"{folder / META}: files is not an object of sha256 by file name")
    for rel, expected in sorted(meta.files.items()):
        path = folder / rel
        try:
            with open(path, "rb") as f:
                actual = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise CheckpointError(f"{path}: checkpoint file unreadable ({e.strerror}); the checkpoint is "
                                  f"incomplete") from None
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 {actual[:16]}… differs from the {expected[:16]}… recorded at "
                                  f"save; the file was changed or corrupted")


def read_verified_meta(folder: str | os.PathLike) -> CheckpointMeta:
    """meta.json of a complete step folder, after checking every file it records (verify_files)."""
    meta = read_meta(folder)
    verify_files(folder, meta)
    return meta


def open_checkpoint(path: str | os.PathLike, cfg: Config) -> tuple[Path, CheckpointMeta]:
    """(folder, meta) of the checkpoint `path` names (see resolve), its files verified, refused if its model
    is not cfg's."""
    folder = resolve(path)
    meta = read_verified_meta(folder)
    check_model_matches(folder, meta, cfg)
    return folder, meta


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_meta(folder: Path, meta: CheckpointMeta) -> Path:
    """meta.json, atomically: a reader sees the old file, no file, or the whole new one; after a power
    cut too (the data and then the rename are fsynced)."""
    path = Path(folder) / META
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(meta.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def checkpoints_to_keep(entries: Iterable[tuple[int, float | None]], keep_last: int) -> set[int]:
    """Steps to keep among (step, val_loss) entries: the newest `keep_last` plus the best val loss."""
    entries = list(entries)
    steps = sorted(s for s, _ in entries)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    scored = [(v, s) for s, v in entries if v is not None]
    if scored:
        keep.add(min(scored)[1])
    return keep


def retained_steps(out_dir: str | os.PathLike, meta: CheckpointMeta) -> set[int]:
    """The steps to keep once checkpoint `meta.step` is saved: run.keep_checkpoints of the run's config,
    newest first, plus the best val_loss; the new one's val_loss comes from `meta`, the others' from
    their meta.json (an unreadable one can still be pruned by age)."""
    def val_loss(folder: Path) -> float | None:
        try:
            return read_meta(folder).val_loss
        except CheckpointError:
            return None

    entries = [(step_of(p), val_loss(p)) for p in complete_checkpoints(out_dir) if step_of(p) != meta.step]
    entries.append((meta.step, meta.val_loss))
    keep_last = meta.run_config().run.keep_checkpoints
    return checkpoints_to_keep(entries, keep_last) | {meta.step}


def prune(out_dir: str | os.PathLike, keep: set[int]) -> None:
    """Delete the complete checkpoints whose step is not in `keep`."""
    for p in complete_checkpoints(out_dir):
        if step_of(p) not in keep:
            shutil.rmtree(p, ignore_errors=True)


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
