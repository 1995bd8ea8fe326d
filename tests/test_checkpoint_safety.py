"""No file the project reads can run code: a checkpoint whose pickle calls os.system is refused on every path that
opens one, before the call can happen; checkpoints hold plain data only; an old checkpoint with Python objects
(argparse.Namespace, numpy scalars and arrays) converts once, explicitly, to the same values."""
import argparse
import ast
import fractions
import importlib.util
import io
import os
import pickle
import random
import re
import sys
import threading
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
import train
from engine import Detector
from nets import build_model, model_config, model_from_checkpoint, network_on_meta
from tools import convert_official, export_onnx, upgrade_checkpoint
from utils.checkpoint import load_checkpoint, load_inference_checkpoint, pickled_globals, read_plain, save_checkpoint
from utils.errors import CheckpointError, MissingFileError, UnsafeCheckpointError, UserError

REPO = Path(__file__).resolve().parents[1]
RACCOON = Path(__file__).parent / "data" / "raccoon"
_spec = importlib.util.spec_from_file_location("centernet47_test_cli", REPO / "test.py")
test_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cli)


class Payload:
    """Unpickled in full, this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path: Path, marker: Path, kind: str) -> Path:
    """A checkpoint with every entry a reader wants, and the payload beside them, in torch's zip format, its
    legacy format, or as a plain pickle (protocol 4, as a .pkl of other code would be)."""
    state = {"model": {}, "args": {"arch": "tiny_hourglass", "img_size": 127}, "class_names": ["a"],
             "note": Payload(marker)}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(state, protocol=4))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=kind == "zip")
    return path


def train_args(shapes_dir: Path, ckpt_dir: Path, *extra: str) -> argparse.Namespace:
    return train.get_args_parser().parse_args([
        "--log_name", "run", "--ckpt_dir", str(ckpt_dir), "--data_dir", str(shapes_dir), "--train_split", "train",
        "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127", "--batch_size", "2",
        "--num_workers", "0", "--device", "cpu", "--num_epochs", "1", *extra])


def resume_from(path: Path, shapes_dir: Path, tmp: Path):
    (tmp / "ckpt" / "run").mkdir(parents=True)
    path.replace(tmp / "ckpt" / "run" / "checkpoint.pt")
    train.main(train_args(shapes_dir, tmp / "ckpt", "--resume"))


READERS = {
    "load_checkpoint": lambda path, data, tmp: load_checkpoint(path),
    "Detector": lambda path, data, tmp: Detector.from_checkpoint(path, device="cpu"),
    "test.py": lambda path, data, tmp: test_cli.main(test_cli.get_args_parser().parse_args(
        ["--ckpt", str(path), "--data_dir", str(data), "--val_split", "val", "--device", "cpu"])),
    "demo.py": lambda path, data, tmp: demo.main(demo.get_args_parser().parse_args(
        ["--ckpt", str(path), "--images", str(RACCOON / "val"), "--out", str(tmp / "out"), "--device", "cpu"])),
    "export_onnx.py": lambda path, data, tmp: export_onnx.main(export_onnx.get_args_parser().parse_args(
        ["--ckpt", str(path), "--out", str(tmp / "model.onnx")])),
    "convert_official.py": lambda path, data, tmp: convert_official.main(convert_official.get_args_parser().parse_args(
        ["--src", str(path), "--arch", "small_hourglass", "--out", str(tmp / "converted.pt")])),
    "train.py --pretrained": lambda path, data, tmp: train.main(
        train_args(data, tmp / "ckpt", "--pretrained", str(path))),
    "train.py --resume": lambda path, data, tmp: resume_from(path, data, tmp),
}


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("reader", list(READERS))
def test_a_checkpoint_that_would_run_code_is_refused_on_every_path_and_runs_nothing(shapes_dir, tmp_path, reader,
                                                                                     kind):
    marker = tmp_path / "ran"
    path = write_malicious(tmp_path / "evil.pt", marker, kind)
    with pytest.raises(Exception) as refused:
        READERS[reader](path, shapes_dir, tmp_path)
    assert not marker.exists()
    if kind == "pickle":  # not torch's format at all, so not offered for conversion either
        assert type(refused.value) is CheckpointError and "not a file of torch.save" in str(refused.value)
    else:
        assert isinstance(refused.value, UnsafeCheckpointError) and re.search(
            r"\(posix\.system\); reading them could run code, so it is refused.*python tools/upgrade_checkpoint.py "
            "--src ", str(refused.value))
    assert not (tmp_path / "ckpt" / "run" / "train.log").exists()  # refused before the run started


UNPICKLERS = {"torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "torch.hub.load",
              "torch.hub.load_state_dict_from_url"}


def unpickling_calls() -> list[str]:
    """`file function weights_only=...` of each call of an unpickler in the project's code outside tests/."""
    found = []
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith(("tests/", ".venv/", "data/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in UNPICKLERS:
                weights_only = next((ast.unparse(k.value) for k in node.keywords if k.arg == "weights_only"), None)
                found.append(f"{relative} {ast.unparse(node.func)} weights_only={weights_only}")
    return found


def test_checkpoints_are_unpickled_in_one_place():
    """README: every .pt and .pkl is read with torch.load(weights_only=True) in utils/checkpoint.py; the converter
    alone unpickles otherwise (its own restricted unpickler, or in full with --trust)."""
    assert unpickling_calls() == ["tools/upgrade_checkpoint.py torch.load weights_only=False",
                                  "tools/upgrade_checkpoint.py torch.load weights_only=True",
                                  "utils/checkpoint.py torch.load weights_only=True"]


def test_checkpoints_hold_plain_data_only(tmp_path):
    """A numpy number or a Namespace is refused before anything is written, naming where it is, so that every
    checkpoint the project writes loads weights-only."""
    path = tmp_path / "checkpoint.pt"
    for value, where in [(np.float64(0.5), r"state\['best_ap'\]: numpy.float64"),
                         ({"lr": [1e-3, argparse.Namespace()]},
                          r"state\['best_ap'\]\['lr'\]\[1\]: argparse.Namespace")]:
        with pytest.raises(TypeError, match=where):
            save_checkpoint(path, {"model": {"w": torch.ones(2)}, "best_ap": value})
        assert not path.exists()
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "best_ap": 0.5, "steps": (1, 2), "args": {"lr": None}})
    assert read_plain(path)["steps"] == (1, 2)


