"""The GPU path proven in one command (`make gpu-check`, or `make gpu-check PY=python3` with a Python that holds
torch): builds the CUDA corner-pooling kernel, runs the `cuda` tests, the pooling benchmark, a short training run
with --amp on the built-in shapes data followed by test.py --test_flip, the training, forward and test-time pipeline
benchmarks of large_hourglass and small_hourglass, and last the pooling kernel's cuda tests again under
`compute-sanitizer --tool memcheck`, then prints one summary table.

Sized for one H100 / H200: each step has a time limit, and the default --budget (580 s) covers all of them. A step
that would start with less than 20 s of the budget left is skipped, as is the memcheck step where there is no
compute-sanitizer (on PATH or in the CUDA toolkit's bin/). Exit status: 0 when no step failed or ran out of time;
skipped steps are listed in the table and the last line, but are not failures. --dry-run prints the plan.

--plan levers runs, instead, the build and the speed levers not yet measured on a GPU: training HG-104 at 511,
6 images, bf16 and fp32, eager and under torch.compile (bench_train --compile; its "first s" column holds the
compilation), and the HG-104 forward in each precision eager and compiled with CUDA graphs (bench_infer
--compile), within the same budget.

    python3 tools/gpu_check.py [--plan check|levers] [--budget 580] [--wheels .whl] [--out DIR] [--dry-run]

pycocotools and tensorboardX, when not importable, are installed from the wheels in --wheels (no network needed)
into build/gpu_check_site, which is put on PYTHONPATH for every step. Get the wheels on a machine with network:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 -d .whl pycocotools==2.0.11 tensorboardX==2.6.5
Logs (one per step) and summary.txt go to --out: $OUT when set, else runs/gpu_check.
"""
import argparse
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: import lib from the repo
from lib.cuda_toolkit import find_cuda_home  # noqa: E402
from utils.checks import check_number  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

NEEDED = ["pycocotools", "tensorboardX"]
SITE = ROOT / "build" / "gpu_check_site"
RUN = "gpu_check_shapes"
ENV = {"FORCE_CUDA": "1", "PYTHONUNBUFFERED": "1"}  # setup.py builds the CUDA kernel; logs stream live
DATA = ["--dataset", "coco", "--data_dir", "data/shapes", "--val_split", "val"]
DEFAULT_BUDGET = 580  # the step limits' sum, inside one 10-minute command
MIN_START_S = 20  # a step is not started with less of the budget left
NO_GPU = "no GPU visible (torch.cuda.is_available() is false)"
# The tests of the pooling kernel itself (every dtype, direction and tile remainder, edge sizes, strided and
# channels_last layouts), not the training runs, which memcheck would slow far past the step's limit.
MEMCHECK_TESTS = "(matches_cpu_kernel and random) or size_one or non_contiguous"
# Without the caching allocator every tensor is its own allocation, so memcheck sees a read past its end.
MEMCHECK_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}


@dataclass
class Step:
    name: str
    log: str  # log file name under --out
    commands: list[list[str]]
    limit_s: int
    summarize: Callable[[str], str]  # output text -> one-line result
    env: dict[str, str] = field(default_factory=dict)  # added to the environment of this step
    unavailable: str | None = None  # why this machine cannot run the step: it is skipped, not failed

    def describe(self) -> str:
        env = "".join(f"{k}={v} " for k, v in self.env.items())
        return "\n".join(f"    {env}{shlex.join(c)}" for c in self.commands)


def last_line(pattern: str):
    def summarize(text: str) -> str:
        found = re.findall(pattern, text, flags=re.MULTILINE)
        return found[-1].strip() if found else "see log"
    return summarize


def summarize_cpool(text: str) -> str:
    """'all four' row of bench_cpool: ours ms, vs cummax, vs rowloop; and the GB/s of each direction."""
    rows = dict(re.findall(r"^(top|bottom|left|right|all four)\s+(.+)$", text, flags=re.MULTILINE))
    if "all four" not in rows:
        return "see log"
    ours, _, _, vs_cummax, vs_loop, _ = rows["all four"].split()
    gbs = "/".join(rows[d].split()[-1] for d in ("top", "bottom", "left", "right"))
    return f"4 dirs {ours} ms, {vs_cummax} faster than cummax, {vs_loop} than rowloop; GB/s t/b/l/r {gbs}"


