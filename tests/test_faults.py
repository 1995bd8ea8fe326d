"""Faults a long run meets, injected for real where a test can: SIGTERM and kill -9 to a running train.py, a write
that the kernel refuses (file size limit), a full disk, truncated checkpoints and unreadable training images.
Each test states what must survive."""
import contextlib
import errno
import importlib.util
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from datasets.shapes import ShapesConfig, write_split
from utils import files
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError, DataError, WriteError
from utils.stopping import CheckpointTimer, StopSignals

ROOT = Path(__file__).resolve().parents[1]
# test.py by path: a plain `import test` could find the standard library's `test` package
_spec = importlib.util.spec_from_file_location("centernet47_test_cli", ROOT / "test.py")
test_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cli)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    cfg = ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40, max_objects=3)
    write_split(out, "train", 8, seed=2, cfg=cfg)
    write_split(out, "val", 1, seed=2, cfg=cfg)
    return out


def train_cmd(shapes_dir: Path, ckpt_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--log_name", "run", "--ckpt_dir", str(ckpt_dir), "--data_dir",
            str(shapes_dir), "--train_split", "train", "--val_split", "val", "--arch", "tiny_hourglass",
            "--img_size", "127", "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--lr", "1e-3",
            "--lr_step", "1", "--val_interval", "0", "--num_epochs", "2", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0, poll: float = 0.001) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, "timed out"
        time.sleep(poll)


