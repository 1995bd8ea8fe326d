"""Trains CenterNet (keypoint triplets) on COCO-format data: CPU, one GPU, or many GPUs with DistributedDataParallel.

Built-in data on CPU (what `make demo` runs, with a dated --log_name):
    python train.py --log_name shapes_tiny --dataset coco --data_dir data/shapes --train_split train \
        --val_split val --arch tiny_hourglass --img_size 127 --batch_size 16 --lr 2e-3 --lr_step 30 \
        --num_epochs 36 --val_interval 12 --num_workers 2 --device cpu
COCO on 8 GPUs (the recipe of pytorch_simple_CenterNet_47; `python -m torch.distributed.launch --nproc_per_node 8`
and `srun` work too):
    torchrun --nproc_per_node 8 train.py --dist --log_name coco_hg_511_ddp --dataset coco --arch large_hourglass \
        --lr 5e-4 --lr_step 90,120 --batch_size 48 --num_epochs 200 --num_workers 2
Resume a stopped run: the same command with --resume. A run saves every --ckpt_interval minutes and when it is sent
SIGTERM or Ctrl-C, and resumes from the exact step it reached. The loop itself: engine/trainer.py; the rules of a
run folder (new run, resume, what may continue): engine/run_folder.py.
"""
import argparse

from engine.run_folder import RunComplete, RunFolderLock, check_log_name
from engine.trainer import parse_lr_steps, train
from nets import ARCHS, METHODS
from nets.hourglass import CENTER_BRANCHES, CORNER_POOLS
from utils import dist
from utils.checkpoint import MAX_IMG_SIZE
from utils.checks import check_non_negative_int, check_number, check_positive_int
from utils.device import cudnn_benchmark
from utils.errors import ArgumentError, run_cli
from utils.stopping import StopSignals


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("centernet47 training", add_help=True)
    p.add_argument("--log_name", required=True, help="run folder name under --ckpt_dir")
    p.add_argument("--ckpt_dir", default="ckpt", help="root of the run folders")
    p.add_argument("--dataset", default="coco", choices=["coco"], help="COCO-format data (COCO or your own)")
    p.add_argument("--data_dir", default="data/coco")
    p.add_argument("--train_split", default="train2017")
    p.add_argument("--val_split", default="val2017")
    p.add_argument("--arch", default="large_hourglass", choices=list(ARCHS))
    # The variant (README "Variants"): a preset, and its two parts, which override the preset when given.
    p.add_argument("--method", default="centernet", choices=list(METHODS),
                   help="centernet: --corner_pool cascade --center_branch pool; cornernet: plain, none")
    p.add_argument("--corner_pool", choices=list(CORNER_POOLS),
                   help="cascade corner pooling (CenterNet's) or plain (CornerNet's); default: the --method's")
    p.add_argument("--center_branch", choices=list(CENTER_BRANCHES),
                   help="center heatmap and offsets after center pooling (pool), after convolutions only (conv), "
                        "or none (no center loss, no center check); default: the --method's")
    p.add_argument("--img_size", type=int, default=511, help="training crop size, of the form 128k-1")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr_step", default="90,120", help="epochs after which the lr is multiplied by 0.1 (\"\": none)")
    p.add_argument("--batch_size", type=int, default=48, help="global batch, split over the processes")
    p.add_argument("--num_epochs", type=int, default=200)
    p.add_argument("--num_workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--val_interval", type=int, default=5, help="validate every N epochs (0: only after the last)")
    p.add_argument("--test_flip", action="store_true", help="validate with the flipped copy too")
    p.add_argument("--seed", type=int, default=317)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="mixed precision: on CUDA autocast to --amp_dtype (fp16 with a "
                   "GradScaler), on CPU bf16 autocast")
    p.add_argument("--amp_dtype", default="fp16", choices=["fp16", "bf16"], help="autocast dtype on CUDA with --amp")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in CKPT_DIR/LOG_NAME from its last checkpoint (a new run if it has none)")
    p.add_argument("--ckpt_interval", type=float, default=20.0,
                   help="minutes between mid-epoch checkpoints (0: only at the end of each epoch)")
    p.add_argument("--max_bad_fraction", type=float, default=0.01,
                   help="stop when more than this fraction of an epoch's training images cannot be read "
                        "(fewer are skipped with a warning)")
    p.add_argument("--dist", action="store_true",
                   help="DistributedDataParallel (implied when torchrun or srun starts several processes)")
    p.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes (GPU only)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # Fine-tuning and memory (see README "Fine-tuning" and "Fewer GPUs").
    p.add_argument("--pretrained", help="checkpoint to start from (weights only; other classes are fine)")
    p.add_argument("--accum_steps", type=int, default=1,
                   help="micro-batches of --batch_size per optimizer step (effective batch: their product)")
    p.add_argument("--grad_checkpoint", action="store_true", help="recompute the hourglasses in backward")
    p.add_argument("--channels_last", action="store_true",
                   help="the network and its input in the channels_last memory layout (README: where it is faster)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward and backward (compiled on the first step: about a minute "
                        "for tiny_hourglass on a CPU); validation runs the network as it is")
    # The objective (README "Notes on the method"); the defaults are the official code's. A resumed run keeps its own.
    p.add_argument("--ae_images_per_gpu", type=float, default=6.0,
                   help="weight of the per-image pull and push: the official code sums them over the images of one "
                        "GPU, 6 in its published 8 x 6 batch; keep 6 for that objective whatever your GPU count")
    p.add_argument("--stack_loss", default="mean", choices=["mean", "sum"], help="average or add the stacks' losses")
    p.add_argument("--count_eps", type=float, default=1e-4,
                   help="added to the object counts that divide the offset, pull and push losses")
    p.add_argument("--min_box_size", type=float, default=0.0,
                   help="drop training boxes with a side under this many canvas pixels after the augmentation")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work (NaN and infinity included), refused before anything is created."""
    for flag in ("batch_size", "num_epochs", "accum_steps"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    if not 127 <= args.img_size <= MAX_IMG_SIZE or args.img_size % 128 != 127:
        raise ArgumentError(f"--img_size must be of the form 128k - 1 (127, 255, 383, 511, ..., {MAX_IMG_SIZE}), got "
                            f"{args.img_size}")
    for flag in ("num_workers", "val_interval"):
        check_non_negative_int(f"--{flag}", getattr(args, flag))
    # The augmentation draws and the epoch orders seed numpy generators, which take no negative number, and
    # torch.manual_seed takes 64 bits at most.
    if not 0 <= args.seed < 2**64:
        raise ArgumentError(f"--seed must be a whole number in [0, 2**64 - 1], got {args.seed}")
    check_number("--lr", args.lr, 0, above=True)
    for flag in ("ckpt_interval", "ae_images_per_gpu", "count_eps"):
        check_number(f"--{flag}", getattr(args, flag), 0)
    # A box must fit the training crop to be kept: a larger minimum would drop every box.
    check_number("--min_box_size", args.min_box_size, 0, args.img_size, below=True)
    check_number("--max_bad_fraction", args.max_bad_fraction, 0, 1, below=True)
    check_log_name(args.log_name)
    parse_lr_steps(args.lr_step)


def main(args: argparse.Namespace) -> float:
    """Trains as the flags say; returns the last validation AP (the best, for a run already complete). Raises
    SystemExit(128 + signal) after saving when stopped by SIGTERM / SIGINT."""
    check_args(args)
    try:
        # cuDNN autotuning for the fixed --img_size (evaluate() turns it off while it runs), for this run only: a
        # caller that goes on (a notebook running Detector on photos of many sizes) keeps its own setting.
        with StopSignals() as signals, RunFolderLock() as folder_lock, cudnn_benchmark(True):
            ap, stopped = train(args, signals, folder_lock)
    except RunComplete as done:
        if dist.is_main():
            print(done.args[0])
        dist.cleanup()
        return done.args[1]
    if stopped:
        raise SystemExit(signals.exit_status or 1)
    return ap


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