def test_a_corrupt_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(CheckpointError, match="the file is truncated or corrupt, or not a file of torch.save") as e:
        load_checkpoint(path)
    assert not isinstance(e.value, UnsafeCheckpointError)


def damaged_copies(data: bytes, rng: random.Random, count: int) -> list[bytes]:
    """`count` truncations of `data` and `count` copies with a few bytes changed (most within the first 4 KB,
    where the pickle and the zip headers are)."""
    copies = [data[:rng.randrange(len(data))] for _ in range(count)]
    for _ in range(count):
        changed = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            changed[rng.randrange(min(len(data), 4096) if rng.random() < 0.7 else len(data))] = rng.randrange(256)
        copies.append(bytes(changed))
    return copies


def test_no_damaged_or_foreign_file_escapes_as_anything_but_a_checkpoint_error(tmp_path):
    """Damaged bytes reach torch's unpickler and zip reader, which fail with whatever error the bytes lead to
    (KeyError, IndexError, zlib.error, ...): every one must reach the user as a CheckpointError naming the file."""
    rng = random.Random(0)
    state = {"model": build_model("tiny_hourglass", 2).state_dict(), "args": {"lr": 1e-3}, "class_names": ["a", "b"]}
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(100)]
    samples += [b"junk\n", b"hello world", b"", pickle.dumps({"a": 1}, protocol=4), pickle.dumps([1.5], protocol=2)]
    for zip_format in (True, False):
        written = io.BytesIO()
        torch.save(state, written, _use_new_zipfile_serialization=zip_format)
        samples += damaged_copies(written.getvalue(), rng, 60)
    path = tmp_path / "checkpoint.pt"
    for data in samples:
        path.write_bytes(data)
        try:
            state_read = read_plain(path)
        except CheckpointError as e:
            assert str(path) in str(e)
        else:  # a change outside what the zip's checksums cover (a header's timestamp), or the legacy format's
            assert isinstance(state_read, dict)  # raw storage, which has no checksums
            if zipfile.is_zipfile(path):
                assert state_read.keys() == state.keys() and all(
                    torch.equal(state_read["model"][k], v) for k, v in state["model"].items())


