"""Errors caused by the user's input or machine (bad flags, missing or corrupt files, a full disk), as opposed to bugs.

The command-line scripts end these with one line that names the problem and a non-zero exit status
(`run_cli`); anything else keeps its traceback, because it is a bug to report.
"""
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix; its message names the file, flag or entry and what was expected."""


class DataError(UserError, ValueError):
    """A data set file (annotations or an image) that cannot be used."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read."""


class UnsafeCheckpointError(CheckpointError):
    """A file that holds Python objects beyond plain data, which weights-only loading refuses because reading them
    could run code (utils/checkpoint.py)."""


class WriteError(UserError, OSError):
    """A file that cannot be written (disk full, permission denied, file size limit)."""


def run_cli(main: Callable, args) -> None:
    """Runs `main(args)`; user errors and Ctrl-C end with one line on stderr instead of a traceback."""
    try:
        main(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted (Ctrl-C)")
