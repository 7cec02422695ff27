"""What the command-line tools share: bad input is one `error: …` line on stderr and exit code 2."""
from __future__ import annotations

import argparse

from common.checkpoints import CheckpointError
from common.config import ConfigError
from common.data import DataError
from common.hellaswag import HellaSwagError
from common.hf import HFError
from common.records import RecordsError
from common.shards import ShardError


class UsageError(ValueError):
    """A bad flag value; the message names the flag."""


# Every error that means bad input (a flag, config, data, checkpoint or file), never a bug: the entry
# points print its one-line message and exit with code 2.
INPUT_ERRORS = (UsageError, ConfigError, DataError, ShardError, CheckpointError, HFError, HellaSwagError,
                RecordsError)


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError, so the tool prints one line (argparse would add the usage)."""

    def error(self, message: str):
        raise UsageError(message)
