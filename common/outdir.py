"""Output folders: created with a one-line error naming the flag, and written by one run at a time.

`make_output_dir(path, flag)` turns the OSError of a folder that cannot exist (a regular file on its path,
no permission) into a FolderError naming the flag and the file in the way; `output_file(path, flag)` checks a
report's destination before the work that fills it, creating nothing, and `write_output` writes it.
`hold(folder, flag)` is a context manager holding an exclusive `flock` on `folder/.lock` for the life of a run; the holder's pid
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
import time
from pathlib import Path
from typing import Iterator

from common.usage import InputError

LOCK = ".lock"


class FolderError(InputError):
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
    """`path` as a file a tool will write when its work is done, checked before the work starts and without
    creating anything: a refused command leaves nothing behind, and a path that could not be written (a
    folder, a file on the way, no permission) is a FolderError naming `flag` now, not a traceback at the
    end. `write_output` writes it, creating its folders then."""
    path = Path(path)
    if path.is_dir():
        raise FolderError(f"{flag}: {path} is a folder; give a file name")
    if os.path.lexists(path):
        if not path.is_file():  # a dangling link, a FIFO: writing would not make the report a file here
            raise FolderError(f"{flag}: {path} exists and is not a regular file")
        if not os.access(path, os.W_OK):
            raise FolderError(f"{flag}: {path} is not writable")
        return path
    parent = path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise FolderError(f"{flag}: cannot create {parent}: {existing} is a file, not a folder")
    if existing == parent:  # the file itself can be tried, and removed again
        try:
            with open(path, "x"):
                pass
        except OSError as e:
            raise FolderError(f"{flag}: cannot write {path}: {e.strerror}") from None
        path.unlink()
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise FolderError(f"{flag}: cannot create {parent}: {existing} is not writable")
    return path


def write_output(path: str | os.PathLike, text: str) -> Path:
    """Write a report checked by `output_file`, creating its folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def holder(folder: str | os.PathLike) -> str:
    """Who holds (or last held) the folder's lock, as its lock file says."""
    try:
        text = (Path(folder) / LOCK).read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def in_use(folder: str | os.PathLike) -> str | None:
    """Who holds the folder's lock now, as its lock file says; None when nobody does. Reads only: a folder
    or lock file that does not exist is not in use."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO there does not hang
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # an instant's shared lock, released by the close below
        return None
    except BlockingIOError:
        return holder(folder)
    except OSError:  # a file system without locks: nothing to tell
        return None
    finally:
        os.close(fd)


def _lock_now(fd: int, tries: int = 5) -> None:
    """flock(LOCK_EX) without waiting for a holder, tried a few times over about 40 ms: `in_use` takes a
    shared lock for an instant to look, and a run starting in that instant is not refused for it."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(0.01)


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
            _lock_now(fd)
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
