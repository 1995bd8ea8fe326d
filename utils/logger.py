"""Run logging on the main process: a plain text log, tensorboardX scalars, and the console."""
from pathlib import Path

from tensorboardX import SummaryWriter

from utils.errors import UserError, WriteError
from utils.files import make_folder


class RunLogger:
    """Writes to `run_dir/train.log` and tensorboard files in `run_dir`; does nothing when `enabled` is False
    (every process but rank 0), so callers need no rank checks."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            make_folder(run_dir, "run folder")
            try:
                self.text = open(run_dir / "train.log", "a", buffering=1)
            except OSError as e:
                raise WriteError(f"cannot write {run_dir / 'train.log'}: {e.strerror or e}") from None
            self.writer = SummaryWriter(str(run_dir))

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)
            self.text.write(message + "\n")

    def failed(self, error: BaseException) -> None:
        """Writes the error that ends the run to train.log only (the console shows it already): the one line of a
        user error (utils.errors.UserError), a second Ctrl-C, else the exception of a bug, whose traceback goes to
        stderr."""
        if self.enabled:
            if isinstance(error, KeyboardInterrupt):
                self.text.write("interrupted (Ctrl-C twice): stopped at once, without saving\n")
            elif isinstance(error, UserError):
                self.text.write(f"error: {error}\n")
            else:
                self.text.write(f"error: {type(error).__name__}: {error}\n")

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
