"""tools/gpu_check.py on the CPU: its plan and budget, the refusal without a GPU, step running with logs, time
limits and the ending of every process a step started, skips and the exit status, the summaries it reads off each
step's output, and the Makefile target (--dry-run, PY override)."""
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tools import gpu_check
from utils.errors import ArgumentError

ROOT = Path(__file__).resolve().parents[1]


def clean_make_env() -> dict:
    # Under `make test` the parent make's variables would turn this into a sub-make that prints its directory.
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def test_dry_run_prints_the_plan_through_make():
    result = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PY={sys.executable}",
                             "GPU_CHECK_ARGS=--dry-run"], cwd=ROOT, env=clean_make_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    plan = gpu_check.steps(sys.executable, "/tmp/x", None)
    assert f"budget {gpu_check.DEFAULT_BUDGET} s; step limits add up to {sum(s.limit_s for s in plan)} s\n" in result.stdout
    for step in plan:
        assert f"{step.name} (limit {step.limit_s} s, log {step.log}" in result.stdout
    assert "FORCE_CUDA=1" in result.stdout and "--test_flip" in result.stdout
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1 " in result.stdout and "--tool memcheck" in result.stdout


def test_default_budget_covers_every_step_within_one_device_command():
    for sanitizer in (None, "/usr/local/cuda/bin/compute-sanitizer"):
        plan = gpu_check.steps("python3", "/tmp/x", sanitizer)
        assert sum(s.limit_s for s in plan) <= gpu_check.DEFAULT_BUDGET <= 10 * 60
        # every step gets its whole limit: the last one starts with at least that much (and MIN_START_S) left
        assert gpu_check.DEFAULT_BUDGET - sum(s.limit_s for s in plan[:-1]) >= max(plan[-1].limit_s,
                                                                                    gpu_check.MIN_START_S)
    assert gpu_check.get_args_parser().parse_args([]).budget == gpu_check.DEFAULT_BUDGET
    memcheck = {s.name: s for s in gpu_check.steps("python3", "/tmp/x", None)}["memcheck pooling tests"]
    assert memcheck.unavailable == "no compute-sanitizer"


def test_each_step_limit_is_at_least_1_3_times_its_first_run():
    # Seconds each step took in the first run on one H200 (README, GPU: its table), which the limits are sized by;
    # bench_train ran out of its 130 s there and now times fewer settings in that limit.
    first_run_s = {"build CUDA kernel": 70, "pytest -m cuda": 54, "bench_cpool (6,128,128,128) fp32": 8,
                   "train --amp + test --test_flip": 89, "bench_infer 511": 23, "bench_pipeline 511": 10,
                   "memcheck pooling tests": 10}
    limits = {s.name: s.limit_s for s in gpu_check.steps("python3", "/tmp/x", None)}
    assert limits.keys() - first_run_s.keys() == {"bench_train 511 batch 6"}
    for name, seconds in first_run_s.items():
        assert limits[name] >= 1.3 * seconds, name


