"""Run logging on the main process: a plain text log, tensorboardX scalars, and the console; the line that ends a
failed process, from every process."""
import contextlib
import os
from pathlib import Path

from tensorboardX import SummaryWriter

from utils import dist
from utils.errors import UserError, WriteError
from utils.files import make_folder


class RunLogger:
    """Writes to `run_dir/train.log` and tensorboard files in `run_dir`; does nothing when `enabled` is False
    (every process but rank 0), so callers need no rank checks, except that `failed` adds the line of any process.
    `purge_step`, for a resumed run: TensorBoard drops the earlier files' events from that step on, logged after the
    checkpoint by the run that stopped, which the resumed run logs again (two values per step otherwise)."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self.log_path = run_dir / "train.log"
        self.writer = None
        if enabled:
            make_folder(run_dir, "run folder")
            try:
                self.text = open(self.log_path, "a", buffering=1)
            except OSError as e:
                raise WriteError(f"cannot write {self.log_path}: {e.strerror or e}") from None
            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)
            self.text.write(message + "\n")

    def failed(self, error: BaseException) -> None:
        """Writes the error that ends this process to train.log only (the console shows it already): the one line of
        a user error (utils.errors.UserError), a second Ctrl-C, else the exception of a bug, whose traceback goes to
        stderr. Under several processes each one that fails adds its own line, starting with its rank: the others
        see only a peer's disconnect (a Gloo or NCCL error), and the cause would be on the failed process's console
        alone. It is written before that process's end breaks the connections, so it precedes their lines."""
        if isinstance(error, KeyboardInterrupt):
            line = "interrupted (Ctrl-C twice): stopped at once, without saving"
        elif isinstance(error, UserError):
            line = f"error: {error}"
        else:
            line = f"error: {type(error).__name__}: {error}"
        if dist.world_size() > 1:
            line = f"rank {dist.rank()}: {line}"
        if self.enabled:
            self.text.write(line + "\n")
        else:
            append_line(self.log_path, line)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.enabled:
            for name, value in values.items():
                self.writer.add_scalar(prefix + name, value, step)

    def images(self, tag: str, images: list, step: int) -> None:
        """(H, W, 3) uint8 RGB images, logged as `tag/0`, `tag/1`, ..."""
        if self.enabled:
            for i, image in enumerate(images):
                self.writer.add_image(f"{tag}/{i}", image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.text.close()


def append_line(path: Path, line: str) -> None:
    """Adds `line` at the end of the file `path` in one write. O_APPEND puts each write at the end of the file as it
    is then (rank 0's open(..., "a") too), so the lines of several processes neither interleave nor overwrite each
    other on a local file system. A file not there is left so: rank 0 creates the log with the run folder, and a
    process on a node that does not share the folder has no log to add to. A failed write is let go: this
    process's own error is on its way to the console, and must not be replaced by that of the log."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
