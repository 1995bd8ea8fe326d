"""tools/voc_to_coco.py on a VOC-style folder written in tmp_path: boxes, classes, difficult objects, errors;
the result loads as a data set."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.coco import CocoDetection
from tools.voc_to_coco import get_args_parser, main
from utils.errors import ArgumentError, DataError, MissingFileError, WriteError

REPO = Path(__file__).resolve().parents[1]

# image id: (width, height, [(name, xmin, ymin, xmax, ymax, difficult)])
IMAGES = {
    "000001": (64, 48, [("dog", 1, 1, 20, 30, 0), ("person", 10, 5, 60, 40, 1)]),
    "000002": (50, 70, [("cat", 5, 6, 45, 66, 0)]),
    "000003": (40, 40, []),
}


def xml_of(width: int, height: int, objects) -> str:
    objs = "".join(f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
                   f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                   for n, x1, y1, x2, y2, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def voc_dir(tmp_path) -> Path:
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for name, (w, h, objects) in IMAGES.items():
        (root / "Annotations" / f"{name}.xml").write_text(xml_of(w, h, objects))
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.full((h, w, 3), 127, np.uint8))
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000003\n")
    return root


def convert(voc_dir: Path, out: Path, *extra: str) -> None:
    main(get_args_parser().parse_args(["--voc_dir", str(voc_dir), "--out", str(out), *extra]))


def test_boxes_classes_and_difficult(voc_dir, tmp_path):
    out = tmp_path / "coco"
    convert(voc_dir, out)
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    # VOC's 20 classes in their usual order (all names here are VOC classes): cat 8, dog 12, person 15.
    assert [c["name"] for c in train["categories"]][:3] == ["aeroplane", "bicycle", "bird"]
    assert len(train["categories"]) == 20
    assert [(im["file_name"], im["width"], im["height"]) for im in train["images"]] == [
        ("000001.jpg", 64, 48), ("000002.jpg", 50, 70)]
    got = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in train["annotations"]]
    assert got == [(1, 12, [0, 0, 20, 30], 0), (1, 15, [9, 4, 51, 36], 1), (2, 8, [4, 5, 41, 61], 0)]
    assert (out / "train" / "000001.jpg").is_symlink()

    dataset = CocoDetection(out, "train", train=False, img_size=127)
    assert dataset.class_names[7] == "cat" and len(dataset) == 2
    _, boxes, labels = dataset.load(0)  # the difficult person is not a training box
    np.testing.assert_allclose(boxes, [[0, 0, 20, 30]])
    assert labels.tolist() == [11]
    val = CocoDetection(out, "val", train=False, img_size=127)
    assert len(val) == 1 and val.class_names == dataset.class_names


def test_class_list_keep_difficult_and_copy(voc_dir, tmp_path):
    convert(voc_dir, tmp_path / "a", "--splits", "train", "--classes", "person,dog,cat", "--keep_difficult",
            "--copy")
    data = json.loads((tmp_path / "a" / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["person", "dog", "cat"]
    assert [(a["category_id"], a["iscrowd"]) for a in data["annotations"]] == [(2, 0), (1, 0), (3, 0)]
    assert not (tmp_path / "a" / "train" / "000001.jpg").is_symlink()
    with pytest.raises(ArgumentError, match="--classes: the annotations also name person"):
        convert(voc_dir, tmp_path / "b", "--classes", "dog,cat")
    # A name given twice was two categories, the first without objects: a network with a class never trained.
    with pytest.raises(ArgumentError, match="--classes: cat is listed more than once"):
        convert(voc_dir, tmp_path / "b", "--classes", "person,cat,dog,cat")
    assert not (tmp_path / "b").exists()
    # Names outside VOC's 20: the sorted names found.
    xml = voc_dir / "Annotations" / "000002.xml"
    xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>zebra</name>"))
    convert(voc_dir, tmp_path / "c")
    data = json.loads((tmp_path / "c" / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["dog", "person", "zebra"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s[:-20], r"000002\.xml: not valid XML"),
    (lambda s: s.replace("<xmax>45</xmax>", ""), r"000002\.xml: object 1 \(cat\) lacks <bndbox/xmax>"),
    (lambda s: s.replace("<xmax>45</xmax>", "<xmax>4x</xmax>"), r"000002\.xml: object 1 \(cat\) <bndbox/xmax> is '4x'"),
    (lambda s: s.replace("<xmax>45</xmax>", "<xmax>2</xmax>"),
     r"000002\.xml: object 1 \(cat\) has xmin\.\.xmax 5\.\.2"),
    (lambda s: s.replace("<width>50</width>", "<width>0</width>"), r"000002\.xml: <size> is 0 x 70"),
    # These parse as floats, and were written into the json as NaN and Infinity, which no json reader accepts.
    (lambda s: s.replace("<xmin>5</xmin>", "<xmin>nan</xmin>"),
     r"000002\.xml: object 1 \(cat\) <bndbox/xmin> is 'nan', expected a finite number"),
    (lambda s: s.replace("<xmax>45</xmax>", "<xmax>1e400</xmax>"), r"<bndbox/xmax> is '1e400', expected a finite"),
    (lambda s: s.replace("<ymax>66</ymax>", "<ymax>-Infinity</ymax>"), r"<bndbox/ymax> is '-Infinity', expected a"),
    (lambda s: s.replace("<xmin>5</xmin>", "<xmin>-1e308</xmin>").replace("<xmax>45</xmax>", "<xmax>1e308</xmax>"),
     r"000002\.xml: object 1 \(cat\) has xmin\.\.xmax -1e\+308\.\.1e\+308, .* a box too large for a number"),
])
def test_broken_annotation_names_the_file(voc_dir, tmp_path, edit, message):
    xml = voc_dir / "Annotations" / "000002.xml"
    xml.write_text(edit(xml.read_text()))
    with pytest.raises(DataError, match=message):
        convert(voc_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_files_and_existing_output(voc_dir, tmp_path):
    with pytest.raises(MissingFileError, match=r"Main/test\.txt: image list of split 'test' not found"):
        convert(voc_dir, tmp_path / "out", "--splits", "test")
    with pytest.raises(MissingFileError, match=r"nowhere: no Annotations/ folder"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    (voc_dir / "JPEGImages" / "000003.jpg").unlink()
    with pytest.raises(MissingFileError, match=r"000003\.jpg: image of split 'val' not found"):
        convert(voc_dir, tmp_path / "out")
    convert(voc_dir, tmp_path / "out", "--splits", "train")
    before = (tmp_path / "out" / "annotations" / "instances_train.json").read_bytes()
    with pytest.raises(ArgumentError, match="already holds split 'train'"):
        convert(voc_dir, tmp_path / "out", "--splits", "train")
    assert (tmp_path / "out" / "annotations" / "instances_train.json").read_bytes() == before

    (voc_dir / "Annotations" / "000001.xml").unlink()
    with pytest.raises(MissingFileError, match=r"000001\.xml: cannot read the annotation \(No such file"):
        convert(voc_dir, tmp_path / "out2", "--splits", "train")
    assert not (tmp_path / "out2").exists()


def test_an_image_listed_twice_stops_before_anything_is_written(voc_dir, tmp_path):
    (voc_dir / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n\n000001\n")
    with pytest.raises(DataError, match=r"Main/train\.txt: image id 000001 is listed twice, on lines 1 and 4"):
        convert(voc_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (voc_dir / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    convert(voc_dir, tmp_path / "out")  # the fixed list converts into the same --out


def test_out_must_be_a_folder(voc_dir, tmp_path):
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ArgumentError, match="--out .*a_file is a file; give a folder"):
        convert(voc_dir, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"


def test_the_command_line_ends_a_mistake_in_one_error_line(voc_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "voc_to_coco.py"), "--voc_dir", str(voc_dir), "--out",
                           str(tmp_path / "out"), "--splits", "test"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {voc_dir / 'ImageSets' / 'Main' / 'test.txt'}: image list of split 'test' not found"]


def test_a_disk_full_part_way_leaves_nothing_and_the_command_runs_again(voc_dir, tmp_path, monkeypatch):
    """The second image's copy fails (ENOSPC), then, in a second run, the third (the val split's, after train was
    written): no split folder or json is left either time, so the same command, run again once there is room,
    converts instead of refusing an 'already held' split."""
    out, real_copy, copies, full_at = tmp_path / "coco", shutil.copy2, [], [2]

    def copy_until_full(src, dst):
        copies.append(dst)
        if len(copies) == full_at[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copy2", copy_until_full)
    with pytest.raises(WriteError, match=f"cannot write split 'train' into {out}: No space left on device"):
        convert(voc_dir, out, "--copy")
    assert sorted(p.name for p in out.rglob("*")) == []
    copies.clear()
    full_at[0] = 3  # val's first image, after train's two
    with pytest.raises(WriteError, match=f"cannot write split 'val' into {out}"):
        convert(voc_dir, out, "--copy")
    assert [p for p in out.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(shutil, "copy2", real_copy)
    convert(voc_dir, out, "--copy")
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000001.jpg", "000002.jpg"]
    assert len(CocoDetection(out, "train", train=False)) == 2


QUADRATIC = ('<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY b "' + "A" * 1000 + '">]><annotation><filename>'
             + "&b;" * 50 + "</filename><size><width>50</width><height>70</height></size></annotation>")
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1 or "") + ";") * 10}">' for i in range(1, 9))
                  + ']><annotation><filename>&lol8;</filename></annotation>')
EXTERNAL = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/hostname">]><annotation><size>'
            '<width>50</width><height>70</height></size><object><name>&xxe;</name></object></annotation>')


@pytest.mark.parametrize("text, message", [
    (QUADRATIC, r"000002\.xml: declares the XML entity 'b'"),  # expat's amplification limit lets this one expand
    (BILLION_LAUGHS, r"000002\.xml: declares the XML entity 'lol'"),
    (EXTERNAL, r"000002\.xml: declares the XML entity 'xxe'"),
    ('<?xml version="1.0" encoding="klingon"?><annotation/>', r"000002\.xml: not valid XML \(unknown encoding"),
])
def test_xml_that_declares_entities_or_an_unknown_encoding_is_refused(voc_dir, tmp_path, text, message):
    (voc_dir / "Annotations" / "000002.xml").write_text(text)
    with pytest.raises(DataError, match=message):
        convert(voc_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_xml_file_too_large_or_not_a_file_is_refused_unread(voc_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("tools.voc_to_coco.MAX_XML_BYTES", 100)
    with pytest.raises(DataError, match=r"000001\.xml: \d+ bytes, more than a VOC annotation holds \(at most 100\)"):
        convert(voc_dir, tmp_path / "out")
    monkeypatch.undo()
    xml = voc_dir / "Annotations" / "000002.xml"
    xml.unlink()
    os.mkfifo(xml)  # reading it waits for a writer forever

    def hung(signum, frame):
        raise AssertionError("the converter waited on the pipe")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(DataError, match=r"000002\.xml: not a regular file"):
            convert(voc_dir, tmp_path / "out")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("listed, message", [
    (b"000001\n../../elsewhere/x\n", r"train\.txt: line 2: image id '\.\./\.\./elsewhere/x' is not a file name"),
    (b"/tmp/x\n", r"train\.txt: line 1: image id '/tmp/x' is not a file name"),
    (b"000001\nb\0c\n", r"train\.txt: line 2: image id 'b\\x00c' is not a file name"),
    (b"000001\n\xe9t\xe9\n", r"train\.txt: not UTF-8 text \(invalid continuation byte at byte 7\)"),
])
def test_an_image_list_naming_paths_or_not_utf8_is_refused(voc_dir, tmp_path, listed, message):
    """An image id is joined to Annotations/, JPEGImages/ and OUT/<split>/: '../../elsewhere/x' read
    VOC2007/../elsewhere/x.xml and linked its image as OUT/../elsewhere/x.jpg, outside OUT, where it stayed."""
    for folder in (tmp_path / "elsewhere", tmp_path / "o" / "elsewhere"):
        folder.mkdir(parents=True)
    shutil.copy(voc_dir / "Annotations" / "000001.xml", tmp_path / "elsewhere" / "x.xml")
    shutil.copy(voc_dir / "JPEGImages" / "000001.jpg", tmp_path / "elsewhere" / "x.jpg")
    (voc_dir / "ImageSets" / "Main" / "train.txt").write_bytes(listed)
    with pytest.raises(DataError, match=message):
        convert(voc_dir, tmp_path / "o" / "out", "--splits", "train")
    assert not any((tmp_path / "o" / "elsewhere").iterdir()) and not (tmp_path / "o" / "out").exists()


@pytest.mark.parametrize("split", ["../x", "", "..", "a/b"])
def test_a_split_name_must_be_a_name(voc_dir, tmp_path, split):
    with pytest.raises(ArgumentError, match=r"--splits: .* is not a name"):
        convert(voc_dir, tmp_path / "out", "--splits", split)


def test_a_split_folder_made_by_someone_else_during_the_conversion_is_left_alone(voc_dir, tmp_path, monkeypatch):
    """The check that OUT holds no such split comes before the xml files are read (minutes for a large set): a folder
    made in between makes the conversion stop, and was deleted with the user's files by its clean-up."""
    import tools.voc_to_coco as voc
    out = tmp_path / "out"
    read_split = voc.read_split

    def meanwhile(voc_dir, split):
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / "mine.txt").write_text("keep")
        return read_split(voc_dir, split)
    monkeypatch.setattr(voc, "read_split", meanwhile)
    with pytest.raises(WriteError, match=r"cannot write split 'train'"):
        convert(voc_dir, out, "--splits", "train")
    assert (out / "train" / "mine.txt").read_text() == "keep"
    assert not (out / ".train.tmp").exists() and not (out / "annotations" / "instances_train.json").exists()