def test_levers_plan_builds_then_times_the_compiled_network(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_visible", lambda: True)
    assert gpu_check.main(gpu_check.get_args_parser().parse_args(["--plan", "levers", "--dry-run"])) == 0
    out = capsys.readouterr().out
    plan = gpu_check.lever_steps("python3")
    assert [s.name for s in plan][0] == "build CUDA kernel" and sum(s.limit_s for s in plan) <= gpu_check.DEFAULT_BUDGET
    for step in plan:
        assert f"{step.name} (limit {step.limit_s} s, log {step.log})" in out
    assert out.count("--compile") == 2 and "--tool memcheck" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu(tmp_path):
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "gpu-check: no GPU visible" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_dry_run_says_when_no_gpu_is_visible_and_a_budget_must_be_positive(monkeypatch, capsys):
    args = gpu_check.get_args_parser().parse_args(["--dry-run"])
    for visible in (True, False):
        monkeypatch.setattr(gpu_check, "gpu_visible", lambda: visible)
        assert gpu_check.main(args) == 0
        out = capsys.readouterr().out
        assert ("note: no GPU visible (torch.cuda.is_available() is false)" in out) is not visible
        assert f"budget {gpu_check.DEFAULT_BUDGET} s" in out
    for budget in ("0", "-5", "nan", "inf"):
        with pytest.raises(ArgumentError, match=f"--budget: expected a finite number above 0, got {budget}"):
            gpu_check.main(gpu_check.get_args_parser().parse_args(["--dry-run", "--budget", budget]))


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
    status, _ = gpu_check.run_step(silent, env, tmp_path, 1.5)  # killed at its limit, not after 30 s
    assert status == "timeout (2 s)"

    with_env = gpu_check.Step("env", "env.log", [[sys.executable, "-c", "import os; print('v', os.environ['V'])"]],
                              10, gpu_check.last_line(r"^v .*$"), env={"V": "7"})
    assert gpu_check.run_step(with_env, env, tmp_path, 10) == ("ok", "v 7")


def test_a_step_log_holds_each_line_as_it_comes(tmp_path):
    """A gpu-check that the device machine's own time limit kills leaves its logs under $OUT as they stand: the
    step's lines were held in a buffer until the step ended (here the second command found none of the first's)."""
    lines_of_first = f"print(open({str(tmp_path / 'log.log')!r}).read().splitlines().count('a 1'))"
    step = gpu_check.Step("log", "log.log", [[sys.executable, "-c", "print('a', 1)"],
                                             [sys.executable, "-c", lines_of_first]], 10, gpu_check.last_line(r"^\d+$"))
    assert gpu_check.run_step(step, {"PATH": "/usr/bin:/bin"}, tmp_path, 10) == ("ok", "1")


# A command that starts a grandchild holding the output pipe (as setup.py starts nvcc; torchrun starts its workers
# in sessions of their own, outside the step's process group), writes its pid, then sleeps (the timeout case) or
# exits (the straggler case). The grandchild writes the file argv[4] if it lives to the end of its 20 s.
SPAWNER = """import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(20); open(sys.argv[1], 'w')",
                          sys.argv[4]], start_new_session=sys.argv[3] == "1")
open(sys.argv[1], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(float(sys.argv[2]))
"""


def gone(pid: int) -> bool:
    """Whether `pid` has ended (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("own_session", [False, True], ids=["in-group", "own-session"])
@pytest.mark.parametrize("sleep_s, status", [(30, "timeout (2 s)"), (0, "ok")], ids=["timeout", "straggler"])
def test_a_step_ends_every_process_it_started(tmp_path, sleep_s, status, own_session):
    pid_file, finished = tmp_path / "grandchild.pid", tmp_path / "grandchild.finished"
    step = gpu_check.Step("spawn", "spawn.log", [[sys.executable, "-c", SPAWNER, str(pid_file), str(sleep_s),
                                                  str(int(own_session)), str(finished)]], 10,
                          gpu_check.last_line("started"))
    assert gpu_check.run_step(step, {"PATH": "/usr/bin:/bin"}, tmp_path, 1.5) == (status, "started")
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5  # SIGKILL is delivered at once; its reaping may take a moment
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid)
    # killed, not waited for (before: only the direct child was killed, and reading its output waited the 20 s of
    # the grandchild)
    assert not finished.exists()


def test_build_step_fails_without_the_cuda_kernel(tmp_path):
    # here the extension is built for the CPU only: the check of the build step must fail, not report ok
    build = gpu_check.steps(sys.executable, "/tmp/x", None)[0]
    check_only = gpu_check.Step(build.name, "build.log", build.commands[1:], 60, build.summarize)
    assert gpu_check.run_step(check_only, dict(os.environ), tmp_path, 60) == ("FAILED (rc 1)",
                                                                               "CUDA kernel registered: False")


def quick(name: str, code: str, **kw) -> "gpu_check.Step":
    return gpu_check.Step(name, f"{name}.log", [[sys.executable, "-c", code]], 10, gpu_check.last_line(".+"), **kw)


def test_plan_skips_and_exit_status(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_START_S", 1.0)
    plan = [quick("first", "import time; time.sleep(0.6); print('one')"),
            quick("memcheck", "print('x')", unavailable="no compute-sanitizer"),
            quick("late", "print('two')")]
    rows = gpu_check.run_plan(plan, 1.3, {"PATH": "/usr/bin:/bin"}, tmp_path)  # 0.7 s left for "late": under 1
    assert [(r[0], r[1], r[3]) for r in rows] == [("first", "ok", "one"), ("memcheck", "skipped (no compute-sanitizer)",
                                                                            ""), ("late", "skipped (budget)", "")]
    assert gpu_check.exit_status(rows) == 0  # nothing failed
    assert gpu_check.summary(rows, "GPU").splitlines()[-1] == ("1 passed, 0 failed, 2 skipped: memcheck (no "
                                                               "compute-sanitizer), late (budget)")
    rows = gpu_check.run_plan([quick("bad", "import sys; sys.exit(2)"), plan[1]], 100, {"PATH": "/usr/bin:/bin"},
                              tmp_path)
    assert rows[0][1] == "FAILED (rc 2)" and gpu_check.exit_status(rows) == 1
    assert gpu_check.exit_status([("t", "timeout (9 s)", 9.0, "")]) == 1


def bench_output(step: "gpu_check.Step", monkeypatch, capsys, **fakes) -> str:
    """What the bench of `step` prints with the step's own arguments, run here on a pretend GPU: CUDA said to be
    there with one GPU, which the bench's --device makes the current one (bench.device, as on a GPU), tensors made
    on the meta device (shapes only), and the bench's measuring functions replaced by `fakes`. Its rows come from
    its own formatting code, so a change of its table that the step's summary cannot read fails here rather than in
    the one run on a GPU."""
    [command] = step.commands
    bench = importlib.import_module(f"bench.{Path(command[1]).stem}")
    args = bench.get_args_parser().parse_args(command[2:])  # every flag and value of the plan exists
    current = []

    def set_device(device):  # an index or a torch.device, as torch.cuda.set_device takes
        current.append(torch.device("cuda", device) if isinstance(device, int) else torch.device(device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch, "randn", lambda *shape, **kwargs: torch.empty(*shape, device="meta"))
    for name, fake in fakes.items():
        monkeypatch.setattr(bench, name, fake)
    bench.main(args)
    assert current[-1] == torch.device("cuda", 0)  # the plan's --device cuda: the one GPU, current as it runs
    return capsys.readouterr().out


def plan_steps() -> dict[str, "gpu_check.Step"]:
    return {s.name: s for s in gpu_check.steps("python3", "/tmp/x", None) + gpu_check.lever_steps("python3")}


def test_the_cpool_summary_reads_what_the_bench_prints(monkeypatch, capsys):
    from lib.cpool.pool import BOTTOM, LEFT, RIGHT, TOP, cummax_pool, extension_pool

    ours = {TOP: 0.230, BOTTOM: 0.217, LEFT: 0.277, RIGHT: 0.216}

    def median_ms(fn, x, grad, direction, warmup, repeats):
        return ours[direction] * {extension_pool: 1, cummax_pool: 2}.get(fn, 30)  # rowloop: 30 times ours

    step = plan_steps()["bench_cpool (6,128,128,128) fp32"]
    out = bench_output(step, monkeypatch, capsys, median_ms=median_ms, copy_gbs=lambda *args: 2784.0,
                       extension_available=lambda: True, kernel_registered=lambda device_type: True)
    assert "device-to-device copy of one tensor: 2784 GB/s" in out
    # 6 passes of 6 * 128**3 fp32 values: 302 MB, in 0.230 ms at the top: 1313 GB/s
    assert step.summarize(out) == ("4 dirs 0.940 ms, 2.0x faster than cummax, 30.0x than rowloop; "
                                   "GB/s t/b/l/r 1313/1392/1090/1398")


def fake_train_bench(arch, mode, layout, compiled, args, device):
    """(images/s, peak MiB, first step's seconds) of a setting: HG-104's from README's GPU section."""
    rate = {"fp32": 32.4, "fp16": 40.9, "bf16": 39.1}[mode] * (1.5 if compiled else 1)
    return rate, 18458.0 if mode == "fp32" else 12303.0, 95.5 if compiled else 2.1


def test_the_train_bench_summaries_read_what_the_bench_prints(monkeypatch, capsys):
    steps = plan_steps()
    step = steps["bench_train 511 batch 6"]
    out = bench_output(step, monkeypatch, capsys, bench=fake_train_bench)
    assert step.summarize(out) == "large img/s: fp32 32.4 18.0G, fp16 40.9 12.0G, bf16 39.1 12.0G"
    step = steps["bench_train HG-104 compiled"]
    out = bench_output(step, monkeypatch, capsys, bench=fake_train_bench)
    assert step.summarize(out) == "large img/s: bf16 39.1 12.0G, bf16 c 58.7 12.0G, fp32 32.4 18.0G, fp32 c 48.6 18.0G"


def test_the_infer_summaries_read_what_the_bench_prints(monkeypatch, capsys):
    import numpy as np

    fakes = {"build_model": lambda arch, classes: torch.nn.Identity(), "synthetic_outputs": lambda batch: {},
             "postprocess": lambda *args: [], "median_ms": lambda *args, **kwargs: 38.7,
             "detect": lambda *args: np.zeros((3, 6), np.float32)}
    steps = plan_steps()
    step = steps["bench_infer 511"]
    assert step.summarize(bench_output(step, monkeypatch, capsys, **fakes)) == (
        "forward large fp32 38.7, large fp16 38.7, large bf16 38.7, small fp32 38.7, small fp16 38.7, "
        "small bf16 38.7 ms")
    step = steps["bench_infer HG-104 compiled"]
    assert step.summarize(bench_output(step, monkeypatch, capsys, **fakes)) == (
        "forward large fp32 38.7, large fp16 38.7, large bf16 38.7, large fp32 compiled 38.7, "
        "large fp16 compiled 38.7, large bf16 compiled 38.7 ms")


def test_the_pipeline_summary_reads_what_the_bench_prints(monkeypatch, capsys):
    def time_setting(wrapped, timer, inputs, amp, repeats, device):
        ms = {1: 23.2, 2: 25.5, 10: 126.7}[sum(len(images) for images, _ in inputs)]  # single, flip, 5 scales
        return ms, {"forward": 0.7 * ms, "decode": 0.1 * ms, "soft-NMS": 0.01 * ms, "rest": 0.19 * ms}, 12

    step = plan_steps()["bench_pipeline 511"]
    out = bench_output(step, monkeypatch, capsys, build_model=lambda arch, classes: torch.nn.Identity(),
                       time_setting=time_setting)
    assert step.summarize(out) == ("large single 23.2, large flip 25.5, large 5 scales + flip 126.7, small single "
                                   "23.2, small flip 25.5, small 5 scales + flip 126.7 ms")


def test_the_other_summaries():
    ap = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.721\n"
    plan = plan_steps()
    assert plan["train --amp + test --test_flip"].summarize(ap).endswith("= 0.721")
    assert plan["pytest -m cuda"].summarize("..\n3 passed, 1 skipped in 2.0s\n") == "3 passed, 1 skipped in 2.0s"
    assert plan["memcheck pooling tests"].summarize("========= ERROR SUMMARY: 0 errors\n") == "ERROR SUMMARY: 0 errors"
    assert gpu_check.summarize_cpool("Traceback ...") == "see log"


def test_missing_modules_and_wheels(tmp_path):
    assert gpu_check.missing_modules(["json", "no_such_module_47"]) == ["no_such_module_47"]
    with pytest.raises(SystemExit, match="no_such_module_47 not importable and no wheels in"):
        gpu_check.install_wheels(sys.executable, tmp_path, ["no_such_module_47"])


def test_makefile_target_takes_the_python_override():
    result = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "PY=python3",
                             "GPU_CHECK_ARGS=--budget 300"], cwd=ROOT, env=clean_make_env(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "python3 tools/gpu_check.py --budget 300"
