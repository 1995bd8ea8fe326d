"""Trains CenterNet (keypoint triplets) on COCO-format data: CPU, one GPU, or many GPUs with DistributedDataParallel.

Built-in data on CPU (what `make demo` runs):
    python train.py --log_name shapes_tiny --dataset coco --data_dir data/shapes --train_split train \
        --val_split val --arch tiny_hourglass --img_size 127 --batch_size 16 --num_epochs 12 --lr 2e-3 --lr_step 10
COCO on 8 GPUs (the seed's recipe; `python -m torch.distributed.launch --nproc_per_node 8` works too):
    torchrun --nproc_per_node 8 train.py --dist --log_name coco_hg_511_ddp --dataset coco --arch large_hourglass \
        --lr 5e-4 --lr_step 90,120 --batch_size 48 --num_epochs 200 --num_workers 2
Resume a stopped run: the same command with --resume.
"""
import argparse
import contextlib
import itertools
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from datasets import build_dataset
from nets import build_model
from utils import dist
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.device import autocast, select_device
from utils.inference import build_eval_config, evaluate
from utils.logger import RunLogger
from utils.losses import centernet_loss
from utils.pretrained import load_pretrained_checkpoint
from utils.visualize import val_images


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("centernet47 training", add_help=True)
    p.add_argument("--log_name", required=True, help="run folder name under --ckpt_dir")
    p.add_argument("--ckpt_dir", default="ckpt", help="root of the run folders")
    p.add_argument("--dataset", default="coco", choices=["coco"], help="COCO-format data (COCO or your own)")
    p.add_argument("--data_dir", default="data/coco")
    p.add_argument("--train_split", default="train2017")
    p.add_argument("--val_split", default="val2017")
    p.add_argument("--arch", default="large_hourglass")
    p.add_argument("--img_size", type=int, default=511, help="training crop size, of the form 128k-1")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr_step", default="90,120", help="epochs after which the lr is multiplied by 0.1")
    p.add_argument("--batch_size", type=int, default=48, help="global batch, split over the processes")
    p.add_argument("--num_epochs", type=int, default=200)
    p.add_argument("--num_workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--val_interval", type=int, default=5, help="validate every N epochs (0: only after the last)")
    p.add_argument("--test_flip", action="store_true", help="validate with the flipped copy too")
    p.add_argument("--seed", type=int, default=317)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU")
    p.add_argument("--resume", action="store_true", help="continue the run in CKPT_DIR/LOG_NAME")
    p.add_argument("--dist", action="store_true", help="DistributedDataParallel (launch with torchrun)")
    p.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes (GPU only)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # Fine-tuning and memory (see README "Fine-tuning" and "Fewer GPUs").
    p.add_argument("--pretrained", help="checkpoint to start from (weights only; other classes are fine)")
    p.add_argument("--accum_steps", type=int, default=1,
                   help="micro-batches of --batch_size per optimizer step (effective batch: their product)")
    p.add_argument("--grad_checkpoint", action="store_true", help="recompute the hourglasses in backward")
    return p


