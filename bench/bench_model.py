"""The networks: parameter counts, training speed of a full step and forward latency.

    .venv/bin/python bench/bench_model.py                      # CPU: tiny training at 127, tiny/small forward at 511
    .venv/bin/python bench/bench_model.py --device cuda --train_archs small_hourglass large_hourglass \
        --img_size 511 --batch_size 8 --forward_archs small_hourglass large_hourglass

A training step is forward, loss (utils.losses), backward and an Adam step on random images with random targets
of the real shapes (four boxes per image); input 127 is the "128" size (32 x 32 maps). Forward latency is eval
mode, batch 1, without post-processing. Both report the median over the timed iterations, after one warm-up.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from bench.device import DEVICE_HELP, bench_device
from datasets.targets import make_targets
from nets import ARCHS, build_model
from utils.checks import check_number, check_positive_int
from utils.errors import run_cli
from utils.losses import centernet_loss


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--num_classes", type=int, default=80)
    p.add_argument("--train_archs", nargs="*", default=["tiny_hourglass"], choices=list(ARCHS))
    p.add_argument("--img_size", type=int, default=127, help="training input size (128k - 1)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--train_steps", type=int, default=8)
    p.add_argument("--forward_archs", nargs="*", default=["tiny_hourglass", "small_hourglass"], choices=list(ARCHS))
    p.add_argument("--forward_size", type=int, default=511)
    p.add_argument("--forward_iters", type=int, default=5)
    p.add_argument("--forward_budget", type=float, default=3.0, help="seconds; slow nets stop timing early")
    return p


def random_batch(batch_size: int, size: int, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    items = []
    for _ in range(batch_size):
        xy = rng.uniform(0, size * 0.6, (4, 2))
        wh = rng.uniform(size * 0.1, size * 0.4, (4, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, size - 1)], axis=1)
        items.append(make_targets(boxes, rng.integers(0, num_classes, 4), num_classes, size, size))
    batch = {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}
    batch["image"] = torch.randn(batch_size, 3, size, size)
    return {k: v.to(device) for k, v in batch.items()}


def timed(fn, iters: int, device: torch.device, budget_s: float = float("inf")) -> float:
    """Median seconds of fn over `iters` calls after one warm-up call; fewer (at least one) once `budget_s`
    seconds of timed calls have passed."""
    times = []
    for i in range(iters + 1):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
            if sum(times) > budget_s:
                break
    return statistics.median(times)


def train_rate(arch: str, args, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(arch, args.num_classes).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = random_batch(args.batch_size, args.img_size, args.num_classes, device)

    def step():
        loss, _ = centernet_loss(model(batch["image"]), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return args.batch_size / timed(step, args.train_steps, device)


@torch.no_grad()
def forward_ms(arch: str, args, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(arch, args.num_classes).to(device).eval()
    image = torch.randn(1, 3, args.forward_size, args.forward_size, device=device)
    return 1e3 * timed(lambda: model(image), args.forward_iters, device, budget_s=args.forward_budget)


def main(args: argparse.Namespace) -> None:
    check_number("--forward_budget", args.forward_budget, 0, above=True)
    for flag in ("num_classes", "batch_size", "train_steps", "forward_iters"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    device = bench_device(args.device)
    print(f"{device}, {torch.get_num_threads()} threads, {args.num_classes} classes; training: input "
          f"{args.img_size}, batch {args.batch_size}, {args.train_steps} steps; forward: input {args.forward_size}, "
          "batch 1")
    train_col, fwd_col = f"train img/s @{args.img_size}", f"forward ms @{args.forward_size}"
    print(f"| arch | params | {train_col} | {fwd_col} |\n|---|---|---|---|")
    for arch in ARCHS:
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(arch, args.num_classes).parameters())
        rate = f"{train_rate(arch, args, device):.1f}" if arch in args.train_archs else "-"
        latency = f"{forward_ms(arch, args, device):.0f}" if arch in args.forward_archs else "-"
        print(f"| {arch} | {params:,} | {rate} | {latency} |", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