def test_bits_flipped_in_a_stored_tensor_are_found(tmp_path):
    """torch.load does not check the zip format's CRC-32s: a tensor whose bytes changed on disk would load as it is."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(10000)}, "args": {}})
    data = bytearray(path.read_bytes())
    start = data.index(bytes(4096))  # the zeros of the stored tensor
    data[start + 1000] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"truncated or corrupt \(.*/data/0 does not match its checksum\)"):
        load_checkpoint(path)


def flip_a_weight_bit(path: Path) -> str:
    """Changes one bit in the middle of the largest tensor stored in torch's zip file `path`; the member's name."""
    with zipfile.ZipFile(path) as archive:
        member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(data[member.header_offset + i:member.header_offset + i + 2], "little")
                                 for i in (26, 28))  # the local file header's two length fields
    data[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return member.filename


@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_finds_bits_flipped_in_a_stored_tensor(shapes_dir, fixed_box_checkpoint, tmp_path, reader):
    """README: every reader checks the zip format's CRC-32s and names the damaged part (a whole checkpoint here,
    which a reader that skipped the check would load and use)."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(fixed_box_checkpoint.read_bytes())
    damaged = flip_a_weight_bit(path)
    with pytest.raises(CheckpointError, match=rf"truncated or corrupt \({re.escape(damaged)} does not match its "
                                              "checksum"):
        READERS[reader](path, shapes_dir, tmp_path)


def test_a_plain_pickle_is_not_a_checkpoint_nor_offered_for_conversion(tmp_path):
    src = tmp_path / "dict.pkl"
    src.write_bytes(pickle.dumps({"model": {}, "args": {"arch": "tiny_hourglass"}}, protocol=4))
    for read in (load_checkpoint, lambda path: upgrade("--src", str(path), "--out", str(tmp_path / "new.pt"))):
        with pytest.raises(CheckpointError, match="not a file of torch.save at all .*a plain pickle") as e:
            read(src)
        assert not isinstance(e.value, UnsafeCheckpointError)
    assert not (tmp_path / "new.pt").exists()


def old_checkpoint(path: Path) -> dict:
    """What an older code wrote: the flags as a Namespace, numpy numbers, a numpy sample order, a Path."""
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 2)
    flags = argparse.Namespace(arch="tiny_hourglass", img_size=127, lr=1e-3, ckpt_dir=Path("ckpt"))
    state = {"model": model.state_dict(), "args": flags, "class_names": ["cat", "dog"], "epoch": np.int64(3),
             "best_ap": np.float64(0.25), "position": {"order": np.arange(6), "sums": {"loss": np.float32(1.5)}}}
    torch.save(state, path)
    return state


def upgrade(*argv: str) -> list[str]:
    return upgrade_checkpoint.main(upgrade_checkpoint.get_args_parser().parse_args(list(argv)))


def test_an_old_checkpoint_is_refused_then_converts_once_to_the_same_values(tmp_path):
    src, out = tmp_path / "old.pt", tmp_path / "new.pt"
    old = old_checkpoint(src)
    original = src.read_bytes()
    with pytest.raises(UnsafeCheckpointError, match=r"\(argparse.Namespace, .*numpy.*\).*convert it once: python "
                                                    f"tools/upgrade_checkpoint.py --src {src} --out NEW.pt"):
        load_checkpoint(src)
    changes = upgrade("--src", str(src), "--out", str(out), "--category_ids", "3,7")
    assert "checkpoint['args']: argparse.Namespace -> dict" in changes and src.read_bytes() == original

    new = load_checkpoint(out)
    assert new["args"] == {"arch": "tiny_hourglass", "img_size": 127, "lr": 1e-3, "ckpt_dir": "ckpt"}
    assert type(new["epoch"]) is int and new["epoch"] == 3 and type(new["best_ap"]) is float and new["best_ap"] == 0.25
    assert torch.equal(new["position"]["order"], torch.arange(6)) and new["position"]["sums"] == {"loss": 1.5}
    assert new["class_names"] == ["cat", "dog"] and new["category_ids"] == [3, 7]
    assert new["model"].keys() == old["model"].keys()
    assert all(torch.equal(new["model"][k], v) for k, v in old["model"].items())
    model_from_checkpoint(new, out)
    assert Detector.from_checkpoint(out, device="cpu").class_names == ["cat", "dog"]

    # A plain file needs no full unpickling and is left as it is.
    assert upgrade("--src", str(out), "--out", str(tmp_path / "again.pt")) == []
    assert "checkpoint['category_ids']: added [3, 7]" in changes
    # Ids a checkpoint already holds: the same ones change nothing, others are replaced and said to be (not "added").
    assert upgrade("--src", str(out), "--out", str(tmp_path / "same.pt"), "--category_ids", "3,7") == []
    assert upgrade("--src", str(out), "--out", str(tmp_path / "other.pt"), "--category_ids", "7,3") == [
        "checkpoint['category_ids']: [3, 7] replaced by [7, 3]"]
    assert load_checkpoint(tmp_path / "other.pt")["category_ids"] == [7, 3]


