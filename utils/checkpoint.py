"""Checkpoints: one dict per file, written atomically (utils/files.py), read with errors that name the file.

A training checkpoint holds `model`, `optimizer`, `scheduler`, `scaler`, `epoch` (the last finished epoch),
`position` (None at an epoch's end; mid-epoch: the epoch, the optimizer steps done in it, its sample order (see
datasets/sampling.py) and the running sums of its loss terms), `global_step`, `best_ap`, `validated` (at an
epoch's end: whether that epoch was validated), `validation_pending`
(only in one saved because the epoch's validation failed or was stopped: --resume runs it first),
`args` (the flags, a dict: read it with `saved_args`), `model_config` (the network's constructor arguments, so
that the checkpoint still builds after the architecture table in nets/ changes), `class_names` and
`category_ids` (the data set's id of each class). `test.py`, `demo.py` and tools/export_onnx.py need only `model`,
`args` (with `arch` and `img_size`) and `class_names` (`load_inference_checkpoint`); they build the network from
`model_config` where it is present.

Safety: every file the project reads with torch (our checkpoints, --pretrained, --resume, the official .pkl)
goes through `read_plain`, torch.load(weights_only=True), which rebuilds tensors, numbers, strings and containers
of them and nothing else, so that no file, whoever made it, can run code when it is opened. `save_checkpoint`
writes only those types. A file holding other Python objects (an argparse.Namespace, numpy scalars) is refused
with `UnsafeCheckpointError`; tools/upgrade_checkpoint.py converts one that you trust, once. Nor can a file fill
the memory before it is checked: a zip member that torch.save would not write (compressed, or claiming more bytes
than the file has) is refused before it is read, and an args.img_size above MAX_IMG_SIZE before an input of that
size is made.
"""
import io
import pickle
import pickletools
import reprlib
import warnings
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from utils.checks import are_distinct_ids
from utils.errors import ArgumentError, CheckpointError, MissingFileError, UnsafeCheckpointError
from utils.files import atomic_write

PLAIN_LEAVES = (str, bytes, bool, int, float, type(None))  # exact types: numpy's float64 subclasses float
PLAIN_CONTAINERS = (dict, OrderedDict, Counter, list, tuple, set)  # those weights-only loading rebuilds
# Names a weights-only pickle may hold: torch's tensor rebuilders and storages, and the containers above.
PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "collections.Counter", "builtins.set", "_codecs.encode")
UPGRADE = "python tools/upgrade_checkpoint.py --src {path} --out NEW.pt"
# The largest args.img_size a checkpoint may hold (train.py refuses more): readers build inputs of that side, which
# a crafted value of 10**9 would make a memory bomb. It is also the default --max_size of tools/export_onnx.py.
MAX_IMG_SIZE = 2047


def first_non_plain(value, where: str = "state") -> str | None:
    """`where[key]...: type` of the first object inside `value` that is not a tensor, a plain number, string or
    None, or a list, tuple, set or dict of those; None when there is none."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_LEAVES:
        return None
    if type(value) not in PLAIN_CONTAINERS:
        return f"{where}: {type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, dict):
        items = [(k, f"{where}, key {k!r}") for k in value] + [(v, f"{where}[{k!r}]") for k, v in value.items()]
    else:
        items = [(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return next(filter(None, (first_non_plain(v, w) for v, w in items)), None)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Writes `state` to `path` atomically; a failed write raises WriteError and keeps the old file. A value that
    weights-only loading could not read back is a bug: TypeError naming it, before anything is written."""
    where = first_non_plain(state)
    if where is not None:
        raise TypeError(f"{path}: a checkpoint holds tensors, numbers, strings, lists and dicts only, got {where}")
    atomic_write(path, lambda f: torch.save(state, f))


def is_torch_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a file that torch.save wrote: a zip archive with a data.pkl, or (the legacy format) a
    pickle stream that starts with torch's magic number. Tools that write other files refuse to replace it, even
    with --force. A file that cannot be opened raises OSError."""
    path = Path(path)
    if not path.is_file():
        return False
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return data_pickle(archive) in archive.namelist()
        except Exception:  # a damaged zip structure fails with whatever error it leads to
            return False
    return starts_with_legacy_magic(path)


def data_pickle(archive: zipfile.ZipFile) -> str:
    """The member torch.load unpickles: data.pkl in the folder of the archive's first record."""
    first = archive.namelist()[0] if archive.namelist() else ""
    return f"{first.split('/', 1)[0]}/data.pkl" if "/" in first else "data.pkl"


def starts_with_legacy_magic(path: Path) -> bool:
    """Whether the first pickle in `path` is torch's magic number, as in every file of torch's legacy format (a
    plain pickle of other data is not a checkpoint). Read by pickletools, which runs no code."""
    with open(path, "rb") as f:
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name not in ("PROTO", "FRAME"):
                    return op.name.startswith("LONG") and arg == torch.serialization.MAGIC_NUMBER
        except Exception:  # bytes that do not parse as a pickle: not this format
            return False
    return False


