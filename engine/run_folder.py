"""A run folder (CKPT_DIR/LOG_NAME) and its checkpoints: whether a run starts or resumes there, whether a checkpoint
can continue under the given flags, and rank-0 decisions shared with every process."""
import argparse
import fcntl
import os
from pathlib import Path

import torch

from nets import resolve_variant, saved_variant, variant_name
from utils import dist
from utils.checkpoint import check_network_args, saved_args
from utils.device import check_scaler_state
from utils.errors import ArgumentError, CheckpointError, DataError, UserError, WriteError
from utils.files import make_folder

CHECKPOINT, BEST = "checkpoint.pt", "best.pt"


def check_log_name(log_name: str, hint: str = "") -> None:
    """Refuses a --log_name that is not one folder name: with a separator or as '..' it would lead outside
    --ckpt_dir, where a run folder would be created or results written beside a checkpoint found there."""
    if log_name in ("", ".", "..") or "/" in log_name or os.sep in log_name:
        raise ArgumentError(f"--log_name {log_name!r}: expected a folder name, without path separators and not '..' "
                            f"(the run folder under --ckpt_dir){hint}")


class RunComplete(Exception):
    """--resume of a run that has trained its --num_epochs (a job requeued after its last save): nothing to do,
    which is a success (exit status 0)."""


class RunFolderLock:
    """Held by the main process of a run on its folder, from `hold` to the end of the `with` block (or the process),
    so that a second train.py with the same --ckpt_dir and --log_name stops at once instead of writing the same
    checkpoints and log. An flock on the folder itself: the kernel drops it when the process dies, so a killed run
    leaves nothing to clean up. Where the file system has no such locks (some network file systems), runs go on
    without one. The folders it created (--ckpt_dir too) are removed again if the run ends before writing anything
    there (an input refused after the lock), as if it had never started."""

    def __init__(self):
        self.fd, self.created = None, []

    def hold(self, run_dir: Path) -> None:
        self.created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first
        make_folder(run_dir, "run folder")
        try:
            fd = os.open(run_dir, os.O_RDONLY)
        except OSError as e:
            raise WriteError(f"run folder {run_dir}: cannot open it ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{run_dir} is in use by another train.py (same --ckpt_dir and --log_name) that is still "
                            "running; wait for it to end, or choose another --log_name") from None
        except OSError:
            os.close(fd)
            return
        self.fd = fd

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc) -> None:
        # The empty folders go while the lock is held: a run that takes the lock then finds no folder to lose.
        for folder in self.created:
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        self.created = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run_folder_plan(run_dir: Path, resume: bool) -> tuple[bool, str]:
    """(resume from run_dir/checkpoint.pt?, a message for the log). Refuses (UserError) what would mix two runs in
    one folder or lose one. Temporary files of an interrupted save are not part of a run."""
    held = sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(".tmp")) if run_dir.is_dir() else []
    if resume and CHECKPOINT in held:
        return True, f"resuming {run_dir / CHECKPOINT}"
    if resume and BEST in held:
        raise UserError(f"--resume: {run_dir} holds {BEST} but no {CHECKPOINT} (deleted, or its save failed), so "
                        f"the run cannot continue; keep {BEST} and start a new run with another --log_name")
    if resume:
        # An elastic restart (torchrun --max-restarts) may come before the first save: start, and say so.
        return False, f"--resume: nothing to resume in {run_dir} yet; starting a new run"
    if held and BEST not in held and CHECKPOINT not in held:
        # A run that failed before its first save (its error is the last line of train.log): nothing to lose.
        return False, (f"starting a new run in {run_dir}; the run before it there saved no checkpoint (it left "
                       f"{', '.join(held)}, kept)")
    if held:
        raise UserError(f"{run_dir} already holds a run ({', '.join(held)}); pass --resume to continue it, or choose "
                        "another --log_name")
    return False, f"starting a new run in {run_dir}"


# What --resume reads from a checkpoint, and from the position of one saved inside an epoch.
TRAINING_ENTRIES = {"model": dict, "optimizer": dict, "scaler": dict, "epoch": int,
                    "global_step": int, "best_ap": (int, float), "args": dict, "class_names": list}
