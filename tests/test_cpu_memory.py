"""utils/cpu_memory.py: a CPU Detector keeps freed activations in the process for the next forward.

Each check runs in a fresh interpreter (the setting is process-wide), on one thread:
- a 64 MiB tensor, larger than glibc's largest dynamic mmap threshold (32 MiB), is freed: by default its memory
  goes back to the OS at once (the resident set shrinks by the whole block); kept, it does not shrink at all;
- the prepared network runs forwards on a 255 x 255 image after five warm-up ones. The control fixes glibc's
  thresholds at their starting values (128 KiB), so every freed activation is unmapped or trimmed and faults in
  anew in the next forward. glibc's own default is no control: its dynamic threshold rises with the blocks it
  frees, and whether the warm-up leaves it above every activation varies from run to run (1100-1600 faults per
  forward measured, and once none). Kept, none did (measured), and only the heap's growth while its free blocks
  settle could (336 per forward with 80 classes measured by bench/profile_infer.py with one warm-up). The bound,
  a twentieth of the control's (about 470 of 9400-9600), is below what glibc's default gives too.
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK_MIB = 64

PROBE = f"""
import os, resource, sys, torch
sys.path.insert(0, {str(REPO)!r})
from nets import build_model

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

model = build_model("tiny_hourglass", 2).eval()
if sys.argv[1] == "detector":
    from engine.detector import Detector
    network = Detector(model, ["a", "b"], torch.device("cpu")).network
else:  # the same prepared network, without the Detector
    from nets.inference import prepare_for_inference
    network = prepare_for_inference(model)
if sys.argv[1] == "returning":  # glibc's starting thresholds, fixed: freed blocks always go back to the OS
    import ctypes, ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.mallopt(-1, 128 << 10) and libc.mallopt(-3, 128 << 10)  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
block = torch.ones({BLOCK_MIB} << 18)  # float32: {BLOCK_MIB} MiB, every page written
before_free = resident_mib()
del block
returned = before_free - resident_mib()
image = torch.randn(1, 3, 255, 255)
with torch.no_grad():
    for _ in range(5):
        network(image)
    start = faults()
    for _ in range(3):
        network(image)
print(returned, (faults() - start) / 3)
"""


def probe(mode: str) -> tuple[float, float]:
    """(MiB returned to the OS when the block is freed, page faults per forward after warm-up)."""
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    returned, faults = map(float, result.stdout.split())
    return returned, faults


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/statm")
def test_a_cpu_detector_keeps_freed_memory_for_the_next_forward():
    if platform.libc_ver()[0] != "glibc":  # no mallopt: nothing is changed, and nothing claims to be
        from utils.cpu_memory import keep_freed_memory
        assert keep_freed_memory() is False
        return
    returned, _ = probe("default")
    assert returned > BLOCK_MIB * 0.9  # glibc's default gives the block back: the probe sees the difference
    _, returning_faults = probe("returning")
    returned, kept_faults = probe("detector")
    assert returned < BLOCK_MIB * 0.1
    assert kept_faults < returning_faults / 20


class OlderGlibc:
    """mallopt as glibc up to 2.34 at least answers it: mmap thresholds above `mmap_max` refused, the rest set."""

    def __init__(self, mmap_max: int):
        self.mmap_max, self.thresholds = mmap_max, {}

    def mallopt(self, param: int, value: int) -> int:
        from utils.cpu_memory import M_MMAP_THRESHOLD

        if param == M_MMAP_THRESHOLD and value > self.mmap_max:
            return 0
        self.thresholds[param] = value
        return 1


@pytest.mark.parametrize("mmap_max, kept", [(32 << 20, True), (0, False)])
def test_a_glibc_refusing_a_1_gib_mmap_threshold_is_never_left_with_only_the_trim_one(monkeypatch, mmap_max, kept):
    """The trim threshold was set first, then an older glibc (2.34 at least) refused the 1 GiB mmap threshold: the
    dynamic mmap threshold was off and every block above 128 KiB mmapped, 4x the faults of glibc's default, and
    keep_freed_memory() answered False. The mmap threshold now comes first, at 32 MiB where 1 GiB is refused,
    and the trim threshold only once it is set."""
    from utils import cpu_memory

    libc = OlderGlibc(mmap_max)
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("glibc", "2.31"))
    monkeypatch.setattr(cpu_memory, "_kept", False)
    assert cpu_memory.keep_freed_memory() is kept
    expected = {cpu_memory.M_MMAP_THRESHOLD: 32 << 20, cpu_memory.M_TRIM_THRESHOLD: 1 << 30} if kept else {}
    assert libc.thresholds == expected
