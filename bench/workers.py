"""Child processes of the benches and checks: environment, CPU pinning, and answers as tagged JSON lines.

Every tool that measures in a subprocess (parity.bench's workers, parity.profile, parity.probe,
parity.sweep) starts it the same way: `python -m MODULE ...` from the repository root, with the root
first on PYTHONPATH (so a checkout's own code runs, not an installed copy), the allocator settings every
worker must share, and optionally under `taskset -c CPUS`. A child answers on its stdout with lines that
start with RESULT_TAG, one JSON object each; it sends everything else there to stderr first
(`answer_channel`), and the parent skips any untagged line a native library still writes to the
descriptor, so answers never have to be parsed around warnings.

A one-shot child is `run(...)`; a persistent one that answers one command per stdin line is a `Worker`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

# The Makefile's allocator settings. Every worker of a comparison must run under the same ones, so a parent
# started without them hands this value to each child (allocator_env).
from common.launch import GLIBC_TUNABLES as MAKEFILE_TUNABLES
from common.levers import usable_cpu_ids
from common.usage import UsageError

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "@answer "
STDERR_TAIL = 2000  # characters of a failed child's stderr quoted in the error


def allocator_env(environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """What to add to every worker's environment, and the header line that says which allocator they ran on.

    glibc reads GLIBC_TUNABLES only at process start, so the value must be in the workers' environment;
    a parent started without it (not via `make`) would otherwise bench every worker on glibc's defaults.
    """
    value = environ.get("GLIBC_TUNABLES")
    if value == MAKEFILE_TUNABLES:
        return {}, f"GLIBC_TUNABLES={value} (the Makefile's value, in the environment of every worker)"
    if value is not None:
        return {}, (f"GLIBC_TUNABLES={value or '(empty)'} (from the environment, not the Makefile's value; "
                    f"inherited by every worker)")
    return ({"GLIBC_TUNABLES": MAKEFILE_TUNABLES},
            f"GLIBC_TUNABLES={MAKEFILE_TUNABLES} (not set in the environment: the Makefile's value, given to "
            f"every worker)")


def child_env(extra_env: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the repository root first on PYTHONPATH, then `extra_env`."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra_env or {})
    return env


def parse_pin(text: str | None, flag: str = "--pin") -> str | None:
    """A `taskset -c` CPU list ("0", "0,2", "0-3", "0-7:2") checked against the CPUs this process may run on,
    so a CPU the machine lacks is one line naming the flag instead of a worker dying under taskset. None
    stays None."""
    if text is None:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part, re.ASCII)  # taskset's own syntax: no spaces
        lo, hi, stride = (int(g) if g else None for g in m.groups()) if m else (None, None, None)
        if lo is None or (hi is not None and hi < lo) or stride == 0:
            raise UsageError(f"{flag}: expected a CPU list such as 0, 0,1 or 0-3, got '{text}'")
        cpus.update(range(lo, (lo if hi is None else hi) + 1, stride or 1))
    allowed = usable_cpu_ids()
    if allowed is not None and (missing := sorted(cpus - allowed)):
        raise UsageError(f"{flag} {text}: CPU {missing[0]} is not one this process may run on "
                         f"({', '.join(map(str, sorted(allowed)))})")
    return text


def module_command(module: str, args: Sequence[Any] = (), pin: str | None = None,
                   launcher: Sequence[str] | None = None) -> list[str]:
    """`[taskset -c PIN] LAUNCHER -m MODULE ARGS`; the launcher defaults to this interpreter."""
    cmd = [*(launcher or [sys.executable]), "-m", module, *map(str, args)]
    return ["taskset", "-c", pin, *cmd] if pin is not None else cmd


def answer_channel() -> TextIO:
    """In a child: the stream its answers go to; from here on print() and Python-level library output go to stderr."""
    channel = sys.stdout
    sys.stdout = sys.stderr
    return channel


def reply(channel: TextIO, answer: dict[str, Any]) -> None:
    channel.write(RESULT_TAG + json.dumps(answer) + "\n")
    channel.flush()


def commands(stream: TextIO | None = None) -> Iterator[tuple[str, str]]:
    """In a persistent child: (command, argument) per line of stdin, until the parent closes it."""
    for line in stream or sys.stdin:
        command, _, arg = line.strip().partition(" ")
        yield command, arg


def answers(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(RESULT_TAG):]) for line in stdout.splitlines() if line.startswith(RESULT_TAG)]


def _tail(text: str) -> str:
    return text.strip()[-STDERR_TAIL:]


@dataclass(frozen=True)
class Finished:
    """A one-shot child that has exited: its exit status, tagged answers and stderr."""
    returncode: int
    answers: list[dict[str, Any]]
    stderr: str

    def check(self, what: str) -> Finished:
        if self.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {self.returncode}): {_tail(self.stderr)}")
        return self

    def answer(self, what: str) -> dict[str, Any]:
        """The last answer of a child that succeeded; a RuntimeError quoting its stderr otherwise."""
        if not self.check(what).answers:
            raise RuntimeError(f"{what} gave no answer: {_tail(self.stderr)}")
        return self.answers[-1]


def run(cmd: Sequence[str], extra_env: Mapping[str, str] | None = None, base_env: Mapping[str, str] | None = None,
        timeout: float | None = None) -> Finished:
    proc = subprocess.run(list(cmd), cwd=ROOT, env=child_env(extra_env, base_env), capture_output=True, text=True,
                          timeout=timeout)
    return Finished(proc.returncode, answers(proc.stdout), proc.stderr)


class Worker:
    """A persistent child: each `ask` writes one command line to its stdin and reads its one tagged answer."""

    def __init__(self, name: str, cmd: Sequence[str], extra_env: Mapping[str, str] | None = None):
        self.name = name
        # stderr goes to a file, not a pipe: a chatty child would block on a full pipe nobody reads.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(list(cmd), cwd=ROOT, env=child_env(extra_env), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)

    def read(self) -> dict[str, Any]:
        while line := self.proc.stdout.readline():
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])
        code = self.proc.wait()
        self._stderr.seek(0)
        raise RuntimeError(f"{self.name} worker died (exit {code}): {_tail(self._stderr.read())}")

    def ask(self, command: str) -> dict[str, Any]:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it has exited: read() reports how, with its stderr
            pass
        return self.read()

    def close(self) -> dict[str, Any]:
        """Its answer to `exit` (a final report), once it has exited."""
        answer = self.ask("exit")
        self.proc.wait(timeout=60)
        self._stderr.close()
        return answer

    def kill(self) -> None:
        """Stops the child if it still runs (after an error elsewhere); safe after close()."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
