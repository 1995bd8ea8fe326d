"""train.py end to end on a few built-in images: checkpoints, resume, refusal to overwrite, non-finite loss,
and DistributedDataParallel (2 gloo processes on CPU): against one process with the same global batch, and a
torchrun run's validation, unreadable-image budget and sample order over 2 epochs."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from tensorboardX.proto.event_pb2 import SessionLog
from torch.utils.data import Dataset, Subset

import train
from datasets.coco import CocoDetection
from datasets.sampling import EpochSampler, TrainSamples, epoch_order
from datasets.shapes import ShapesConfig, write_split
from datasets.targets import make_targets
from engine import trainer
from engine.inference import EvaluationStopped, InferenceConfig, evaluate
from nets import build_model
from tests.tensorboard_events import read_events
from utils import dist
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import ArgumentError, CheckpointError, DataError, MissingFileError, UserError, WriteError
from utils.logger import RunLogger
from utils.losses import OBJECTIVE_FLAGS_BEFORE, LossConfig, centernet_loss

ROOT = Path(__file__).resolve().parents[1]


def args_for(shapes_dir: Path, ckpt_dir: Path, *extra: str):
    return train.get_args_parser().parse_args([
        "--log_name", "run", "--ckpt_dir", str(ckpt_dir), "--data_dir", str(shapes_dir), "--train_split", "train",
        "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu", "--lr", "1e-3", "--lr_step", "2", "--val_interval", "2", *extra])


def test_checkpoint_contents_and_resume_equals_an_uninterrupted_run(shapes_dir, tmp_path):
    # lr milestones after epochs 2 and 3: one before the resume point, one after it
    train.main(args_for(shapes_dir, tmp_path / "a", "--num_epochs", "3", "--lr_step", "2,3"))
    train.main(args_for(shapes_dir, tmp_path / "b", "--num_epochs", "2", "--lr_step", "2,3"))
    first = load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")
    assert first["epoch"] == 2 and first["scheduler"]["last_epoch"] == 2
    assert set(first) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "args", "class_names", "best_ap"}
    assert first["class_names"] == ["rectangle", "ellipse", "triangle", "cross"]
    assert (tmp_path / "b" / "run" / "best.pt").is_file() and (tmp_path / "b" / "run" / "train.log").is_file()

    args = args_for(shapes_dir, tmp_path / "b", "--num_epochs", "3", "--resume", "--lr_step", "2,3")
    given = dict(vars(args))
    train.main(args)
    assert vars(args) == given  # the caller's flags as given (they gained num_classes, corner_pool, ...), to run again
    resumed = load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")
    straight = load_checkpoint(tmp_path / "a" / "run" / "checkpoint.pt")
    assert resumed["model"].keys() == straight["model"].keys()
    # Both runs are in this process (same kernels, same thread count) and see the same batches in the same order
    # from the same weights and optimizer state: equal bit for bit, whatever the CPU.
    for k in straight["model"]:
        torch.testing.assert_close(resumed["model"][k], straight["model"][k], rtol=0, atol=0, msg=k)
    # the lr schedule continues too: --lr 1e-3 times 0.1 at each milestone
    # (_step_count: torch's count of step() calls in this process, for its warning on the order of calls)
    resumed_schedule, straight_schedule = ({k: v for k, v in state["scheduler"].items() if k != "_step_count"}
                                           for state in (resumed, straight))
    assert resumed_schedule == straight_schedule and straight_schedule["last_epoch"] == 3
    for state in (resumed, straight):
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5, rel=1e-9)
    log = (tmp_path / "b" / "run" / "train.log").read_text()
    assert "resuming" in log and "epoch 3:" in log


@pytest.mark.parametrize("steps", [[2, 4], [1], [3, 4, 9]])
def test_a_resumed_schedule_stands_where_the_uninterrupted_one_does(steps):
    """continue_schedule at k epochs done gives the learning rate of a scheduler stepped k times from the start, bit
    for bit (a closed form, lr * 0.1 ** 2, differs in the last bit from two multiplications), and steps on alike."""
    for done in range(7):
        straight_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2.5e-4)
        straight = torch.optim.lr_scheduler.MultiStepLR(straight_opt, milestones=steps, gamma=0.1)
        for _ in range(done):
            straight_opt.step()
            straight.step()
        resumed_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2.5e-4)
        resumed = torch.optim.lr_scheduler.MultiStepLR(resumed_opt, milestones=steps, gamma=0.1)
        saved_flags = {"lr": 2.5e-4, "lr_step": ",".join(map(str, steps))}
        note = trainer.continue_schedule(resumed_opt, resumed, done, saved_flags)
        assert note is None
        for _ in range(3):
            assert resumed_opt.param_groups[0]["lr"] == straight_opt.param_groups[0]["lr"]  # bit for bit
            for opt, sched in ((straight_opt, straight), (resumed_opt, resumed)):
                opt.step()
                sched.step()


def test_resume_follows_a_changed_lr_schedule_and_says_so(shapes_dir, tmp_path):
    """A run extended on --resume with another --lr_step trains by it (it was ignored: the checkpoint's scheduler
    state was restored while the new flags were saved as if used)."""
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--lr_step", "5", "--val_interval", "0"))
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--lr_step", "1", "--val_interval", "0",
                        "--resume"))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4, rel=1e-9)  # 1e-3 decayed after epoch 1
    assert state["args"]["lr_step"] == "1" and state["scheduler"]["milestones"] == {1: 1}
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resuming with --lr 0.001 --lr_step 1 (it was trained with --lr 0.001 --lr_step 5): the learning rate " \
           "is 0.0001 from epoch 2" in log
    # The first run's step after its last epoch is told (a user of --num_epochs 70 and the default 90,120 trains
    # without a drop); the resumed run's step falls inside it.
    assert log.count("not taken in this run") == 1
    assert "--lr_step 5: at or after the last epoch (1), not taken in this run, so the lr stays 0.001 throughout " \
           "(a --resume with more --num_epochs takes it)" in log


def test_the_progress_bar_counts_a_step_before_showing_its_loss(shapes_dir, tmp_path, capsys):
    """The bar iterated the loader, so it counted a batch when the next was fetched: step 1's loss was shown
    beside 0/2."""
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--val_interval", "0"))
    frames = [frame for frame in re.split(r"[\r\n]", capsys.readouterr().err) if frame.startswith("epoch 1:")]
    with_loss = [frame for frame in frames if "loss=" in frame]
    assert with_loss and all(re.search(r" [12]/2 \[", frame) for frame in with_loss), frames
    assert re.search(r" 2/2 \[.*loss=", frames[-1])


def test_a_new_run_never_overwrites_an_existing_one(shapes_dir, tmp_path):
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    # A folder left with best.pt only (checkpoint.pt deleted) is neither overwritten nor "resumed" from scratch.
    (tmp_path / "run" / "checkpoint.pt").unlink()
    log = (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(UserError, match="already holds a run"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    with pytest.raises(UserError, match="holds best.pt but no checkpoint.pt"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--resume"))
    assert (tmp_path / "run" / "train.log").read_text() == log


def test_resume_with_nothing_to_resume_starts_a_new_run(shapes_dir, tmp_path):
    """What an elastic restart (torchrun --max-restarts) needs before the first checkpoint exists."""
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--val_interval", "0", "--resume"))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert "nothing to resume" in (tmp_path / "run" / "train.log").read_text()


def test_flags_that_cannot_work_are_refused_before_anything_is_created(shapes_dir, tmp_path):
    for flags, message in [(("--batch_size", "0"), "--batch_size: expected a whole number of at least 1, got 0"),
                           (("--num_epochs", "0"), "--num_epochs: expected a whole number of at least 1"),
                           (("--val_interval", "-1"), "--val_interval: expected a whole number of at least 0, got -1"),
                           (("--img_size", "128"), "128k - 1"),
                           (("--img_size", "-1"), "128k - 1"),  # -1 % 128 == 127
                           (("--img_size", "2175"), "128k - 1 .*2047"),  # more than a checkpoint may hold
                           (("--lr_step", "0"), "--lr_step: expected increasing epochs of at least 1"),
                           (("--lr_step", "-1"), "--lr_step: expected increasing"),
                           (("--lr_step", "5,3"), "--lr_step: expected increasing"),
                           (("--lr_step", "5,5"), "--lr_step: expected increasing"),
                           (("--lr_step", "5,x"), "--lr_step: expected increasing"),
                           (("--lr_step", "5,,9"), "--lr_step: expected increasing"),  # was taken as 5,9
                           (("--lr_step", ","), "--lr_step: expected increasing"),  # was taken as no step
                           (("--max_bad_fraction", "1"), r"--max_bad_fraction: expected a number in \[0, 1\)"),
                           (("--log_name", "../../x"), "expected a folder name, without path separators"),
                           (("--log_name", ".."), "expected a folder name"),
                           # NaN and infinity pass a `< 0` check: each was accepted, and failed (or trained on
                           # nothing) later
                           (("--ae_images_per_gpu", "nan"), "--ae_images_per_gpu: expected a finite number of at "
                                                            "least 0, got nan"),
                           (("--lr", "inf"), "--lr: expected a finite number above 0, got inf"),
                           (("--count_eps", "nan"), "--count_eps: expected a finite number of at least 0, got nan"),
                           (("--count_eps", "inf"), "--count_eps: .* got inf"),
                           (("--ckpt_interval", "nan"), "--ckpt_interval"),
                           (("--max_bad_fraction", "nan"), "--max_bad_fraction"),
                           (("--min_box_size", "1000"), r"--min_box_size: expected a number in \[0, 127\), got 1000"),
                           (("--min_box_size", "inf"), "--min_box_size"),
                           (("--min_box_size", "-1"), "--min_box_size"),
                           # numpy's seeded generators refuse a negative seed: a traceback after the run folder
                           (("--seed", "-1"), r"--seed must be a whole number in \[0, 2\*\*64 - 1\], got -1"),
                           (("--seed", str(2**64)), "--seed must be a whole number"),
                           (("--sync_bn",), "--sync_bn: SyncBatchNorm runs on CUDA devices only")]:
        with pytest.raises(ArgumentError, match=message):
            train.main(args_for(shapes_dir, tmp_path, *flags))
        assert not (tmp_path / "run").exists()


def test_lr_step_empty_is_no_step_and_blanks_around_epochs_are_fine():
    assert trainer.parse_lr_steps("") == [] and trainer.parse_lr_steps(" 90, 120") == [90, 120]


def test_a_failed_run_logs_its_error_and_its_folder_takes_a_new_run(shapes_dir, tmp_path):
    """Boxes of at most ~70 canvas pixels (16-40 px shapes, scaled to the 127 crop) under --min_box_size 100 are
    all dropped: the epoch stops with an error naming the flag instead of training on empty targets, the error is
    the last line of train.log, and the folder, which holds no checkpoint, takes a new run without --resume."""
    with pytest.raises(DataError, match="epoch 1 trained on no box at all.*lower --min_box_size") as e:
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--min_box_size", "100"))
    run = tmp_path / "run"
    assert (run / "train.log").read_text().splitlines()[-2:] == [
        "the run ended before its first save: it has no checkpoint", f"error: {e.value}"]
    assert not (run / "checkpoint.pt").exists()
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    log = (run / "train.log").read_text()
    assert "the run before it there saved no checkpoint (it left " in log and "epoch 1: val AP" in log
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def test_a_run_started_in_a_worker_thread_trains_and_leaves_the_callers_settings(shapes_dir, tmp_path, monkeypatch):
    """A program that trains in a thread of its own (a service, a GUI) gets its run: Python refuses signal handlers
    outside the main thread, and installing them was a ValueError before anything was trained. The run autotunes
    cuDNN for its fixed input size while it trains, and the program gets its own setting back (it stayed on, for
    the photos of many sizes a Detector runs next)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    benchmark_in_training = []

    def train_one_epoch(*args, **kwargs):
        benchmark_in_training.append(torch.backends.cudnn.benchmark)
        return original(*args, **kwargs)

    original = trainer.train_one_epoch
    monkeypatch.setattr(trainer, "train_one_epoch", train_one_epoch)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))))
    worker.start()
    worker.join()
    assert len(outcome) == 1 and 0.0 <= outcome[0] <= 1.0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert benchmark_in_training == [True] and torch.backends.cudnn.benchmark is False


