"""Converts, once, a checkpoint that the project's readers refuse because it holds Python objects beyond plain data
(an older centernet47's run flags as an argparse.Namespace, numbers as numpy scalars, arrays, paths) into one
that they read: the same weights and values, as tensors, numbers, strings, lists and dicts.

    python tools/upgrade_checkpoint.py --src old/checkpoint.pt --out ckpt/NAME/checkpoint.pt

The risk: reading --src in full runs whatever code its pickle names, as torch.load(weights_only=False) does. It
is the one place in the project that reads a file that way, and only after weights-only reading refused it. Even
then the unpickler finds no more than what older checkpoints held (argparse.Namespace, numpy arrays, scalars and
dtypes, paths: each rebuilds data and does nothing else): the first name beyond them stops the reading before it is
looked up, so nothing it names runs, unless --trust says you trust the file completely (one you wrote, or from a
source you would run a program from). Every other reader (utils/checkpoint.py) refuses all such files, so opening a
checkpoint from anyone else runs no code.

The result is written atomically. An existing --out is replaced only with --force, and never the input unless
--out names it and --force is given. --category_ids adds the data set's category id of each class to a checkpoint
written before checkpoints stored them (needed for COCO results: `Detections.to_coco`).
"""
import argparse
import pickle
import re
import sys
from pathlib import Path, PurePath

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from utils.checkpoint import PLAIN_CONTAINERS, PLAIN_LEAVES, load_checkpoint, save_checkpoint
from utils.errors import CheckpointError, UnsafeCheckpointError, UserError, run_cli
from utils.files import same_file

SHOWN = 10  # changes listed
# The names a checkpoint's pickle may hold for it to be read in full without --trust, each rebuilding data and doing
# nothing else: torch's tensor rebuilders, storages and dtypes, plain containers, and what older checkpoints held
# beyond plain data and `to_plain` converts (flags, numpy values, paths). Exact names: "torch." alone would let in
# torch.load, torch.hub.load and others that run code.
READABLE = re.compile(
    r"torch\._utils\._rebuild_(tensor|tensor_v2|parameter|parameter_with_state)|torch\.(storage\.)?\w+Storage|"
    r"torch\.(float|double|half|bfloat16|float16|float32|float64|uint8|int8|int16|int32|int64|short|int|long|bool)|"
    r"torch\.Size|collections\.(OrderedDict|Counter)|builtins\.set|_codecs\.encode|"
    r"argparse\.Namespace|numpy\.(_core|core)\.multiarray\.(_reconstruct|scalar)|numpy\.ndarray|numpy\.dtype|"
    r"numpy\.dtypes\.\w+DType|pathlib\.(_local\.)?(Pure)?(Posix|Windows)?Path")


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


class UnknownGlobal(pickle.UnpicklingError):
    """A pickle names a class or function that READABLE does not hold."""


class ReadableUnpickler(pickle.Unpickler):
    """An unpickler that finds only what READABLE names: the allowlist holds where the objects are built, whatever
    a listing of the pickle (which a crafted file can cut short) would say."""

    def find_class(self, module: str, name: str):
        if not READABLE.fullmatch(f"{module}.{name}"):
            raise UnknownGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class ReadablePickle:
    """The pickle module torch.load reads the file with when it is not trusted: it subclasses `Unpickler` and calls
    `load` for the small pickles of the legacy format."""
    Unpickler = ReadableUnpickler

    @staticmethod
    def load(file, **kwargs):
        return ReadableUnpickler(file, **kwargs).load()


def read_trusted(path: Path, trust: bool) -> dict:
    """The checkpoint at `path`: weights-only when it can be (no risk), else unpickled in full (see the module),
    finding only what older checkpoints held unless `trust` is given."""
    try:
        return load_checkpoint(path)
    except UnsafeCheckpointError:
        print(f"{path} holds objects beyond plain data: reading it in full"
              + (", as a file you trust" if trust else ", finding only what older checkpoints held"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=None if trust else
                           ReadablePickle)
    except UnknownGlobal as e:
        raise UnsafeCheckpointError(
            f"{path} names {e}, which no checkpoint of ours held: reading it in full could run code, so it is "
            "refused. Only if you trust the file completely, pass --trust") from None
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
    if len(ids) != len(class_names) or len(set(ids)) != len(ids):
        raise UserError(f"--category_ids: expected {len(class_names)} different ids, one per class "
                        f"({', '.join(class_names)}), got {text!r}")
    return ids


def main(args: argparse.Namespace) -> list[str]:
    """Writes the converted checkpoint; returns the changes made (also printed)."""
    src, out = Path(args.src), Path(args.out)
    if not src.is_file():
        raise UserError(f"--src {src}: no such file")
    if out.exists() and not args.force:
        what = "is the input" if same_file(out, src) else "exists"
        raise UserError(f"--out {out} {what}; choose another path or pass --force to replace it")
    changes: list[str] = []
    state = to_plain(read_trusted(src, args.trust), "checkpoint", changes)
    if args.category_ids:
        state["category_ids"] = parse_category_ids(args.category_ids, list(state.get("class_names", [])))
        changes.append(f"checkpoint['category_ids']: added {state['category_ids']}")
    save_checkpoint(out, state)
    shown = changes[:SHOWN] + ([f"... and {len(changes) - SHOWN} more"] if len(changes) > SHOWN else [])
    for line in shown or ["nothing to change: the checkpoint was plain data already"]:
        print(f"  {line}")
    print(f"{src} -> {out}")
    return changes


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