def test_sigterm_then_kill_9_then_resume_ends_bit_identical_to_an_uninterrupted_run(shapes_dir, tmp_path):
    """Run B gets SIGTERM in its first epoch (it finishes the step, saves its exact position and exits 143), is
    resumed with a checkpoint every step and killed with SIGKILL while a save is being written, and is resumed
    again to the end: its weights equal those of run A, which ran straight through (4 steps an epoch)."""
    straight = subprocess.run(train_cmd(shapes_dir, tmp_path / "a"), cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "b" / "run"
    proc = start(train_cmd(shapes_dir, tmp_path / "b"))
    wait_for(lambda: (run / "train.log").is_file() and "tiny_hourglass (centernet) at epoch 1" in (run / "train.log").read_text(),
             proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Resume with the same command plus --resume" in out
    position = load_checkpoint(run / "checkpoint.pt")["position"]
    assert position["epoch"] == 1 and 1 <= position["step"] <= 4

    proc = start(train_cmd(shapes_dir, tmp_path / "b", "--resume", "--ckpt_interval", "1e-9"))
    first = (run / "checkpoint.pt").stat().st_mtime_ns
    wait_for(lambda: (run / "checkpoint.pt").stat().st_mtime_ns != first, proc)
    wait_for(lambda: any(run.glob("checkpoint.pt.*.tmp")), proc)
    proc.kill()
    proc.communicate()
    left_behind = sorted(run.glob("checkpoint.pt.*.tmp"))
    load_checkpoint(run / "checkpoint.pt")  # the last complete checkpoint is intact

    resumed = subprocess.run(train_cmd(shapes_dir, tmp_path / "b", "--resume"), cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(run.glob("*.tmp")) and all(f"removed {p}" in resumed.stdout for p in left_behind)
    a = load_checkpoint(tmp_path / "a" / "run" / "checkpoint.pt")
    b = load_checkpoint(run / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])


def test_ctrl_c_asks_for_a_stop_and_a_second_ctrl_c_stops_at_once():
    """README: Ctrl-C, as SIGTERM, makes the run finish its step, save and exit 130; a second Ctrl-C stops at once
    (KeyboardInterrupt, which train.log records: tests/test_train.py). The caller's handlers come back after."""
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs in this thread between two bytecodes: at once, in practice
            if signals.received:
                break
            time.sleep(0.01)
        assert signals.received == "SIGINT" and signals.exit_status == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the handler raises in this thread before this ends
    assert signal.getsignal(signal.SIGINT) is previous


def test_ckpt_interval_0_saves_at_epoch_ends_only():
    """README: a checkpoint every --ckpt_interval minutes inside an epoch (default 20); 0: only at epoch ends."""
    assert train.get_args_parser().get_default("ckpt_interval") == 20
    for minutes, due in ((20, True), (0, False)):
        timer = CheckpointTimer(minutes)
        timer.last -= 24 * 3600  # a day since the last save
        assert timer.due() is due, minutes


def test_a_write_the_kernel_refuses_stops_the_run_with_one_line_and_keeps_the_checkpoint(shapes_dir, tmp_path):
    """The resumed run may write no file above 1 MB (RLIMIT_FSIZE: the kernel fails the write with EFBIG, as a
    full disk fails it with ENOSPC); its first save fails."""
    first = subprocess.run(train_cmd(shapes_dir, tmp_path, "--num_epochs", "1"), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))

    limited = subprocess.run(train_cmd(shapes_dir, tmp_path, "--resume"), cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=600, preexec_fn=limit_file_size)
    assert limited.returncode == 1
    last_line = limited.stderr.strip().splitlines()[-1]
    assert last_line == f"error: cannot write {ckpt}: File too large (the previous file is intact)"
    assert "Traceback" not in limited.stderr
    assert ckpt.read_bytes() == before and not any(ckpt.parent.glob("*.tmp"))


class FullDisk:
    """A file object whose writes fail with ENOSPC after `room` bytes, as on a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_is_said_plainly_and_the_old_checkpoint_stays(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), room=100))
    with pytest.raises(WriteError) as e:
        save_checkpoint(path, {"model": {"w": torch.zeros(100000)}})
    assert str(e.value) == f"cannot write {path}: no space left on device (the previous file is intact)"
    assert path.read_bytes() == before  # byte-identical, as under the kernel's EFBIG above
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_truncated_or_foreign_checkpoints_are_clear_errors_naming_the_file(shapes_dir, tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "epoch": 1})
    data = path.read_bytes()
    for broken in (data[:len(data) // 2], b"", b"not a checkpoint at all"):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}: the file is truncated or corrupt"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match=str(path)):
            train.main(train.get_args_parser().parse_args(train_cmd(shapes_dir, tmp_path, "--resume")[2:]))
        with pytest.raises(CheckpointError, match=str(path)):
            test_cli.main(test_cli.get_args_parser().parse_args(["--ckpt", str(path), "--data_dir", str(shapes_dir),
                                                                 "--val_split", "val", "--device", "cpu"]))
    save_checkpoint(path, [1, 2, 3])
    with pytest.raises(CheckpointError, match="is not a centernet47 checkpoint"):
        load_checkpoint(path)


def test_an_unreadable_training_image_is_skipped_and_too_many_stop_the_run(tmp_path):
    data = tmp_path / "data"
    write_split(data, "train", 8, seed=4, cfg=ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40))
    write_split(data, "val", 1, seed=4, cfg=ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40))
    bad = sorted((data / "train").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:200])  # a JPEG cut short

    def args(ckpt: str, *extra: str):
        return train.get_args_parser().parse_args(train_cmd(data, tmp_path / ckpt, "--batch_size", "4",
                                                            "--num_epochs", "1", *extra)[2:])

    with pytest.warns(UserWarning, match=f"skipping a training image that cannot be used: {bad}"):
        train.main(args("tolerant", "--max_bad_fraction", "0.2"))
    log = (tmp_path / "tolerant" / "run" / "train.log").read_text()
    assert "(1 unreadable images skipped)" in log
    with pytest.raises(DataError, match="1 training images of epoch 1 could not be read"), pytest.warns(UserWarning):
        train.main(args("strict"))
    assert not (tmp_path / "strict" / "run" / "checkpoint.pt").exists()
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str((tmp_path / "strict" / "run" / "train.log").resolve()) not in open_files  # closed on the error too

    # On the console each skipped image is one line (as a UserWarning it came with the file, line and source line
    # of the warnings.warn call), also from a loader worker process.
    console = subprocess.run(train_cmd(data, tmp_path / "console", "--batch_size", "4", "--num_epochs", "1",
                                       "--num_workers", "1"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert console.returncode == 1, console.stderr[-3000:]
    assert console.stderr.count(f"warning: skipping a training image that cannot be used: {bad}: cannot decode") == 1
    assert "warnings.warn" not in console.stderr and "UserWarning" not in console.stderr


def open_when_read(pipe: Path, proc: subprocess.Popen, timeout: float = 240.0):
    """The named pipe `pipe` opened for writing once a process has opened it to read; an assertion error, not a
    hang, when `proc` ends first or nothing reads it in time."""
    end = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no process reads it
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, f"timed out: nothing read {pipe}"
        time.sleep(0.01)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "wb")


def test_sigterm_to_the_whole_job_during_validation_saves_the_epoch_for_resume_to_validate(tmp_path):
    """SIGTERM to the process group (srun's and scancel's, torchrun's to its workers) while validation reads its
    images in loader workers: the workers died of it, the run ended in their RuntimeError and the epoch just trained
    was lost ("the run ended before its first save"). Now the workers ignore it, as the training loader's do, and
    the validation stops at the next image (a launcher kills what has not stopped soon: torchrun after 30 s): the
    epoch is saved marked for validation and the run exits 143; --resume validates it first, also after the last
    epoch. The last val image is a named pipe, so that the signal arrives while a worker is blocked reading it."""
    data = tmp_path / "data"
    cfg = ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40, max_objects=3)
    write_split(data, "train", 4, seed=2, cfg=cfg)
    last = data / "val" / write_split(data, "val", 5, seed=2, cfg=cfg)["images"][-1]["file_name"]
    image_bytes = last.read_bytes()
    last.unlink()
    os.mkfifo(last)
    log = tmp_path / "run" / "train.log"

    def run(*stop_at_read: bool, resume: bool = False) -> int:
        """A run validating after each epoch; at each read of the pipe, SIGTERM first where `stop_at_read` says."""
        proc = start(train_cmd(data, tmp_path, "--num_workers", "1", "--batch_size", "4", "--val_interval", "1",
                               *(["--resume"] if resume else [])), start_new_session=True)
        for stop in stop_at_read:
            pipe = open_when_read(last, proc)  # a loader worker is reading the image: validation runs
            last.unlink()  # the next read opens a new pipe (this reader holds this one until its end)
            os.mkfifo(last)
            if stop:
                os.killpg(proc.pid, signal.SIGTERM)
                time.sleep(1)  # the signal reaches every process of the group before the worker's read returns
            with contextlib.suppress(BrokenPipeError), pipe:  # a worker the signal killed closed its end
                pipe.write(image_bytes)
        err = proc.communicate(timeout=300)[1]
        assert "Traceback" not in err, err[-3000:]
        return proc.returncode

    assert run(True) == 128 + signal.SIGTERM
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["position"] is None and state["validation_pending"]
    assert "stopped by SIGTERM at epoch 1's validation; saved" in log.read_text()
    assert "val AP" not in log.read_text()

    assert run(False, True, resume=True) == 128 + signal.SIGTERM  # epoch 1's validation, then epoch 2's
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 2 and state["validation_pending"]
    assert "epoch 1: val AP" in log.read_text() and "epoch 2: val AP" not in log.read_text()

    assert run(False, resume=True) == 0  # epoch 2's validation: the run is complete
    assert not load_checkpoint(tmp_path / "run" / "checkpoint.pt").get("validation_pending")
    assert "epoch 2: val AP" in log.read_text()
