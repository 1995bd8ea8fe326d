"""Fine-tuning against training from scratch on a small 2-class data set, the same epochs and flags for both.

    .venv/bin/python bench/bench_finetune.py --out /tmp/finetune
    .venv/bin/python bench/bench_finetune.py --out /tmp/finetune --pre_ckpt ckpt/shapes_demo_DATE/checkpoint.pt

1. Pre-training: tiny_hourglass on the built-in shapes (4 classes, seed 0, `--pre_images` train images), or
   `--pre_ckpt`, a tiny_hourglass checkpoint trained on them (such as `make demo`'s).
2. Target data: other images (seed 1) with only ellipses and crosses, `--target_images` train + 100 val images.
3. Two runs on the target data for `--epochs` epochs: `--pretrained` with step 1's checkpoint, and from scratch.
Prints each one's last val AP and AP50 (no flip) and training loss, from its train.log. Everything is written under --out, which must not exist yet.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
import train
from datasets.shapes import ShapesConfig, write_split
from utils.checks import check_non_negative_int, check_positive_int
from utils.errors import ArgumentError, MissingFileError, run_cli

KEEP = ("ellipse", "cross")
BATCH_SIZE = 16


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (created; must not exist)")
    p.add_argument("--pre_images", type=int, default=400)
    p.add_argument("--pre_epochs", type=int, default=12)
    p.add_argument("--pre_ckpt", help="skip step 1: start from this checkpoint")
    p.add_argument("--target_images", type=int, default=100)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--num_workers", type=int, default=1)
    return p


def keep_classes(data_dir: Path, names: tuple[str, ...]) -> None:
    for split in ("train", "val"):
        path = data_dir / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        data["categories"] = [c for c in data["categories"] if c["name"] in names]
        ids = {c["id"] for c in data["categories"]}
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in ids]
        path.write_text(json.dumps(data))


def last_logged(log: Path) -> tuple[str, str, str]:
    """(val AP, val AP50, training loss) of the last epoch in a run's train.log."""
    text = log.read_text()
    ap, ap50 = re.findall(r"^epoch \d+: val AP (\S+) AP50 (\S+)$", text, re.MULTILINE)[-1]
    loss = re.findall(r"^epoch \d+: loss (\S+)", text, re.MULTILINE)[-1]
    return ap, ap50, loss


def run(data_dir: Path, ckpt_dir: Path, name: str, epochs: int, lr_step: int, workers: int, *extra: str) -> None:
    args = train.get_args_parser().parse_args([
        "--log_name", name, "--ckpt_dir", str(ckpt_dir), "--data_dir", str(data_dir), "--train_split", "train",
        "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127", "--batch_size", str(BATCH_SIZE),
        "--lr", "2e-3", "--lr_step", str(lr_step), "--num_epochs", str(epochs), "--val_interval", "0",
        "--num_workers", str(workers), "--device", "cpu", *extra])
    train.main(args)


def check_args(args: argparse.Namespace) -> None:
    """Flags that would stop a training run only after the data sets were written under --out."""
    for flag in ("pre_epochs", "epochs"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    # Each run drops the last incomplete batch, so a set smaller than one batch gives no training step.
    for flag in ("target_images",) if args.pre_ckpt else ("pre_images", "target_images"):
        if getattr(args, flag) < BATCH_SIZE:
            raise ArgumentError(f"--{flag} must be at least the batch size {BATCH_SIZE}, got {getattr(args, flag)}")
    check_non_negative_int("--num_workers", args.num_workers)
    if args.pre_ckpt and not Path(args.pre_ckpt).is_file():
        raise MissingFileError(f"--pre_ckpt {args.pre_ckpt}: no such file")


def main(args: argparse.Namespace) -> None:
    check_args(args)
    out = Path(args.out)
    if out.exists():
        raise ArgumentError(f"--out {out} exists; give a new folder")
    cfg = ShapesConfig()
    if not args.pre_ckpt:
        write_split(out / "pre", "train", args.pre_images, seed=0, cfg=cfg)
        write_split(out / "pre", "val", 20, seed=0, cfg=cfg)
    write_split(out / "target", "train", args.target_images, seed=1, cfg=cfg)
    write_split(out / "target", "val", 100, seed=1, cfg=cfg)
    keep_classes(out / "target", KEEP)

    pre_ckpt = args.pre_ckpt
    if not pre_ckpt:
        run(out / "pre", out / "ckpt", "pre", args.pre_epochs, max(1, args.pre_epochs * 5 // 6), args.num_workers)
        pre_ckpt = str(out / "ckpt" / "pre" / "checkpoint.pt")
    step = max(1, args.epochs * 5 // 6)
    run(out / "target", out / "ckpt", "finetune", args.epochs, step, args.num_workers, "--pretrained", pre_ckpt)
    run(out / "target", out / "ckpt", "scratch", args.epochs, step, args.num_workers)
    print(f"\n{args.target_images} train images of {', '.join(KEEP)}, {args.epochs} epochs, validated on 100 images:")
    print("| start | val AP | val AP50 | last epoch's training loss |\n|---|---|---|---|")
    source = args.pre_ckpt or f"shapes, 4 classes, {args.pre_epochs} epochs on {args.pre_images} images"
    for start, name in ((f"--pretrained ({source})", "finetune"), ("from scratch", "scratch")):
        print(f"| {start} | " + " | ".join(last_logged(out / "ckpt" / name / "train.log")) + " |")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
