"""The training loop of train.py: one epoch (`train_one_epoch`, with gradient accumulation, mid-epoch saves and
the unreadable-image budget), its position inside an epoch (`EpochProgress`, what a mid-epoch checkpoint holds),
and the whole run (`train`): data (`build_datasets`), network, optimizer, scheduler and scaler (`build_training`,
`resume_training`: a `TrainingState`), the log's opening lines (`log_run_start`), then the epochs with validation
and checkpoints in the run folder (`run_epochs`; engine/run_folder.py). Fine-tuning from another run's weights:
engine/pretrained.py.
"""
import argparse
import bisect
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import build_dataset
from datasets.coco import CocoDetection, check_same_categories
from datasets.sampling import EpochSampler, TrainSamples, epoch_order
from engine.inference import EvaluationStopped, InferenceConfig, evaluate
from engine.pretrained import PretrainedReport, load_pretrained_checkpoint
from engine.run_folder import (BEST, CHECKPOINT, RunFolderLock, check_resumable, on_main_for_all,
                               run_folder_plan, validation_due)
from engine.visualize import val_images
from nets import build_model, model_config, resolve_variant, variant_name
from utils import dist
from utils.checkpoint import load_checkpoint, save_checkpoint, saved_args
from utils.device import autocast, grad_scaler, resume_scaler, select_device
from utils.errors import ArgumentError, CheckpointError, DataError, UserError
from utils.files import remove_stale_temporaries
from utils.logger import RunLogger
from utils.losses import LossConfig, build_loss_config, centernet_loss, resumed_objective
from utils.stopping import CheckpointTimer, StopSignals, ignore_stop_signals

