"""Checkpoints: one dict per file, written atomically so an interrupted save never leaves a half-written file.

A training checkpoint holds `model`, `optimizer`, `scheduler`, `scaler`, `epoch` (the last finished epoch),
`best_ap`, `args` (a dict: arch, num_classes, img_size, ...) and `class_names`. `test.py` and `demo.py` need only
`model`, `args` and `class_names`.
"""
import os
import tempfile
from pathlib import Path

import torch


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Writes `state` to `path` through a temporary file in the same folder, then renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by `save_checkpoint`; a missing or unreadable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a centernet47 checkpoint: expected a dict with a 'model' entry")
    return state


def load_inference_checkpoint(path: str | Path) -> dict:
    """The checked load of test.py, demo.py and tools/export_onnx.py: a checkpoint with `model`, `args` (a dict
    with `arch` and `img_size`) and `class_names`. A missing, corrupt or incomplete file ends the program with one
    line naming it."""
    try:
        state = load_checkpoint(path, map_location="cpu")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    except RuntimeError as e:
        cause = str(e.__cause__ or e).split(". ")[0]
        raise SystemExit(f"{path}: cannot read the checkpoint, the file is truncated or corrupt ({cause})") from None
    saved = state.get("args")
    if not isinstance(saved, dict) or "class_names" not in state:
        raise SystemExit(f"{path}: expected 'args' (a dict) and 'class_names' entries in the checkpoint")
    for name in ("arch", "img_size"):
        if name not in saved:
            raise SystemExit(f"{path}: checkpoint args lack '{name}'")
    return state
