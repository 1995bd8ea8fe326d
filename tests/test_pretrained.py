"""train.py --pretrained: a run on the built-in shapes (4 classes) starts a run on a 2-class subset of them."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from engine.pretrained import class_output_keys, load_pretrained, load_pretrained_checkpoint
from nets import build_model
from nets.hourglass import HEATMAP_BIAS
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError, MissingFileError, UserError

KEEP = ("ellipse", "cross")


def two_class_subset(src: Path, dst: Path) -> Path:
    """The same images with only the ellipses and crosses (category ids 2 and 4, kept as they are)."""
    shutil.copytree(src, dst)
    for split in ("train", "val"):
        path = dst / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        data["categories"] = [c for c in data["categories"] if c["name"] in KEEP]
        ids = {c["id"] for c in data["categories"]}
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in ids]
        path.write_text(json.dumps(data))
    return dst


def run_args(data_dir: Path, ckpt_dir: Path, name: str, *extra: str):
    return train.get_args_parser().parse_args([
        "--log_name", name, "--ckpt_dir", str(ckpt_dir), "--data_dir", str(data_dir), "--train_split", "train",
        "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu", "--lr", "1e-3", "--num_epochs", "1", *extra])


@pytest.fixture(scope="module")
def shapes_ckpt(shapes_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    train.main(run_args(shapes_dir, root, "four"))
    return root / "four" / "checkpoint.pt"


def test_weights_load_and_class_outputs_are_taken_by_class_name(shapes_ckpt):
    """The 2-class subset (ellipse, cross) of the 4 shapes (rectangle, ellipse, triangle, cross): every other tensor
    is copied, and each class output's channels 0 and 1 are the checkpoint's channels 1 and 3."""
    source = load_checkpoint(shapes_ckpt)["model"]
    model = build_model("tiny_hourglass", 2)
    report = load_pretrained_checkpoint(model, str(shapes_ckpt), list(KEEP), "tiny_hourglass")
    state = model.state_dict()

    class_keys = class_output_keys(model)
    assert len(class_keys) == 6 and all(".hm_" in k for k in class_keys)  # weight and bias of 3 heads
    assert sorted(report.class_outputs) == sorted(class_keys)
    assert report.known_classes == list(KEEP) and report.new_classes == []
    assert not report.shape_differs and not report.missing and not report.unused
    assert sorted(report.loaded) == sorted(set(state) - set(class_keys))
    for k in report.loaded:
        torch.testing.assert_close(state[k], source[k], rtol=0, atol=0, msg=k)
    for k in class_keys:
        assert state[k].shape[0] == 2 and source[k].shape[0] == 4
        torch.testing.assert_close(state[k], source[k][[1, 3]], rtol=0, atol=0, msg=k)
    lines = report.lines()
    assert lines[1] == "pretrained: the 6 class outputs by class name: 2 classes from the checkpoint, 0 new"
    assert lines[2:] == ["  class from the checkpoint: ellipse", "  class from the checkpoint: cross"]


def test_a_new_class_keeps_its_fresh_channel(shapes_ckpt):
    """cross is the checkpoint's channel 3; star is new, and a name given twice (here: by the checkpoint) says
    nothing of which channel it would be: both keep the fresh network's channel, its bias the prior."""
    source = load_checkpoint(shapes_ckpt)["model"]
    torch.manual_seed(0)
    fresh = build_model("tiny_hourglass", 3).state_dict()
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 3)
    saved_names = ["rectangle", "ellipse", "ellipse", "cross"]
    report = load_pretrained(model, source, saved_names, ["star", "cross", "ellipse"])
    assert report.known_classes == ["cross"] and report.new_classes == ["star", "ellipse"]
    state = model.state_dict()
    for k in class_output_keys(model):
        torch.testing.assert_close(state[k][1], source[k][3], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(state[k][[0, 2]], fresh[k][[0, 2]], rtol=0, atol=0, msg=k)
        if k.endswith("bias"):
            assert torch.all(state[k][[0, 2]] == HEATMAP_BIAS)
    assert "  fresh (new class): star" in report.lines()


def test_same_classes_load_everything_and_other_shapes_are_reported(shapes_ckpt):
    source = load_checkpoint(shapes_ckpt)["model"]
    names = ["rectangle", "ellipse", "triangle", "cross"]
    model = build_model("tiny_hourglass", 4)
    report = load_pretrained(model, source, names, names)
    assert sorted(report.loaded) == sorted(source) and not report.class_outputs
    assert len(report.lines()) == 1
    # Four classes of other names: the outputs have the right shape, but every channel stays fresh.
    torch.manual_seed(0)
    fresh = build_model("tiny_hourglass", 4).state_dict()
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 4)
    report = load_pretrained(model, source, names, ["a", "b", "c", "d"])
    assert len(report.class_outputs) == 6 and report.new_classes == ["a", "b", "c", "d"]
    for k in report.class_outputs:
        torch.testing.assert_close(model.state_dict()[k], fresh[k], rtol=0, atol=0, msg=k)
    # A checkpoint with an extra tensor and one of another shape.
    edited = dict(source)
    edited["extra.weight"] = torch.zeros(1)
    key = "stem.0.0.weight"
    edited[key] = torch.zeros(1, 3, 7, 7)
    report = load_pretrained(build_model("tiny_hourglass", 4), edited, names, names)
    assert report.unused == ["extra.weight"] and report.shape_differs == {key: ((1, 3, 7, 7), tuple(source[key].shape))}
    assert any(line.startswith("  fresh (shape (1, 3, 7, 7) in the checkpoint") for line in report.lines())


