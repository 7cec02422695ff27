"""Bad input as one line: the InputError every input error derives from, and an argparse parser whose errors
raise UsageError instead of printing usage.

Kept free of other imports so that every module that reads input (common/config.py too) can use it.
"""
from __future__ import annotations

import argparse
import os
import sys


class InputError(ValueError):
    """Bad input (a flag, config, data, checkpoint, file or output folder), never a bug: the entry points print
    its one-line message as `error: …` and exit with code 2. Each module's own error derives from it."""


class UsageError(InputError):
    """A bad flag value; the message names the flag."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError, so the tool prints one line (argparse would add the usage)."""

    def error(self, message: str):
        raise UsageError(message)


class ExitingParser(argparse.ArgumentParser):
    """For tools that parse their flags before their own error handling: a bad flag is the same one
    `error: …` line, then exit code 2 (argparse would print the usage block first)."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def first_line(e: BaseException) -> str:
    """The first line of another library's error message, for quoting it inside a one-line error (torch's
    and safetensors' messages run over several lines)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def env_int(name: str, default: int | None) -> int:
    """An integer environment variable a launcher sets (RANK, JAX_NUM_PROCESSES, ...); UsageError naming it
    when it is not one. Unset or empty gives `default`, or is refused when there is none (a variable the
    launch depends on)."""
    value = os.environ.get(name, "").strip()
    try:
        if value or default is None:
            return int(value)
        return default
    except ValueError:
        raise UsageError(f"{name}: expected an integer, got '{value}'") from None
