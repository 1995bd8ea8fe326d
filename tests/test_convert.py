"""The official-checkpoint converter: its name mapping covers our networks exactly, with the right shapes.

The fixtures list the official state-dict keys and shapes (`name shape`), read from the official model
definitions (github Duankaiwen/CenterNet, models/CenterNet-52.py and CenterNet-104.py) built with PyTorch 2."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import Detector
from nets import build_model
from tools.convert_official import convert_state_dict, detect_method, get_args_parser, main, our_name, what_it_fits
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import ArgumentError, CheckpointError, UserError

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


def fake_official(name: str) -> dict[str, torch.Tensor]:
    state = {}
    for line in (DATA / f"official_keys_{name}.txt").read_text().splitlines():
        key, shape = line.split(" ")
        state[key] = torch.empty([int(s) for s in shape.split(",")] if shape else [], device="meta")
    return state


@pytest.mark.parametrize("name, arch", [("CenterNet-52", "small_hourglass"), ("CenterNet-104", "large_hourglass")])
def test_mapping_covers_every_weight_one_to_one(name, arch):
    official = fake_official(name)
    converted = convert_state_dict(official, arch)
    with torch.device("meta"):
        expected = build_model(arch, 80).state_dict()
    assert set(converted) == set(expected)
    assert len({our_name(k) for k in official}) == len(official)
    for k, v in converted.items():
        assert v.shape == expected[k].shape, k
    with torch.device("meta"):
        build_model(arch, 80).load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parametrize("name", ["CenterNet-52", "CenterNet-104"])
def test_centernet_weights_are_told_from_cornernet_ones(name):
    """--method auto: CenterNet's state dicts have a center branch (CornerNet's, which has none:
    tests/test_official_cornernet_parity.py); without its center heads one would be taken for CornerNet's."""
    official = fake_official(name)
    assert detect_method(official) == "centernet"
    assert detect_method({k: v for k, v in official.items() if ".ct_" not in f".{k.removeprefix('module.')}"}) \
        == "cornernet"


def test_wrong_arch_or_shape_is_a_clear_error():
    with pytest.raises(KeyError, match="wrong --arch"):
        convert_state_dict(fake_official("CenterNet-104"), "small_hourglass")
    official = fake_official("CenterNet-52")
    official["module.tl_heats.0.1.weight"] = torch.empty(20, 256, 1, 1, device="meta")
    with pytest.raises(ValueError, match="module.tl_heats.0.1.weight"):
        convert_state_dict(official, "small_hourglass")
    official = fake_official("CenterNet-52")
    del official["module.ct_regrs.0.1.bias"]
    with pytest.raises(KeyError, match="lacks 1 weights"):
        convert_state_dict(official, "small_hourglass")


def saved_official(name: str, path: Path, prefix: str = "") -> Path:
    """The official state dict `name` written as a file, each tensor a stride-0 view of one number (a few hundred
    KB instead of 400 MB); `prefix` is put before every key."""
    torch.save({prefix + k: torch.zeros(1).expand(v.shape) for k, v in fake_official(name).items()}, path)
    return path


def convert(src: Path, out: Path | str, *flags: str) -> None:
    main(get_args_parser().parse_args(["--src", str(src), "--out", str(out), *flags]))


@pytest.mark.parametrize("name, flags, fits", [
    ("CenterNet-52", ["--arch", "large_hourglass"], "--arch small_hourglass --method centernet"),
    ("CenterNet-104", ["--arch", "small_hourglass"], "--arch large_hourglass --method centernet"),
    ("CornerNet", ["--arch", "large_hourglass", "--method", "centernet"], "--arch large_hourglass --method cornernet"),
])
def test_a_wrong_arch_or_method_names_the_one_the_file_fits(tmp_path, name, flags, fits):
    """CenterNet-52 given --arch large_hourglass said only that 531 weights were missing, CornerNet given --method
    centernet that 114 were, without a word on which flag to change."""
    with pytest.raises(CheckpointError, match=rf"; the file fits {fits}: pass that$"):
        convert(saved_official(name, tmp_path / "official.pkl"), tmp_path / "out.pt", *flags)
    assert not (tmp_path / "out.pt").exists()
    fits_none = {"module.hm.0.weight": torch.empty(80, 256, 1, 1, device="meta")}  # another repository's network
    assert what_it_fits(fits_none).startswith("the file fits none of the official networks")


def test_a_network_wrapped_in_data_parallel_again_converts(tmp_path):
    """Saved from DataParallel around the official DummyModule, every key starts `module.module.`: one prefix was
    removed, so the center branch was missed (--method auto said cornernet) and every key was unknown."""
    official = {f"module.{k}": v for k, v in fake_official("CenterNet-52").items()}
    assert detect_method(official) == "centernet"
    assert set(convert_state_dict(official, "small_hourglass")) == set(convert_state_dict(fake_official(
        "CenterNet-52"), "small_hourglass"))
    convert(saved_official("CenterNet-52", tmp_path / "official.pkl", "module."), tmp_path / "out.pt",
            "--arch", "small_hourglass")
    assert load_checkpoint(tmp_path / "out.pt")["args"]["method"] == "centernet"