class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite."""


def parse_lr_steps(text: str) -> list[int]:
    """--lr_step "90,120" -> [90, 120]: epochs of at least 1, increasing (0 would divide the lr from the start, a
    negative one be ignored); "" -> [], no step. An empty entry ("90,,120", ",") is a typo, refused as in
    --test_scales."""
    try:
        steps = [int(s) for s in text.split(",")] if text.strip() else []
    except ValueError:
        steps = None
    if steps is None or any(s < 1 for s in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
        raise ArgumentError(f"--lr_step: expected increasing epochs of at least 1, comma-separated, such as 90,120; "
                            f"got {text!r}")
    return steps


def late_lr_steps_note(steps: list[int], num_epochs: int, lr: float) -> str | None:
    """A line for the log when --lr_step names epochs at or after the last one, whose drops this run never makes
    (kept, not refused: a --resume with more --num_epochs makes them); None when every step falls inside the run."""
    late = [str(s) for s in steps if s >= num_epochs]
    if not late:
        return None
    throughout = f", so the lr stays {lr:g} throughout" if len(late) == len(steps) else ""
    return (f"--lr_step {','.join(late)}: at or after the last epoch ({num_epochs}), not taken in this run{throughout} "
            "(a --resume with more --num_epochs takes it)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class EpochProgress:
    """Where training stands inside `epoch`: its sample order, the images of one optimizer step (`global_batch`:
    --batch_size x --accum_steps), optimizer steps done in it and in the whole run, the sums of the loss terms
    (over micro-batches), the unreadable images skipped and the boxes trained on (None: unknown, for a position
    saved before they were counted)."""
    epoch: int
    order: np.ndarray
    global_batch: int
    global_step: int
    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    unreadable: int = 0
    boxes: int | None = 0

    @property
    def steps(self) -> int:
        return len(self.order) // self.global_batch

    def position(self) -> dict:
        """The `position` entry of a mid-epoch checkpoint."""
        return {"epoch": self.epoch, "step": self.step, "order": torch.from_numpy(self.order),
                "global_batch": self.global_batch, "global_step": self.global_step, "sums": dict(self.sums),
                "unreadable": self.unreadable, "boxes": self.boxes}

    @classmethod
    def from_position(cls, p: dict) -> "EpochProgress":
        return cls(p["epoch"], p["order"].numpy(), p["global_batch"], p["global_step"], p["step"], dict(p["sums"]),
                   p["unreadable"], p.get("boxes"))


def make_train_loader(dataset, progress: EpochProgress, num_workers: int, device: torch.device,
                      accum_steps: int = 1) -> DataLoader:
    """The rest of `progress.epoch` for this process, from the step reached on (datasets/sampling.py), in
    micro-batches of `global_batch / (accum_steps * world_size)` images."""
    micro_batch = progress.global_batch // accum_steps  # divisible by the world size: checked by `train`
    sampler = EpochSampler(progress.order, progress.global_batch, dist.rank(), dist.world_size(), progress.step)
    return DataLoader(dataset, batch_size=micro_batch // dist.world_size(), sampler=sampler,
                      num_workers=num_workers, drop_last=True, pin_memory=device.type == "cuda",
                      worker_init_fn=ignore_stop_signals)


def train_one_epoch(model, loader, optimizer, scaler, device, amp: bool | str, progress: EpochProgress,
                    logger: RunLogger, pause=lambda: (False, False), save=lambda: None,
                    max_unreadable: float = math.inf, accum_steps: int = 1,
                    loss_config: LossConfig = LossConfig(),
                    memory_format: torch.memory_format = torch.contiguous_format) -> bool:
    """Trains on `loader`, keeping `progress` current; returns whether a stop was asked.

    With `accum_steps` N the gradients of N micro-batches (each loss scaled by 1 / N) make one optimizer step, as
    one batch N times larger would. After each optimizer step `pause()` says, for all processes alike, whether to
    stop and whether to save: `save()` is then called (a mid-epoch checkpoint of `progress`), and the epoch ends
    early on a stop. The images go to the network in `memory_format`."""
    model.train()
    images_seen, start = 0, time.perf_counter()
    # Counted as each micro-batch is done (a bar over the loader counts one when the next batch is fetched: it
    # showed each step's loss beside the count of the step before).
    bar = tqdm(desc=f"epoch {progress.epoch}", disable=not dist.is_main(), dynamic_ncols=True,
               initial=progress.step * accum_steps, total=progress.steps * accum_steps)
    optimizer.zero_grad(set_to_none=True)
    step_sums: dict[str, float] = {}  # of the step's micro-batches, for the per-step log
    for micro, batch in enumerate(loader, start=1):
        step_now = micro % accum_steps == 0
        unreadable = batch.pop("unreadable", torch.zeros(1)).sum()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["image"] = batch["image"].contiguous(memory_format=memory_format)
        # DDP all-reduces the gradients only in the backward of the micro-batch that ends a step.
        with contextlib.nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, amp):
                outputs = model(batch["image"])
            outputs = [{k: v.float() for k, v in stack.items()} for stack in outputs]
            loss, terms = centernet_loss(outputs, batch, loss_config)
            terms = dist.reduce_mean({"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                                      "unreadable": unreadable.to(device).float(),
                                      "boxes": batch["mask"].sum().float()})
            progress.unreadable += round(terms.pop("unreadable") * dist.world_size())
            boxes = round(terms.pop("boxes") * dist.world_size())
            progress.boxes = None if progress.boxes is None else progress.boxes + boxes
            if not all(math.isfinite(v) for v in terms.values()):
                raise TrainingDiverged(
                    f"non-finite loss at epoch {progress.epoch}, step {progress.step + 1}: {terms}. Try a lower --lr, "
                    "or run without --amp.")
            if progress.unreadable > max_unreadable:
                raise DataError(
                    f"{progress.unreadable} training images of epoch {progress.epoch} could not be read (more than "
                    f"--max_bad_fraction of the epoch). List every problem with "
                    f"`python -m datasets.check --data_dir DIR --split NAME`")
            scaler.scale(loss / accum_steps).backward()
        for k, v in terms.items():
            progress.sums[k] = progress.sums.get(k, 0.0) + v
            step_sums[k] = step_sums.get(k, 0.0) + v
        images_seen += batch["image"].shape[0] * dist.world_size()
        bar.update()
        if not step_now:
            continue
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        progress.global_step += 1
        progress.step += 1
        rate = images_seen / (time.perf_counter() - start)
        step_terms = {k: v / accum_steps for k, v in step_sums.items()}
        step_sums = {}
        bar.set_postfix(loss=f"{step_terms['loss']:.3f}", img_s=f"{rate:.1f}")
        logger.scalars(step_terms, progress.global_step, prefix="train/")
        stop, save_now = pause()
        # A save due at the epoch's last step is left to the end-of-epoch save that follows at once.
        if stop or (save_now and progress.step < progress.steps):
            save()
        if stop:
            return True
    bar.close()
    if progress.boxes == 0:
        raise DataError(f"epoch {progress.epoch} trained on no box at all: every box of its {len(progress.order)} "
                        "images was dropped (smaller than --min_box_size canvas pixels after the augmentation, or "
                        "outside the crop); lower --min_box_size.")
    logger.scalars({"lr": optimizer.param_groups[0]["lr"], "images_per_s": images_seen / (time.perf_counter() - start)},
                   progress.global_step, prefix="train/")
    return False


def state_in_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Puts each optimizer state tensor shaped like its parameter (Adam's moments) in the parameter's memory layout.
    A checkpoint of a run in the other layout (--channels_last or not) loads them as they were saved, and the
    fused and for-each optimizer kernels take their fast path only where a parameter and its state share one."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def continue_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.MultiStepLR,
                      epochs_done: int, saved: dict) -> str | None:
    """Sets the learning rate of a resumed run, `epochs_done` epochs in, by this command's schedule (--lr and
    --lr_step, which `scheduler` was built with): a run resumed with another schedule (a longer one, say) follows
    it from here on. The line returned (for the log) names a schedule that differs from the checkpoint's (`saved`,
    its flags)."""
    steps = sorted(scheduler.milestones)
    scheduler.last_epoch = epochs_done
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"], group["lr"] = base, base
        for _ in range(bisect.bisect_right(steps, epochs_done)):  # as MultiStepLR does, to the last bit
            group["lr"] *= scheduler.gamma
    try:
        saved_steps = parse_lr_steps(str(saved.get("lr_step")))
    except ArgumentError:
        saved_steps = None
    if (saved.get("lr"), saved_steps) == (scheduler.base_lrs[0], steps):
        return None
    now = f"--lr {scheduler.base_lrs[0]:g} --lr_step {','.join(map(str, steps))}"
    before = f"--lr {saved.get('lr')} --lr_step {saved.get('lr_step')}"
    return (f"resuming with {now} (it was trained with {before}): the learning rate is "
            f"{optimizer.param_groups[0]['lr']:g} from epoch {epochs_done + 1}")


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, path: Path) -> None:
    """The weights and optimizer state of a checkpoint --resume continues; entries that do not fit this network
    (of other code, or edited) are a CheckpointError naming the file."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"--resume: {path} does not hold this network's training state ({first_line})") \
            from None
    state_in_parameter_layout(optimizer)


