"""How the command-line scripts end: one line for what the user can fix, the traceback for bugs."""
import ast
import os
import signal
import time
from pathlib import Path

import pytest

from utils.errors import (ArgumentError, CheckpointError, DataError, DeviceError, MissingFileError,
                          UnsafeCheckpointError, UserError, WriteError, run_cli)

REPO = Path(__file__).resolve().parents[1]


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


def test_ctrl_c_outside_training_ends_with_one_line_and_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(raising(KeyboardInterrupt()), None)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted (Ctrl-C)\n"  # the shell's 128 + SIGINT
    with pytest.raises(ZeroDivisionError):
        run_cli(raising(ZeroDivisionError("a bug")), None)


def test_sigterm_ends_a_command_with_143_after_its_cleanup():
    cleaned, previous = [], signal.getsignal(signal.SIGTERM)

    def main(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in the main thread before this ends
            cleaned.append("not stopped")
        finally:
            cleaned.append("cleaned up")

    with pytest.raises(SystemExit) as e:
        run_cli(main, None)
    assert e.value.code == 143 and cleaned == ["cleaned up"]
    assert signal.getsignal(signal.SIGTERM) is previous  # restored for the caller


def test_every_command_line_ends_through_run_cli():
    """Each script's `__main__` block calls run_cli, which gives Ctrl-C 130, SIGTERM 143 and user errors one line."""
    scripts = [REPO / "train.py", REPO / "test.py", REPO / "demo.py", REPO / "datasets" / "shapes.py",
               REPO / "datasets" / "check.py", *sorted((REPO / "tools").glob("[!_]*.py")),
               *sorted((REPO / "bench").glob("bench_*.py")), REPO / "bench" / "profile_infer.py"]
    assert len(scripts) == 22
    for script in scripts:
        main_blocks = [node for node in ast.parse(script.read_text()).body
                       if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert len(main_blocks) == 1, script.name
        calls = [node for node in ast.walk(main_blocks[0])
                 if isinstance(node, ast.Call) and ast.unparse(node.func) == "run_cli"]
        assert len(calls) == 1, script.name
        target = calls[0].args[0]
        if isinstance(target, ast.Lambda):  # run_cli(lambda a: main(a, extra), args)
            target = target.body.func if isinstance(target.body, ast.Call) else target.body
        assert ast.unparse(target) == "main", script.name


def test_user_errors_are_still_the_builtin_kinds():
    """Code that catches ValueError / FileNotFoundError / RuntimeError keeps working."""
    assert issubclass(DataError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(WriteError, OSError)
    assert issubclass(ArgumentError, ValueError) and issubclass(DeviceError, RuntimeError)
    assert issubclass(UnsafeCheckpointError, CheckpointError)
