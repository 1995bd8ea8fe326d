"""How the command-line scripts end: one line for what the user can fix, the traceback for bugs."""
import pytest

from utils.errors import CheckpointError, DataError, MissingFileError, UserError, WriteError, run_cli


def raising(error: BaseException):
    def main(args):
        raise error
    return main


@pytest.mark.parametrize("error", [DataError("a.json: annotations[3].bbox is []"), MissingFileError("x: not found"),
                                   CheckpointError("cannot read checkpoint c.pt")])
def test_user_errors_end_with_one_line(error):
    with pytest.raises(SystemExit) as e:
        run_cli(raising(error), None)
    assert e.value.code == f"error: {error}" and isinstance(error, UserError)


def test_ctrl_c_outside_training_ends_with_one_line_and_bugs_keep_their_traceback():
    with pytest.raises(SystemExit, match="interrupted"):
        run_cli(raising(KeyboardInterrupt()), None)
    with pytest.raises(ZeroDivisionError):
        run_cli(raising(ZeroDivisionError("a bug")), None)


def test_user_errors_are_still_the_builtin_kinds():
    """Code that catches ValueError / FileNotFoundError / RuntimeError keeps working."""
    assert issubclass(DataError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(WriteError, OSError)
