"""Corner pooling speed: forward + backward of each direction, our kernels vs torch.cummax vs a per-row loop.

    .venv/bin/python bench/bench_cpool.py [--shape 2 128 128 128] [--device cpu|cuda|cuda:N] [--repeats 11]
    python3 bench/bench_cpool.py --device cuda --shape 6 128 128 128     # the per-GPU training shape

Prints one row per direction (and their sum): median ms over the repeats of
- ours: the compiled extension (the CUDA kernel on --device cuda),
- cummax: the pure-PyTorch torch.cummax fallback (index tensor and scatter_add backward),
- rowloop: one torch.maximum per row along the scanned dim, under autograd: how the original CornerNet C++
  extension works (a loop of per-row ATen max calls),
their ratios to ours, and our achieved memory throughput. Bytes model (the minimum traffic of a fused kernel):
the forward reads x and writes out, the backward reads x, out and grad_out and writes grad_in: 6 tensor passes,
6 * numel * itemsize bytes per forward + backward. On CUDA the table also gives the throughput of a plain
device-to-device copy of the same tensor (2 passes), measured in the same run, as the reachable bound.
Each implementation runs its repeats back to back on the same input and output gradient (interleaving them would
time the fallback's large allocations against the extension).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import lib from the repo
from bench.device import DEVICE_HELP, bench_device
from lib.cpool.pool import (BOTTOM, LEFT, RIGHT, TOP, _DIM, _REVERSE, REBUILD_CUDA, cummax_pool, extension_available,
                            extension_pool, kernel_registered)
from utils.checks import check_non_negative_int, check_positive_int
from utils.errors import run_cli

DIRECTIONS = [("top", TOP), ("bottom", BOTTOM), ("left", LEFT), ("right", RIGHT)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 128, 128, 128], metavar=("N", "C", "H", "W"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    return parser


def rowloop_pool(x: torch.Tensor, direction: int) -> torch.Tensor:
    """Speed baseline: out row k = max(x row k, out row k-1 in scan order), one op per row, autograd backward."""
    dim, n = _DIM[direction], x.shape[_DIM[direction]]
    rows: list[torch.Tensor | None] = [None] * n
    running = None
    for k in (range(n - 1, -1, -1) if _REVERSE[direction] else range(n)):
        row = x.select(dim, k)
        running = row if running is None else torch.maximum(row, running)
        rows[k] = running
    return torch.stack(rows, dim)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, x: torch.Tensor, grad: torch.Tensor, direction: int, warmup: int, repeats: int) -> float:
    """Median wall time of one forward + backward in ms."""
    times = []
    for i in range(warmup + repeats):
        xg = x.detach().requires_grad_()
        sync(x.device)
        start = time.perf_counter()
        fn(xg, direction).backward(grad)
        sync(x.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_gbs(x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Achieved GB/s of y.copy_(x) (bytes read + written)."""
    y = torch.empty_like(x)
    times = []
    for i in range(warmup + repeats):
        sync(x.device)
        start = time.perf_counter()
        y.copy_(x)
        sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 2 * x.numel() * x.element_size() / statistics.median(times) / 1e9


def main(args: argparse.Namespace) -> None:
    for i, side in enumerate(args.shape):
        check_positive_int(f"--shape {'NCHW'[i]}", side)
    check_positive_int("--repeats", args.repeats)
    check_non_negative_int("--warmup", args.warmup)
    device = bench_device(args.device)
    if not extension_available():
        raise SystemExit("bench/bench_cpool.py: lib.cpool._ext is not built; run `make setup` first")
    if not kernel_registered(device.type):
        raise SystemExit(f"bench/bench_cpool.py: lib.cpool._ext has no {device.type} kernel; rebuild: `{REBUILD_CUDA}`")
    dtype = getattr(torch, args.dtype)
    x = torch.randn(*args.shape, device=device).to(dtype)
    grad = torch.randn(*args.shape, device=device).to(dtype)
    moved = 6 * x.numel() * x.element_size()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"shape {tuple(args.shape)} {args.dtype} on {name}, median of {args.repeats}, ms per forward+backward; "
          f"GB/s of ours counts {moved / 1e6:.3g} MB (6 tensor passes)")
    if device.type == "cuda":
        print(f"device-to-device copy of one tensor: {copy_gbs(x, args.warmup, args.repeats):.0f} GB/s")
    print(f"{'direction':<10}{'ours':>9}{'cummax':>9}{'rowloop':>9}{'cummax/ours':>13}{'rowloop/ours':>14}{'GB/s':>8}")
    totals = [0.0, 0.0, 0.0]
    for label, direction in DIRECTIONS:
        times = [median_ms(fn, x, grad, direction, args.warmup, args.repeats)
                 for fn in (extension_pool, cummax_pool, rowloop_pool)]
        totals = [t + s for t, s in zip(totals, times)]
        ours, ref, loop = times
        print(f"{label:<10}{ours:>9.3f}{ref:>9.3f}{loop:>9.3f}{ref / ours:>12.1f}x{loop / ours:>13.1f}x"
              f"{moved / ours / 1e6:>8.0f}")
    ours, ref, loop = totals
    print(f"{'all four':<10}{ours:>9.3f}{ref:>9.3f}{loop:>9.3f}{ref / ours:>12.1f}x{loop / ours:>13.1f}x"
          f"{4 * moved / ours / 1e6:>8.0f}")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
