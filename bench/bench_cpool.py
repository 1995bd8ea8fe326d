"""Corner pooling speed: forward + backward of each direction, compiled extension vs the torch.cummax fallback.

    .venv/bin/python bench/bench_cpool.py [--shape 2 128 128 128] [--device cpu|cuda] [--repeats 7]

Prints one row per direction (and their sum): median ms over the repeats for each implementation and the ratio
fallback / extension. Both are measured in the same run on the same input and output gradient, one implementation
after the other (interleaving them would time the fallback's large allocations, which make the allocator return
memory to the system, against the extension).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import lib from the repo
from lib.cpool.pool import BOTTOM, LEFT, RIGHT, TOP, cummax_pool, extension_available, extension_pool


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 128, 128, 128], metavar=("N", "C", "H", "W"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    return parser


def median_ms(fn, x: torch.Tensor, grad: torch.Tensor, direction: int, warmup: int, repeats: int) -> float:
    """Median wall time of one forward + backward in ms."""
    times = []
    for i in range(warmup + repeats):
        xg = x.detach().requires_grad_()
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(xg, direction).backward(grad)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(args: argparse.Namespace) -> None:
    if not extension_available():
        raise SystemExit("bench/bench_cpool.py: lib.cpool._ext is not built; run `make setup` first")
    dtype = getattr(torch, args.dtype)
    x = torch.randn(*args.shape, device=args.device).to(dtype)
    grad = torch.randn(*args.shape, device=args.device).to(dtype)
    print(f"shape {tuple(args.shape)} {args.dtype} on {args.device}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}, ms per forward+backward")
    print(f"{'direction':<10} {'extension':>10} {'cummax':>10} {'ratio':>7}")
    total_ext = total_ref = 0.0
    for name, direction in [("top", TOP), ("bottom", BOTTOM), ("left", LEFT), ("right", RIGHT)]:
        e = median_ms(extension_pool, x, grad, direction, args.warmup, args.repeats)
        r = median_ms(cummax_pool, x, grad, direction, args.warmup, args.repeats)
        total_ext, total_ref = total_ext + e, total_ref + r
        print(f"{name:<10} {e:>10.2f} {r:>10.2f} {r / e:>6.1f}x")
    print(f"{'all four':<10} {total_ext:>10.2f} {total_ref:>10.2f} {total_ref / total_ext:>6.1f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
