"""tools/gpu_check.py on the CPU: its plan, the refusal without a GPU, step running with logs and time limits,
the summaries it reads off each step's output, and the Makefile target's PY override."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_lists_every_step():
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("build CUDA kernel", "pytest -m cuda", "bench_cpool", "train --amp", "bench_train", "bench_infer"):
        assert name in result.stdout
    assert "FORCE_CUDA=1" in result.stdout and "--test_flip" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu(tmp_path):
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "gpu-check: no GPU visible" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_run_step_statuses_logs_and_time_limit(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    ok = gpu_check.Step("two", "two.log", [[sys.executable, "-c", "print('a 1')"], [sys.executable, "-c",
                                                                                  "print('a 2')"]],
                        10, gpu_check.last_line(r"^a \d$"))
    assert gpu_check.run_step(ok, env, tmp_path, 10) == ("ok", "a 2")
    assert "a 1" in (tmp_path / "two.log").read_text() and "a 2" in (tmp_path / "two.log").read_text()

    failing = gpu_check.Step("fail", "fail.log", [[sys.executable, "-c", "import sys; sys.exit(3)"],
                                                  [sys.executable, "-c", "print('never')"]], 10,
                             gpu_check.last_line("never"))
    assert gpu_check.run_step(failing, env, tmp_path, 10) == ("FAILED (rc 3)", "see log")

    silent = gpu_check.Step("hang", "hang.log", [[sys.executable, "-c", "import time; time.sleep(30)"]], 10,
                            gpu_check.last_line("x"))
    status, _ = gpu_check.run_step(silent, env, tmp_path, 1.5)  # killed by the watchdog, not after 30 s
    assert status == "timeout (2 s)"


def test_summaries():
    cpool = """direction      ours   cummax  rowloop  cummax/ours  rowloop/ours    GB/s
top           0.123    1.000    9.000         8.1x         73.2x    2456
bottom        0.125    1.000    9.000         8.0x         72.0x    2416
left          0.150    1.200    9.500         8.0x         63.3x    2013
right         0.151    1.200    9.500         7.9x         62.9x    2000
all four      0.549    4.400   37.000         8.0x         67.4x    2200
"""
    assert gpu_check.summarize_cpool(cpool) == ("4 dirs 0.549 ms, 8.0x faster than cummax, 67.4x than rowloop; "
                                                "GB/s t/b/l/r 2456/2416/2013/2000")
    train = """arch              mode    images/s  vs old   peak MB
small_hourglass   old         20.0   1.00x     10240
small_hourglass   fp16        50.0   2.50x      6144
"""
    assert gpu_check.summarize_train_bench(train) == "small img/s: old 20.0 10.0G, fp16 50.0 (2.50x) 6.0G"
    infer = "forward large_hourglass 511 fp16          12.5            \npipeline large_hourglass 511 flip   40.1    100\n"
    assert gpu_check.summarize_infer(infer) == "large fwd fp16 12.5, large pipe flip 40.1 ms"
    ap = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.721\n"
    assert gpu_check.steps("python3", "/tmp/x")[3].summarize(ap).endswith("= 0.721")
    assert gpu_check.steps("python3", "/tmp/x")[1].summarize("..\n3 passed, 1 skipped in 2.0s\n") == \
        "3 passed, 1 skipped in 2.0s"
    assert gpu_check.summarize_cpool("Traceback ...") == "see log"


def test_missing_modules_and_wheels(tmp_path):
    assert gpu_check.missing_modules(["json", "no_such_module_47"]) == ["no_such_module_47"]
    with pytest.raises(SystemExit, match="no_such_module_47 not importable and no wheels in"):
        gpu_check.install_wheels(sys.executable, tmp_path, ["no_such_module_47"])


def test_makefile_target_takes_the_python_override():
    # Under `make test` the parent make's variables would turn this into a sub-make that prints its directory.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "PY=python3",
                             "GPU_CHECK_ARGS=--budget 300"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "python3 tools/gpu_check.py --budget 300"
