"""Where the CUDA toolkit is, whether torch can build with it, and which GPU architectures to compile for: the
choices setup.py makes before torch's BuildExtension compiles lib/cpool's CUDA kernel. Imports nothing of torch, so
tests call it with fake toolkits and setup.py calls it before torch.utils.cpp_extension reads CUDA_HOME at import.

torch alone guesses CUDA_HOME as the folder above `which nvcc`; where nvcc is a wrapper outside the toolkit
(/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) that guess has no libcudart, so compiling succeeds and
linking fails. And with TORCH_CUDA_ARCH_LIST unset and no GPU visible (a cluster's login node) torch's arch
detection has no GPU to ask and fails with an IndexError.
"""
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

# sm_80 (A100; its machine code also runs on the other 8.x GPUs) and sm_90 (H100/H200) machine code, and PTX of
# compute_90 that the driver compiles for newer GPUs (Blackwell) when the extension first loads.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def has_cudart(home: Path) -> bool:
    """Whether `home` is a CUDA toolkit torch can build with: bin/nvcc and libcudart under lib64/, lib/ or
    targets/<platform>/lib/ (the layout of NVIDIA's packages and of conda's cuda-toolkit)."""
    libs = [home / "lib64", home / "lib", *sorted((home / "targets").glob("*/lib"))]
    return (home / "bin" / "nvcc").is_file() and any(any(d.glob("libcudart.so*")) for d in libs if d.is_dir())


def run_nvcc(nvcc: str, *args: str) -> subprocess.CompletedProcess | None:
    """`nvcc args` run to its end (its output captured as text), or None where it cannot run or hangs."""
    try:
        return subprocess.run([nvcc, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def nvcc_home(nvcc: str) -> Path | None:
    """The toolkit folder of the nvcc that `nvcc` runs, as nvcc itself reports it (`_HERE_`, its real bin/ folder,
    in the dry run of a compile), so that wrapper scripts and symlinks lead to the real toolkit."""
    result = run_nvcc(nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull)
    found = result and re.search(r"^#\$ _HERE_=(.+)$", result.stdout + result.stderr, flags=re.MULTILINE)
    return Path(found.group(1).strip()).resolve().parent if found else None


def find_cuda_home(environ: dict[str, str], which: Callable[[str], str | None] = shutil.which,
                   default: Path = Path("/usr/local/cuda")) -> Path | None:
    """The CUDA toolkit to build with: CUDA_HOME (or CUDA_PATH) when set, else the toolkit of the nvcc on PATH
    (the folder above its real path, or the folder nvcc reports), else `default`. None when there is no
    nvcc at all; a RuntimeError naming the folders tried when there is one but no libcudart beside it."""
    name = "CUDA_HOME" if environ.get("CUDA_HOME") else "CUDA_PATH"
    given = environ.get(name)
    if given:
        home = Path(given)
        if not has_cudart(home):
            raise RuntimeError(f"{name}={given} is not a CUDA toolkit: expected bin/nvcc and libcudart.so under "
                               "lib64/, lib/ or targets/*/lib/ there")
        return home
    nvcc = which("nvcc")
    tried = []
    if nvcc is not None:
        above = Path(os.path.realpath(nvcc)).parent.parent
        if has_cudart(above):
            return above
        tried.append(above)
        reported = nvcc_home(nvcc)  # runs nvcc: only where the path did not tell
        if reported is not None and has_cudart(reported):
            return reported
        tried += [reported] if reported is not None and reported != above else []
    if has_cudart(default):
        return default
    if nvcc is None:
        return None
    raise RuntimeError(f"found nvcc at {nvcc} but no CUDA toolkit with libcudart (looked in "
                       f"{', '.join(map(str, tried + [default]))}): set CUDA_HOME to the toolkit, e.g. "
                       "CUDA_HOME=/usr/local/cuda-12.8")


def toolkit_release(home: Path) -> str | None:
    """The CUDA release ("13.0") that home/bin/nvcc reports, read as torch's BuildExtension reads it; None when it
    reports none."""
    result = run_nvcc(str(home / "bin" / "nvcc"), "--version")
    found = result and re.search(r"release (\d+\.\d+)", result.stdout)
    return found.group(1) if found else None


def release_mismatch(home: Path, torch_cuda: str) -> str | None:
    """Why torch, built with CUDA `torch_cuda`, cannot compile with the toolkit at `home`, or None: its
    BuildExtension stops on another major release, in a traceback that prints its message unformatted."""
    release = toolkit_release(home)
    if release is None or release.split(".")[0] == torch_cuda.split(".")[0]:
        return None
    return (f"the CUDA toolkit at {home} is CUDA {release}, and this torch was built with CUDA {torch_cuda}: set "
            f"CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit")


def default_arch_list(environ: dict[str, str], visible_gpus: int) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to set, or None to leave torch's choice: a list the user gave, or, with GPUs
    visible, their own architectures (torch adds PTX of the newest). With neither, DEFAULT_ARCH_LIST."""
    if environ.get("TORCH_CUDA_ARCH_LIST") or visible_gpus > 0:
        return None
    return DEFAULT_ARCH_LIST