def test_a_second_run_in_a_folder_in_use_stops_and_writes_nothing(shapes_dir, tmp_path):
    """Another train.py holding the run folder (here a process that took its lock, as train.py does before deciding
    to start or resume) makes a second run with the same --log_name stop before it writes anything; once that
    process is killed (-9: no clean-up of its own), the folder takes a run."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from engine.run_folder import "
         "RunFolderLock; lock = RunFolderLock(); lock.hold(Path(sys.argv[1])); print('held', flush=True); "
         "time.sleep(600)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"{run} is in use by another train.py"):
            train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
        assert list(run.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def test_a_training_split_without_boxes_is_refused_naming_it_not_min_box_size(shapes_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    ann = data / "annotations" / "instances_train.json"
    content = json.loads(ann.read_text())
    for change in ("empty", "crowd", "no width"):
        content["annotations"] = {"empty": [], "crowd": [{**a, "iscrowd": 1} for a in content["annotations"]],
                                  "no width": [{**a, "bbox": a["bbox"][:2] + [0, a["bbox"][3]]}
                                               for a in content["annotations"]]}[change]
        ann.write_text(json.dumps(content))
        with pytest.raises(DataError, match="--train_split train has no box to train on"):
            train.main(args_for(data, tmp_path, "--num_epochs", "1"))
        content = json.loads((shapes_dir / "annotations" / "instances_train.json").read_text())
    assert not (tmp_path / "run").exists()


def test_a_class_without_a_training_box_is_a_warning_in_train_log(shapes_dir, tmp_path):
    """Roboflow's extra category (id 0, named after the data set, no box) became a class trained as never present,
    without a word in train.log."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    for split in ("train", "val"):
        ann = data / "annotations" / f"instances_{split}.json"
        content = json.loads(ann.read_text())
        content["categories"].insert(0, {"id": 0, "name": "shapes-Xq2p", "supercategory": "none"})
        ann.write_text(json.dumps(content))
    train.main(args_for(data, tmp_path, "--num_epochs", "1"))
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"warning: {data / 'annotations' / 'instances_train.json'}: no box here has category 'shapes-Xq2p' " \
           "(id 0) (1 of the 5 categories)" in log
    assert "instances_val.json: no box here" not in log  # the val split's classes are the evaluation's to show


