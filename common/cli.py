"""What the command-line tools share: a bad flag is one `error: …` line on stderr and exit code 2."""
from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A bad flag value; the message names the flag."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError, so the tool prints one line (argparse would add the usage)."""

    def error(self, message: str):
        raise UsageError(message)
