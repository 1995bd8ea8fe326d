"""Builds the two compiled parts of centernet47 in place: `make setup` runs `python setup.py build_ext --inplace`.

- lib/cpool: corner pooling (C++ CPU kernel; CUDA kernel when a GPU is visible or FORCE_CUDA=1).
- lib/nms: soft-NMS in Cython.

The CUDA toolkit is CUDA_HOME when set, else found from nvcc (lib/cuda_toolkit.py); the GPU architectures are
TORCH_CUDA_ARCH_LIST when set, else those of the visible GPUs, else sm_80 and sm_90 with PTX of compute_90.
"""
import logging
import os
import sys
from glob import glob

import numpy as np
import torch
from Cython.Build import cythonize
from setuptools import Extension, setup

from lib.cuda_toolkit import default_arch_list, find_cuda_home, release_mismatch


def want_cuda() -> bool:
    """Whether to compile the CUDA kernel; when so, sets CUDA_HOME (and TORCH_CUDA_ARCH_LIST where torch could not
    choose) for torch's BuildExtension, which reads them later."""
    # CPU machines (and CI) never compile CUDA: it is slow and fails on nvcc / torch version mismatches.
    force = os.environ.get("FORCE_CUDA") or "0"
    if force not in ("0", "1"):  # FORCE_CUDA=true or =yes built the CPU kernel only, without a word
        raise SystemExit(f"setup.py: FORCE_CUDA={force}: expected 1 (build the CUDA kernel) or 0")
    forced = force == "1"
    if forced and torch.version.cuda is None:
        raise SystemExit(f"FORCE_CUDA=1, but this torch ({torch.__version__}) was built without CUDA")
    if torch.version.cuda is None or not (forced or torch.cuda.is_available()):
        return False
    try:
        home = find_cuda_home(dict(os.environ))
    except RuntimeError as e:
        raise SystemExit(f"setup.py: {e}") from None
    if home is None:
        if forced:
            raise SystemExit("setup.py: FORCE_CUDA=1 but no nvcc on PATH and no CUDA_HOME: set CUDA_HOME to a CUDA "
                             f"toolkit of version {torch.version.cuda} (torch.version.cuda)")
        print("setup.py: a GPU is visible but no CUDA toolkit (nvcc) is: building the CPU kernel only")
        return False
    mismatch = release_mismatch(home, torch.version.cuda)
    if mismatch is not None:
        if forced:
            raise SystemExit(f"setup.py: FORCE_CUDA=1, but {mismatch}")
        print(f"setup.py: a GPU is visible, but {mismatch}; building the CPU kernel only")
        return False
    os.environ["CUDA_HOME"] = str(home)
    arch_list = default_arch_list(dict(os.environ), torch.cuda.device_count())
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    print(f"setup.py: CUDA kernel with CUDA_HOME={home}, TORCH_CUDA_ARCH_LIST="
          f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(those of the visible GPUs)')}")
    return True


BUILD_CUDA = want_cuda()
if not BUILD_CUDA:
    # Without a GPU, torch's import below warns "No CUDA runtime is found, using CUDA_HOME='/usr/local'" (its guess
    # from nvcc), which the C++ build never uses: a CPU set-up would end on a CUDA warning naming a wrong folder.
    # Only that message: the logger's compiler warnings stay.
    logging.getLogger("torch.utils.cpp_extension").addFilter(lambda record: "No CUDA runtime" not in str(record.msg))
# torch.utils.cpp_extension reads CUDA_HOME when imported: only after want_cuda() has set it
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def openmp_flags() -> list[str]:
    # at::parallel_for is inlined into the extension: with torch's OpenMP backend it runs on one thread unless the
    # extension is compiled with -fopenmp (at run time it shares torch's libgomp.so.1).
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if openmp and sys.platform.startswith("linux") else []


def cpool_extension():
    sources = glob("lib/cpool/csrc/*.cpp")
    args = {"cxx": ["-O3", *openmp_flags()]}
    common = dict(extra_compile_args=args, extra_link_args=openmp_flags(), depends=glob("lib/cpool/csrc/*.h"))
    if BUILD_CUDA:
        args["nvcc"] = ["-O3", "--threads", "0"]  # the device code of each architecture compiled in parallel
        return CUDAExtension("lib.cpool._ext", sources + glob("lib/cpool/csrc/*.cu"), **common)
    return CppExtension("lib.cpool._ext", sources, **common)


nms_extension = Extension(
    "lib.nms._soft_nms",
    ["lib/nms/soft_nms.pyx"],
    include_dirs=[np.get_include()],
    # C, not C++: BuildExtension gives every compile that names no standard -std=c++20 (a warning for C)
    extra_compile_args=["-O3", "-std=gnu11"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(
    name="centernet47",
    ext_modules=[cpool_extension(), *cythonize([nms_extension], language_level=3)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
