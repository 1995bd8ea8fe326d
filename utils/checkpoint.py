"""Checkpoints: one dict per file, written atomically (utils/files.py), read with errors that name the file.

A training checkpoint holds `model`, `optimizer`, `scheduler`, `scaler`, `epoch` (the last finished epoch),
`position` (None at an epoch's end; mid-epoch: the epoch, the optimizer steps done in it and its sample order,
see utils/sampler.py), `global_step`, `best_ap`, `loss_sums` (the running sums of the epoch's loss terms),
`args` (the flags, a dict), `model_config` (the network's constructor arguments, so that the checkpoint still
builds after the architecture table in nets/ changes) and `class_names`. `test.py` and `demo.py` need only
`model`, `args` (or `model_config`) and `class_names`.
"""
import pickle
import zipfile
from pathlib import Path

import torch

from utils.errors import CheckpointError, MissingFileError
from utils.files import atomic_write


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Writes `state` to `path` atomically; a failed write raises WriteError and keeps the old file."""
    atomic_write(path, lambda f: torch.save(state, f))


def is_torch_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a file that torch.save wrote: a zip archive with a data.pkl, or (the legacy format) a
    pickle stream. Tools that write other files refuse to replace it, even with --force."""
    path = Path(path)
    if not path.is_file():
        return False
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # pickle protocol 2 and later


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by `save_checkpoint`; a missing, truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first_line = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({first_line})") \
            from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a centernet47 checkpoint: expected a dict with a 'model' entry")
    return state


def load_inference_checkpoint(path: str | Path) -> dict:
    """The checked load of test.py, demo.py and tools/export_onnx.py: a checkpoint with `model`, `args` (a dict
    with `arch` and `img_size`) and `class_names`. A missing, corrupt or incomplete file is a user error naming it."""
    state = load_checkpoint(path, map_location="cpu")
    saved = state.get("args")
    if not isinstance(saved, dict) or "class_names" not in state:
        raise CheckpointError(f"{path}: expected 'args' (a dict) and 'class_names' entries in the checkpoint")
    for name in ("arch", "img_size"):
        if name not in saved:
            raise CheckpointError(f"{path}: checkpoint args lack '{name}'")
    return state
