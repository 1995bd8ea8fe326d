"""Converts, once, a checkpoint that the project's readers refuse because it holds Python objects beyond plain data
(an older centernet47's run flags as an argparse.Namespace, numbers as numpy scalars, arrays, paths) into one
that they read: the same weights and values, as tensors, numbers, strings, lists and dicts.

    python tools/upgrade_checkpoint.py --src old/checkpoint.pt --out ckpt/NAME/checkpoint.pt

The risk: unpickling --src in full runs whatever code its pickle names, as torch.load(weights_only=False) does.
So, unless --trust says you trust the file completely (one you wrote, or from a source you would run a program
from), it is read with torch's weights-only unpickler, allowed besides tensors and plain data only what older
checkpoints held (argparse.Namespace, numpy arrays, scalars and dtypes, paths): that unpickler builds those and
sets their state, and refuses any other name and any operation on a function or class, so a crafted file runs
nothing. With --trust it is unpickled in full: the one place in the project that reads a file that way, and only
after weights-only reading refused it. Every other reader (utils/checkpoint.py) refuses all such files.

The result is written atomically. An existing --out is replaced only with --force, and never the input unless
--out names it and --force is given. --category_ids adds the data set's category id of each class to a checkpoint
written before checkpoints stored them (needed for COCO results: `Detections.to_coco`); in one that holds ids, other
ids replace them, and the list of changes says so.
"""
import argparse
import pathlib
import pickle
import re
import sys
from pathlib import Path, PurePath

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from utils.checkpoint import PLAIN_CONTAINERS, PLAIN_LEAVES, check_regular_file, load_checkpoint, save_checkpoint
from utils.checks import is_id
from utils.errors import CheckpointError, UnsafeCheckpointError, UserError, run_cli
from utils.files import file_to_write, same_file

SHOWN = 10  # changes listed
# Python's pathlib classes, named in pickles by the module that defines them: pathlib up to Python 3.12,
# pathlib._local after (WindowsPath is left out: it cannot be built on Linux, nor PosixPath on Windows).
PATH_CLASSES = (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path,
                pathlib.PosixPath if sys.platform != "win32" else pathlib.WindowsPath)


