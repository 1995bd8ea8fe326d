"""`keep_freed_memory()`: let glibc's malloc keep freed memory for reuse instead of returning it to the OS.

A forward frees tens of megabytes of activations and allocates them again in the next layer or the next image.
By default glibc serves large blocks with mmap and trims the top of its heap, so the memory goes back to the OS
and comes back as fresh zeroed pages, one page fault each: 8-10 thousand faults per tiny_hourglass forward at
511 x 511, 4-11% of its time in our runs (bench/profile_infer.py). onnxruntime avoids this with its own arena;
this is the same for PyTorch, done once per process: the resident memory then stays at its peak instead of
shrinking between images. Only glibc has mallopt (musl, macOS and Windows keep their own allocators, and nothing changes).
"""
import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB of free heap is kept
# The largest mmap threshold that glibc up to 2.34 at least accepts (HEAP_MAX_SIZE / 2 on 64-bit: 32 MiB); newer
# ones take any size.
OLD_GLIBC_MMAP_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)

_kept = False


def keep_freed_memory() -> bool:
    """Sets glibc's trim and mmap thresholds to 1 GiB (the mmap one to 32 MiB where glibc refuses more), once per
    process; True where they are set (glibc). Both are needed: setting either one turns off glibc's dynamic mmap
    threshold, and with only the trim threshold set, blocks above 128 KiB would all be mmapped (4x the faults,
    measured). So the mmap threshold comes first: an older glibc refused 1 GiB after the trim threshold was set."""
    global _kept
    if not _kept and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mmap_set = libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) or libc.mallopt(M_MMAP_THRESHOLD, OLD_GLIBC_MMAP_MAX)
        _kept = bool(mmap_set) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    return _kept