def parse_lr_steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--lr_step: expected comma-separated epochs such as 90,120, got {text!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_one_epoch(model, loader, optimizer, scaler, device, amp: bool, epoch: int, logger: RunLogger,
                    global_step: int, accum_steps: int = 1) -> tuple[dict[str, float], int]:
    """One pass over `loader`; returns the mean of each loss term (over all processes) and the new optimizer step
    count. With `accum_steps` N the gradients of N batches (each loss scaled by 1 / N) make one optimizer step, as
    one batch N times larger would; the last len(loader) % N batches are left out."""
    model.train()
    sums: dict[str, float] = {}
    images_seen, start = 0, time.perf_counter()
    num_batches = len(loader) // accum_steps * accum_steps
    bar = tqdm(itertools.islice(loader, num_batches), total=num_batches, desc=f"epoch {epoch}",
               disable=not dist.is_main(), dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        step_now = (i + 1) % accum_steps == 0
        # DDP all-reduces the gradients only in the backward of the micro-batch that ends a step.
        with (contextlib.nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync()):
            with autocast(device, amp):
                outputs = model(batch["image"])
            outputs = [{k: v.float() for k, v in stack.items()} for stack in outputs]
            loss, terms = centernet_loss(outputs, batch)
            terms = dist.reduce_mean({"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}})
            if not all(math.isfinite(v) for v in terms.values()):
                raise FloatingPointError(
                    f"non-finite loss at epoch {epoch}, step {global_step}: {terms}. Stopping; the last saved "
                    "checkpoint is intact. Try a lower --lr, or run without --amp.")
            scaler.scale(loss / accum_steps).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        if not step_now:
            continue
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        global_step += 1
        images_seen += batch["image"].shape[0] * dist.world_size() * accum_steps
        rate = images_seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{terms['loss']:.3f}", img_s=f"{rate:.1f}")
        logger.scalars(terms, global_step, prefix="train/")
    logger.scalars({"lr": optimizer.param_groups[0]["lr"], "images_per_s": images_seen / (time.perf_counter() - start)},
                   global_step, prefix="train/")
    return {k: v / max(num_batches, 1) for k, v in sums.items()}, global_step


def make_train_loader(dataset, batch_size: int, num_workers: int, seed: int, epoch: int, device) -> DataLoader:
    """Each process loads `batch_size / world_size` images a step. The sampler is the distributed one even in a
    single process, so one process with batch B sees, step by step, the same images as N processes with B / N."""
    if batch_size % dist.world_size():
        raise SystemExit(f"--batch_size {batch_size} must be divisible by the number of processes ({dist.world_size()})")
    per_process = batch_size // dist.world_size()
    if len(dataset) < batch_size:
        raise SystemExit(f"--batch_size {batch_size} is larger than the training set ({len(dataset)} images)")
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=per_process, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=device.type == "cuda")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    last = run_dir / "checkpoint.pt"
    if resume and not last.is_file():
        raise SystemExit(f"--resume: no checkpoint to resume at {last}")
    if not resume and last.exists():
        raise SystemExit(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --log_name")


def main(args: argparse.Namespace) -> float:
    dist.init_distributed(args.dist, args.local_rank, args.device)
    device = select_device(args.device, dist.local_rank())
    run_dir = Path(args.ckpt_dir) / args.log_name
    check_run_dir(run_dir, args.resume)
    lr_steps = parse_lr_steps(args.lr_step)
    if args.accum_steps < 1:
        raise SystemExit(f"--accum_steps must be at least 1, got {args.accum_steps}")
    seed_everything(args.seed)

    train_set = build_dataset(args, args.train_split, train=True)
    val_set = build_dataset(args, args.val_split, train=False)
    if val_set.class_names != train_set.class_names:
        raise SystemExit(f"{args.val_split} and {args.train_split} have different categories")
    args.num_classes = len(train_set.class_names)
    if len(train_set) < args.batch_size * args.accum_steps:
        raise SystemExit(f"--batch_size {args.batch_size} x --accum_steps {args.accum_steps} is larger than the "
                         f"training set ({len(train_set)} images): no optimizer step would be made")

    model = build_model(args.arch, args.num_classes, grad_checkpoint=args.grad_checkpoint).to(device)
    if args.sync_bn and dist.is_dist():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_steps, gamma=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    start_epoch, best_ap, global_step = 1, -1.0, 0
    if args.resume:
        state = load_checkpoint(run_dir / "checkpoint.pt", map_location=device)
        if state["args"]["arch"] != args.arch or state["class_names"] != train_set.class_names:
            raise SystemExit(f"--resume: {run_dir / 'checkpoint.pt'} was trained with --arch "
                             f"{state['args']['arch']} on other classes; it cannot continue with these flags")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_ap, global_step = state["epoch"] + 1, state["best_ap"], state["global_step"]

    logger = RunLogger(run_dir, enabled=dist.is_main())
    logger.info(f"{'resuming' if args.resume else 'starting'} {run_dir} at epoch {start_epoch}: {args.arch}, "
                f"{args.num_classes} classes, {len(train_set)} train / {len(val_set)} val images, "
                f"{dist.world_size()} process(es) on {device}")
    if args.pretrained and not args.resume:  # a resumed run already holds the fine-tuned weights
        for line in load_pretrained_checkpoint(model, args.pretrained, train_set.class_names).lines():
            logger.info(line)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_dist() else model
    eval_config = build_eval_config(args)

    ap = best_ap
    for epoch in range(start_epoch, args.num_epochs + 1):
        # Seeding per epoch makes a resumed run draw the same augmentations as an uninterrupted one.
        seed_everything(args.seed * 1000 + epoch)
        loader = make_train_loader(train_set, args.batch_size, args.num_workers, args.seed, epoch, device)
        means, global_step = train_one_epoch(ddp_model, loader, optimizer, scaler, device, args.amp, epoch, logger,
                                             global_step, args.accum_steps)
        scheduler.step()
        logger.info(f"epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in means.items()))

        validate = epoch == args.num_epochs or (args.val_interval > 0 and epoch % args.val_interval == 0)
        if validate:
            stats = evaluate(model, val_set, eval_config, device=device, num_workers=args.num_workers,
                             amp=args.amp)
            ap = stats["AP"]
            logger.scalars({"AP": ap, "AP50": stats["AP50"]}, global_step, prefix="val/")
            logger.info(f"epoch {epoch}: val AP {ap:.4f}")
            if dist.is_main():  # a few val images with true (green) and detected boxes, in tensorboard
                logger.images("val/boxes", val_images(model, val_set, eval_config, device, amp=args.amp), global_step)
        if dist.is_main():
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "global_step": global_step, "best_ap": max(best_ap, ap), "args": vars(args),
                     "class_names": train_set.class_names}
            if validate and ap > best_ap:
                save_checkpoint(run_dir / "best.pt", state)
            save_checkpoint(run_dir / "checkpoint.pt", state)
        best_ap = max(best_ap, ap)
        dist.barrier()
    logger.close()
    dist.cleanup()
    return ap


if __name__ == "__main__":
    main(get_args_parser().parse_args())