def first_damaged_member(path: Path) -> str | None:
    """The first file inside torch's zip format whose bytes do not match its CRC-32 (bits flipped on a disk or in a
    copy), which torch.load does not check: it would load the damaged tensor as it is. None for an intact file and
    for the legacy format, which has no checksums, and for members written without one. Reading a 200 MB checkpoint
    took 0.06 s."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.CRC == 0:  # written without checksums (torch's compute_crc32 setting off)
                    continue
                try:
                    with archive.open(member) as f:  # zipfile compares the CRC-32 once the member is read
                        while f.read(1 << 20):
                            pass
                except zipfile.BadZipFile:
                    return member.filename
    except Exception as e:  # a damaged zip structure fails with whatever error it leads to
        return f"its zip structure ({type(e).__name__}: {e})"
    return None


def first_expanding_member(path: Path) -> str | None:
    """Why the first member of torch's zip format that torch.save would not write is refused: one compressed (it
    stores all of them uncompressed) or claiming more bytes than the whole archive holds, either of which could
    expand a small file into gigabytes when read; None when there is none, and for the legacy format. Reads the
    archive's directory only."""
    if not zipfile.is_zipfile(path):
        return None
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.compress_type != zipfile.ZIP_STORED:
                    return f"its member {member.filename} is compressed with zip method {member.compress_type}"
                if member.file_size > size:
                    return (f"its member {member.filename} claims {member.file_size} bytes, more than the {size} "
                            "of the whole file")
    except Exception as e:  # a damaged zip structure fails with whatever error it leads to
        return f"its zip structure is damaged ({type(e).__name__}: {e})"
    return None