def test_the_converter_never_writes_over_a_file_unasked(tmp_path):
    src, out = tmp_path / "old.pt", tmp_path / "new.pt"
    old_checkpoint(src)
    original = src.read_bytes()
    with pytest.raises(UserError, match=f"--out {src} is the input; choose another path or pass --force"):
        upgrade("--src", str(src), "--out", str(src))
    out.write_bytes(b"mine")
    with pytest.raises(UserError, match=f"--out {out} exists"):
        upgrade("--src", str(src), "--out", str(out))
    with pytest.raises(UserError, match="expected 2 different ids, one per class"):
        upgrade("--src", str(src), "--out", str(tmp_path / "x.pt"), "--category_ids", "1")
    with pytest.raises(UserError, match="--category_ids: expected ids within 64 bits, got '1,18446744073709551616'"):
        upgrade("--src", str(src), "--out", str(tmp_path / "x.pt"), "--category_ids", f"1,{2**64}")
    assert src.read_bytes() == original and out.read_bytes() == b"mine" and not (tmp_path / "x.pt").exists()
    for force in ([], ["--force"]):  # it advised --force, which then failed: a file cannot replace a folder
        with pytest.raises(UserError, match=f"--out {tmp_path} is a folder; give the file to write, such as "
                                            f"{tmp_path / 'checkpoint.pt'}"):
            upgrade("--src", str(src), "--out", str(tmp_path), *force)
    with pytest.raises(CheckpointError, match=f"--src {tmp_path} is a folder, not a file; give the checkpoint file "
                                              "to convert"):
        upgrade("--src", str(tmp_path), "--out", str(tmp_path / "x.pt"))
    with pytest.raises(UserError, match=f"--out {tmp_path}/new/ names a folder; give the file to write, such as "
                                        f"{tmp_path}/new/checkpoint.pt"):  # it wrote a file named new
        upgrade("--src", str(src), "--out", f"{tmp_path}/new/")
    upgrade("--src", str(src), "--out", str(src), "--force")
    assert load_checkpoint(src)["args"]["arch"] == "tiny_hourglass"