def test_a_training_snapshot_is_named_as_such_not_as_our_checkpoint(tmp_path):
    """A dict of a 'model' state dict and an optimizer was taken for one of our checkpoints ("use it as it is",
    which then fails), and any other snapshot was only "got dict"."""
    weights = {"module.pre.0.conv.weight": torch.zeros(1).expand(128, 3, 7, 7)}
    torch.save({"model": weights, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "snapshot.pkl")
    torch.save({"epoch": 140, "state_dict": weights}, tmp_path / "ctdet_coco_hg.pth")  # xingyizhou/CenterNet's
    for name, entries in (("snapshot.pkl", "'model' (dict), 'optimizer' (dict)"),
                          ("ctdet_coco_hg.pth", "'epoch' (int), 'state_dict' (dict)")):
        with pytest.raises(CheckpointError, match=rf"a dict with entries {re.escape(entries)}: a training snapshot"):
            convert(tmp_path / name, tmp_path / "out.pt", "--arch", "small_hourglass")


def test_names_of_each_part():
    assert our_name("module.kps.0.low2.low2.up1.0.conv1.weight") == "hourglasses.0.inner.inner.skip.0.conv1.weight"
    assert our_name("module.tl_cnvs.1.P1_look_conv.weight") == "branches.1.pool_tl.cascade_v.weight"
    assert our_name("module.ct_cnvs.0.p2_conv1.bn.running_var") == "branches.0.pool_ct.conv_row.1.running_var"
    assert our_name("module.br_regrs.0.1.bias") == "branches.0.off_br.2.bias"


def test_cli_never_replaces_an_existing_file(tmp_path):
    out = tmp_path / "checkpoint.pt"
    out.write_bytes(b"mine")
    args = get_args_parser().parse_args(["--src", "x.pkl", "--arch", "small_hourglass", "--out", str(out)])
    with pytest.raises(UserError, match="exists"):
        main(args)
    assert out.read_bytes() == b"mine"


def test_an_out_ending_in_a_slash_is_refused_as_a_folder(tmp_path):
    """`--out ckpt/official_52/` wrote a file named official_52, which test.py --log_name official_52 then could not
    find (it reads ckpt/official_52/checkpoint.pt)."""
    with pytest.raises(ArgumentError, match=f"--out {tmp_path}/official_52/ names a folder; give the file to write, "
                                            f"such as {tmp_path}/official_52/checkpoint.pt"):
        convert(saved_official("CenterNet-52", tmp_path / "official.pkl"), f"{tmp_path}/official_52/",
                "--arch", "small_hourglass")
    (tmp_path / "official_104").mkdir()  # it said "exists; choose another path"
    with pytest.raises(ArgumentError, match=f"--out {tmp_path / 'official_104'} is a folder; give the file to write, "
                                        f"such as {tmp_path / 'official_104' / 'checkpoint.pt'}"):
        convert(tmp_path / "official.pkl", tmp_path / "official_104", "--arch", "small_hourglass")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["official.pkl", "official_104"]


def test_bad_sources_are_one_line_errors(tmp_path):
    """Run as a command: a missing file, a file that is not a checkpoint, a web page saved in its place (Google
    Drive's confirmation page, fetched with wget, said only "truncated or corrupt") and one of our own checkpoints
    each end with one line saying so (not a traceback, nor a key error blaming --arch)."""
    ours = tmp_path / "ours.pt"
    save_checkpoint(ours, {"model": {"w": torch.ones(1)}, "class_names": ["a"], "args": {"arch": "tiny_hourglass"}})
    (tmp_path / "notes.pkl").write_text("not a checkpoint")
    (tmp_path / "page.pkl").write_text("\n<!DOCTYPE html><html><title>Virus scan warning</title></html>")  # wget's
    torch.save({"weights": [1, 2]}, tmp_path / "list.pkl")
    for src, message in [(tmp_path / "nowhere.pkl", f"official checkpoint not found: {tmp_path / 'nowhere.pkl'}"),
                         (tmp_path / "notes.pkl", "the file is truncated or corrupt"),
                         (tmp_path / "page.pkl", "the file is a web page (HTML or XML: it starts with '<!DOCTYPE "
                                                 "html>'), not weights: the download saved the server's page instead "
                                                 "of the file; download it again"),
                         (tmp_path / "list.pkl", "is not an official CenterNet checkpoint: expected a state dict"),
                         (ours, f"--src {ours} is already a centernet47 checkpoint")]:
        result = subprocess.run([sys.executable, str(REPO / "tools" / "convert_official.py"), "--src", str(src),
                                 "--arch", "small_hourglass", "--out", str(tmp_path / "out.pt")],
                                capture_output=True, text=True)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "out.pt").exists()


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "CenterNet-52_480000.pkl").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"truncated or corrupt: it is empty \(0 bytes\)$"):
        convert(tmp_path / "CenterNet-52_480000.pkl", tmp_path / "out.pt", "--arch", "small_hourglass")


def test_official_weights_read_unconverted_name_the_converter(tmp_path):
    """The official .pkl (a bare state dict) given to the Detector or train.py --pretrained, skipping the
    conversion, names tools/convert_official.py; it said only that a 'model' entry was expected."""
    official = tmp_path / "CenterNet-52_480000.pkl"
    torch.save({key: torch.zeros(2) for key in list(fake_official("CenterNet-52"))[:3]}, official)
    with pytest.raises(UserError, match=rf"{official} is not a centernet47 checkpoint: .*\(a state dict, as the "
                                        r"official CenterNet and CornerNet \.pkl files do\): convert official weights "
                                        r"first with tools/convert_official\.py"):
        Detector.from_checkpoint(official, device="cpu")
    torch.save({"weights": torch.zeros(2), "epoch": 3}, tmp_path / "other.pt")  # not weights alone: no such hint
    with pytest.raises(UserError) as refused:
        Detector.from_checkpoint(tmp_path / "other.pt", device="cpu")
    assert str(refused.value).endswith("expected a dict with a 'model' entry")