POSITION_ENTRIES = {"epoch": int, "step": int, "order": torch.Tensor, "global_batch": int, "global_step": int,
                    "sums": dict, "unreadable": int}


def check_training_state(state: dict, path: Path) -> None:
    """Refuses (CheckpointError naming the entry) a checkpoint that --resume cannot continue: one written by the
    converter or by other code, whose entries are missing or of another type."""
    position = state.get("position")
    checks = [("", state, TRAINING_ENTRIES)] + ([("position ", position, POSITION_ENTRIES)] if position else [])
    for where, entries, kinds in checks:
        if not isinstance(entries, dict):
            raise CheckpointError(f"--resume: {path}: its {where.strip()} entry is not a dict")
        for key, kind in kinds.items():
            if not isinstance(entries.get(key), kind):
                raise CheckpointError(f"--resume: {path} is not a training checkpoint of train.py: its {where}entry "
                                      f"{key!r} is {type(entries.get(key)).__name__ if key in entries else 'missing'}")
    if position and not all(isinstance(v, (int, float)) for v in position["sums"].values()):
        raise CheckpointError(f"--resume: {path} is not a training checkpoint of train.py: its position entry "
                              "'sums' holds values other than numbers")
    try:
        check_network_args(state, path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}") from None


def check_resumable(state: dict, args: argparse.Namespace, class_names: list[str], path: Path) -> None:
    """Refuses a checkpoint that is not a whole training state, and flags that cannot continue the checkpoint at
    `path`, before any network is built."""
    check_training_state(state, path)
    saved = saved_args(state)
    # The flags that define the run (its network and training input); the batch may be split over another
    # number of processes.
    for name in ("arch", "img_size"):
        if saved[name] != getattr(args, name):
            raise ArgumentError(f"--resume: {path} was trained with --{name} {saved[name]}, not {getattr(args, name)}; "
                                f"resume with --{name} {saved[name]}, or start a new run with another --log_name")
    saved_net, net = saved_variant(saved), resolve_variant(args.method, args.corner_pool, args.center_branch)
    if saved_net != net:
        flags = " ".join(f"--{k} {v}" for k, v in saved_net.items())
        raise ArgumentError(f"--resume: {path} is a {variant_name(**saved_net)} network ({flags}), not "
                            f"{variant_name(**net)}; resume with {flags}, or start a new run with another --log_name")
    if state["class_names"] != class_names:
        raise DataError(f"--resume: {path} was trained on classes {state['class_names']}, but "
                        f"{args.train_split} has {class_names}")
    position = state.get("position")
    if position and position["global_batch"] != args.batch_size * args.accum_steps:
        raise ArgumentError(f"--resume: {path} stopped inside epoch {position['epoch']} with "
                            f"{position['global_batch']} images per optimizer step; resume with the same "
                            "--batch_size and --accum_steps")
    last_epoch = position["epoch"] if position else state["epoch"] + 1
    if last_epoch > args.num_epochs and not validation_due(state, args.num_epochs):
        raise RunComplete(f"{path} is complete: it has trained {state['epoch']} epochs (--num_epochs "
                          f"{args.num_epochs}); pass a larger --num_epochs to train longer", state["best_ap"])
    check_scaler_state(state.get("scaler"), path)  # any --amp setting may continue it: see resume_scaler


def validation_due(state: dict, num_epochs: int) -> bool:
    """Whether --resume validates the checkpoint's epoch before anything else: one whose validation a stop or a
    corrupt val image left pending, or one saved without validation that --num_epochs, lowered to it, now makes the
    last (a run always validates after its last epoch; it was complete without a validation, and without best.pt
    under --val_interval 0). A checkpoint from before `validated` was saved counts as validated."""
    unvalidated_last = state.get("position") is None and state["epoch"] == num_epochs and \
        state.get("validated") is False
    return bool(state.get("validation_pending")) or unvalidated_last


def on_main_for_all(work):
    """Runs `work()` on rank 0 only (a decision about the run folder, a save) and gives every process its result,
    or raises rank 0's user error (disk full, a folder that holds another run) on every process."""
    result, error = None, None
    if dist.is_main():
        try:
            result = work()
        except UserError as e:
            error = e
    result, error = dist.broadcast_object((result, error))
    if error is not None:
        raise error
    return result