def test_train_and_val_splits_of_other_categories_are_refused_naming_the_files_and_names(shapes_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    train_file, val_file = (data / "annotations" / f"instances_{split}.json" for split in ("train", "val"))
    content = json.loads(val_file.read_text())
    renamed = content["categories"][0]["name"]
    content["categories"][0]["name"] = "raccoon"
    val_file.write_text(json.dumps(content))
    message = (f"{train_file} and {val_file} have different categories (only in {train_file}: '{renamed}'; only in "
               f"{val_file}: 'raccoon')")
    with pytest.raises(DataError, match=re.escape(message)):
        train.main(args_for(data, tmp_path, "--num_epochs", "1"))


def test_a_second_ctrl_c_ends_train_log_with_what_the_run_leaves(shapes_dir, tmp_path, monkeypatch):
    """A second Ctrl-C stops at once (KeyboardInterrupt from utils/stopping.py): train.log still says so, after
    what the run leaves, as for an error."""
    def second_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_one_epoch", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    assert (tmp_path / "run" / "train.log").read_text().splitlines()[-2:] == [
        "the run ended before its first save: it has no checkpoint",
        "interrupted (Ctrl-C twice): stopped at once, without saving"]


def test_a_run_folder_that_cannot_be_written_is_a_one_line_error(shapes_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(WriteError, match=f"run folder {tmp_path / 'a_file' / 'run'}: cannot create or read the "
                                         "folder"):
        train.main(args_for(shapes_dir, tmp_path / "a_file", "--num_epochs", "1"))
    (tmp_path / "run" / "train.log").mkdir(parents=True)  # what the log cannot be opened as
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'run' / 'train.log'}: Is a directory"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))


def test_a_val_image_not_there_is_named_before_any_training(shapes_dir, tmp_path):
    """It stopped the run at the first validation, after an epoch of training (hours on COCO)."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    val = sorted((data / "val").iterdir())
    for gone in val:
        gone.unlink()
    with pytest.raises(MissingFileError, match=rf"{val[0]}: image file not found \({len(val)} of the {len(val)} "
                                               rf"images of {data / 'annotations' / 'instances_val.json'} are not "
                                               rf"there\)"):
        train.main(args_for(data, tmp_path, "--num_epochs", "1"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_val_image_corrupt_keeps_the_epoch_trained_and_resume_validates_it(shapes_dir, tmp_path):
    """Validation reads the val images only after the epoch's training: a corrupt one (a missing one is refused at
    the start) stops the run with its one-line error, but the epoch is saved first (on COCO an epoch is hours),
    marked for validation; --resume, once the image is mended, runs that validation before anything else, also after
    the last epoch (which alone would be complete)."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    gone = sorted((data / "val").iterdir())[0]
    kept = gone.read_bytes()
    gone.write_bytes(kept[:len(kept) // 3])  # a JPEG cut short
    with pytest.raises(UserError, match=f"{gone.name}") as e:
        train.main(args_for(data, tmp_path, "--num_epochs", "1"))
    assert "Traceback" not in str(e.value)
    checkpoint, log = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "train.log"
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 1 and state["validation_pending"] and state["global_step"] == 2
    assert log.read_text().splitlines()[-2] == f"the run's last save, {checkpoint}, is intact"
    assert not (tmp_path / "run" / "best.pt").exists()
    gone.write_bytes(kept)
    ap = train.main(args_for(data, tmp_path, "--num_epochs", "1", "--resume"))
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 1 and "validation_pending" not in state and state["best_ap"] == ap >= 0
    assert state["global_step"] == 2 and load_checkpoint(tmp_path / "run" / "best.pt")["best_ap"] == ap
    assert f"epoch 1: val AP {ap:.4f}" in log.read_text().splitlines()[-1]


def test_resume_names_what_a_checkpoint_lacks_for_training(shapes_dir, tmp_path):
    """A checkpoint of other code (or edited by hand) that lacks an entry --resume reads, or holds it with another
    type, is a CheckpointError naming the entry, before anything is trained or written (it was a KeyError or
    TypeError, `best_ap` only after a whole epoch; a model or optimizer state that does not fit: a RuntimeError
    or KeyError)."""
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--val_interval", "0"))
    path = tmp_path / "run" / "checkpoint.pt"
    good = load_checkpoint(path)
    position = {"epoch": 2, "step": 1, "order": torch.arange(8), "global_batch": 4, "global_step": 3, "sums": {},
                "unreadable": 0}
    for change, message in [(lambda s: s.pop("optimizer"), "entry 'optimizer' is missing"),
                            (lambda s: s.update(epoch="x"), "entry 'epoch' is str"),
                            (lambda s: s.update(best_ap="x"), "entry 'best_ap' is str"),
                            (lambda s: s["args"].pop("arch"), "checkpoint args lack 'arch'"),
                            (lambda s: s.update(position={k: v for k, v in position.items() if k != "global_batch"}),
                             "its position entry 'global_batch' is missing"),
                            (lambda s: s.update(position={**position, "sums": {"hm": "x"}}),
                             "its position entry 'sums' holds values other than numbers"),
                            (lambda s: s.update(position=position, args={**s["args"], "accum_steps": "2"}),
                             "holds accum_steps '2' in its args, expected a whole number"),
                            (lambda s: s.update(optimizer={}), "does not hold this network's training state"),
                            (lambda s: s["model"].pop(next(iter(s["model"]))),
                             "does not hold this network's training state")]:
        state = {**good, "args": dict(good["args"]), "model": dict(good["model"])}
        change(state)
        save_checkpoint(path, state)
        log_before = (tmp_path / "run" / "train.log").read_text()
        with pytest.raises(CheckpointError, match=f"--resume: {path}.*{message}"):
            train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--val_interval", "0", "--resume"))
        assert (tmp_path / "run" / "train.log").read_text() == log_before


def test_num_epochs_lowered_to_an_epoch_saved_unvalidated_validates_it(shapes_dir, tmp_path, monkeypatch):
    """README: a run always validates after its last epoch. A run stopped at the end of epoch 1 of 3 (--val_interval
    0: no validation there), resumed with --num_epochs 1, was complete at once: never validated, no best.pt."""
    log_info = RunLogger.info

    def stop_after_epoch_1(logger, message):  # SIGTERM as the epoch's line is written: the run stops after its save
        log_info(logger, message)
        if message.startswith("epoch 1: loss"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "info", stop_after_epoch_1)
    with pytest.raises(SystemExit):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "3", "--val_interval", "0"))
    monkeypatch.setattr(RunLogger, "info", log_info)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["position"] is None and not (tmp_path / "run" / "best.pt").exists()

    ap = train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--val_interval", "0", "--resume"))
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("epoch 1: val AP") == 1 and ap >= 0 and (tmp_path / "run" / "best.pt").is_file()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["validated"]
    # validated now: the run is complete, and a second --resume says so without validating again
    assert train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--val_interval", "0", "--resume")) == ap
    assert (tmp_path / "run" / "train.log").read_text() == log


def tensorboard_files(run_dir: Path) -> list[list]:
    """The events of each tensorboard file of a run, oldest first (their names start with the time of writing)."""
    return [read_events(path) for path in sorted(run_dir.glob("events.out.tfevents.*"))]


