"""datasets/shapes.py: deterministic, COCO layout read by the ordinary loader, boxes tight on the drawn shapes."""
import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.coco import CocoDetection
from datasets.coco_eval import evaluate_detections
from datasets.shapes import CLASSES, ShapesConfig, get_args_parser, main, make_image
from utils.errors import ArgumentError, WriteError


def generate(out, *extra):
    main(get_args_parser().parse_args(["--out", str(out), "--num_train", "24", "--num_val", "8", *extra]))


def test_deterministic_and_seeded(tmp_path):
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    generate(tmp_path / "c", "--seed", "1")
    for split in ("train", "val"):
        ja = (tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text()
        assert ja == (tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text()
        assert ja != (tmp_path / "c" / "annotations" / f"instances_{split}.json").read_text()
        names = sorted(p.name for p in (tmp_path / "a" / split).iterdir())
        assert len(names) == (24 if split == "train" else 8)
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / split, tmp_path / "b" / split, names, shallow=False)
        assert len(match) == len(names) and not mismatch and not errors


def test_the_ordinary_loader_reads_it(tmp_path):
    generate(tmp_path)
    train = CocoDetection(tmp_path, "train", train=True, img_size=127)
    val = CocoDetection(tmp_path, "val", train=False)
    assert train.class_names == list(CLASSES) == val.class_names and train.cat_ids == [1, 2, 3, 4]
    torch.manual_seed(0)
    item = train[0]
    assert item["image"].shape == (3, 127, 127) and item["hm_ct"].shape == (4, 32, 32)
    assert val[0]["inputs"][0][0].shape[2] == 255  # 128..192 pixels pad to 255
    dets = {}
    for i in range(len(val)):
        _, boxes, labels = val.load(i)
        dets[val.image_ids[i]] = np.concatenate([boxes, np.ones((len(boxes), 1)), labels[:, None]], axis=1)
    assert evaluate_detections(val.coco, dets, val.cat_ids, val.class_names)["AP"] == pytest.approx(1.0)


def test_boxes_are_tight_on_visible_pixels_and_sets_are_varied():
    rng = np.random.default_rng(0)
    cfg = ShapesConfig(noise=0.0)  # every shape then has one exact colour
    counts, empty, sides, aspects = np.zeros(len(CLASSES)), 0, [], []
    for _ in range(60):
        img, objects = make_image(rng, cfg)
        assert cfg.min_size <= min(img.shape[:2]) and max(img.shape[:2]) <= cfg.max_size
        empty += not objects
        assert len(objects) <= cfg.max_objects
        for cls, (x, y, w, h) in objects:
            counts[cls] += 1
            assert x >= 0 and y >= 0 and x + w <= img.shape[1] and y + h <= img.shape[0]
            crop = img[y:y + h, x:x + w].reshape(-1, 3)
            colours, n = np.unique(crop, axis=0, return_counts=True)
            colour = colours[n.argmax()]
            ys, xs = np.nonzero((img == colour).all(2))
            inside = (xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)
            tight = [xs[inside].min(), ys[inside].min(), xs[inside].max() + 1, ys[inside].max() + 1]
            assert tight == [x, y, x + w, y + h]
            sides.append(max(w, h))
            aspects.append(w / h)
    assert (counts > 10).all() and 1 <= empty <= 20
    assert min(sides) < 30 and max(sides) > 60 and min(aspects) < 0.7 and max(aspects) > 1.4


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ArgumentError, match="--min_obj"):
        generate(tmp_path, "--min_obj", "300")
    for flag, value in [("--noise", "nan"), ("--noise", "inf"), ("--empty", "1.5"), ("--max_occlusion", "nan")]:
        with pytest.raises(ArgumentError, match=f"{flag}: expected"):
            generate(tmp_path / "x", flag, value)
    assert not (tmp_path / "x").exists()


def test_runs_by_path_from_anywhere(tmp_path):
    """`python datasets/shapes.py` as datasets/check.py runs: the repository is imported, not datasets/ itself."""
    script = Path(__file__).resolve().parents[1] / "datasets" / "shapes.py"
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m datasets.shapes [-h]")
    assert "tight box of the shape's" in result.stdout  # the module's description, which said what each flag does
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "x"), "--noise", "nan"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "error: --noise: expected a finite number of at least 0, got nan\n"


