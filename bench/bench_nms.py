"""Soft-NMS speed: the Cython lib.nms against the pure-Python reference (tests/nms_reference.py).

    .venv/bin/python bench/bench_nms.py [--sizes 100 500 2000] [--repeats 5]

Prints ms per call (median over the repeats) of soft_nms and soft_nms_merge (gaussian, Nt 0.5) on N random
boxes clustered like detections of one class, and the speed-up. The reference runs once per size above 500.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from lib.nms import soft_nms, soft_nms_merge
from tests.nms_reference import soft_nms_reference
from utils.checks import check_positive_int
from utils.errors import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def random_dets(n: int, seed: int = 0) -> np.ndarray:
    """(n, 7) float32: boxes around n // 10 + 1 objects of a 512 x 512 image, scores and corner scores."""
    rng = np.random.default_rng(seed)
    objects = n // 10 + 1
    tl = rng.uniform(0, 400, (objects, 2))
    wh = rng.uniform(10, 200, (objects, 2))
    which = rng.integers(0, objects, n)
    x1y1 = tl[which] + rng.normal(0, 0.1, (n, 2)) * wh[which]
    x2y2 = x1y1 + wh[which] * rng.uniform(0.8, 1.2, (n, 2))
    return np.concatenate([x1y1, x2y2, rng.uniform(0, 1, (n, 3))], axis=1).astype(np.float32)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(args: argparse.Namespace) -> None:
    check_positive_int("--repeats", args.repeats)
    for n in args.sizes:
        check_positive_int("--sizes", n)
    print(f"{'function':<16}{'N':>6}{'kept':>6}{'cython ms':>12}{'python ms':>12}{'speed-up':>10}")
    for n in args.sizes:
        dets = random_dets(n)
        ref_repeats = args.repeats if n <= 500 else 1
        cases = (
            ("soft_nms", lambda: soft_nms(dets[:, :5], Nt=0.5), lambda: soft_nms_reference(dets[:, :5], Nt=0.5)),
            ("soft_nms_merge", lambda: soft_nms_merge(dets, Nt=0.5, weight_exp=10),
             lambda: soft_nms_reference(dets, Nt=0.5, merge=True, weight_exp=10)),
        )
        for name, fast, slow in cases:
            fast_ms = median_ms(fast, args.repeats)
            slow_ms = median_ms(slow, ref_repeats)
            print(f"{name:<16}{n:>6}{len(fast()):>6}{fast_ms:>12.3f}{slow_ms:>12.1f}{slow_ms / fast_ms:>9.0f}x")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
