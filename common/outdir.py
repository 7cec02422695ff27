"""Output folders: created with a one-line error naming the flag, and written by one run at a time.

`make_output_dir(path, flag)` turns the OSError of a folder that cannot exist (a regular file on its path,
no permission) into a FolderError naming the flag and the file in the way; `output_file(path, flag)` checks a
report's destination the same way before the work that fills it. `hold(folder, flag)` is a
context manager holding an exclusive `flock` on `folder/.lock` for the life of a run; the holder's pid
and host are written inside for the message a second run gets. The kernel drops the lock when its
process dies, however it dies, so the lock of a killed run is taken over by the next without any
staleness test (a pid check could name a pid reused by another process).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

LOCK = ".lock"


class FolderError(ValueError):
    """An output folder that cannot be created or is in use; the message names the flag and the path."""


def make_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a folder (created with its parents); FolderError naming `flag` when it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else e.strerror
        raise FolderError(f"{flag}: cannot create {path}: {why}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FolderError(f"{flag}: {path} is not writable")
    return path


def output_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a file a tool will write when its work is done, checked before the work starts: its
    folder is created here, and a path that cannot be written (a folder there, no permission, a file
    system that takes no new files) is refused with a FolderError naming `flag`. An existing file is
    left as it is until the tool overwrites it."""
    path = Path(path)
    make_output_dir(path.resolve().parent, flag)
    if path.is_dir():
        raise FolderError(f"{flag}: {path} is a folder; give a file name")
    existed = path.exists()
    try:
        with open(path, "a"):  # append: an existing file keeps its content
            pass
    except OSError as e:
        raise FolderError(f"{flag}: cannot write {path}: {e.strerror}") from None
    if not existed:
        path.unlink()
    return path


def holder(folder: str | os.PathLike) -> str:
    """Who holds (or last held) the folder's lock, as its lock file says."""
    try:
        text = (Path(folder) / LOCK).read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def hold(folder: str | os.PathLike, flag: str) -> Iterator[Path]:
    """Create `folder` and hold its lock until the block ends; FolderError naming the holder when another
    process holds it (a warning, and no lock, where the file system has no locks). Only one process of a
    multi-process run should call this (the main one)."""
    folder = make_output_dir(folder, flag)
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FolderError(f"{flag}: cannot create the lock file {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderError(f"{flag}: {folder} is in use by {holder(folder)} (lock file {path}); wait for that run "
                              f"to end or choose another {flag}") from None
        except OSError as e:  # a file system without locks (some network mounts): the run is not stopped for it
            print(f"warning: {flag}: cannot lock {path} ({e.strerror}); a second run into {folder} would not be "
                  f"refused", file=sys.stderr)
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield folder
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race with a waiting opener)