def old_checkpoint_globals() -> list[tuple[object, str]]:
    """The classes and functions, with the names pickles give them, that older checkpoints held beyond plain data
    and `to_plain` converts: each builds data and does nothing else. Numpy 1 and 2 pickle its array and scalar
    rebuilders under numpy.core and numpy._core."""
    reconstruct, scalar = np.zeros(0).__reduce__()[0], np.float64(0).__reduce__()[0]
    found = [(argparse.Namespace, "argparse.Namespace"), (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    dtypes = {type(np.dtype(code)) for code in np.typecodes["All"]}  # numpy 2's np.dtypes.Float64DType, ...
    found += [(kind, f"{kind.__module__}.{kind.__name__}") for kind in dtypes]
    found += [(kind, f"{module}.{kind.__name__}") for kind in PATH_CLASSES for module in ("pathlib", "pathlib._local")]
    return found


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("convert a trusted old checkpoint to plain data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the checkpoint to convert (an older centernet47's, or one you trust)")
    p.add_argument("--out", required=True, help="the checkpoint to write")
    p.add_argument("--category_ids", help="comma-separated category id of each class, in the order of its "
                                          "class_names, for a checkpoint that has none")
    p.add_argument("--force", action="store_true", help="replace an existing --out (the input too, if --out is it)")
    p.add_argument("--trust", action="store_true", help="read --src in full even where its pickle names objects "
                   "older checkpoints never held (it could run any code)")
    return p


def to_plain(value, where: str, changes: list[str]):
    """`value` with every Namespace, numpy value and path replaced by its plain equivalent, noting each kind of
    change in `changes`; anything else that is not plain is an error naming `where` it is."""
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_LEAVES:
        return value
    if isinstance(value, argparse.Namespace):
        changes.append(f"{where}: {kind} -> dict")
        return to_plain(vars(value), where, changes)
    if isinstance(value, np.generic):
        changes.append(f"{where}: {kind} -> {type(value.item()).__name__}")
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype != object:
        changes.append(f"{where}: {kind} -> tensor")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, PurePath):
        changes.append(f"{where}: {kind} -> str")
        return str(value)
    if isinstance(value, dict):
        items = [(to_plain(k, f"{where}, key {k!r}", changes), to_plain(v, f"{where}[{k!r}]", changes))
                 for k, v in value.items()]
        converted = dict(items)
        return type(value)(converted) if type(value) in PLAIN_CONTAINERS else converted
    if isinstance(value, (list, tuple, set)):
        converted = [to_plain(v, f"{where}[{i}]", changes) for i, v in enumerate(value)]
        return next(t for t in (list, tuple, set) if isinstance(value, t))(converted)
    raise CheckpointError(f"{where} is a {kind}, which has no plain equivalent; the checkpoint cannot be converted")


def read_trusted(path: Path, trust: bool) -> dict:
    """The checkpoint at `path`: weights-only when it can be (no risk), else with what older checkpoints held too,
    or unpickled in full when `trust` is given (see the module)."""
    try:
        return load_checkpoint(path)
    except UnsafeCheckpointError:
        print(f"{path} holds objects beyond plain data: reading it "
              + ("in full, as a file you trust" if trust else "with what older checkpoints held"))
    try:
        if trust:
            state = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(old_checkpoint_globals()):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = next((line.strip() for line in str(e).splitlines() if "nsupported" in line), "")
        what = f"names {named[1]}, which no checkpoint of ours held" if named else \
            f"holds pickle operations no checkpoint of ours held ({reason or 'on objects beyond plain data'})"
        raise UnsafeCheckpointError(f"{path} {what}: reading it in full could run code, so it is refused. Only if "
                                    "you trust the file completely, pass --trust") from None
    except Exception as e:  # a class the file names may no longer exist, or its bytes be corrupt
        raise CheckpointError(f"cannot read {path} in full either: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a centernet47 checkpoint: expected a dict with a 'model' dict")
    return state


def parse_category_ids(text: str, class_names: list[str]) -> list[int]:
    try:
        ids = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--category_ids: expected comma-separated whole numbers, got {text!r}") from None
    if not all(map(is_id, ids)):  # the checkpoint's readers would refuse it
        raise UserError(f"--category_ids: expected ids within 64 bits, got {text!r}")
    if len(ids) != len(class_names) or len(set(ids)) != len(ids):
        raise UserError(f"--category_ids: expected {len(class_names)} different ids, one per class "
                        f"({', '.join(class_names)}), got {text!r}")
    return ids


def main(args: argparse.Namespace) -> list[str]:
    """Writes the converted checkpoint; returns the changes made (also printed)."""
    src, out = Path(args.src), file_to_write(args.out, "--out", "checkpoint.pt")
    check_regular_file(src, "--src", "; give the checkpoint file to convert")
    if out.exists() and not args.force:
        what = "is the input" if same_file(out, src) else "exists"
        raise UserError(f"--out {out} {what}; choose another path or pass --force to replace it")
    changes: list[str] = []
    state = to_plain(read_trusted(src, args.trust), "checkpoint", changes)
    if args.category_ids:
        ids, held = parse_category_ids(args.category_ids, list(state.get("class_names", []))), state.get("category_ids")
        if ids != held:  # a checkpoint that holds ids has them replaced, which the list of changes must say
            changes.append(f"checkpoint['category_ids']: {'added' if held is None else f'{held} replaced by'} {ids}")
        state["category_ids"] = ids
    save_checkpoint(out, state)
    shown = changes[:SHOWN] + ([f"... and {len(changes) - SHOWN} more"] if len(changes) > SHOWN else [])
    for line in shown or ["nothing to change: the checkpoint was plain data already"]:
        print(f"  {line}")
    print(f"{src} -> {out}")
    return changes


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
