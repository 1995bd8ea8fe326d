"""lib/cuda_toolkit.py on fake toolkits: which CUDA_HOME setup.py builds with, and the default GPU architectures;
setup.py's FORCE_CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.cuda_toolkit import DEFAULT_ARCH_LIST, default_arch_list, find_cuda_home, has_cudart, release_mismatch


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def toolkit(home: Path, lib: str = "lib64") -> Path:
    """A fake toolkit: bin/nvcc, whose compile dry run reports its bin/ folder as the real nvcc does, and
    libcudart under `lib`."""
    executable(home / "bin" / "nvcc", f'#!/bin/sh\necho "#$ _HERE_={home / "bin"}" >&2\n')
    (home / lib).mkdir(parents=True)
    (home / lib / "libcudart.so.13").write_bytes(b"")
    return home


def which_of(path: Path | None):
    return lambda name: str(path) if name == "nvcc" and path is not None else None


NO_DEFAULT = Path("/nonexistent/cuda")


@pytest.mark.parametrize("lib", ["lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"])
def test_library_layouts(tmp_path, lib):
    assert has_cudart(toolkit(tmp_path / "cuda", lib))
    assert not has_cudart(tmp_path)  # no bin/nvcc, no library


def test_cuda_home_variable_wins_and_is_checked(tmp_path):
    home = toolkit(tmp_path / "cuda-12.8")
    assert find_cuda_home({"CUDA_HOME": str(home)}, which_of(None), NO_DEFAULT) == home
    assert find_cuda_home({"CUDA_PATH": str(home)}, which_of(None), NO_DEFAULT) == home
    with pytest.raises(RuntimeError, match=f"CUDA_HOME={tmp_path} is not a CUDA toolkit: expected bin/nvcc and "
                                           "libcudart.so"):
        find_cuda_home({"CUDA_HOME": str(tmp_path)}, which_of(home / "bin" / "nvcc"), NO_DEFAULT)


def test_nvcc_symlink_leads_to_its_toolkit(tmp_path):
    home = toolkit(tmp_path / "cuda-12.8")
    link = tmp_path / "usr" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(home / "bin" / "nvcc")
    assert find_cuda_home({}, which_of(link), NO_DEFAULT) == home


def test_nvcc_wrapper_script_leads_to_its_toolkit(tmp_path):
    # /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc: torch would guess /usr/local, which has no
    # libcudart (compiling works there, linking fails)
    home = toolkit(tmp_path / "opt" / "cuda-13.0")
    wrapper = executable(tmp_path / "local" / "bin" / "nvcc", f'#!/bin/sh\nexec {home / "bin" / "nvcc"} "$@"\n')
    assert not has_cudart(wrapper.parent.parent)
    assert find_cuda_home({}, which_of(wrapper), NO_DEFAULT) == home


def test_no_libcudart_anywhere_is_a_clear_error(tmp_path):
    lone = executable(tmp_path / "tools" / "bin" / "nvcc", "#!/bin/sh\nexit 1\n")  # reports nothing
    with pytest.raises(RuntimeError, match=f"found nvcc at {lone} but no CUDA toolkit with libcudart .*"
                                           f"{tmp_path / 'tools'}.*set CUDA_HOME"):
        find_cuda_home({}, which_of(lone), NO_DEFAULT)


def test_default_folder_and_no_nvcc(tmp_path):
    default = toolkit(tmp_path / "cuda")
    assert find_cuda_home({}, which_of(None), default) == default
    assert find_cuda_home({}, which_of(None), NO_DEFAULT) is None  # a CPU machine: no CUDA kernel, no error


@pytest.mark.parametrize("release, expected", [
    ("12.8", "the CUDA toolkit at {home} is CUDA 12.8, and this torch was built with CUDA 13.0: set CUDA_HOME to a "
             "CUDA 13.x toolkit"),
    ("13.2", None),  # another minor release: torch warns and builds
    ("13.0", None),
    (None, None),  # nvcc reports no release: torch does not check either
])
def test_another_major_release_than_torch_s_is_named(tmp_path, release, expected):
    """torch's BuildExtension stopped on it with a traceback ending in its message unformatted, a tuple with '%s'."""
    output = f"Cuda compilation tools, release {release}, V{release}.1" if release else "nvcc: no version"
    executable(tmp_path / "bin" / "nvcc", f'#!/bin/sh\necho "{output}"\n')
    mismatch = release_mismatch(tmp_path, "13.0")
    assert mismatch == (expected.format(home=tmp_path) if expected else None)


@pytest.mark.parametrize("environ, visible, expected", [
    ({}, 0, DEFAULT_ARCH_LIST),  # a login node: torch's own detection would end in an IndexError
    ({"TORCH_CUDA_ARCH_LIST": ""}, 0, DEFAULT_ARCH_LIST),
    ({}, 2, None),  # torch builds for the visible GPUs, with PTX of the newest
    ({"TORCH_CUDA_ARCH_LIST": "8.6"}, 0, None),  # the user's list
])
def test_default_arch_list(environ, visible, expected):
    assert default_arch_list(environ, visible) == expected


def test_default_arch_list_gives_sass_and_ptx(monkeypatch):
    # what torch's BuildExtension passes nvcc for it: machine code for A100 (and the other 8.x GPUs) and
    # H100/H200, and PTX of compute_90 that the driver compiles for the GPUs that came after
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    assert _get_cuda_arch_flags() == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90",
                                      "-gencode=arch=compute_90,code=sm_90"]


@pytest.mark.skipif(not os.path.exists("/usr/local/cuda/bin/nvcc"), reason="needs a real CUDA toolkit")
def test_real_toolkit_found_from_nvcc():
    assert has_cudart(find_cuda_home({}))


def test_force_cuda_other_than_0_or_1_is_refused():
    """FORCE_CUDA=true built the CPU kernel only, without a word (`--name` builds nothing)."""
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "FORCE_CUDA": "true"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.endswith("setup.py: FORCE_CUDA=true: expected 1 (build the CUDA kernel) or 0\n")


def test_a_cpu_build_prints_no_cuda_warning(tmp_path):
    """torch's import warned "No CUDA runtime is found, using CUDA_HOME=..." on every set-up without a GPU."""
    env = {**os.environ, "CUDA_HOME": str(toolkit(tmp_path / "cuda"))}
    env.pop("FORCE_CUDA", None)
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "CUDA_HOME" not in result.stderr