def pickled_globals(path: Path) -> set[str] | None:
    """The classes and functions (`module.name`) that the pickle of a torch file names, read by pickletools, which
    parses opcodes and runs none; None when not even one pickle parses (a corrupt file)."""
    if not is_torch_checkpoint(path):
        return None
    found, parsed = set(), False
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                stream = io.BytesIO(archive.read(data_pickle(archive)))
        else:
            stream = io.BytesIO(path.read_bytes())
        size = len(stream.getbuffer())
        while stream.tell() < size:  # the legacy format: several pickles in a row, then raw storage bytes
            pushed, memo = [], {}  # protocol 4 pushes module and name (or memo copies of them) before STACK_GLOBAL
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):  # INST: protocol 0's class and instance in one opcode
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.add(".".join(map(str, pushed[-2:])))
                if op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name.endswith("PUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name.endswith("GET"):
                    pushed.append(memo.get(arg))
                elif op.name != "FRAME":
                    pushed.append(arg if op.name.endswith(("UNICODE", "STRING")) else None)
            parsed = True
    except Exception:  # corrupt bytes end the parse with whatever error they lead to
        pass
    return found if parsed else None


def why_not_torch(path: Path) -> str:
    """Why `path`, which is not a file of torch.save, cannot be read: an empty file says so, and a web page (a
    download that saved the server's error, sign-in or confirmation page instead of the weights) what to do."""
    if path.stat().st_size == 0:
        return "the file is truncated or corrupt: it is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 byte order mark, then blanks
    if head.startswith(b"<"):
        return (f"the file is a web page (HTML or XML: it starts with {head[:15].decode(errors='replace')!r}), not "
                "weights: the download saved the server's page instead of the file; download it again (in a "
                "browser if the site shows a confirmation page)")
    return ("the file is truncated or corrupt, or not a file of torch.save at all (neither its zip archive nor its "
            "legacy format, which starts with torch's magic number; a plain pickle, say)")


def refuse_onnx_as_checkpoint(ckpt: str, instead: str | None = None) -> None:
    """An ArgumentError for an exported .onnx file given as --ckpt, which the checkpoint reader would call truncated
    or corrupt, saying what to do `instead` (by default what test.py and demo.py take: pass it as --onnx)."""
    if Path(ckpt).suffix.lower() == ".onnx":
        raise ArgumentError(f"--ckpt {ckpt} is an ONNX file; {instead or f'pass it as --onnx {ckpt}'}")


def check_regular_file(path: Path, what: str, expected: str = "") -> None:
    """Refuses a `path` that is not a regular file before it is read, naming it as `what`: a folder (with the
    `expected` hint), FIFO, socket or device is a CheckpointError, a path with nothing there a MissingFileError."""
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file{expected}")
    if path.exists() and not path.is_file():  # a FIFO would block the read until a writer comes
        raise CheckpointError(f"{what} {path} is not a regular file (a FIFO, socket or device)")
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")


def read_plain(path: str | Path, map_location: str | torch.device = "cpu", what: str = "checkpoint"):
    """The content of a file of torch.save, read weights-only: tensors, numbers, strings and containers of them.
    A missing, truncated or corrupt file is a CheckpointError naming it; one that holds other objects an
    UnsafeCheckpointError naming them, and how to convert it if it is trusted."""
    path = Path(path)
    check_regular_file(path, what)
    try:
        torch_file = is_torch_checkpoint(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if not torch_file:
        raise CheckpointError(f"cannot read {what} {path}: {why_not_torch(path)}")
    expanding = first_expanding_member(path)
    if expanding is not None:
        raise CheckpointError(f"cannot read {what} {path}: the file is truncated or corrupt, or not written by "
                              f"torch.save ({expanding}, which torch.save never writes and reading could fill the "
                              "memory)")
    damaged = first_damaged_member(path)
    if damaged is not None:
        raise CheckpointError(f"cannot read {what} {path}: the file is truncated or corrupt ({damaged} does not "
                              "match its checksum)")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols above 2, which it reads or refuses below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names = pickled_globals(path)
        if names is None:
            raise CheckpointError(f"cannot read {what} {path}: the file is truncated or corrupt (not a pickle)") \
                from None
        refused = sorted(name for name in names if not name.startswith(PLAIN_GLOBALS))
        detail = ", ".join(refused) or next((line.strip() for line in str(e).splitlines() if "Unsupported" in line),
                                            "pickle features beyond plain data")
        raise UnsafeCheckpointError(
            f"{path} holds Python objects other than tensors, numbers, strings, lists and dicts ({detail}); reading "
            f"them could run code, so it is refused. If you trust where the file comes from (e.g. a checkpoint of an "
            f"older centernet47), convert it once: {UPGRADE.format(path=path)}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except Exception as e:  # corrupt bytes meet the unpickler with whatever error they lead to
        first_line = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {what} {path}: the file is truncated or corrupt ({first_line})") \
            from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by `save_checkpoint`; a missing, truncated, unsafe or foreign file is a clear
    error."""
    state = read_plain(path, map_location)
    if not isinstance(state, dict) or "model" not in state:
        # The official weights are such a bare state dict: the reader has skipped the conversion step.
        bare = isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
        hint = ("; it holds weights alone (a state dict, as the official CenterNet and CornerNet .pkl files do): "
                "convert official weights first with tools/convert_official.py") if bare else ""
        raise CheckpointError(f"{path} is not a centernet47 checkpoint: expected a dict with a 'model' entry{hint}")
    if not isinstance(state.get("args", {}), dict):
        raise CheckpointError(f"{path}: expected 'args' (a dict) in the checkpoint, got "
                              f"{type(state['args']).__name__}")
    return state


def saved_args(state: dict) -> dict:
    """The run's arguments stored in a checkpoint (`args`, a dict of flag values); {} when it has none."""
    return state.get("args", {})


def check_network_args(state: dict, path: str | Path) -> None:
    """Refuses (CheckpointError) a checkpoint whose args lack the network's arch (a string) or img_size (a whole
    number from 1 to MAX_IMG_SIZE), which every reader builds the network from."""
    saved = saved_args(state)
    for name, kind in (("arch", str), ("img_size", int)):
        if name not in saved:
            raise CheckpointError(f"{path}: checkpoint args lack '{name}'")
        if not isinstance(saved[name], kind):
            raise CheckpointError(f"{path}: checkpoint args hold {name} {saved[name]!r}, expected a {kind.__name__}")
    if not 1 <= saved["img_size"] <= MAX_IMG_SIZE:
        raise CheckpointError(f"{path}: checkpoint args hold img_size {saved['img_size']}, expected a side from 1 to "
                              f"{MAX_IMG_SIZE} pixels")


def check_class_names(state: dict, path: str | Path) -> None:
    """Refuses (CheckpointError) a checkpoint whose `class_names` are not a list of strings, which readers count
    and print."""
    names = state["class_names"]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"{path}: expected 'class_names' to be a list of strings, got {reprlib.repr(names)}")


def load_inference_checkpoint(path: str | Path) -> dict:
    """The checked load of test.py, demo.py and tools/export_onnx.py: a checkpoint with `model`, `args` (a dict
    with `arch` and `img_size`) and `class_names`. A missing, corrupt or incomplete file is a user error naming it."""
    state = load_checkpoint(path, map_location="cpu")
    if "args" not in state or "class_names" not in state:
        raise CheckpointError(f"{path}: expected 'args' (a dict) and 'class_names' entries in the checkpoint")
    check_network_args(state, path)
    check_class_names(state, path)
    ids = state.get("category_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(state["class_names"])
                            or not are_distinct_ids(ids)):
        raise CheckpointError(f"{path}: expected 'category_ids' to list one whole number per class "
                              f"({len(state['class_names'])}), each within 64 bits and none twice, got {ids!r}")
    return state