def test_another_architecture_is_refused(shapes_ckpt, tmp_path):
    state = load_checkpoint(shapes_ckpt)
    state["model"] = {f"backbone.{k}": v for k, v in state["model"].items()}  # another code's names
    save_checkpoint(tmp_path / "odd.pt", state)
    with pytest.raises(CheckpointError, match="only 0 of the 69 weight tensors of this tiny_hourglass network match"):
        load_pretrained_checkpoint(build_model("tiny_hourglass", 2), str(tmp_path / "odd.pt"), list(KEEP),
                                   "tiny_hourglass")
    with pytest.raises(MissingFileError, match="--pretrained: checkpoint not found"):
        load_pretrained_checkpoint(build_model("tiny_hourglass", 2), str(tmp_path / "none.pt"), list(KEEP),
                                   "tiny_hourglass")


def test_a_checkpoint_of_another_arch_sharing_only_counters_and_biases_is_refused(shapes_ckpt, tmp_path):
    """small_hourglass and tiny_hourglass share 50 tensors by name and shape (batch-norm counters, head biases)
    and no kernel: that is not a fine-tuning start, even from a checkpoint that does not name its arch."""
    tiny = build_model("tiny_hourglass", 2)
    small = build_model("small_hourglass", 2).state_dict()
    shared = {k: v for k, v in small.items() if k in tiny.state_dict() and v.shape == tiny.state_dict()[k].shape}
    assert len(shared) >= 40 and all(v.dim() <= 1 for v in shared.values())
    state = load_checkpoint(shapes_ckpt)
    state["model"] = shared  # the tensors that matter, not 400 MB
    del state["args"]["arch"]
    save_checkpoint(tmp_path / "small.pt", state)
    with pytest.raises(CheckpointError, match=r"only 0 of the \d+ weight tensors of this tiny_hourglass network match "
                                         r"the checkpoint by name and shape \(the checkpoint's --arch is "
                                         r"unknown\)"):
        load_pretrained_checkpoint(tiny, str(tmp_path / "small.pt"), list(KEEP), "tiny_hourglass")


@pytest.mark.parametrize("saved, arch", [("small_hourglass", "large_hourglass"),
                                         ("large_hourglass", "small_hourglass")])
