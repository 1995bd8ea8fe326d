"""Errors caused by the user's input or machine (bad flags or arguments, missing or corrupt files, a full disk, a
device that is not there), as opposed to bugs.

Below the command lines (engine/, datasets/, nets/, utils/, lib/) such problems raise these exceptions, never
SystemExit, so that a program calling the library can catch them (`except ValueError`, `except UserError`). The
command-line scripts end them with one line that names the problem and a non-zero exit status (`run_cli`);
anything else keeps its traceback, because it is a bug to report.
"""
import signal
import sys
import warnings
from typing import Callable

INTERRUPTED, TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # the shell's status for each: 130, 143


class UserError(Exception):
    """A problem the user can fix; its message names the file, flag or entry and what was expected."""


class ArgumentError(UserError, ValueError):
    """An argument (a command-line flag or a parameter of the Python API) outside what it can be."""


class DataError(UserError, ValueError):
    """A data set file (annotations or an image) that cannot be used."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint (or an exported .onnx file) that cannot be read or used."""


class UnsafeCheckpointError(CheckpointError):
    """A file that holds Python objects beyond plain data, which weights-only loading refuses because reading them
    could run code (utils/checkpoint.py)."""


class DeviceError(UserError, RuntimeError):
    """A device that this machine or process does not have (CUDA where no GPU is visible)."""


class WriteError(UserError, OSError):
    """A file that cannot be written (disk full, permission denied, file size limit)."""


class DataWarning(UserWarning):
    """A problem in the data that a run passes over (a training image that cannot be read)."""


def _format_warning(message, category, filename, lineno, line=None, _python_format=warnings.formatwarning) -> str:
    """A DataWarning as one line, `warning: ...`: Python's format adds the file, line and source of the call, which
    tell a user nothing. Every other warning keeps Python's format."""
    if issubclass(category, DataWarning):
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


warnings.formatwarning = _format_warning  # at import: also in the data loader's worker processes


def _terminated(signum, frame):
    raise SystemExit(TERMINATED)


def run_cli(main: Callable, args):
    """Returns `main(args)`; user errors end with one line on stderr instead of a traceback (status 1), Ctrl-C
    with status 130 and SIGTERM with 143. Both signals end the program as an exception in the main thread, so
    that `finally` blocks and context managers clean up (temporary files, a json saved so far) first."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return main(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
