"""The GPU path proven in one command (`make gpu-check`, or `make gpu-check PY=python3` with a Python that holds
torch): builds the CUDA corner-pooling kernel, runs the `cuda` tests, the pooling benchmark, a short training run
with --amp on the built-in shapes data followed by test.py --test_flip, and the training and inference
benchmarks, then prints one summary table. Sized to finish in about 6 minutes on one H100: each step has a time
limit, and steps that would start after --budget seconds are skipped (the table says so).

    python3 tools/gpu_check.py [--budget 330] [--wheels .whl] [--out DIR] [--dry-run]

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
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ["pycocotools", "tensorboardX"]
SITE = ROOT / "build" / "gpu_check_site"
RUN = "gpu_check_shapes"
ENV = {"FORCE_CUDA": "1", "PYTHONUNBUFFERED": "1"}  # setup.py builds the CUDA kernel; logs stream live
DATA = ["--dataset", "coco", "--data_dir", "data/shapes", "--val_split", "val"]


@dataclass
class Step:
    name: str
    log: str  # log file name under --out
    commands: list[list[str]]
    limit_s: int
    summarize: object  # output text -> one-line result

    def describe(self) -> str:
        return "\n".join("    " + " ".join(c) for c in self.commands)


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
    rows = re.findall(r"^(\w+_hourglass)\s+(old|fp32|fp16|bf16)\s+([\d.]+)\s+(?:([\d.]+)x\s+)?(\d+)$", text,
                      flags=re.MULTILINE)
    parts = {}
    for arch, mode, rate, ratio, peak in rows:
        parts.setdefault(arch, []).append(f"{mode} {rate}" + (f" ({ratio}x)" if ratio and mode != "old" else "")
                                          + f" {int(peak) / 1024:.1f}G")
    return "; ".join(f"{arch.split('_')[0]} img/s: " + ", ".join(p) for arch, p in parts.items()) or "see log"


def summarize_infer(text: str) -> str:
    rows = re.findall(r"^(forward|pipeline) (\w+)_hourglass 511 (\w+)\s+([\d.]+)", text, flags=re.MULTILINE)
    short = {"forward": "fwd", "pipeline": "pipe"}
    return ", ".join(f"{arch} {short[kind]} {mode} {ms}" for kind, arch, mode, ms in rows) + " ms" if rows else "see log"


def steps(py: str, ckpt_dir: str) -> list[Step]:
    arch_flags = ["--archs", "small_hourglass", "large_hourglass"]
    return [
        Step("build CUDA kernel", "build.log",
             [[py, "setup.py", "build_ext", "--inplace", "--force"],  # FORCE_CUDA=1; --force: replace a CPU build
              [py, "-c", "from lib.cpool import pool; print('CUDA kernel registered:', "
                         "pool.kernel_registered('cuda'))"]],
             300, last_line(r"CUDA kernel registered: .*$")),
        Step("pytest -m cuda", "cuda_tests.log", [[py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"]],
             180, last_line(r"^=*\s*\d+ (?:passed|failed).*$")),
        Step("bench_cpool (6,128,128,128) fp32", "bench_cpool.log",
             [[py, "bench/bench_cpool.py", "--device", "cuda", "--shape", "6", "128", "128", "128"]], 60,
             summarize_cpool),
        Step("train --amp + test --test_flip", "train_test.log",
             shapes_data(py) +
             [[py, "train.py", "--log_name", RUN, "--ckpt_dir", ckpt_dir, *DATA, "--train_split", "train", "--arch",
               "tiny_hourglass", "--img_size", "127", "--batch_size", "16", "--lr", "2e-3", "--lr_step", "30",
               "--num_epochs", "36", "--val_interval", "0", "--num_workers", "6", "--device", "cuda", "--amp"],
              [py, "test.py", "--log_name", RUN, "--ckpt_dir", ckpt_dir, *DATA, "--test_flip", "--device", "cuda",
               "--num_workers", "6"]],
             150, last_line(r"Average Precision\s+\(AP\) @\[ IoU=0.50:0.95 \| area=   all.*$")),
        Step("bench_train 511 batch 6", "bench_train.log",
             [[py, "bench/bench_train.py", "--device", "cuda", *arch_flags, "--img_size", "511", "--batch_size", "6",
               "--steps", "5"]], 150, summarize_train_bench),
        Step("bench_infer 511", "bench_infer.log",
             [[py, "bench/bench_infer.py", "--device", "cuda", *arch_flags, "--forward_repeats", "10",
               "--post_repeats", "5"]], 90, summarize_infer),
    ]


def shapes_data(py: str) -> list[list[str]]:
    """The command writing the built-in data set (as `make demo` does), unless it is there already."""
    if (ROOT / "data" / "shapes" / "annotations" / "instances_val.json").is_file():
        return []
    return [[py, "-m", "datasets.shapes", "--out", "data/shapes"]]


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


def run_step(step: Step, env: dict, out: Path, limit_s: float) -> tuple[str, str]:
    """Runs the step's commands in order, output to the console and to its log; (status, result)."""
    text = ""
    with open(out / step.log, "w") as log:
        deadline = time.monotonic() + limit_s
        for command in step.commands:
            log.write(f"$ {' '.join(command)}\n")
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            watchdog = threading.Timer(max(deadline - time.monotonic(), 0), proc.kill)
            watchdog.start()
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                text += line
            proc.wait()
            watchdog.cancel()
            if time.monotonic() >= deadline:
                return f"timeout ({limit_s:.0f} s)", step.summarize(text)
            if proc.returncode != 0:
                return f"FAILED (rc {proc.returncode})", step.summarize(text)
    return "ok", step.summarize(text)


def main(args: argparse.Namespace) -> int:
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="gpu_check_ckpt_") as ckpt_dir:
        return check(args, steps(py, ckpt_dir), py)


def check(args: argparse.Namespace, plan: list[Step], py: str) -> int:
    if args.dry_run:
        print(f"environment: {' '.join(f'{k}={v}' for k, v in ENV.items())}")
        for step in plan:
            print(f"{step.name} (limit {step.limit_s} s, log {step.log}):\n{step.describe()}")
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: no GPU visible (torch.cuda.is_available() is false); run it on a GPU machine")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENV}
    missing = missing_modules(NEEDED)
    if missing:
        install_wheels(py, Path(args.wheels), missing)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    gpu = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    start, rows = time.monotonic(), []
    for step in plan:
        left = args.budget - (time.monotonic() - start)
        if left < 20:
            rows.append((step.name, "skipped (budget)", 0.0, ""))
            continue
        t0 = time.monotonic()
        print(f"\n=== {step.name} ===", flush=True)
        status, result = run_step(step, env, out, min(step.limit_s, left))
        rows.append((step.name, status, time.monotonic() - t0, result))
    width = max(len(r[0]) for r in rows)
    lines = [f"gpu-check on {gpu}: {time.monotonic() - start:.0f} s in all",
             f"{'step':<{width}}  {'status':<16}{'s':>6}  result"]
    lines += [f"{name:<{width}}  {status:<16}{secs:>6.0f}  {result}" for name, status, secs, result in rows]
    summary = "\n".join(lines)
    print("\n" + summary)
    (out / "summary.txt").write_text(summary + "\n")
    return 0 if all(r[1] == "ok" for r in rows) else 1


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=330, help="seconds; later steps are skipped past it")
    p.add_argument("--wheels", default=".whl", help="folder of the pycocotools and tensorboardX wheels")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="logs and summary.txt")
    p.add_argument("--dry-run", action="store_true", help="print the steps and their commands, run nothing")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
