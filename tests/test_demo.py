"""demo.py end to end: an untrained tiny_hourglass on two raccoon photos and one corrupt file."""
import json
import shutil
from pathlib import Path

import cv2
import pytest
import torch

import demo
from nets import build_model
from utils.checkpoint import save_checkpoint

RACCOON = Path(__file__).parent / "data" / "raccoon" / "val"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 1)
    save_checkpoint(path, {"model": model.state_dict(), "args": {"arch": "tiny_hourglass", "img_size": 127},
                           "class_names": ["raccoon"], "epoch": 1})
    return path


def run(ckpt: Path, images: Path, out: Path, *extra: str):
    args = demo.get_args_parser().parse_args(["--ckpt", str(ckpt), "--images", str(images), "--out", str(out),
                                              "--device", "cpu", "--score_thresh", "0", *extra])
    return demo.main(args)


def test_folder_with_a_corrupt_file(ckpt, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    photos = sorted(RACCOON.glob("*.jpg"))[:2]
    for p in photos:
        shutil.copy(p, folder)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    results = run(ckpt, folder, out, "--test_flip")

    assert "broken.png" in capsys.readouterr().err
    written = json.loads((out / "detections.json").read_text())
    assert written["skipped"] == [str(folder / "broken.png")]
    assert written["detections"] == json.loads(json.dumps(results)) and len(results) > 0
    for p in photos:
        drawn = cv2.imread(str(out / p.name))
        h, w = cv2.imread(str(p)).shape[:2]
        assert drawn.shape[:2] == (h, w)
        for d in (d for d in results if d["file"] == p.name):
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h and d["class"] == "raccoon" and d["score"] >= 0
    assert not (out / "broken.png").exists()


def test_never_overwrites_without_force(ckpt, tmp_path):
    photo = sorted(RACCOON.glob("*.jpg"))[0]
    out = tmp_path / "out"
    run(ckpt, photo, out)
    before = (out / "detections.json").read_bytes()
    with pytest.raises(SystemExit, match="not empty"):
        run(ckpt, photo, out)
    assert (out / "detections.json").read_bytes() == before
    run(ckpt, photo, out, "--force", "--score_thresh", "2")
    assert json.loads((out / "detections.json").read_text())["detections"] == []


def test_missing_input_is_a_clear_error(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="no such file or folder"):
        run(ckpt, tmp_path / "nowhere", tmp_path / "out")
