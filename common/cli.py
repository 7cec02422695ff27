"""What the command-line tools share: bad input is one `error: …` line on stderr and exit code 2."""
from __future__ import annotations

from common.checkpoints import CheckpointError
from common.config import ConfigError
from common.data import DataError
from common.hellaswag import HellaSwagError
from common.hf import HFError
from common.outdir import FolderError
from common.records import RecordsError
from common.shards import ShardError
from common.sources import PrepareError
from common.usage import Parser, UsageError

__all__ = ["INPUT_ERRORS", "Parser", "UsageError"]

# Every error that means bad input (a flag, config, data, checkpoint, file or output folder), never a bug:
# the entry points print its one-line message and exit with code 2.
INPUT_ERRORS = (UsageError, ConfigError, DataError, ShardError, CheckpointError, HFError, HellaSwagError,
                RecordsError, FolderError, PrepareError)