@dataclass
class TrainingState:
    """The network (`config` rebuilds it from a checkpoint) and what trains it: the optimizer, the learning rate
    schedule, the fp16 loss scaler, the memory layout and the --amp dtype (or False); and where the run stands: the
    first epoch to train, the best validation AP, the optimizer steps done, the position inside a part-trained epoch
    and whether the validation of the epoch before `start_epoch` is still to run."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    scaler: torch.amp.GradScaler
    config: dict
    memory_format: torch.memory_format
    amp: bool | str
    start_epoch: int = 1
    best_ap: float = -1.0
    global_step: int = 0
    progress: EpochProgress | None = None
    validation_pending: bool = False

    def steps_done(self) -> int:
        """Optimizer steps of the run (the checkpoint's, before a resumed epoch starts)."""
        return self.progress.global_step if self.progress else self.global_step

    def state_dict(self, epoch_done: int, position: dict | None, args: argparse.Namespace,
                   train_set: CocoDetection) -> dict:
        """What checkpoint.pt holds after `epoch_done` epochs and, mid-epoch, the next one's `position`."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch_done,
                "position": position, "global_step": self.steps_done(), "best_ap": self.best_ap,
                "args": dict(vars(args)), "model_config": self.config, "class_names": train_set.class_names,
                "category_ids": train_set.cat_ids}


# Flags that may differ between the processes of a run: paths (each node may mount the data elsewhere; only rank 0
# writes the run folder), given on all processes or on none; what is the process's own, and --dist (implied under a
# launcher).
PATH_FLAGS = {"data_dir", "ckpt_dir", "pretrained"}
PER_PROCESS_FLAGS = {"local_rank", "num_workers", "dist"}


def init_process(args: argparse.Namespace) -> torch.device:
    """Joins the other processes of a distributed run (--dist, or started by a launcher) and returns this process's
    device, refusing flags that differ between the processes, a --batch_size they cannot share and --sync_bn off
    CUDA."""
    dist.init_distributed(args.dist or dist.launched(), args.local_rank, args.device)
    dist.check_same_flags(vars(args), PATH_FLAGS, PER_PROCESS_FLAGS)
    if args.batch_size % dist.world_size():  # --batch_size is that of one forward over all the processes
        raise ArgumentError(f"--batch_size {args.batch_size} must be divisible by the number of processes "
                            f"({dist.world_size()})")
    device = select_device(args.device, dist.local_rank())
    if args.sync_bn and device.type != "cuda":  # torch's SyncBatchNorm refuses CPU tensors at the first step
        raise ArgumentError(f"--sync_bn: SyncBatchNorm runs on CUDA devices only, and this run is on {device}; "
                            "drop --sync_bn")
    return device


def build_datasets(args: argparse.Namespace) -> tuple[CocoDetection, CocoDetection]:
    """The training and validation sets, refused before any training when they cannot make a run: a val split
    without annotations, a train split without a box, different categories, a val image missing, or fewer training
    images than one optimizer step takes."""
    train_set = build_dataset(args, args.train_split, train=True, min_box_size=args.min_box_size)
    val_set = build_dataset(args, args.val_split, train=False)
    if not val_set.has_annotations:
        raise DataError(f"--val_split {args.val_split} has no annotations to validate against (a test-dev split?); "
                        "pick a split with instances_<split>.json")
    if not any(len(boxes) for boxes in train_set.boxes):
        raise DataError(f"--train_split {args.train_split} has no box to train on: its 'annotations' list is empty "
                        "or holds crowd regions and boxes without width or height only")
    check_same_categories(train_set, val_set)
    val_set.check_images_there()  # now, not after the first epoch's training
    step_batch = args.batch_size * args.accum_steps
    if len(train_set) < step_batch:
        raise ArgumentError(f"--batch_size {args.batch_size} x --accum_steps {args.accum_steps} is larger than the "
                            f"training set ({len(train_set)} images): no optimizer step would be made")
    return train_set, val_set


def check_same_input(train_set: CocoDetection, val_set: CocoDetection, state: dict | None) -> None:
    """Refuses (DataError, on every process) copies of the data set, or checkpoints to resume, that differ between
    the processes: one of another size, or an older checkpoint.pt, made its processes take other steps than the rest
    (a run folder not shared: each process reads checkpoint.pt itself)."""
    dist.check_same_input({"training images": len(train_set), "val images": len(val_set),
                           "classes": train_set.class_names, f"{CHECKPOINT} steps": state and state.get("global_step")})


def build_training(args: argparse.Namespace, device: torch.device, lr_steps: list[int]) -> TrainingState:
    """A new run's network (SyncBatchNorm across processes with --sync_bn), Adam, the --lr_step schedule and the
    loss scaler, at its first epoch."""
    config = model_config(args.arch, args.num_classes, args.corner_pool, args.center_branch)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(args.arch, args.num_classes, args.grad_checkpoint, args.corner_pool,
                        args.center_branch).to(device, memory_format=memory_format)
    if args.sync_bn and dist.is_dist():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_steps, gamma=0.1)
    amp = args.amp and args.amp_dtype
    scaler = grad_scaler(device, amp)
    return TrainingState(model, optimizer, scheduler, scaler, config, memory_format, amp)


def resumed_progress(state: dict, path: Path, accum_steps: int) -> EpochProgress:
    """The position inside an epoch that the checkpoint `state` (read from `path`) holds, continued with
    `accum_steps` micro-batches per optimizer step. Its loss sums add one value per micro-batch, and the epoch's
    mean divides them by its steps x `accum_steps`: they are rescaled from the --accum_steps of the run that saved
    them, as the same images per step may be split otherwise on resume (--batch_size 4 --accum_steps 2 continued
    as 8 x 1 logged the epoch's loss 7/5 too large)."""
    saved = saved_args(state).get("accum_steps", 1)  # a run from before the flag made one micro-batch per step
    if not isinstance(saved, int) or saved < 1:
        raise CheckpointError(f"--resume: {path} holds accum_steps {saved!r} in its args, expected a whole number "
                              "of at least 1")
    progress = EpochProgress.from_position(state["position"])
    progress.sums = {k: v * accum_steps / saved for k, v in progress.sums.items()}
    return progress


def resume_training(training: TrainingState, state: dict, path: Path, accum_steps: int,
                    num_epochs: int) -> list[str | None]:
    """Puts `training` where the checkpoint `state` (read from `path`) left the run, to continue with `accum_steps`
    micro-batches per optimizer step up to `num_epochs`; returns the lines for the log on what this command changes
    there, the loss scaling and the learning rate schedule (None: nothing)."""
    load_training_state(training.model, training.optimizer, state, path)
    schedule_note = continue_schedule(training.optimizer, training.scheduler, state["epoch"], saved_args(state))
    scaler_note = resume_scaler(training.scaler, state["scaler"], path)
    training.start_epoch, training.best_ap, training.global_step = \
        state["epoch"] + 1, state["best_ap"], state["global_step"]
    training.progress = resumed_progress(state, path, accum_steps) if state.get("position") else None
    training.validation_pending = validation_due(state, num_epochs)
    return [scaler_note, schedule_note]


def log_run_start(logger: RunLogger, notes: list[str | None], run_dir: Path, args: argparse.Namespace,
                  training: TrainingState, train_set: CocoDetection, val_set: CocoDetection, device: torch.device,
                  pretrained: PretrainedReport | None, launched_without_flag: bool, resuming: bool) -> None:
    """The run's first lines in train.log: `notes` (how it starts or resumes; None: no line), the temporary files
    of an interrupted save it removes, how it was launched, the --pretrained weights, then what trains on what."""
    for note in notes:
        if note:
            logger.info(note)
    if dist.is_main():
        for stale in remove_stale_temporaries(run_dir, CHECKPOINT) + remove_stale_temporaries(run_dir, BEST):
            logger.info(f"removed {stale}, left by a save that was interrupted")
    if launched_without_flag:
        logger.info(f"started as {dist.world_size()} processes by a launcher: training with "
                    "DistributedDataParallel (--dist implied)")
    for line in pretrained.lines() if pretrained else []:
        logger.info(line)
    for note in train_set.training_notes + val_set.ground_truth_notes:
        logger.info(f"warning: {note}")
    if args.pretrained and resuming:
        logger.info(f"--pretrained {args.pretrained} not read: the run resumes from its own checkpoint, which "
                    "holds the weights it started from and trained")
    variant = variant_name(args.corner_pool, args.center_branch)
    start_epoch, progress = training.start_epoch, training.progress
    logger.info(f"{args.arch} ({variant}) at epoch {start_epoch}{f' step {progress.step}' if progress else ''}: "
                f"{args.num_classes} classes, {len(train_set)} train / {len(val_set)} val images, "
                f"{dist.world_size()} process(es) on {device}")


def model_for_training_steps(model: torch.nn.Module, device: torch.device, compile_steps: bool,
                             logger: RunLogger) -> torch.nn.Module:
    """`model` as the training steps run it: in DistributedDataParallel across processes, and through torch.compile
    with --compile."""
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_dist() else model
    # Only the training steps are compiled: validation's image sizes vary, and would each compile anew.
    train_model = ddp_model
    if compile_steps:
        train_model = torch.compile(ddp_model)
        logger.info("--compile: the training steps run through torch.compile, which compiles on the first step")
    return train_model


def run_epochs(args: argparse.Namespace, training: TrainingState, train_model: torch.nn.Module,
               train_set: CocoDetection, val_set: CocoDetection, device: torch.device, run_dir: Path,
               logger: RunLogger, signals: StopSignals) -> tuple[float, bool]:
    """The validation a stop left pending, then the epochs from `training.start_epoch` to --num_epochs, each ended by
    its validation (when due) and saves, with mid-epoch saves every --ckpt_interval minutes and on a stop request.
    Returns (last validation AP, whether a stop request stopped the run)."""
    eval_config = InferenceConfig()  # the official single-scale settings
    step_batch = args.batch_size * args.accum_steps

    def end_epoch(epoch: int, validate: bool) -> bool:
        """Validation (when due), then checkpoint.pt and, on a better AP, best.pt. A val image missing or corrupt
        stops the run, and a stop request (SIGTERM, Ctrl-C) the validation, but the epoch trained is saved
        first, marked for its validation to run on --resume. Whether a stop request ended the validation (the
        same on every process)."""
        nonlocal ap
        if validate:
            dist.broadcast_buffers(training.model)  # every process validates the network the checkpoint holds
            try:
                stats = evaluate(training.model, val_set, eval_config, device=device, num_workers=args.num_workers,
                                 amp=training.amp, stop=lambda: signals.received is not None)
            except (UserError, EvaluationStopped) as error:
                snapshot = {**training.state_dict(epoch, None, args, train_set), "validation_pending": True}
                on_main_for_all(lambda: save_checkpoint(run_dir / CHECKPOINT, snapshot))
                if isinstance(error, EvaluationStopped):
                    return True
                raise
            ap = stats["AP"]
            logger.scalars({"AP": ap, "AP50": stats["AP50"]}, training.steps_done(), prefix="val/")
            logger.info(f"epoch {epoch}: val AP {ap:.4f} AP50 {stats['AP50']:.4f}")
            if dist.is_main():  # a few val images with true (green) and detected boxes, in tensorboard
                logger.images("val/boxes", val_images(training.model, val_set, eval_config, device, amp=training.amp),
                              training.steps_done())
        improved = validate and ap > training.best_ap
        training.best_ap = max(training.best_ap, ap)
        snapshot = {**training.state_dict(epoch, None, args, train_set), "validated": validate}
        # checkpoint.pt first: a failure between the two saves leaves a folder that --resume continues.
        on_main_for_all(lambda: save_checkpoint(run_dir / CHECKPOINT, snapshot))
        if improved:
            on_main_for_all(lambda: save_checkpoint(run_dir / BEST, snapshot))
        timer.reset()
        return False

    timer = CheckpointTimer(args.ckpt_interval)
    ap, where = training.best_ap, None  # where a stop request (SIGTERM, Ctrl-C) stopped the run, for its last line
    start_epoch = training.start_epoch
    if training.validation_pending:
        logger.info(f"epoch {start_epoch - 1}: its validation is still to run (it did not end before the run stopped, "
                    "or --num_epochs now makes this unvalidated epoch the last); it runs now")
        if end_epoch(start_epoch - 1, True):
            where = f"epoch {start_epoch - 1}'s validation"
    for epoch in range(start_epoch, args.num_epochs + 1):
        if where:
            break
        if training.progress is None or training.progress.epoch != epoch:
            training.progress = EpochProgress(epoch, epoch_order(len(train_set), step_batch, args.seed, epoch),
                                              step_batch, training.steps_done())
        progress = training.progress
        loader = make_train_loader(TrainSamples(train_set, args.seed, epoch), progress, args.num_workers, device,
                                   args.accum_steps)

        def save_mid_epoch():
            snapshot = training.state_dict(epoch - 1, progress.position(), args, train_set)
            on_main_for_all(lambda: save_checkpoint(run_dir / CHECKPOINT, snapshot))
            timer.reset()

        if train_one_epoch(
                train_model, loader, training.optimizer, training.scaler, device, training.amp, progress, logger,
                pause=lambda: dist.any_true(signals.received is not None, dist.is_main() and timer.due()),
                save=save_mid_epoch, max_unreadable=args.max_bad_fraction * len(progress.order),
                accum_steps=args.accum_steps, loss_config=build_loss_config(args),
                memory_format=training.memory_format):
            where = f"epoch {epoch}, step {progress.step} of {progress.steps}"
            break
        training.scheduler.step()
        means = {k: v / max(progress.steps * args.accum_steps, 1) for k, v in progress.sums.items()}
        logger.info(f"epoch {epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) +
                    (f" ({progress.unreadable} unreadable images skipped)" if progress.unreadable else ""))

        if end_epoch(epoch, epoch == args.num_epochs or (args.val_interval > 0 and epoch % args.val_interval == 0)):
            where = f"epoch {epoch}'s validation"
        # After the last epoch's save the run is complete: a stop received meanwhile has nothing left to stop.
        elif epoch < args.num_epochs and dist.any_true(signals.received is not None)[0]:
            where = f"the end of epoch {epoch}"
    if where:
        logger.info(f"stopped by {signals.received or 'a signal to another process'} at {where}; saved "
                    f"{run_dir / CHECKPOINT}. Resume with the same command plus --resume")
    return ap, where is not None


def train(args: argparse.Namespace, signals: StopSignals, folder_lock: RunFolderLock) -> tuple[float, bool]:
    """The run of `main`: (last validation AP, whether a signal stopped it). The main process holds `folder_lock` on
    the run folder from before it decides to start or resume there."""
    args = argparse.Namespace(**vars(args))  # completed below; the caller's flags stay as given, to run again
    # The variant's two parts, resolved from the preset once: the checkpoint's args hold what the network is.
    vars(args).update(resolve_variant(args.method, args.corner_pool, args.center_branch))
    launched_without_flag = dist.launched() and not args.dist
    device = init_process(args)
    run_dir = Path(args.ckpt_dir) / args.log_name
    on_main_for_all(lambda: folder_lock.hold(run_dir))
    resuming, plan_message = on_main_for_all(lambda: run_folder_plan(run_dir, args.resume))
    lr_steps = parse_lr_steps(args.lr_step)
    seed_everything(args.seed)
    state = dist.on_every_process(lambda: load_checkpoint(run_dir / CHECKPOINT)) if resuming else None
    objective_notes = []
    if state is not None:
        objective, objective_notes = resumed_objective(saved_args(state), vars(args))
        vars(args).update(objective)
    train_set, val_set = dist.on_every_process(lambda: build_datasets(args))
    check_same_input(train_set, val_set, state)
    args.num_classes = len(train_set.class_names)
    if state is not None:
        check_resumable(state, args, train_set.class_names, run_dir / CHECKPOINT)
    training = build_training(args, device, lr_steps)
    resume_notes = resume_training(training, state, run_dir / CHECKPOINT, args.accum_steps, args.num_epochs) \
        if state is not None else []
    del state

    # Before the log is opened: a missing or foreign --pretrained file leaves nothing written (the lock removes the
    # run folder it created), so nothing refuses the corrected rerun.
    pretrained = dist.on_every_process(lambda: load_pretrained_checkpoint(
        training.model, args.pretrained, train_set.class_names, args.arch)) \
        if args.pretrained and not resuming else None  # a resumed run already holds the fine-tuned weights
    logger = RunLogger(run_dir, enabled=dist.is_main(), purge_step=training.steps_done() + 1 if resuming else None)
    try:
        notes = [plan_message, *objective_notes, *resume_notes, late_lr_steps_note(lr_steps, args.num_epochs, args.lr)]
        log_run_start(logger, notes, run_dir, args, training, train_set, val_set, device, pretrained,
                      launched_without_flag, resuming)
        train_model = model_for_training_steps(training.model, device, args.compile, logger)
        ap, stopped = run_epochs(args, training, train_model, train_set, val_set, device, run_dir, logger, signals)
    # What the run leaves, and the line that ends it, go into its train.log too (KeyboardInterrupt: a second Ctrl-C).
    except (Exception, KeyboardInterrupt) as error:
        saved = run_dir / CHECKPOINT
        logger.info(f"the run's last save, {saved}, is intact" if saved.is_file()
                    else "the run ended before its first save: it has no checkpoint")
        logger.failed(error)
        raise
    finally:  # a caller that goes on (a notebook, the ablation's next row) keeps no open log or writer thread
        logger.close()
    dist.cleanup()
    return ap, stopped