def test_a_resumed_run_marks_tensorboard_to_drop_what_came_after_its_checkpoint(shapes_dir, tmp_path, monkeypatch):
    """A resumed run's file starts at the step after its checkpoint's, with the mark (SessionLog START at that step)
    from which TensorBoard drops the earlier files' events of that step and later: a run that died after its last
    save (killed, or failed on another process) had logged steps that the resumed run logs again, two values each.
    At the checkpoint's own step, not after it, the mark would drop the epoch's val/AP, which is not logged again."""
    log_info = RunLogger.info

    def stop_after_epoch_1(logger, message):
        log_info(logger, message)
        if message.startswith("epoch 1: val AP"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "info", stop_after_epoch_1)
    with pytest.raises(SystemExit):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--val_interval", "1"))
    monkeypatch.setattr(RunLogger, "info", log_info)
    steps = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["global_step"]
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--val_interval", "1", "--resume"))
    first, resumed = tensorboard_files(tmp_path / "run")
    assert ("val/AP", steps) in {(v.tag, e.step) for e in first for v in e.summary.value}
    starts = [e.step for e in resumed if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert starts == [steps + 1] and not any(e.HasField("session_log") for e in first)
    assert min(e.step for e in resumed if e.summary.value) == steps + 1


def test_resume_refuses_what_cannot_continue_the_run(shapes_dir, tmp_path, capsys):
    ap = train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--val_interval", "0"))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    # A job requeued after its last save: a success that says so in one line, the checkpoint untouched.
    assert train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--resume")) == ap
    assert capsys.readouterr().out == (f"{tmp_path / 'run' / 'checkpoint.pt'} is complete: it has trained 2 epochs "
                                       "(--num_epochs 2); pass a larger --num_epochs to train longer\n")
    with pytest.raises(ArgumentError, match="trained with --arch tiny_hourglass, not small_hourglass"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "3", "--resume", "--arch", "small_hourglass"))
    with pytest.raises(ArgumentError, match="trained with --img_size 127, not 255; resume with --img_size 127"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "3", "--resume", "--img_size", "255"))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_a_resume_inside_an_epoch_keeps_its_images_per_optimizer_step(shapes_dir, tmp_path):
    """The saved order of an epoch stopped at step 1 is cut into steps of 4 images (--batch_size 4): --resume
    refuses another --batch_size x --accum_steps, before anything is written, and continues with the same product
    split otherwise (2 x 2)."""
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--val_interval", "0"))
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    state["position"] = {"epoch": 2, "step": 1, "order": torch.from_numpy(epoch_order(8, 4, SEED, 2)),
                         "global_batch": 4, "global_step": 3, "sums": {}, "unreadable": 0}
    save_checkpoint(path, state)
    before = path.read_bytes()
    for flags in (("--batch_size", "2"), ("--batch_size", "4", "--accum_steps", "2")):
        with pytest.raises(ArgumentError, match="stopped inside epoch 2 with 4 images per optimizer step; resume "
                                                "with the same --batch_size and --accum_steps"):
            train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--val_interval", "0", "--resume", *flags))
        assert path.read_bytes() == before
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--val_interval", "0", "--resume",
                        "--batch_size", "2", "--accum_steps", "2"))
    resumed = load_checkpoint(path)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 4  # step 2 of epoch 2 alone was trained


def test_an_epoch_resumed_with_its_steps_split_otherwise_logs_the_mean_of_its_steps(shapes_dir, tmp_path,
                                                                                    monkeypatch):
    """Step 1 of 2 as 2 micro-batches of 2 images (stopped by SIGTERM after it), step 2 as one batch of 4 after
    --resume: train.log's epoch loss is the mean of the two steps' losses, each step's the mean of its
    micro-batches (the sums of 3 micro-batches divided by 2 x 1 gave 3/2 of it)."""
    losses = []

    def recorded_loss(outputs, batch, config):
        loss, terms = centernet_loss(outputs, batch, config)
        losses.append(loss.item())
        if len(losses) == 2:  # the stop request arrives during step 1; the run finishes the step and saves
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, terms

    monkeypatch.setattr(trainer, "centernet_loss", recorded_loss)
    common = ("--num_epochs", "1", "--val_interval", "0")
    with pytest.raises(SystemExit):
        train.main(args_for(shapes_dir, tmp_path, *common, "--batch_size", "2", "--accum_steps", "2"))
    train.main(args_for(shapes_dir, tmp_path, *common, "--batch_size", "4", "--resume"))
    assert len(losses) == 3
    logged = re.search(r"^epoch 1: loss (\S+)", (tmp_path / "run" / "train.log").read_text(), re.M)
    expected = ((losses[0] + losses[1]) / 2 + losses[2]) / 2
    assert float(logged[1]) == pytest.approx(expected, abs=1e-4)  # logged with 4 decimals


def test_resume_across_amp_settings(shapes_dir, tmp_path):
    # A CPU run has no loss scaler; a checkpoint of an fp16 run on CUDA has one. Resuming it without fp16 drops
    # the scale with a log line (the other way round: tests/test_device.py); a scale no run can use is refused.
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--val_interval", "0"))
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    state["scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()
    torch.save(state, path)
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--val_interval", "0", "--resume"))
    assert "its fp16 loss scale (1024) is not used" in (tmp_path / "run" / "train.log").read_text()
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and state["scaler"] == {}
    state["scaler"]["scale"] = float("inf")
    torch.save(state, path)
    with pytest.raises(UserError, match="the fp16 loss scale in the checkpoint is inf"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "3", "--resume"))


def test_a_checkpoint_from_before_the_objective_flags_resumes_with_its_own_objective(shapes_dir, tmp_path,
                                                                                      monkeypatch):
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--val_interval", "0"))
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    assert {k: state["args"][k] for k in OBJECTIVE_FLAGS_BEFORE} == {
        "ae_images_per_gpu": 6.0, "stack_loss": "mean", "count_eps": 1e-4, "min_box_size": 0.0}
    for k in OBJECTIVE_FLAGS_BEFORE:  # as a checkpoint written before these flags existed
        del state["args"][k]
    save_checkpoint(path, state)
    configs, real_loss = [], trainer.centernet_loss
    monkeypatch.setattr(trainer, "centernet_loss", lambda out, batch, config: configs.append(config) or
                        real_loss(out, batch, config))
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--val_interval", "0", "--resume"))
    assert configs and set(configs) == {LossConfig(ae_images_per_gpu=1.0, stack_mean=False, count_eps=0.0)}
    resumed = load_checkpoint(path)
    assert {k: resumed["args"][k] for k in OBJECTIVE_FLAGS_BEFORE} == OBJECTIVE_FLAGS_BEFORE
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resuming with --ae_images_per_gpu 1.0 (it predates the flag" in log and "--min_box_size 1.0" in log


def test_checkpoint_is_saved_before_best_and_with_the_normal_file_mode(shapes_dir, tmp_path, monkeypatch):
    saved = []
    real_save = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, state: (saved.append(path.name), real_save(path, state)))
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    assert saved == ["checkpoint.pt", "best.pt"]
    umask = os.umask(0)
    os.umask(umask)
    for name in saved:
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_save_due_at_an_epochs_last_step_is_the_end_of_epoch_save(shapes_dir, tmp_path, monkeypatch):
    """--ckpt_interval due at every step, 2 steps an epoch: a mid-epoch save after step 1 only; the one due after
    step 2 was written and at once overwritten by the epoch's save (a whole checkpoint more, each time)."""
    saved = []
    real_save = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, state: (
        saved.append((path.name, state["epoch"], (state["position"] or {}).get("step"))), real_save(path, state)))
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--ckpt_interval", "1e-9"))
    assert saved == [("checkpoint.pt", 0, 1), ("checkpoint.pt", 1, None), ("best.pt", 1, None)]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(shapes_dir, tmp_path, monkeypatch):
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real_loss = trainer.centernet_loss

    def exploding_loss(outputs, batch, config):
        total, terms = real_loss(outputs, batch, config)
        return total * float("nan"), terms

    monkeypatch.setattr(trainer, "centernet_loss", exploding_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 2"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--resume"))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    saved = tmp_path / "run" / "checkpoint.pt"
    assert (tmp_path / "run" / "train.log").read_text().splitlines()[-2] == f"the run's last save, {saved}, is intact"


