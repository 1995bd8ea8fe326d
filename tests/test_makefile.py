"""The Makefile's set-up targets, run on a copy of it with stand-in Pythons (no venv, pip or compiler runs): the
Python version check before a venv is made, and the rebuild that setuptools would skip."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!{executable}
# Python {version} for the Makefile: runs `-c CODE` under that version; any other call (venv, pip, setup.py) is
# written to calls.txt and does nothing, but for the files make looks for: venv's last file, bin/activate, and
# the two modules of setup.py.
import os, sys
if sys.argv[1] == "-c":
    sys.version_info, sys.version = {version_info!r}, "{version} (stand-in)"
    exec(sys.argv[2])
else:
    with open("calls.txt", "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    made = []
    if sys.argv[1:3] == ["-m", "venv"]:
        made = [sys.argv[3] + "/bin/activate"]
    elif sys.argv[1] == "setup.py":
        made = ["lib/cpool/_ext.stand-in.so", "lib/nms/_soft_nms.stand-in.so"]
    for path in made:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()
"""


def fake_python(path: Path, version: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    version_info = (*map(int, version.split(".")), "final", 0)
    path.write_text(FAKE_PYTHON.format(executable=sys.executable, version=version, version_info=version_info))
    path.chmod(0o755)
    return path


def make(folder: Path, *args: str, python3: str) -> subprocess.CompletedProcess:
    """`make ARGS` in `folder` (a copy of the Makefile there) with a `python3` of version `python3` first on PATH."""
    shutil.copy(ROOT / "Makefile", folder)
    for name in ("requirements.txt", "setup.py", "lib/cuda_toolkit.py"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).open("a").close()  # made once: a later call leaves its time
    fake_python(folder / "bin" / "python3", python3)
    # Under `make test` the parent make's variables would turn this into a sub-make that prints its directory.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = f"{folder / 'bin'}{os.pathsep}{env['PATH']}"
    return subprocess.run(["make", "--no-print-directory", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=60)


def calls(folder: Path) -> list[str]:
    return (folder / "calls.txt").read_text().splitlines() if (folder / "calls.txt").exists() else []


def test_a_python_older_than_3_11_is_named_before_a_venv_is_made(tmp_path):
    result = make(tmp_path, "setup", python3="3.10.13")
    assert result.returncode != 0
    assert ("python3 is Python 3.10.13; requirements.txt needs 3.11 or newer; make setup PYTHON=python3.12 (say) "
            "takes another") in result.stderr
    assert calls(tmp_path) == []


def test_a_venv_that_an_older_python_made_is_named_before_pip_runs(tmp_path):
    """`python3 -m venv .venv` keeps the python of a .venv that exists, whichever Python runs it."""
    fake_python(tmp_path / ".venv" / "bin" / "python", "3.10.13")
    result = make(tmp_path, "setup", python3="3.12.1")
    assert result.returncode != 0
    assert (".venv/bin/python is Python 3.10.13; requirements.txt needs 3.11 or newer; remove .venv (an older "
            "Python made it) and run make setup again") in result.stderr
    assert calls(tmp_path) == ["-m venv .venv"]


def test_setup_installs_then_rebuilds_what_setuptools_would_skip(tmp_path):
    """setuptools skips an extension whose build/ copy is newer than its sources, so without --force a new torch
    (requirements.txt) or a changed setup.py kept the old build."""
    fake_python(tmp_path / ".venv" / "bin" / "python", "3.11.2")
    result = make(tmp_path, "setup", python3="3.12.1")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == ["-m venv .venv", "-m pip install -q -r requirements.txt",
                               "setup.py -q build_ext --inplace --force"]
    assert make(tmp_path, "setup", python3="3.12.1").returncode == 0 and len(calls(tmp_path)) == 3  # up to date
    os.utime(tmp_path / "lib" / ".built", (0, 0))  # setup.py changed after the build
    assert make(tmp_path, "setup", python3="3.12.1").returncode == 0
    assert calls(tmp_path)[3:] == ["setup.py -q build_ext --inplace --force"]


def test_a_new_requirements_txt_is_installed_into_the_venv_there_is(tmp_path):
    """A .venv made with PYTHON=python3.12 where python3 is 3.10: venv ran again on each change of requirements.txt
    and stopped on python3's version (or, with a python3 of 3.11, rewrote the .venv's pyvenv.cfg for it)."""
    fake_python(tmp_path / ".venv" / "bin" / "python", "3.12.1")
    (tmp_path / ".venv" / "bin" / "activate").touch()  # venv's last file: the .venv is complete
    (tmp_path / ".venv" / ".installed").touch()
    os.utime(tmp_path / ".venv" / ".installed", (0, 0))  # requirements.txt changed after the install
    result = make(tmp_path, "setup", python3="3.10.13")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == ["-m pip install -q -r requirements.txt", "setup.py -q build_ext --inplace --force"]


def test_setup_builds_again_when_a_module_of_the_build_is_gone(tmp_path):
    """lib/.built alone, its module removed by hand: `make setup`, which the import error asks for, did nothing."""
    fake_python(tmp_path / ".venv" / "bin" / "python", "3.11.2")
    assert make(tmp_path, "setup", python3="3.11.2").returncode == 0
    (tmp_path / "lib" / "nms" / "_soft_nms.stand-in.so").unlink()
    result = make(tmp_path, "setup", python3="3.11.2")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path)[3:] == ["setup.py -q build_ext --inplace --force"]