def test_a_src_that_is_no_regular_file_is_named_as_such(tmp_path):
    """A named pipe exists: "no such file" was wrong."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(CheckpointError, match=f"--src {tmp_path / 'pipe'} is not a regular file"):
        upgrade("--src", str(tmp_path / "pipe"), "--out", str(tmp_path / "x.pt"))
    with pytest.raises(MissingFileError, match=f"--src not found: {tmp_path / 'nowhere.pt'}"):
        upgrade("--src", str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "x.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_an_object_without_a_plain_form_is_named(tmp_path):
    src = tmp_path / "odd.pt"
    torch.save({"model": {}, "extra": {"third": fractions.Fraction(1, 3)}}, src)
    with pytest.raises(UnsafeCheckpointError, match=r"names fractions\.Fraction, which no checkpoint of ours held.*"
                                                    "--trust"):  # README: a class of other code, refused untrusted
        upgrade("--src", str(src), "--out", str(tmp_path / "new.pt"))
    with pytest.raises(CheckpointError, match=r"checkpoint\['extra'\]\['third'\] is a fractions.Fraction, which "
                                              "has no plain equivalent"):
        upgrade("--src", str(src), "--out", str(tmp_path / "new.pt"), "--trust")
    assert not (tmp_path / "new.pt").exists()


def test_a_trusted_file_whose_classes_are_gone_is_a_clear_error(tmp_path, monkeypatch):
    gone = types.ModuleType("centernet47_gone_module")
    gone.Flags = type("Flags", (), {"__module__": gone.__name__})
    monkeypatch.setitem(sys.modules, gone.__name__, gone)
    src = tmp_path / "old.pt"
    torch.save({"model": {}, "args": gone.Flags()}, src)
    monkeypatch.delitem(sys.modules, gone.__name__)
    with pytest.raises(CheckpointError, match="cannot read .*old.pt in full either: ModuleNotFoundError"):
        upgrade("--src", str(src), "--out", str(tmp_path / "new.pt"), "--trust")
    assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_the_converter_runs_nothing_that_older_checkpoints_never_held_unless_trusted(tmp_path, kind):
    """Every reader's refusal points to the converter; following it with a file from someone else must not run
    their code: os.system is not what an older checkpoint held, so it is refused unless --trust is given."""
    marker = tmp_path / "ran"
    path = write_malicious(tmp_path / "evil.pt", marker, kind)
    with pytest.raises(UnsafeCheckpointError, match=r"names posix\.system, which no checkpoint of ours held.*--trust"):
        upgrade("--src", str(path), "--out", str(tmp_path / "new.pt"))
    assert not marker.exists() and not (tmp_path / "new.pt").exists()
    upgrade("--src", str(path), "--out", str(tmp_path / "new.pt"), "--trust")  # trusted, it runs: reading in full
    assert marker.exists() and load_checkpoint(tmp_path / "new.pt")["note"] == 0  # os.system's status


def test_the_converter_writes_only_a_checkpoint(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": np.float64(0), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="not a centernet47 checkpoint: expected a dict with a 'model' dict"):
        upgrade("--src", str(path), "--out", str(tmp_path / "new.pt"))
    assert not (tmp_path / "new.pt").exists()


def test_the_globals_of_a_protocol_0_pickle_are_listed_too(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, path, _use_new_zipfile_serialization=False,
               pickle_protocol=0)
    assert "argparse.Namespace" in pickled_globals(path)


class TorchSavePayload:
    """Unpickled in full, this calls torch.save, which writes `marker`: a function under "torch." that is no
    tensor rebuilder (torch.load and torch.hub.load would run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return torch.save, ({}, str(self.marker))


def with_decoy_first(path: Path) -> None:
    """Rewrites torch's zip `path` with a harmless `<prefix>/decoy_data.pkl` as its first member: torch.load still
    unpickles `<prefix>/data.pkl`."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    prefix = members[0][0].filename.split("/")[0]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/decoy_data.pkl", pickle.dumps({"model": {}}, protocol=2))
        for info, data in members:
            archive.writestr(info, data)


@pytest.mark.parametrize("payload", ["torch.save", "decoy first member"])
def test_the_converter_is_not_fooled_by_torch_functions_or_a_decoy_pickle(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    if payload == "torch.save":
        torch.save({"model": {}, "note": TorchSavePayload(marker)}, path)
    else:
        write_malicious(path, marker, "zip")
        with_decoy_first(path)
        torch.load(path, weights_only=False)  # what reading in full does: the payload runs
        assert marker.exists()
        marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="which no checkpoint of ours held.*--trust"):
        upgrade("--src", str(path), "--out", str(tmp_path / "new.pt"))
    assert not marker.exists() and not (tmp_path / "new.pt").exists()


def crafted_legacy_file(path: Path, marker: Path) -> Path:
    """A file in torch's legacy format (magic number, protocol, system info, the object, storage keys) whose object
    pickle starts with a string that is not ASCII, which stops pickletools' listing but not the unpickler, before it
    calls os.system."""
    head = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                          "type_sizes": {"short": 2, "int": 4, "long": 4}}]
    crafted = (b"S'caf\xc3\xa9'\n0(dS'model'\n(dsS'note'\ncos\nsystem\n(S'touch " + str(marker).encode()
               + b"'\ntRs.")
    path.write_bytes(b"".join(pickle.dumps(value, protocol=2) for value in head) + crafted
                     + pickle.dumps([], protocol=2))
    return path


def test_the_converter_is_not_fooled_by_a_pickle_its_listing_cannot_read_to_the_end(tmp_path):
    marker = tmp_path / "ran"
    path = crafted_legacy_file(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"holds pickle operations no checkpoint of ours held "
                                                    r"\(Unsupported operand 83\).*--trust"):
        upgrade("--src", str(path), "--out", str(tmp_path / "new.pt"))
    assert not marker.exists() and not (tmp_path / "new.pt").exists()
    upgrade("--src", str(path), "--out", str(tmp_path / "new.pt"), "--trust")  # the file does call os.system
    assert marker.exists()


def short_unicode(text: str) -> bytes:
    """Pickle's SHORT_BINUNICODE opcode pushing `text`."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def test_the_converter_sets_no_state_on_the_functions_it_allows(tmp_path):
    """Allowing names is not enough: a pickle that BUILDs state onto an allowed function (torch's tensor rebuilder:
    dump_patches and __name__), then hands it to the legacy format's 'module' persistent id, made torch write a
    .patch file of the attacker's path and text. Weights-only unpickling refuses BUILD on anything but data."""
    target = tmp_path / "written_by_pickle"
    crafted = (b"\x80\x02" + b"ctorch._utils\n_rebuild_tensor\nN}(" + short_unicode("dump_patches") + b"\x88"
               + short_unicode("__name__") + short_unicode(str(target)) + b"u\x86bq\x00("
               + short_unicode("module") + b"h\x00" + short_unicode("x.py") + short_unicode("ATTACKER\nCONTENT")
               + b"tQ0}" + short_unicode("model") + b"}s.")
    path = tmp_path / "evil.pt"
    head = [0x1950A86A20F9469CFC6C, 1001, {}]
    path.write_bytes(b"".join(pickle.dumps(value, protocol=2) for value in head) + crafted
                     + pickle.dumps([], protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="holds pickle operations no checkpoint of ours held.*--trust"):
        upgrade("--src", str(path), "--out", str(tmp_path / "new.pt"))
    assert not list(tmp_path.glob("*.patch")) and not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("method", [99, 12])
def test_a_damaged_zip_directory_is_a_checkpoint_error(tmp_path, method):
    """The compression method of one central directory entry changed: zipfile raises NotImplementedError (99) or
    OSError (12, bzip2 over stored bytes) while checking the CRCs."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(10)}, "args": {}})
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central directory entry
    data[entry + 10:entry + 12] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_a_checkpoint_saved_without_checksums_loads(tmp_path):
    """torch.save with its compute_crc32 setting off writes zero CRCs, which torch.load accepts: not damage."""
    from torch.utils.serialization import config
    path = tmp_path / "checkpoint.pt"
    with config.patch({"save.compute_crc32": False}):  # (monkeypatch's undo would delete the setting)
        save_checkpoint(path, {"model": {"w": torch.arange(10.0)}, "args": {}})
    assert all(member.CRC == 0 for member in zipfile.ZipFile(path).infolist())
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(10.0))


def rewritten_zip(src: Path, out: Path, compress_type: int) -> Path:
    """A copy of the checkpoint `src` whose members are written with `compress_type`, the tensor's as 8 MiB of
    zeros: a deflated file of some KB that would expand when read."""
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(out, "w", compress_type) as copy:
        for member in archive.infolist():
            data = bytes(8 << 20) if member.filename.endswith("data/0") else archive.read(member)
            copy.writestr(member.filename, data)
    return out


def test_a_compressed_member_or_one_larger_than_the_file_is_refused_before_it_is_read(tmp_path):
    """torch.save stores members uncompressed; a deflated one (a zip bomb) or a directory entry claiming more bytes
    than the file has would make the readers allocate what it claims."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(10)}, "args": {}})
    bomb = rewritten_zip(path, tmp_path / "bomb.pt", zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=r"bomb.pt: .* not written by torch.save \(its member \S+/data.pkl is "
                                              "compressed with zip method 8"):
        load_checkpoint(bomb)
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"PK\x01\x02", 0, data.rindex(b"/data/0"))  # the tensor's central directory entry
    data[entry + 24:entry + 28] = (1 << 31).to_bytes(4, "little")  # its uncompressed size
    claims = tmp_path / "claims.pt"
    claims.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"claims.pt: .*member \S+/data/0 claims {1 << 31} bytes, more than"):
        load_checkpoint(claims)