def test_info_records_the_config(tmp_path):
    generate(tmp_path, "--noise", "3.5")
    info = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())["info"]
    assert info["config"]["noise"] == 3.5


@pytest.mark.parametrize("flag, value", [("--max_objects", "0"), ("--max_objects", "-3"), ("--max_objects", "101"),
                                         ("--max_objects", str(10**6)),
                                         ("--clutter", "-5"), ("--jpeg_quality", "500"), ("--seed", "-1")])
def test_whole_number_flags_out_of_range_are_refused(tmp_path, flag, value):
    with pytest.raises(ArgumentError, match=f"{flag}: expected a whole number in"):
        generate(tmp_path / "x", flag, value, "--num_train", "1", "--num_val", "0")
    assert not (tmp_path / "x").exists()


def test_a_negative_split_size_is_refused(tmp_path):
    with pytest.raises(ArgumentError, match="--num_val: expected a whole number of at least 0, got -1"):
        generate(tmp_path / "x", "--num_train", "1", "--num_val", "-1")
    assert not (tmp_path / "x").exists()


def test_an_image_side_beyond_the_limit_is_refused(tmp_path):
    with pytest.raises(ArgumentError, match=r"--max_size <= 4096, got 16, 72, 100000, 100000"):
        generate(tmp_path / "x", "--min_size", "100000", "--max_size", "100000")
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_out_that_is_a_file_or_holds_a_data_set_is_refused_unless_force(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(WriteError, match=r"--out .*file is a file; give a folder"):
        generate(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    out = tmp_path / "set"
    generate(out)
    before = (out / "annotations" / "instances_train.json").read_bytes()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(ArgumentError, match=r"instances_train\.json exists: .* already holds a data set; --force"):
        generate(out, "--seed", "1")
    assert (out / "annotations" / "instances_train.json").read_bytes() == before
    generate(out, "--seed", "1", "--force")
    assert (out / "annotations" / "instances_train.json").read_bytes() != before
    assert (out / "mine.txt").read_text() == "mine" and not list(out.glob(".*.tmp"))


def test_force_stopped_while_drawing_leaves_the_earlier_data_set_whole(tmp_path, monkeypatch):
    """--force with Ctrl-C while val was drawn: train had already been replaced and was then removed, which left the
    old val without a train split. Every split is now drawn before any is put in place."""
    import datasets.shapes
    generate(tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real, drawn = datasets.shapes.make_image, []

    def interrupted(rng, cfg):
        drawn.append(1)
        if len(drawn) == 24 + 3:  # val's third image
            raise KeyboardInterrupt
        return real(rng, cfg)
    monkeypatch.setattr(datasets.shapes, "make_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, "--seed", "1", "--force")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and len(before) == 24 + 8 + 2
    assert not list(tmp_path.glob(".*"))


def test_a_failed_write_leaves_no_split_and_the_command_runs_again(tmp_path, monkeypatch):
    """A full disk while writing val (cv2.imwrite only returned False on it): no split stays, neither train nor a
    short val, so the same command does not refuse to run again."""
    import utils.files
    real = utils.files.write_json

    def full(path, obj):
        if "val" in str(path):
            raise WriteError(f"cannot write {path}: no space left on device (nothing was written)")
        real(path, obj)
    monkeypatch.setattr(utils.files, "write_json", full)
    with pytest.raises(WriteError, match="no space left"):
        generate(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["annotations"]
    monkeypatch.undo()
    generate(tmp_path)
    assert len(list((tmp_path / "val").iterdir())) == 8


def test_max_occlusion_1_drops_the_shapes_covered_whole():
    """--max_occlusion 1 lets a later shape cover an earlier one whole: it has no visible pixel and so no box (its
    box was the min of no pixels, a numpy traceback)."""
    rng = np.random.default_rng(0)
    cfg = ShapesConfig(max_occlusion=1.0, max_objects=30, noise=0.0)
    for _ in range(5):
        img, objects = make_image(rng, cfg)
        for _cls, (x, y, w, h) in objects:
            assert w >= 1 and h >= 1 and x + w <= img.shape[1] and y + h <= img.shape[0]
