"""Data loading speed of one worker: training and evaluation samples/s, single process, no DataLoader workers,
one thread for OpenCV and torch (as in a DataLoader worker).

    python bench/bench_data.py --data_dir tests/data/raccoon
    python bench/bench_data.py --data_dir tests/data/raccoon --seed_repo /tmp/seed   # side by side
    python bench/bench_data.py --data_dir tests/data/raccoon --profile               # where the time goes

--seed_repo is a checkout of the reimplementation whose command line we keep (github
zzzxxxttt/pytorch_simple_CenterNet_47, "the seed" below), kept outside this repository. Its loader reads
DATA/coco/{train,val}2017 and annotations/instances_{train,val}2017.json: the bench links the two splits into that layout in a temporary folder and runs the seed's `COCO` (training) and
`COCO_eval` (test scale 1, no flip) in a subprocess, since its packages are named like ours. The seed hardcodes
COCO's 80 classes; its `num_classes` is set to the data's class count so both build the same heatmaps. Each round
times every image of the split once; the table shows the median round. Both loaders first read the same WARMUP
items of each split untimed (ours once, the seed in each of its processes): the first items of a fresh process
pay one-off set-up, several times the time of a warm item.
"""
import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from bench.child import child_stdout
from datasets.coco import CocoDetection
from utils.checks import check_positive_int
from utils.errors import run_cli

SEED_DRIVER = r"""
import contextlib, io, json, sys, time
import cv2, numpy as np, torch
cv2.setNumThreads(1)
torch.set_num_threads(1)
repo, root = sys.argv[1], sys.argv[2]
img_size, num_classes, warmup = (int(a) for a in sys.argv[3:6])
sys.path.insert(0, repo)
with contextlib.redirect_stdout(io.StringIO()):
    from datasets.coco import COCO, COCO_eval
    train = COCO(root, "train", img_size=img_size)
    val = COCO_eval(root, "val", test_scales=(1,), test_flip=False)
train.num_classes = num_classes
np.random.seed(0)
for ds in (train, val):
    for i in range(min(warmup, len(ds))):
        ds[i]
rates = {}
for name, ds in (("train", train), ("eval", val)):
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    rates[name] = len(ds) / (time.perf_counter() - start)
print(json.dumps(rates))
"""
WARMUP = 8  # untimed items of each split before the rounds


def rate(dataset, count: int) -> float:
    """Samples/s over the first `count` items."""
    start = time.perf_counter()
    for i in range(count):
        dataset[i]
    return count / (time.perf_counter() - start)


def seed_layout(data_dir: Path, train_split: str, val_split: str, tmp: Path) -> Path:
    """TMP/coco/{train,val}2017 and annotations/instances_{train,val}2017.json linked to our splits."""
    coco = tmp / "coco"
    (coco / "annotations").mkdir(parents=True)
    for ours, theirs in ((train_split, "train"), (val_split, "val")):
        (coco / f"{theirs}2017").symlink_to((data_dir / ours).resolve())
        (coco / "annotations" / f"instances_{theirs}2017.json").symlink_to(
            (data_dir / "annotations" / f"instances_{ours}.json").resolve())
    return tmp


def run_seed(repo: Path, root: Path, img_size: int, num_classes: int) -> dict:
    # Without PYTHONPATH: one naming this repository (as IDEs set it) gave the seed our `datasets`, since a package
    # with an __init__.py anywhere on the path wins over a folder without one, as the seed's may be.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = child_stdout([sys.executable, "-c", SEED_DRIVER, str(repo), str(root), str(img_size), str(num_classes),
                        str(WARMUP)], "the seed's loader", cwd=repo, env=env)
    return json.loads(out.strip().splitlines()[-1])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("data loading bench")
    p.add_argument("--data_dir", default="tests/data/raccoon")
    p.add_argument("--train_split", default="train")
    p.add_argument("--val_split", default="val")
    p.add_argument("--img_size", type=int, default=511)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed_repo", default=None, help="checkout of pytorch_simple_CenterNet_47 to compare with")
    p.add_argument("--profile", action="store_true", help="cProfile one training pass of ours")
    return p


def main(args: argparse.Namespace) -> None:
    check_positive_int("--rounds", args.rounds)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data_dir = Path(args.data_dir)
    train = CocoDetection(data_dir, args.train_split, train=True, img_size=args.img_size)
    val = CocoDetection(data_dir, args.val_split, train=False)
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(rate, train, len(train))
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)

    rates = {"ours": {"train": [], "eval": []}, "seed": {"train": [], "eval": []}}
    with tempfile.TemporaryDirectory() as tmp:
        root = seed_layout(data_dir, args.train_split, args.val_split, Path(tmp)) if args.seed_repo else None
        for dataset in (train, val):  # warm-up: imports, caches
            rate(dataset, min(WARMUP, len(dataset)))
        for _ in range(args.rounds):
            rates["ours"]["train"].append(rate(train, len(train)))
            rates["ours"]["eval"].append(rate(val, len(val)))
            if args.seed_repo:
                for k, v in run_seed(Path(args.seed_repo), root, args.img_size, train.num_classes).items():
                    rates["seed"][k].append(v)

    med = {who: {k: statistics.median(v) for k, v in r.items() if v} for who, r in rates.items()}
    print(f"{data_dir}: {len(train)} training images ({args.train_split}, img_size {args.img_size}, random crop, "
          f"flip, colour), {len(val)} evaluation images ({args.val_split}, scale 1, no flip); median of "
          f"{args.rounds} rounds, one thread")
    print("| loader | train samples/s | eval samples/s |\n|---|---|---|")
    print(f"| centernet47 | {med['ours']['train']:.1f} | {med['ours']['eval']:.1f} |")
    if args.seed_repo:
        print(f"| seed (pytorch_simple_CenterNet_47) | {med['seed']['train']:.1f} | {med['seed']['eval']:.1f} |")
        print(f"| ratio | {med['ours']['train'] / med['seed']['train']:.2f}x | "
              f"{med['ours']['eval'] / med['seed']['eval']:.2f}x |")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
