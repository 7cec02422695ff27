"""Process start-up for the trainers and benches: glibc malloc tunables without `make`.

GLIBC_TUNABLES below keeps a training step from faulting in fresh pages for the buffers it frees and
allocates again every step (`python -m torch_impl.bench` reports minor faults per step; numerics are
unchanged). The Makefile exports the same value, but glibc reads GLIBC_TUNABLES only once, when the process starts (the dynamic loader sets
malloc up before any Python runs); setting os.environ afterwards changes nothing for this process.
So a run started directly (`python -m torch_impl.train`) re-executes itself once with the variable
set: `if __name__ == "__main__": ensure_allocator_env("torch_impl.train")` before anything else.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

# The one definition of the tunables (the Makefile's `export GLIBC_TUNABLES` is the same string):
# malloc'd memory on transparent huge pages, blocks up to glibc's 32 MB ceiling served from the heap,
# and the heap never trimmed below 1 GiB, so steps reuse freed buffers instead of faulting pages anew.
GLIBC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:"
                  "glibc.malloc.trim_threshold=1073741824")
NO_REEXEC = "GPT2TWIN_NO_REEXEC"  # set (to any value) to never re-execute
# Set by the re-execution itself, so the run header can tell the launcher's tunables from a user's own.
REEXECUTED = "GPT2TWIN_REEXECUTED"


def _is_glibc_linux() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def ensure_allocator_env(module: str) -> None:
    """Re-execute `python -m module` with GLIBC_TUNABLES set, if it is not set yet.

    Why a re-exec: glibc reads its tunables only at process start-up, so they cannot be applied from
    inside a running interpreter. os.execve replaces the process image in place: the pid, the open
    file descriptors and the rest of the environment stay, so a torchrun worker (or a job scheduler's
    child) keeps its pid and its RANK / LOCAL_RANK / MASTER_ADDR ... environment, and its launcher
    notices nothing. The same interpreter runs `-m module` with the same arguments (sys.argv[1:]) and
    interpreter flags.

    Does nothing when GLIBC_TUNABLES is already in the environment (a user's own setting always wins,
    even an empty one; this is also what stops the re-executed process from looping), when
    GPT2TWIN_NO_REEXEC is set, or off Linux/glibc (musl, macOS, Windows: no such tunables). Call it
    only from an `if __name__ == "__main__":` block, before any work: importing a module must never
    replace the importing process.
    """
    if "GLIBC_TUNABLES" in os.environ or NO_REEXEC in os.environ or not sys.executable or not _is_glibc_linux():
        return
    # Interpreter flags as multiprocessing passes them on (-O, -W, -X ...), plus -u, which
    # _args_from_interpreter_flags leaves out and torchrun starts its workers with.
    flags = subprocess._args_from_interpreter_flags()
    if getattr(sys.stdout, "write_through", False) and "-u" not in flags:
        flags.append("-u")
    argv = [sys.executable, *flags, "-m", module, *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES, REEXECUTED: "1"})
    except OSError as e:  # cannot re-execute (e.g. a sandbox): run on with glibc's defaults
        print(f"warning: could not restart with GLIBC_TUNABLES set ({e}); using glibc's malloc defaults",
              file=sys.stderr)


def allocator_setting() -> tuple[str, str, str]:
    """(value, source, note) of the allocator lever for the run header (common/levers.py's sources)."""
    if not _is_glibc_linux():
        return "system malloc", "fixed", "no glibc tunables here"
    value = os.environ.get("GLIBC_TUNABLES")
    if value is None:
        if NO_REEXEC in os.environ:
            return "glibc defaults", "env", f"{NO_REEXEC} is set"
        return "glibc defaults", "fixed", "not started through an entry point"
    if value == GLIBC_TUNABLES:
        if os.environ.get(REEXECUTED) == "1":
            return "glibc tunables", "fixed", "set at start-up"
        return "glibc tunables", "env", "the Makefile's value"
    return f"GLIBC_TUNABLES={value or '(empty)'}", "env", "the environment's own value"
