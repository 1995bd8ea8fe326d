"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

The data go to a temporary file `NAME.XXXXXXXX.tmp` in the same folder, are flushed to disk, get the mode of a
normally created file (`mkstemp` makes them 0600) and are renamed over NAME. A failed write removes the temporary
file, leaves NAME as it was and raises `WriteError` with the operating system's reason in plain words.
A process killed mid-write can leave a temporary file behind: `remove_stale_temporaries` clears them.

Writers that must name their own temporary file (OpenCV's video writer picks the container from the suffix) use
`pid_temporary`, `.NAME.PID.tmpSUFFIX`, and clear those of processes that no longer run with `remove_dead_temporaries`.
"""
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable

from utils.errors import ArgumentError, UserError, WriteError


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: torch.save reports a failed write as a RuntimeError about its zip writer, with
    the OSError of the file object in its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Calls `write(f)` on a binary file object, then puts the result at `path` atomically (see the module)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        cause = _os_error(e)
        if cause is None:
            raise
        reason = "no space left on device" if cause.errno == errno.ENOSPC else (cause.strerror or str(cause))
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path}: {reason} ({kept})") from e
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Makes the rename itself durable (a power cut right after it keeps the new file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj) -> None:
    """`obj` as json at `path`, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode()))


def make_folder(path: str | Path, flag: str) -> Path:
    """Creates folder `path` (and its parents) if needed; WriteError naming `flag` and the reason otherwise (a file
    in the way, no permission, a read-only file system)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"{flag} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        next(path.iterdir(), None)  # a folder that cannot be listed cannot be checked for earlier outputs either
    except OSError as e:
        raise WriteError(f"{flag} {path}: cannot create or read the folder ({e.strerror or e})") from e
    return path


def file_to_write(text: str, flag: str, example: str) -> Path:
    """The file to write that `flag` gives as `text`; a folder is an ArgumentError suggesting the file `example` in
    it. So is a path that ends in a separator, which names a folder: Path() drops the separator, and the file would be
    written under the folder's name (`--out ckpt/run/` made a file `ckpt/run`)."""
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise ArgumentError(f"{flag} {text} {'is' if path.is_dir() else 'names'} a folder; give the file to "
                            f"write, such as {path / example}")
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether writing `a` would write over `b`: the same path after resolving symlinks, or one file under two
    names (hard links)."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def remove_stale_temporaries(folder: str | Path, name: str) -> list[Path]:
    """Deletes the temporary files that an interrupted `atomic_write` of `folder/name` left; returns them."""
    stale = sorted(Path(folder).glob(f"{name}.*.tmp")) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink()
    return stale


def pid_temporary(path: str | Path) -> Path:
    """The hidden temporary file of this process for `path`, in its folder and with its suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_temporaries(path: str | Path) -> list[Path]:
    """Deletes the `pid_temporary` files of `path` whose process no longer runs on this machine (killed before it
    could clean up); returns them. Those of running processes (another run writing the same file) stay."""
    path = Path(path)
    prefix, end = f".{path.stem}.", f".tmp{path.suffix}"
    stale = []
    for p in sorted(path.parent.glob(glob.escape(prefix) + "*" + glob.escape(end))):
        pid = p.name[len(prefix):len(p.name) - len(end)]
        if pid.isdigit() and not _running(int(pid)):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


def write_coco_split(out: Path, split: str, fill: Callable[[Path], dict], replace: bool = False) -> dict:
    """`write_coco_splits` for one split; returns its json dict."""
    return write_coco_splits(out, {split: fill}, replace)[split]


def write_coco_splits(out: Path, fills: dict[str, Callable[[Path], dict]], replace: bool = False,
                      report: Callable[[str, dict], None] = lambda split, data: None) -> dict[str, dict]:
    """Data set splits in COCO layout, all or none: `fills` maps each split's name to its `fill(folder)`, which puts
    the images in the (hidden) folder it is given and returns the json dict. Every split is made before any is put
    in place, so a failure while making them (the long part: a full disk, Ctrl-C) leaves `out` as it was, with an
    earlier data set that `replace` would replace. Then each folder is renamed to out/<split> (over one there only
    when `replace`: the rename fails on a folder of files), annotations/instances_<split>.json written and
    `report(split, data)` called; a failure there removes the splits this call put in place, which would make the
    same command refuse to run again. Returns {split: json dict}; an OSError is a WriteError naming the split."""
    made, placed, split = {}, [], None
    try:
        for split, fill in fills.items():
            tmp = out / f".{split}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
            tmp.mkdir(parents=True)
            made[split] = fill(tmp)
        for split, data in made.items():
            folder = out / split
            if replace and folder.exists():
                shutil.rmtree(folder)
            (out / f".{split}.tmp").rename(folder)
            placed.append(split)  # ours from here on; a folder made by someone else after the caller's checks stays
            write_json(out / "annotations" / f"instances_{split}.json", data)
            report(split, data)
    except BaseException as error:
        for name in fills:
            shutil.rmtree(out / f".{name}.tmp", ignore_errors=True)
        for name in placed:
            shutil.rmtree(out / name, ignore_errors=True)
            (out / "annotations" / f"instances_{name}.json").unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, UserError):
            raise WriteError(f"cannot write split {split!r} into {out}: {error.strerror or error}") from error
        raise
    return made