def summarize_train_bench(text: str) -> str:
    """Images/s and peak GiB ("G") of each arch, mode, layout and compilation of bench_train ('cl': channels_last, 'c':
    torch.compile)."""
    rows = re.findall(r"^(\w+)_hourglass\s+(old|fp32|fp16|bf16)\s+(contiguous|channels_last)\s+(no|yes)\s+([\d.]+)\s+"
                      r"(?:[\d.]+x\s+)?(\d+)\s+[\d.]+$", text, flags=re.MULTILINE)
    parts = {}
    for arch, mode, layout, compiled, rate, peak in rows:
        name = mode + (" cl" if layout == "channels_last" else "") + (" c" if compiled == "yes" else "")
        parts.setdefault(arch, []).append(f"{name} {rate} {int(peak) / 1024:.1f}G")
    return "; ".join(f"{arch} img/s: " + ", ".join(p) for arch, p in parts.items()) or "see log"


def summarize_infer(text: str) -> str:
    rows = re.findall(r"^forward (\w+)_hourglass 511 (\w+(?: compiled)?)\s+([\d.]+)", text, flags=re.MULTILINE)
    return "forward " + ", ".join(f"{arch} {mode} {ms}" for arch, mode, ms in rows) + " ms" if rows else "see log"


def summarize_pipeline(text: str) -> str:
    rows = re.findall(r"^(\w+)_hourglass (single|flip|5 scales \+ flip)\s+([\d.]+)", text, flags=re.MULTILINE)
    return ", ".join(f"{arch} {setting} {ms}" for arch, setting, ms in rows) + " ms" if rows else "see log"


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else in the CUDA toolkit's bin/; None where neither has it."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    try:
        home = find_cuda_home(dict(os.environ))
    except RuntimeError:
        return None
    tool = home / "bin" / "compute-sanitizer" if home is not None else None
    return str(tool) if tool is not None and tool.is_file() else None


def build_step(py: str) -> Step:
    registered = ("import sys; from lib.cpool import pool; found = pool.kernel_registered('cuda'); "
                  "print('CUDA kernel registered:', found); sys.exit(0 if found else 1)")
    return Step("build CUDA kernel", "build.log",
                [[py, "setup.py", "build_ext", "--inplace", "--force"],  # FORCE_CUDA=1; --force: replace a CPU build
                 [py, "-c", registered]],
                100, last_line(r"CUDA kernel registered: .*$"))