def test_small_and_large_hourglass_refuse_each_other_though_they_share_a_stack(shapes_ckpt, tmp_path, saved, arch):
    """large_hourglass's first stack has small_hourglass's names and shapes: CenterNet-52 weights filled exactly
    half of a large_hourglass network (630 of its 1260 tensors, the rest trained from scratch) and CenterNet-104
    weights all of a small_hourglass one (its second stack dropped), both let through by the count of matching
    kernels. On the meta device: the weights are stride-0 views of one zero, the networks hold no memory."""
    with torch.device("meta"):
        source = build_model(saved, 2).state_dict()
        model = build_model(arch, 2)
    state = load_checkpoint(shapes_ckpt)
    state["model"] = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in source.items()}
    state["args"]["arch"] = saved
    save_checkpoint(tmp_path / "other.pt", state)
    with pytest.raises(CheckpointError, match=f"the checkpoint's --arch is {saved}, not {arch}; pass a checkpoint "
                                              f"of --arch {arch}, or train with --arch {saved}"):
        load_pretrained_checkpoint(model, str(tmp_path / "other.pt"), list(KEEP), arch)


@pytest.mark.parametrize("problem", ["missing", "truncated"])
def test_a_bad_pretrained_file_creates_no_run_folder(shapes_dir, shapes_ckpt, tmp_path, problem):
    path = tmp_path / "pretrained.pt"
    if problem == "truncated":
        path.write_bytes(shapes_ckpt.read_bytes()[:5000])
    with pytest.raises(UserError, match=f"--pretrained: .*{path}"):
        train.main(run_args(shapes_dir, tmp_path / "ckpt", "run", "--pretrained", str(path)))
    assert not (tmp_path / "ckpt").exists()


def test_a_pretrained_checkpoint_with_nan_weights_is_refused_naming_the_weight(shapes_dir, shapes_ckpt, tmp_path):
    """Diverged weights: the run stopped at its first loss, with a hint to lower --lr that did not apply."""
    state = load_checkpoint(shapes_ckpt)
    key = next(k for k, v in state["model"].items() if v.dim() == 4)  # a convolution kernel
    state["model"][key].view(-1)[3] = float("nan")
    save_checkpoint(tmp_path / "diverged.pt", state)
    with pytest.raises(CheckpointError, match=f"--pretrained {tmp_path / 'diverged.pt'}: its weight {key} holds 1 "
                                              "NaN or infinite values"):
        train.main(run_args(shapes_dir, tmp_path / "ckpt", "run", "--pretrained", str(tmp_path / "diverged.pt")))
    assert not (tmp_path / "ckpt").exists()


def test_train_py_fine_tunes_on_a_two_class_subset(shapes_dir, shapes_ckpt, tmp_path):
    subset = two_class_subset(shapes_dir, tmp_path / "subset")
    train.main(run_args(subset, tmp_path, "two", "--pretrained", str(shapes_ckpt)))
    state = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert state["class_names"] == list(KEEP) and state["epoch"] == 1 and state["global_step"] == 2
    assert state["category_ids"] == [2, 4]  # the data set's ids, not the labels 0 and 1
    assert state["model"]["branches.0.hm_ct.2.weight"].shape[0] == 2
    log = (tmp_path / "two" / "train.log").read_text()
    assert "pretrained: loaded" in log and log.count("class from the checkpoint: ") == 2

    # Resumed, the run continues from its own weights: --pretrained (here a file that is gone) is not read, and
    # the log says so instead of passing over it in silence.
    gone = tmp_path / "moved_away.pt"
    train.main(run_args(subset, tmp_path, "two", "--pretrained", str(gone), "--resume", "--num_epochs", "2"))
    assert load_checkpoint(tmp_path / "two" / "checkpoint.pt")["epoch"] == 2
    log = (tmp_path / "two" / "train.log").read_text()
    assert f"--pretrained {gone} not read: the run resumes from its own checkpoint" in log
