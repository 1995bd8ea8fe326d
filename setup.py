"""Builds the two compiled parts of centernet47 in place: `make setup` runs `python setup.py build_ext --inplace`.

- lib/cpool: corner pooling (C++ CPU kernel; CUDA kernel when a GPU is visible or FORCE_CUDA=1).
- lib/nms: soft-NMS in Cython.
"""
import os
import sys
from glob import glob

import numpy as np
import torch
from Cython.Build import cythonize
from setuptools import Extension, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def want_cuda() -> bool:
    # CPU machines (and CI) never compile CUDA: it is slow and fails on nvcc / torch version mismatches.
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    return CUDA_HOME is not None and torch.version.cuda is not None and (forced or torch.cuda.is_available())


def openmp_flags() -> list[str]:
    # at::parallel_for is inlined into the extension: with torch's OpenMP backend it runs on one thread unless the
    # extension is compiled with -fopenmp (at run time it shares torch's libgomp.so.1).
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if openmp and sys.platform.startswith("linux") else []


def cpool_extension():
    sources = glob("lib/cpool/csrc/*.cpp")
    args = {"cxx": ["-O3", *openmp_flags()]}
    common = dict(extra_compile_args=args, extra_link_args=openmp_flags(), depends=glob("lib/cpool/csrc/*.h"))
    if want_cuda():
        args["nvcc"] = ["-O3"]
        return CUDAExtension("lib.cpool._ext", sources + glob("lib/cpool/csrc/*.cu"), **common)
    return CppExtension("lib.cpool._ext", sources, **common)


nms_extension = Extension(
    "lib.nms._soft_nms",
    ["lib/nms/soft_nms.pyx"],
    include_dirs=[np.get_include()],
    extra_compile_args=["-O3"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(
    name="centernet47",
    ext_modules=[cpool_extension(), *cythonize([nms_extension], language_level=3)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