# Limits: at least 1.3 times the seconds each step took in the first run on one H200 (16 cores; README, GPU): build 70,
# cuda tests 54, bench_cpool 8, train + test 89, bench_infer 23, bench_pipeline 10, memcheck 10. bench_train there
# timed 4 HG-104 settings in 130 s in a fresh process (each new network, precision and layout is autotuned by
# cuDNN), so this step times train.py's layout in three precisions; README gives the command of the full table.
# The steps run in the order of their value to the README table, the memory checker last.
def steps(py: str, ckpt_dir: str, sanitizer: str | None) -> list[Step]:
    arch_flags = ["--archs", "large_hourglass", "small_hourglass"]
    cuda_tests = [py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"]
    return [
        build_step(py),
        Step("pytest -m cuda", "cuda_tests.log", [cuda_tests], 71, last_line(r"^=*\s*\d+ (?:passed|failed).*$")),
        Step("bench_cpool (6,128,128,128) fp32", "bench_cpool.log",
             [[py, "bench/bench_cpool.py", "--device", "cuda", "--shape", "6", "128", "128", "128"]], 20,
             summarize_cpool),
        Step("train --amp + test --test_flip", "train_test.log",
             shapes_data(py) +
             [[py, "train.py", "--log_name", RUN, "--ckpt_dir", ckpt_dir, *DATA, "--train_split", "train", "--arch",
               "tiny_hourglass", "--img_size", "127", "--batch_size", "16", "--lr", "2e-3", "--lr_step", "30",
               "--num_epochs", "36", "--val_interval", "0", "--num_workers", "6", "--device", "cuda", "--amp"],
              [py, "test.py", "--log_name", RUN, "--ckpt_dir", ckpt_dir, *DATA, "--test_flip", "--device", "cuda",
               "--num_workers", "6"]],
             120, last_line(r"Average Precision\s+\(AP\) @\[ IoU=0.50:0.95 \| area=   all.*$")),
        Step("bench_train 511 batch 6", "bench_train.log",
             [[py, "bench/bench_train.py", "--device", "cuda", "--archs", "large_hourglass", "--img_size", "511",
               "--batch_size", "6", "--steps", "4", "--modes", "fp32", "fp16", "bf16"]],
             130, summarize_train_bench),
        Step("bench_infer 511", "bench_infer.log",
             [[py, "bench/bench_infer.py", "--device", "cuda", *arch_flags, "--forward_repeats", "10",
               "--post_repeats", "5"]], 45, summarize_infer),
        Step("bench_pipeline 511", "bench_pipeline.log",
             [[py, "bench/bench_pipeline.py", "--device", "cuda", *arch_flags, "--repeats", "5"]], 45,
             summarize_pipeline),
        Step("memcheck pooling tests", "memcheck.log",
             [[sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", *cuda_tests, "-k",
               MEMCHECK_TESTS]],
             45, last_line(r"ERROR SUMMARY: .*$"), env=MEMCHECK_ENV,
             unavailable=None if sanitizer else "no compute-sanitizer"),
    ]


# The compilations' times on a GPU are not known yet: the limits split what the build leaves of the budget.
def lever_steps(py: str) -> list[Step]:
    return [
        build_step(py),
        Step("bench_train HG-104 compiled", "bench_train_compile.log",
             [[py, "bench/bench_train.py", "--device", "cuda", "--archs", "large_hourglass", "--img_size", "511",
               "--batch_size", "6", "--steps", "4", "--modes", "bf16", "fp32", "--compile"]],
             240, summarize_train_bench),
        Step("bench_infer HG-104 compiled", "bench_infer_compile.log",
             [[py, "bench/bench_infer.py", "--device", "cuda", "--archs", "large_hourglass", "--compile",
               "--forward_repeats", "10", "--post_repeats", "5"]], 240, summarize_infer),
    ]


def shapes_data(py: str) -> list[list[str]]:
    """The command writing the built-in data set (as `make demo` does), unless it is there already (--force: a killed
    run may have left its train split alone)."""
    if (ROOT / "data" / "shapes" / "annotations" / "instances_val.json").is_file():
        return []
    return [[py, "-m", "datasets.shapes", "--out", "data/shapes", "--force"]]


def missing_modules(names: list[str]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def install_wheels(py: str, wheels: Path, missing: list[str]) -> None:
    """Installs every wheel of `wheels` into SITE (offline, no dependencies: the rest is already there)."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"gpu-check: {', '.join(missing)} not importable and no wheels in {wheels}/; fetch them "
                         "as this script's docstring shows (tools/gpu_check.py)")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                    "--target", str(SITE), *map(str, files)], check=True)


def end_group(pgid: int) -> None:
    """Kills every process left in the process group `pgid`: nvcc and cc1plus under setup.py, a torchrun agent."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left
        pass


def end_process(pid: int) -> None:
    """Kills `pid`, with its process group where it leads one."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # ended meanwhile
        pass


def pipe_holders(inode: int) -> list[int]:
    """The processes other than this one that hold the pipe `inode` open (Linux /proc): what a step left running
    outside its process group, such as torchrun's workers, which it starts in sessions of their own."""
    target, holders = f"pipe:[{inode}]", []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        try:
            if pid != os.getpid() and any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.append(pid)
        except OSError:  # ended meanwhile, or not ours to look at
            continue
    return holders


def run_command(command: list[str], env: dict, timeout_s: float, sink: Callable[[str], None]) -> int | None:
    """Runs `command` in its own process group, each output line to `sink`; its exit status, or None when it ran
    out of time. Either way nothing it started and that still holds its output outlives it."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    inode = os.fstat(proc.stdout.fileno()).st_ino

    def copy_lines() -> None:
        for line in proc.stdout:
            sink(line)

    reader = threading.Thread(target=copy_lines, daemon=True)
    reader.start()
    try:
        status = proc.wait(timeout=max(timeout_s, 0))
    except subprocess.TimeoutExpired:
        status = None
    end_group(proc.pid)  # the command itself on a timeout; whatever it left running in any case
    proc.wait()
    deadline = time.monotonic() + 10
    while reader.is_alive() and time.monotonic() < deadline:  # the output ends when its last writer is gone
        for pid in pipe_holders(inode):
            end_process(pid)
        reader.join(0.1)
    if not reader.is_alive():
        proc.stdout.close()
    return status


def run_step(step: Step, env: dict, out: Path, limit_s: float) -> tuple[str, str]:
    """Runs the step's commands in order, output to the console and to its log; (status, result)."""
    lines = []
    with open(out / step.log, "w", buffering=1) as log:  # by line: a run cut short from outside keeps what it logged
        def sink(line: str) -> None:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)

        deadline = time.monotonic() + limit_s
        for command in step.commands:
            log.write(f"$ {shlex.join(command)}\n")
            status = run_command(command, {**env, **step.env}, deadline - time.monotonic(), sink)
            if status is None:
                return f"timeout ({limit_s:.0f} s)", step.summarize("".join(lines))
            if status != 0:
                return f"FAILED (rc {status})", step.summarize("".join(lines))
    return "ok", step.summarize("".join(lines))


def run_plan(plan: list[Step], budget: float, env: dict, out: Path) -> list[tuple[str, str, float, str]]:
    """Runs the steps in order within `budget` seconds: (name, status, seconds, result) for each."""
    start, rows = time.monotonic(), []
    for step in plan:
        left = budget - (time.monotonic() - start)
        if step.unavailable:
            rows.append((step.name, f"skipped ({step.unavailable})", 0.0, ""))
            continue
        if left < MIN_START_S:
            rows.append((step.name, "skipped (budget)", 0.0, ""))
            continue
        t0 = time.monotonic()
        print(f"\n=== {step.name} ===", flush=True)
        status, result = run_step(step, env, out, min(step.limit_s, left))
        rows.append((step.name, status, time.monotonic() - t0, result))
    return rows


def failed(status: str) -> bool:
    """Whether a step's status is a failure: it failed or ran out of time; skipped steps are not failures."""
    return not (status == "ok" or status.startswith("skipped"))


def exit_status(rows: list[tuple[str, str, float, str]]) -> int:
    """0 when no step failed or ran out of time."""
    return 1 if any(failed(status) for _, status, _, _ in rows) else 0


def summary(rows: list[tuple[str, str, float, str]], gpu: str) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"gpu-check on {gpu}: {sum(r[2] for r in rows):.0f} s in all",
             f"{'step':<{width}}  {'status':<16}{'s':>6}  result"]
    lines += [f"{name:<{width}}  {status:<16}{secs:>6.0f}  {result}" for name, status, secs, result in rows]
    skipped = [f"{name} ({status[len('skipped ('):-1]})" for name, status, _, _ in rows if status.startswith("skipped")]
    failures = [name for name, status, _, _ in rows if failed(status)]
    lines.append(f"{len(rows) - len(skipped) - len(failures)} passed, {len(failures)} failed, {len(skipped)} skipped"
                 + (f": {', '.join(skipped)}" if skipped else ""))
    return "\n".join(lines)


def gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def print_plan(plan: list[Step], budget: float) -> None:
    total = sum(s.limit_s for s in plan)
    print(f"environment: {' '.join(f'{k}={v}' for k, v in ENV.items())}")
    print(f"budget {budget:.0f} s; step limits add up to {total} s"
          + ("" if total <= budget else f": steps that would start with under {MIN_START_S} s left are skipped"))
    for step in plan:
        note = f", skipped here: {step.unavailable}" if step.unavailable else ""
        print(f"{step.name} (limit {step.limit_s} s, log {step.log}{note}):\n{step.describe()}")


def main(args: argparse.Namespace) -> int:
    check_number("--budget", args.budget, 0, above=True)
    py = sys.executable
    if args.plan == "levers":
        return check(args, lever_steps(py), py)
    with tempfile.TemporaryDirectory(prefix="gpu_check_ckpt_") as ckpt_dir:
        return check(args, steps(py, ckpt_dir, find_sanitizer()), py)


def check(args: argparse.Namespace, plan: list[Step], py: str) -> int:
    if args.dry_run:
        print_plan(plan, args.budget)
        if not gpu_visible():
            print(f"note: {NO_GPU}: a real run here would stop at once")
        return 0
    if not gpu_visible():
        raise UserError(f"gpu-check: {NO_GPU}; run it on a GPU machine")
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENV}
    missing = missing_modules(NEEDED)
    if missing:
        install_wheels(py, Path(args.wheels), missing)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    gpu = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    rows = run_plan(plan, args.budget, env, out)
    text = summary(rows, gpu)
    print("\n" + text)
    (out / "summary.txt").write_text(text + "\n")
    return exit_status(rows)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="check", choices=["check", "levers"],
                   help="check: the GPU path and its figures; levers: the build and the speed levers not yet measured")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds; later steps are skipped past it")
    p.add_argument("--wheels", default=".whl", help="folder of the pycocotools and tensorboardX wheels")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="logs and summary.txt")
    p.add_argument("--dry-run", action="store_true", help="print the plan (steps, commands, limits, budget)")
    return p


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