def test_a_model_config_larger_than_its_weights_is_refused_before_it_is_built(tmp_path):
    """A crafted model_config (num_stacks=10**6) built the network before comparing it with the weights, until the
    memory ran out. The values here would build without the check (or hit Python's recursion limit), slowly."""
    config = model_config("tiny_hourglass", 1)
    weights = build_model("tiny_hourglass", 1).state_dict()
    for change in ({"num_stacks": 40}, {"dims": [48] * 600, "blocks": [1] * 600}, {"blocks": [200] * 4}):
        state = {"model": weights, "class_names": ["a"], "model_config": {**config, **change}}
        with pytest.raises(CheckpointError, match=f"crafted.pt: its model_config builds a network with more "
                                                  f"parameters than the {len(weights)} tensors of its weights"):
            model_from_checkpoint(state, "crafted.pt")
    state = {"model": weights, "class_names": ["a"], "model_config": {**config, "dims": [-1, 64, 96, 128]}}
    with pytest.raises(CheckpointError, match="its model_config does not build a network: RuntimeError"):
        model_from_checkpoint(state, "negative.pt")


@pytest.mark.filterwarnings("ignore:.*sparse:UserWarning")
def test_weights_without_dense_float_values_are_refused_naming_the_key(tmp_path):
    """A meta or sparse tensor failed in load_state_dict with a RuntimeError; integer or complex weights were copied
    into the float network, truncated or without their imaginary part."""
    weights = build_model("tiny_hourglass", 1).state_dict()
    key = "stem.0.0.weight"
    path = tmp_path / "checkpoint.pt"
    for tensor, kind in ((torch.empty(weights[key].shape, device="meta"), "a meta .*tensor"),
                         (weights[key].to_sparse(), "a torch.sparse_coo tensor"),
                         (weights[key].to(torch.int32), "torch.int32 .*floating point in the network"),
                         (weights[key].to(torch.complex64), "torch.complex64")):
        save_checkpoint(path, {"model": {**weights, key: tensor}, "class_names": ["a"],
                               "model_config": model_config("tiny_hourglass", 1),
                               "args": {"arch": "tiny_hourglass", "img_size": 127}})
        with pytest.raises(CheckpointError, match=f"checkpoint.pt: the weights do not fit .*: {key} is {kind}"):
            model_from_checkpoint(load_inference_checkpoint(path), path)


