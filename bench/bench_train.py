"""Training speed: images/s of full training steps (forward, loss, backward, Adam) and peak memory.

    .venv/bin/python bench/bench_train.py                               # tiny_hourglass on the CPU
    .venv/bin/python bench/bench_train.py --device cuda --archs small_hourglass large_hourglass --img_size 511 \
        --batch_size 12 --amp

Inputs are random images with random targets of the real shapes (a few objects per image); the data loader is
not part of the measurement (bench/bench_data.py measures it).
"""
import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from datasets.targets import make_targets
from nets import build_model
from utils.device import autocast
from utils.losses import centernet_loss


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--archs", nargs="+", default=["tiny_hourglass"])
    p.add_argument("--img_size", type=int, default=127)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=8, help="timed steps, after 2 warm-up steps")
    p.add_argument("--amp", action="store_true")
    return p


def random_batch(batch_size: int, size: int, num_classes: int, device) -> dict[str, torch.Tensor]:
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # process peak RSS (Linux: KiB)


def bench(arch: str, args, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(arch, args.num_classes).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    batch = random_batch(args.batch_size, args.img_size, args.num_classes, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.steps + 2):
        start = time.perf_counter()
        with autocast(device, args.amp):
            outputs = model(batch["image"])
        loss, _ = centernet_loss([{k: v.float() for k, v in o.items()} for o in outputs], batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(times), peak_memory_mb(device)


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    print(f"{args.device}, {torch.get_num_threads()} threads, input {args.img_size}, batch {args.batch_size}, "
          f"{args.num_classes} classes, amp {args.amp}, median of {args.steps} steps")
    print(f"{'arch':<18}{'params':>12}{'images/s':>10}{'peak MB':>10}")
    for arch in args.archs:
        rate, memory = bench(arch, args, device)
        params = sum(p.numel() for p in build_model(arch, args.num_classes).parameters())
        print(f"{arch:<18}{params:>12,}{rate:>10.1f}{memory:>10.0f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