def test_bf16_autocast_on_cpu(shapes_dir, tmp_path):
    ap = train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--amp"))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["args"]["amp"]
    # the AP returned is that of the saved weights, evaluated the same way (bf16 autocast on the CPU)
    model = build_model("tiny_hourglass", 4)
    model.load_state_dict(state["model"])
    val = CocoDetection(shapes_dir, "val", train=False)
    assert ap == evaluate(model, val, InferenceConfig(), torch.device("cpu"), num_workers=0, amp="fp16")["AP"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "loss" in (tmp_path / "run" / "train.log").read_text()


def test_channels_last_trains_as_contiguous_and_resumes_in_either_layout(shapes_dir, tmp_path):
    # One optimizer step per epoch (batch 8: the 8 training images), so epoch 1's loss is that of the same weights
    # on the same batch in both layouts. Convolutions in the other layout sum in another order: float32 roundings,
    # far under the 1e-4 allowed; a wrong layout conversion (a transposed map) changes the loss itself.
    def run(folder: str, *extra: str) -> dict:
        train.main(args_for(shapes_dir, tmp_path / folder, "--batch_size", "8", *extra))
        return load_checkpoint(tmp_path / folder / "run" / "checkpoint.pt")

    def epoch_loss(folder: str, epoch: int) -> float:
        return float((tmp_path / folder / "run" / "train.log").read_text().split(f"epoch {epoch}: loss ")[1].split()[0])

    def layouts(state: dict) -> set[bool]:  # whether each 3x3 convolution weight and its Adam moments are NHWC
        names = [k for k, v in state["model"].items() if v.dim() == 4 and v.shape[-1] == 3]
        moments = [m for i, m in state["optimizer"]["state"].items() if m["exp_avg"].dim() == 4
                   and m["exp_avg"].shape[-1] == 3]
        assert names and moments
        return ({state["model"][k].is_contiguous(memory_format=torch.channels_last) and
                 not state["model"][k].is_contiguous() for k in names} |
                {m[key].is_contiguous(memory_format=torch.channels_last) and not m[key].is_contiguous()
                 for m in moments for key in ("exp_avg", "exp_avg_sq")})

    contiguous = run("a", "--num_epochs", "1")
    nhwc = run("b", "--num_epochs", "1", "--channels_last")
    assert epoch_loss("b", 1) == pytest.approx(epoch_loss("a", 1), rel=1e-4)
    assert layouts(contiguous) == {False} and layouts(nhwc) == {True}
    # Resumed in the other layout, the run continues, and the moments follow the parameters into it.
    assert layouts(run("a", "--num_epochs", "2", "--resume", "--channels_last")) == {True}
    assert layouts(run("b", "--num_epochs", "2", "--resume")) == {False}
    # Epoch 2 starts from weights one Adam step apart in the last float32 bits (apart by up to 2 lr where a
    # gradient near zero changed sign): the same loss, well within 1%.
    assert epoch_loss("b", 2) == pytest.approx(epoch_loss("a", 2), rel=1e-2)


def test_bad_arguments_are_clear_errors(shapes_dir, tmp_path):
    with pytest.raises(ArgumentError, match="--lr_step"):
        train.main(args_for(shapes_dir, tmp_path, "--lr_step", "ten"))
    with pytest.raises(ArgumentError, match="larger than the training set"):
        train.main(args_for(shapes_dir, tmp_path / "x", "--batch_size", "64", "--num_epochs", "1"))


class OneBoxImages(Dataset):
    """Fixed images with one box each, so that every process normalises its loss by the same object count."""

    def __init__(self, n: int, size: int = 63, num_classes: int = 2):
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(n):
            x1, y1 = rng.uniform(0, 20, 2)
            w, h = rng.uniform(16, 40, 2)
            boxes = np.array([[x1, y1, min(x1 + w, size), min(y1 + h, size)]])
            item = make_targets(boxes, np.array([i % num_classes]), num_classes, size, size)
            item["image"] = rng.standard_normal((3, size, size)).astype(np.float32)
            self.items.append({k: torch.from_numpy(v) for k, v in item.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def without_batchnorm(model: nn.Module) -> nn.Module:
    """Batch statistics differ between one batch of B and N batches of B / N (SyncBatchNorm needs a GPU), so
    the comparison runs on the network with its BN layers removed."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            without_batchnorm(child)
    return model


def one_step_gradients(rank: int, world: int, port: int, out: str) -> None:
    """One training step of the BN-free tiny network on a global batch of 4: the gradients after backward (all-reduced
    by DDP when world > 1), the loss terms the step logged (averaged over the processes), and the batch each
    process loaded."""
    if world > 1:  # in a spawned process; the single-process run stays out of any process group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                          LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_distributed(True, device="cpu")
    torch.manual_seed(0)
    model = without_batchnorm(build_model("tiny_hourglass", 2))
    ddp = nn.parallel.DistributedDataParallel(model) if dist.is_dist() else model
    # lr 0: the loop runs as in training; the gradients the optimizer sees belong to the initial weights.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = {}
    optimizer.register_step_pre_hook(lambda *_: grads.update({k: p.grad.clone() for k, p in model.named_parameters()}))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    data = OneBoxImages(4)
    progress = trainer.EpochProgress(1, epoch_order(len(data), 4, seed=0, epoch=1), 4, 0)
    loader = trainer.make_train_loader(data, progress, 0, torch.device("cpu"))
    batch = next(iter(loader))
    logger = RunLogger(Path(out), enabled=False)
    trainer.train_one_epoch(ddp, loader, optimizer, scaler, torch.device("cpu"), False, progress, logger)
    torch.save({"grads": grads, "images": batch["image"], "terms": progress.sums},
               Path(out) / f"world{world}_rank{rank}.pt")
    dist.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SecondImageBroken(Dataset):
    """`dataset`, with its item 1 (the second process's first image) a DataError."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i == 1:
            raise DataError("val image 1 is corrupt")
        return self.dataset[i]


def evaluate_on_one_of_two(rank: int, world: int, port: int, shapes: str, out: str, case: str) -> None:
    """An evaluation in which only rank 1 reads a broken image ("broken"), or only rank 0 is asked to stop, at its
    first image, with shares of 2 and 1 images ("stop"); each process writes down what it raised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_distributed(True, device="cpu")
    val = CocoDetection(shapes, "val", train=False)
    data = SecondImageBroken(val) if case == "broken" else Subset(val, [0, 1, 0])
    try:
        evaluate(build_model("tiny_hourglass", 4), data, InferenceConfig(), torch.device("cpu"), num_workers=0,
                 progress=False, stop=(lambda: rank == 0) if case == "stop" else None)
    except (DataError, EvaluationStopped) as e:
        (Path(out) / f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    dist.cleanup()


@pytest.mark.parametrize("case, raised", [("broken", "DataError: val image 1 is corrupt"),
                                          ("stop", "EvaluationStopped: evaluation stopped by a stop request")])
def test_an_evaluation_error_or_stop_on_one_process_is_raised_on_every_process(shapes_dir, tmp_path, case, raised):
    """Only one process reads the broken image, or is asked to stop; the other must not wait for it in the gather of
    the results (a hang until the process group's timeout) but raise the same, so that train.py can save the epoch on
    every process and each process exits with the error, or stops."""
    processes = mp.spawn(evaluate_on_one_of_two, args=(2, free_port(), str(shapes_dir), str(tmp_path), case),
                         nprocs=2, join=False)
    for process in processes.processes:
        process.join(timeout=120)
    hung = [p for p in processes.processes if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == [raised] * 2


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """What DDP guarantees: the averaged gradients of N processes with B / N images each equal the gradients of one
    process with B. Float sums in another order differ by a few ulps of the largest terms, so each tensor is
    compared within 1e-4 of its largest gradient (float32 eps is 1.2e-7); a missing or doubled all-reduce
    would be off by ~50%. The loss terms every process logs are the mean over the processes of its own terms, each
    normalised by its images' objects (one per image): those of the whole batch, within 1e-4 relative (each object
    count has 1e-4 added, --count_eps: 2.5e-5 relative between counts of 2 and 4); without the division by the
    number of processes they would be twice as large."""
    mp.spawn(one_step_gradients, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    one_step_gradients(0, 1, free_port(), str(tmp_path))
    one = torch.load(tmp_path / "world1_rank0.pt")
    ranks = [torch.load(tmp_path / f"world2_rank{r}.pt") for r in range(2)]
    # The global batch is the same images: rank r holds every 2nd image of the single process's batch.
    torch.testing.assert_close(torch.stack([ranks[i % 2]["images"][i // 2] for i in range(4)]), one["images"],
                               rtol=0, atol=0)
    nonzero = 0
    for k, g in one["grads"].items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][k], g, rtol=0, atol=1e-4 * float(g.abs().max()), msg=k)
        nonzero += int(bool(g.abs().max() > 0))
    assert nonzero > 0.9 * len(one["grads"])
    assert set(one["terms"]) >= {"loss", "focal", "pull", "push", "off"} and one["terms"]["loss"] > 0
    for r in ranks:
        assert r["terms"] == pytest.approx(one["terms"], rel=1e-4)


def test_each_process_draws_its_own_augmentation(tmp_path):
    """Every image of one split is the same photo: crops that differ between the processes' i-th samples come from
    the random draws alone (all ranks once shared one seed and drew the same crop for their i-th sample)."""
    data = same_image_split(tmp_path, copies=8)
    batches = {}
    for rank in range(2):
        progress = trainer.EpochProgress(1, epoch_order(len(data), 4, seed=317, epoch=1), 4, 0)
        sampler = EpochSampler(progress.order, 4, rank, 2)
        samples = TrainSamples(data, seed=317, epoch=1)
        batches[rank] = [samples[i] for i in sampler]
    for a, b in zip(batches[0], batches[1]):
        assert not torch.equal(a["image"], b["image"])
        assert not torch.equal(a["hm_tl"], b["hm_tl"])
    # ... and a sample's draw is the same whenever it is read again (a resumed run repeats it exactly).
    again = TrainSamples(data, seed=317, epoch=1)[int(EpochSampler(progress.order, 4, 1, 2).indices[0])]
    assert torch.equal(again["image"], batches[1][0]["image"])


def same_image_split(root: Path, copies: int) -> CocoDetection:
    write_split(root, "one", 1, seed=3, cfg=ShapesConfig(min_size=96, max_size=96, min_obj=30, max_obj=40,
                                                          max_objects=2))
    ann_file = root / "annotations" / "instances_one.json"
    data = json.loads(ann_file.read_text())
    image, anns = data["images"][0], data["annotations"]
    data["images"] = [{**image, "id": i + 1} for i in range(copies)]
    data["annotations"] = [{**a, "id": i * len(anns) + j + 1, "image_id": i + 1}
                           for i in range(copies) for j, a in enumerate(anns)]
    ann_file.write_text(json.dumps(data))
    return CocoDetection(root, "one", train=True, img_size=127)


def launch_cmd(tmp_path: Path, shapes_dir: Path, *extra: str) -> list[str]:
    return ["train.py", "--log_name", "ddp", "--ckpt_dir", str(tmp_path), "--data_dir", str(shapes_dir),
            "--train_split", "train", "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127",
            "--batch_size", "4", "--num_epochs", "1", "--num_workers", "0", "--device", "cpu", *extra]


SEED = train.get_args_parser().get_default("seed")


@pytest.fixture(scope="module")
def torchrun_run(squares_dir, fixed_box_checkpoint, tmp_path_factory) -> Path:
    """The run folder of one 2-process torchrun run of train.py (without --dist) that several tests read: 2 epochs
    of the 8 square images at a global batch of 4 (2 per process), fine-tuning the fixed-box network
    (tests/fixed_box.py) at an lr that leaves its box in place, then validating on the 3 val images. One training
    image, the first that process 1 reads, cannot be read: the budget (--max_bad_fraction 1/8 of 8) is one per
    epoch. Each process writes down its samples of each epoch to samples/ (tests/recorded_train.py)."""
    root = tmp_path_factory.mktemp("torchrun")
    data = root / "data"
    shutil.copytree(squares_dir, data)
    first_of_rank1 = EpochSampler(epoch_order(8, 4, SEED, epoch=1), 4, rank=1, world_size=2).indices[0]
    bad = data / "train" / CocoDetection(data, "train", train=True, img_size=127).images[first_of_rank1]["file_name"]
    bad.write_bytes(b"not an image")
    (root / "samples").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tests.recorded_train", "--log_name", "ddp", "--ckpt_dir", str(root), "--data_dir", str(data),
           "--train_split", "train", "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127",
           "--batch_size", "4", "--num_epochs", "2", "--val_interval", "0", "--num_workers", "0", "--device", "cpu",
           "--pretrained", str(fixed_box_checkpoint), "--lr", "1e-7", "--max_bad_fraction", "0.125"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAMPLES_DIR": str(root / "samples")}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "ddp"


def test_torchrun_without_dist_trains_one_ddp_run(torchrun_run):
    state = load_checkpoint(torchrun_run / "checkpoint.pt")
    assert state["epoch"] == 2 and not state["args"]["dist"]
    log = (torchrun_run / "train.log").read_text()
    assert "--dist implied" in log and "2 process(es)" in log and log.count("starting a new run") == 1


def test_validation_of_two_processes_scores_every_image_once(torchrun_run, squares_dir):
    """The val AP of the 2-process run is that of its checkpoint evaluated by one process: 1.0, each square found
    (Adam moves each weight by about the lr, 1e-7, at each of the 4 steps). A process evaluating another's share
    instead of its own would leave an image out and another twice, and the AP at about 2/3."""
    model = build_model("tiny_hourglass", 1)
    model.load_state_dict(load_checkpoint(torchrun_run / "checkpoint.pt")["model"])
    val = CocoDetection(squares_dir, "val", train=False)
    ap = evaluate(model, val, InferenceConfig(), torch.device("cpu"), num_workers=0, progress=False)["AP"]
    assert ap == 1.0
    logged = re.findall(r"^epoch 2: val AP (\S+) AP50 ", (torchrun_run / "train.log").read_text(), re.MULTILINE)
    assert logged == [f"{ap:.4f}"]


def test_every_process_validates_with_the_statistics_the_checkpoint_holds(torchrun_run):
    """After the last step each process's batch-norm running statistics hold its own images (DDP sends rank 0's
    only at the start of a training forward); the processes validated with different ones, and the logged AP, which
    picks best.pt, was not the checkpoint's (0.060 against 0.043 in a longer run)."""
    seen = [json.loads((torchrun_run.parent / "samples" / f"val_rank{r}.jsonl").read_text()) for r in (0, 1)]
    saved = {k: v.double().sum().item() for k, v in load_checkpoint(torchrun_run / "checkpoint.pt")["model"].items()
             if "running_" in k}
    assert len(saved) > 10 and seen[0] == seen[1] == saved


def test_an_unreadable_image_counts_once_over_the_processes(torchrun_run):
    """Each epoch reads the unreadable image once, in one process: each epoch logs it once, and the budget of one
    was not exceeded (counted once per process, or twice, the run would have stopped or logged none)."""
    epoch_lines = re.findall(r"^epoch \d: loss .*$", (torchrun_run / "train.log").read_text(), re.MULTILINE)
    assert len(epoch_lines) == 2 and all(line.endswith(" (1 unreadable images skipped)") for line in epoch_lines), \
        epoch_lines


def test_the_processes_share_each_epoch_and_every_epoch_has_its_order(torchrun_run):
    """Per epoch, the two processes' samples are disjoint and cover the 8 images; they are those of epoch_order
    for the run's seed and that epoch (which a resumed run computes again), so they change from epoch to epoch."""
    samples = {}
    for rank in (0, 1):
        for line in (torchrun_run.parent / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            samples[entry["epoch"], rank] = entry["samples"]
    assert sorted(samples) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for epoch in (1, 2):
        shares = [samples[epoch, 0], samples[epoch, 1]]
        assert sorted(shares[0] + shares[1]) == list(range(8)), f"epoch {epoch}: {shares}"
        order = epoch_order(8, 4, SEED, epoch)
        assert shares == [EpochSampler(order, 4, rank, 2).indices for rank in (0, 1)], f"epoch {epoch}"
    assert samples[1, 0] + samples[1, 1] != samples[2, 0] + samples[2, 1]


def test_a_batch_the_processes_cannot_share_is_refused_before_anything_is_created(shapes_dir, tmp_path):
    """--batch_size 3 on 2 processes: refused on each, before the run folder (was after building the model and
    writing train.log and a tensorboard file)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *launch_cmd(tmp_path, shapes_dir, "--batch_size", "3")]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: --batch_size 3 must be divisible by the number of processes (2)") == 2
    assert not (tmp_path / "ddp").exists()


def test_the_legacy_launcher_starts_train_py_too(shapes_dir, tmp_path):
    """README: `python -m torch.distributed.launch --nproc_per_node N train.py --dist ...` works too. It passes
    --local-rank=N to each process; both processes take it and join one group of 2, as their refusal of
    --batch_size 3 shows (before any training, which keeps this test short)."""
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port",
           str(free_port()), *launch_cmd(tmp_path, shapes_dir, "--dist", "--batch_size", "3")]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert "unrecognized arguments" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("error: --batch_size 3 must be divisible by the number of processes (2)") == 2, \
        result.stderr[-3000:]
    assert not (tmp_path / "ddp").exists()


def two_nodes(port: int, *node_args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two torchrun "nodes" on this machine (--nnodes 2, one process each), node r running train.py with
    node_args[r], as two machines of a multi-node run would."""
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, args in enumerate(node_args)]
    results = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # waiting in a collective the other node never reaches
            for other in nodes:
                other.kill()
            pytest.fail("a node did not end within 120 s")
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return results


def test_nodes_started_with_different_flags_are_refused_on_each_before_anything_is_created(shapes_dir, tmp_path):
    """Node 1 given another --batch_size (and --lr): it trained 4 steps of 1 image where node 0 trained 2 of 2,
    without a word, then the nodes waited for each other for ever. Paths (here --data_dir spelled otherwise) and
    --num_workers may differ."""
    base = launch_cmd(tmp_path, shapes_dir, "--dist")
    other = [*launch_cmd(tmp_path, shapes_dir / ".." / shapes_dir.name), "--batch_size", "2", "--lr", "2e-3",
             "--num_workers", "1"]
    nodes = two_nodes(free_port(), base, other)
    expected = ("error: the processes of this run were given different flags: --lr 0.0005 on rank 0, 0.002 on rank 1; "
                "--batch_size 4 on rank 0, 2 on rank 1. Start every node with the same flags (only paths and "
                "--num_workers may differ)")
    for node in nodes:
        assert node.returncode != 0 and expected in node.stderr.splitlines(), node.stderr[-3000:]
    assert not (tmp_path / "ddp").exists()


def test_nodes_reading_different_copies_of_the_data_are_refused_on_each_before_anything_is_created(shapes_dir,
                                                                                                    tmp_path):
    """Node 1's copy of the data set (its own --data_dir, as a node without a shared file system has) lacks two of
    the 8 training images: its process took 1 step per epoch where node 0's took 2, and died in the mismatched
    all-reduce (gloo: `terminate called after throwing an instance of 'gloo::EnforceNotMet'`) with only a `Connection
    reset by peer` in train.log."""
    copy = tmp_path / "copy"
    shutil.copytree(shapes_dir, copy)
    ann_file = copy / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    kept = {image["id"] for image in data["images"][:6]}
    data["images"] = data["images"][:6]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    ann_file.write_text(json.dumps(data))
    nodes = two_nodes(free_port(), launch_cmd(tmp_path, shapes_dir), launch_cmd(tmp_path, copy))
    expected = ("error: the processes of this run read different inputs: training images 8 on rank 0, 6 on rank 1. "
                "Every node must read the same files (on a shared file system, or identical copies)")
    for node in nodes:
        assert node.returncode != 0 and expected in node.stderr.splitlines(), node.stderr[-3000:]
    assert not (tmp_path / "ddp").exists()


FAILS_ONCE = """
import os, runpy, signal, sys
from pathlib import Path
from engine import trainer
from utils import dist
signal.alarm(150)  # a process that waits for a group that never forms ends (SIGALRM's default), and torchrun too
train_one_epoch = trainer.train_one_epoch

def fails_once(model, loader, optimizer, scaler, device, amp, progress, *args, **kwargs):
    failed = Path(os.environ["FAILED_ONCE"])
    if dist.rank() == 1 and progress.epoch == 2 and not failed.exists():
        failed.touch()
        raise RuntimeError("process 1 fails once")
    return train_one_epoch(model, loader, optimizer, scaler, device, amp, progress, *args, **kwargs)

trainer.train_one_epoch = fails_once
sys.argv[0] = os.path.join(os.getcwd(), "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_torchrun_restarts_a_failed_run_and_it_resumes(shapes_dir, tmp_path):
    """README's `torchrun --max-restarts N ... --resume`: process 1 fails once at the start of epoch 2; torchrun
    starts both processes again, which resume after epoch 1 and end the run. The restarted processes joined the
    group under the keys the failed ones had left in torchrun's store, which outlives them, read their addresses
    and failed to connect ("Gloo connectFullMesh failed") or waited for them: in 3 of 4 restarts of a bare
    torch script; which process joins first decides it (the next test is the deterministic one)."""
    script = tmp_path / "fails_once.py"
    script.write_text(FAILS_ONCE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "1", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(script), *launch_cmd(tmp_path, shapes_dir, "--num_epochs", "2",
                                                                       "--val_interval", "0", "--resume")[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FAILED_ONCE": str(tmp_path / "failed")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    err = proc.stderr
    assert proc.returncode == 0 and (tmp_path / "failed").exists(), err[-3000:]
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert "process 1 fails once" in err and f"resuming {tmp_path / 'ddp' / 'checkpoint.pt'}" in log
    assert len(re.findall(r"^epoch 1: loss", log, re.MULTILINE)) == 1
    assert len(re.findall(r"^epoch 2: loss", log, re.MULTILINE)) == 1
    assert load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["epoch"] == 2


def test_a_process_other_than_rank_0_that_fails_puts_its_own_error_in_train_log(shapes_dir, tmp_path):
    """Process 1 fails at the start of epoch 2 (no restart): rank 0 sees only its peer's disconnect, a Gloo error,
    and train.log held only that; the cause was on process 1's console alone. Process 1's line, written before its
    end broke the connection, comes before rank 0's, and the lines rank 0 wrote before stay whole."""
    script = tmp_path / "fails_once.py"
    script.write_text(FAILS_ONCE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), *launch_cmd(tmp_path, shapes_dir, "--num_epochs", "2", "--val_interval", "0")[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FAILED_ONCE": str(tmp_path / "failed")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "RuntimeError: process 1 fails once" in proc.stderr, proc.stderr[-3000:]
    lines = (tmp_path / "ddp" / "train.log").read_text().splitlines()
    assert "rank 1: error: RuntimeError: process 1 fails once" in lines, lines
    cause = lines.index("rank 1: error: RuntimeError: process 1 fails once")
    assert lines[cause + 1] == f"the run's last save, {tmp_path / 'ddp' / 'checkpoint.pt'}, is intact"
    assert lines[cause + 2].startswith("rank 0: error: ")  # the disconnect, in the backend's words
    assert lines[0] == f"starting a new run in {tmp_path / 'ddp'}" and re.match(r"epoch 1: loss \d", lines[cause - 1])


def test_each_torchrun_attempt_joins_its_group_under_its_own_keys(monkeypatch):
    """torchrun's store outlives the processes of a failed attempt: what the group of a restarted attempt writes
    there (each process's address) must not be read as the failed attempt's, nor the other way round."""
    shared, stores = torch.distributed.HashStore(), []
    monkeypatch.setattr(dist.dist, "rendezvous", lambda url: iter([(shared, 0, 2)]))
    monkeypatch.setattr(dist.dist, "init_process_group", lambda backend, store=None, **kw: stores.append(store))
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    for attempt in (0, 1):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        assert dist.init_distributed(True, device="cpu")
        stores[-1].set("rank_0", f"address of attempt {attempt}")
    assert [store.get("rank_0") for store in stores] == [b"address of attempt 0", b"address of attempt 1"]


def test_srun_variables_start_a_two_process_run(shapes_dir, tmp_path):
    """Two local processes with the variables srun sets (and no torchrun ones) join one gloo group."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(OMP_NUM_THREADS="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2",
                   SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="77", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *launch_cmd(tmp_path, shapes_dir, "--dist")], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "2 process(es)" in (tmp_path / "ddp" / "train.log").read_text()
    assert load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["epoch"] == 1


def test_srun_variables_give_the_steps_first_node_and_a_port_of_the_job_id(monkeypatch):
    """README "SLURM": rank, world size and local rank from srun's variables; the master is the first node of the
    srun step (which may hold fewer nodes than the job), on MASTER_PORT when set, else on 20000 + job id % 20000,
    so that two jobs sharing a node take different ports."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_STEP_NUM_TASKS="4", SLURM_NTASKS="16",
               SLURM_JOB_NODELIST="gpu[07-08]", SLURM_STEP_NODELIST="gpu[08]", SLURM_JOB_ID="123456")
    monkeypatch.setattr(os, "environ", env)  # what the function sets goes into this copy, not into later tests
    assert dist.launched()
    dist.slurm_to_torchrun_env()
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu08", "MASTER_PORT": "23456"}
    del env["MASTER_PORT"]
    env["SLURM_JOB_ID"] = "123457"
    dist.slurm_to_torchrun_env()
    assert env["MASTER_PORT"] == "23457"
    env["MASTER_PORT"] = "29400"
    dist.slurm_to_torchrun_env()
    assert env["MASTER_PORT"] == "29400"


def test_first_host_of_a_slurm_node_list():
    assert dist.first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert dist.first_host("node7,node8") == "node7"
    assert dist.first_host("a-b[100]") == "a-b100"
    assert dist.first_host("127.0.0.1") == "127.0.0.1"


@pytest.mark.parametrize("given, missing", [({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT"),
                                            ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT")])
def test_world_size_without_a_launchers_other_variables_is_a_one_line_error(monkeypatch, given, missing):
    """WORLD_SIZE set by hand (or left in the shell) without RANK was taken for srun's environment: a RuntimeError
    traceback saying that srun started several tasks, outside SLURM; with RANK, a traceback too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", {**env, **given})
    with pytest.raises(UserError, match=f"^the environment sets WORLD_SIZE=2 but not {missing}, which a launcher"):
        dist.init_distributed(True, device="cpu")
    assert not dist.is_dist()


def sent_in_first_gather(main, args, monkeypatch):
    """What `main(args)` sends in its first gather as a process of a distributed run: what another process, given
    `args`, sends to this one in a run that a test plays with one process."""
    class Sent(Exception):
        pass

    def stop(values):
        raise Sent(values)

    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "_holders", 0)
    with monkeypatch.context() as gathering:
        gathering.setattr(dist, "all_gather_object", stop)
        with pytest.raises(Sent) as sent:
            main(args)
    return sent.value.args[0]


def test_a_path_given_on_some_nodes_only_is_refused(shapes_dir, tmp_path, monkeypatch):
    """Paths may differ between the nodes, not whether they are given: --pretrained on rank 0 alone made it read
    the file in a gather that rank 1 never joined (it went on to DistributedDataParallel's own collective)."""
    rank_1 = sent_in_first_gather(train.main, args_for(shapes_dir, tmp_path / "ckpt"), monkeypatch)
    monkeypatch.setattr(dist, "all_gather_object", lambda values: [values, rank_1])
    with pytest.raises(ArgumentError, match=r"given different flags: --pretrained 'given' on rank 0, 'not given' on "
                                            r"rank 1\. Start"):
        train.main(args_for(shapes_dir, tmp_path / "ckpt", "--pretrained", str(tmp_path / "elsewhere.pt")))
    assert list(tmp_path.iterdir()) == []


def test_data_that_one_process_cannot_read_stops_every_process_before_anything_is_created(shapes_dir, tmp_path,
                                                                                         monkeypatch):
    """A node without the data (or with another --data_dir) failed alone: the others built the network, opened
    train.log and stopped at their first collective, whose `Connection closed by peer` was all their train.log held.
    Tried with two torchrun nodes on this machine; here the gather of a 2-process run is played by one process,
    rank 1 reporting its error."""
    elsewhere = DataError("/elsewhere: data directory not found")
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, elsewhere])
    with pytest.raises(DataError, match=r"^rank 1: /elsewhere: data directory not found$"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    assert list(tmp_path.iterdir()) == []


def test_a_node_reading_an_older_checkpoint_to_resume_is_refused(shapes_dir, monkeypatch):
    """--resume on nodes that do not share the run folder: node 1's copy of checkpoint.pt, two steps behind, set its
    processes at another epoch and step than rank 0's. The gather of a 2-process run is played by one process."""
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "all_gather_object", lambda values: [values, {**values, "checkpoint.pt steps": 2}])
    train_set = CocoDetection(shapes_dir, "train", train=True, img_size=127)
    val_set = CocoDetection(shapes_dir, "val", train=False)
    with pytest.raises(DataError, match=r"read different inputs: checkpoint\.pt steps 4 on rank 0, 2 on rank 1\. "):
        trainer.check_same_input(train_set, val_set, {"global_step": 4})