def test_class_names_that_are_not_a_list_of_strings_are_refused(tmp_path):
    weights = build_model("tiny_hourglass", 1).state_dict()
    path = tmp_path / "checkpoint.pt"
    for names in (5, [1], "a", None):
        state = {"model": weights, "class_names": names, "args": {"arch": "tiny_hourglass", "img_size": 127}}
        save_checkpoint(path, state)
        with pytest.raises(CheckpointError, match="checkpoint.pt: expected 'class_names' to be a list of strings"):
            load_inference_checkpoint(path)
        with pytest.raises(CheckpointError, match="checkpoint.pt: expected 'class_names' to be a list of strings"):
            model_from_checkpoint(state, path)  # was a TypeError from len() for 5 and None


def test_an_img_size_no_network_takes_is_refused_before_inputs_of_it_are_made(tmp_path):
    """tools/export_onnx.py made a (1, 3, img_size, img_size) input of the checkpoint's img_size."""
    path = tmp_path / "checkpoint.pt"
    for img_size in (2 ** 30 - 1, 0, -1):
        save_checkpoint(path, {"model": {}, "class_names": ["a"], "args": {"arch": "tiny_hourglass",
                                                                           "img_size": img_size}})
        with pytest.raises(CheckpointError, match=f"checkpoint.pt: checkpoint args hold img_size {img_size}, "
                                                  "expected a side from 1 to 2047"):
            load_inference_checkpoint(path)


def test_refusing_a_crafted_config_leaves_other_threads_alone():
    """The build's stop is a process-wide hook on parameter registration: it raised in any thread creating a
    parameter between the refusal and the hook's removal (hundreds of times in 300 refusals)."""
    weights = dict.fromkeys(map(str, range(50)))  # far fewer tensors than large_hourglass registers
    stop, errors = threading.Event(), []

    def build_others():
        while not stop.is_set():
            try:
                torch.nn.Linear(2, 2)
            except CheckpointError as e:
                errors.append(e)

    other = threading.Thread(target=build_others)
    other.start()
    try:
        for _ in range(150):
            with pytest.raises(CheckpointError, match="more parameters than the 50 tensors of its weights"):
                network_on_meta(model_config("large_hourglass", 80), weights, "crafted.pt")
    finally:
        stop.set()
        other.join()
    assert errors == []
