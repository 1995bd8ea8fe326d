"""python -m datasets.check: every problem of a split, each with its file and entry, not just the first."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from datasets.check import check_split, inspect_split, main
from datasets.shapes import ShapesConfig, write_split
from tests.test_data_coco import with_exif_orientation

ROOT = Path(__file__).resolve().parents[1]
RACCOON = Path(__file__).parent / "data" / "raccoon"


def broken_split(root: Path) -> Path:
    """Six images with five problems: a missing file, a truncated JPEG, a size that differs from the json, a bad
    box and an unknown category."""
    write_split(root, "train", 6, seed=5, cfg=ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40))
    ann_file = root / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    images = data["images"]
    (root / "train" / images[0]["file_name"]).unlink()
    truncated = root / "train" / images[1]["file_name"]
    truncated.write_bytes(truncated.read_bytes()[:300])
    resized = root / "train" / images[2]["file_name"]
    cv2.imwrite(str(resized), np.zeros((images[2]["height"] + 3, images[2]["width"], 3), np.uint8))
    data["annotations"][0]["bbox"] = [1, 2, 3]
    data["annotations"][1]["category_id"] = 99
    ann_file.write_text(json.dumps(data))
    return ann_file


def test_every_problem_is_listed_with_its_file_and_entry(tmp_path):
    ann_file = broken_split(tmp_path)
    data = json.loads(ann_file.read_text())
    problems = check_split(tmp_path, "train", progress=False)
    assert len(problems) == 5, problems
    first, second = data["annotations"][0], data["annotations"][1]
    expected = [
        "annotations[0].bbox is [1, 2, 3]", f"(annotation id {first['id']})",
        "annotations[1].category_id 99 is not in 'categories'", f"(annotation id {second['id']})",
        f"{tmp_path / 'train' / data['images'][0]['file_name']}: image file not found",
        f"{tmp_path / 'train' / data['images'][1]['file_name']}: ",
        f"decoded size {data['images'][2]['width']}x{data['images'][2]['height'] + 3} differs",
    ]
    text = "\n".join(problems)
    for part in expected:
        assert part in text, part


def test_exit_status_and_output_of_the_command(tmp_path, capsys):
    assert main(["--data_dir", str(RACCOON), "--split", "val"]) == 0
    assert "no problems found" in capsys.readouterr().out
    broken_split(tmp_path)
    result = subprocess.run([sys.executable, "-m", "datasets.check", "--data_dir", str(tmp_path), "--split", "train"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout.strip().splitlines()[-1].endswith(": 5 problem(s)")
    assert main(["--data_dir", str(tmp_path), "--split", "nope"]) == 1
    assert "annotation file not found" in capsys.readouterr().err


def test_boxes_of_no_size_or_outside_their_image_are_reported_with_their_ids(tmp_path):
    write_split(tmp_path, "train", 2, seed=5, cfg=ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40))
    ann_file = tmp_path / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    im = {i["id"]: i for i in data["images"]}[data["annotations"][0]["image_id"]]
    w, h = im["width"], im["height"]
    boxes = {"zero width": [5, 5, 0, 10], "negative height": [5, 5, 10, -3], "outside": [w + 10, 5, 8, 8],
             "leaves by 5 px": [w - 10, 5, 15, 8], "leaves by 1 px (rounding)": [w - 10, 5, 11, 8],
             "inside": [0, 0, w, h]}
    anns = [{**data["annotations"][0], "id": 100 + k, "bbox": box} for k, box in enumerate(boxes.values())]
    data["annotations"] = anns
    ann_file.write_text(json.dumps(data))
    problems = check_split(tmp_path, "train", progress=False)
    assert len(problems) == 4, problems
    assert "bbox [5, 5, 0, 10] has a width or height of 0 or less (annotation id 100)" in problems[0]
    assert "bbox [5, 5, 10, -3] has a width or height of 0 or less (annotation id 101)" in problems[1]
    assert f"bbox {[w + 10, 5, 8, 8]} lies entirely outside its {w}x{h} image" in problems[2]
    assert problems[2].endswith("(annotation id 102)")
    assert f"bbox {[w - 10, 5, 15, 8]} leaves its {w}x{h} image" in problems[3]
    assert problems[3].endswith("(annotation id 103)")

    data["annotations"] = []
    ann_file.write_text(json.dumps(data))
    assert check_split(tmp_path, "train", progress=False) == [
        f"{ann_file}: 'annotations' is empty: no box to train on or to evaluate against"]


def test_runs_from_any_folder_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "datasets" / "check.py"), "--data_dir", str(RACCOON),
                             "--split", "val"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("val: no problems found"), result.stderr


def test_ids_that_are_not_integers_are_reported_not_a_crash(tmp_path):
    write_split(tmp_path, "train", 3, seed=5, cfg=ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40))
    ann_file = tmp_path / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["image_id"] = [1]  # unhashable: the box check's lookup raised TypeError
    data["images"][1]["id"] = {"a": 1}
    ann_file.write_text(json.dumps(data))
    text = "\n".join(check_split(tmp_path, "train", progress=False))
    assert "images[1].id must be an integer of 64 bits, got {'a': 1}" in text
    assert "annotations[0].image_id [1] is not in 'images'" in text


def test_a_test_dev_split_is_checked_where_the_loader_finds_it(tmp_path):
    """image_info_test-dev2017.json (no annotations) with its images in test2017/, as COCO ships them."""
    write_split(tmp_path, "test2017", 2, seed=5, cfg=ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40))
    data = json.loads((tmp_path / "annotations" / "instances_test2017.json").read_text())
    del data["annotations"]
    (tmp_path / "annotations" / "instances_test2017.json").unlink()
    (tmp_path / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(data))
    assert check_split(tmp_path, "test-dev2017", progress=False) == []
    (tmp_path / "test2017" / data["images"][0]["file_name"]).unlink()
    assert check_split(tmp_path, "test-dev2017", progress=False) == [
        f"image id {data['images'][0]['id']}: {tmp_path / 'test2017' / data['images'][0]['file_name']}: image file "
        "not found"]


def one_image_split(root: Path, image: np.ndarray, name: str, entry: dict, boxes: list) -> Path:
    """A split "train" of one image file `name` (its json entry `entry`) with one annotation per box."""
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    (root / "train" / name).write_bytes(cv2.imencode(Path(name).suffix, image)[1].tobytes())
    data = {"images": [{"id": 1, "file_name": name, **entry}], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 10 + i, "image_id": 1, "category_id": 1, "bbox": b} for i, b in enumerate(boxes)]}
    ann_file = root / "annotations" / "instances_train.json"
    ann_file.write_text(json.dumps(data))
    return ann_file


def test_boxes_of_an_image_without_width_and_height_are_checked_against_its_decoded_size(tmp_path):
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {},
                               [[10, 10, 20, 20], [110, 10, 20, 20], [90, 70, 20, 5]])
    assert check_split(tmp_path, "train", progress=False) == [
        f"{ann_file}: annotations[1].bbox [110, 10, 20, 20] lies entirely outside its 100x80 image (file '1.png') "
        "(annotation id 11)",
        f"{ann_file}: annotations[2].bbox [90, 70, 20, 5] leaves its 100x80 image (file '1.png') (annotation id 12)"]


def test_a_width_of_the_wrong_type_is_reported_once(tmp_path):
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {"width": "100", "height": 80},
                               [[150, 10, 20, 20]])
    assert check_split(tmp_path, "train", progress=False) == [
        f"{ann_file}: images[0] (file '1.png') has width '100', expected a positive whole number",
        f"{ann_file}: annotations[0].bbox [150, 10, 20, 20] lies entirely outside its 100x80 image (file '1.png') "
        "(annotation id 10)"]


def test_images_that_exif_turns_are_listed_as_notes_not_problems(tmp_path, capsys):
    one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.jpg", {"width": 80, "height": 100},
                    [[10, 10, 20, 20]])
    turned = tmp_path / "train" / "1.jpg"
    turned.write_bytes(with_exif_orientation(turned.read_bytes(), 6, "<"))  # read as 80 wide, 100 high
    note = (f"image id 1: {turned}: EXIF orientation 6: it is read upright, as viewers show it (80x100); its width, "
            "height and boxes must be those of the upright image")
    assert inspect_split(tmp_path, "train", progress=False) == ([], [note])
    assert main(["--data_dir", str(tmp_path), "--split", "train"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"note: {note}", f"{tmp_path} train: no problems found"]


def test_an_image_too_large_to_evaluate_is_a_note(tmp_path):
    """4096 x 4096 (input 4223 x 4223, over 4095 x 4095 pixels): "no problems found", and then train.py and test.py
    refused the split as val. Its decoded size is used where the json gives none; training may use such an image."""
    ann_file = one_image_split(tmp_path, np.zeros((4096, 4096), np.uint8), "1.png", {}, [[10, 10, 20, 20]])
    note = (f"image id 1: {tmp_path / 'train' / '1.png'}: an image of 4096 x 4096 pixels at test scale 1 makes a "
            "network input of 4223 x 4223 pixels")
    problems, notes = inspect_split(tmp_path, "train", progress=False)
    assert problems == [] and len(notes) == 1 and notes[0].startswith(note), notes
    assert notes[0].endswith("Training crops it, but train.py and test.py refuse it in a val split")
    data = json.loads(ann_file.read_text())
    data["images"][0].update(width=4095, height=4095)  # by the json's size, which a size problem also reports
    ann_file.write_text(json.dumps(data))
    problems, notes = inspect_split(tmp_path, "train", progress=False)
    assert len(problems) == 1 and "decoded size 4096x4096 differs" in problems[0] and notes == []
    data["images"][0].update(id=[1], width=None)  # problems of their own; no size to look up by that id
    ann_file.write_text(json.dumps(data))
    assert inspect_split(tmp_path, "train", progress=False)[1] == []


def test_an_image_with_more_boxes_than_the_training_cap_is_a_note(tmp_path):
    """Past MAX_OBJECTS (128) objects in a crop, training gives the rest no embeddings or offsets, and said nothing.
    Counted as training counts: crowd boxes and boxes of no size are left out."""
    boxes = [[i % 20 * 4, i // 20 * 4, 3, 3] for i in range(129)]
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {}, boxes + [[1, 1, 0, 5]])
    note = (f"image id 1: {tmp_path / 'train' / '1.png'}: 129 boxes to train on; in a crop holding more than 128, "
            "those past the first 128 train the heatmaps only, without embeddings and offsets")
    problems, notes = inspect_split(tmp_path, "train", progress=False)
    assert notes == [note] and len(problems) == 1 and "has a width or height of 0 or less" in problems[0]
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["iscrowd"] = 1
    ann_file.write_text(json.dumps(data))
    assert inspect_split(tmp_path, "train", progress=False)[1] == []


def test_a_category_name_given_to_several_ids_is_a_note(tmp_path):
    """Two ids named 'cat' (two label sets joined by hand): two classes that results and drawings name alike; the
    check said "no problems found"."""
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {}, [[10, 10, 20, 20]])
    data = json.loads(ann_file.read_text())
    data["categories"] = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 7, "name": "cat"}]
    ann_file.write_text(json.dumps(data))
    problems, notes = inspect_split(tmp_path, "train", progress=False)
    assert problems == [] and notes[0] == (f"{ann_file}: category name 'cat' is given to ids 1, 7: each is a class "
                                           "of its own, named alike in results and drawings")
    assert len(notes) == 2 and "no box here has category 'dog' (id 2), 'cat' (id 7)" in notes[1]


def test_a_category_without_a_box_is_a_note(tmp_path):
    """Roboflow's export adds a category named after the data set that no box has (labelme2coco a '_background_'):
    a class the network learns as never present, which the check passed without a word. Crowd boxes and boxes
    without width train nothing, so their category is named too."""
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {},
                               [[10, 10, 20, 20], [30, 30, 20, 20], [50, 50, 0, 20]])
    data = json.loads(ann_file.read_text())
    data["categories"] = [{"id": 0, "name": "raccoons-Xq2p", "supercategory": "none"},
                          {"id": 1, "name": "raccoon", "supercategory": "raccoons-Xq2p"},
                          {"id": 2, "name": "crowd"}, {"id": 3, "name": "flat"}]
    data["annotations"][1].update(category_id=2, iscrowd=1)
    data["annotations"][2]["category_id"] = 3
    ann_file.write_text(json.dumps(data))
    problems, notes = inspect_split(tmp_path, "train", progress=False)
    assert len(problems) == 1 and "width or height of 0" in problems[0]
    assert notes == [f"{ann_file}: no box here has category 'raccoons-Xq2p' (id 0), 'crowd' (id 2), 'flat' (id 3) "
                     "(3 of the 4 categories). Each is still a class of the network: trained on this split, it "
                     "learns the class as never present; evaluated on it, the class's AP is '-', left out of the "
                     "mean. An exporter's extra entry (Roboflow's named after the data set, labelme2coco's "
                     "'_background_') is best left out of the 'categories' of every split"]


def test_boxes_that_all_lie_within_the_top_left_pixel_are_a_problem(tmp_path):
    """YOLO's fractions of the image written as a COCO bbox (a converter that did not scale them): "no problems
    found" before."""
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {},
                               [[0.1, 0.2, 0.3, 0.25], [0.5, 0.5, 0.5, 0.5]])
    assert check_split(tmp_path, "train", progress=False) == [
        f"{ann_file}: all 2 boxes lie within the image's top left pixel, [0, 1] x [0, 1]: fractions of its width and "
        "height (YOLO's coordinates)? A COCO bbox is [x, y, width, height] in pixels"]


def test_a_file_name_outside_the_image_folder_is_reported_once_and_not_read(tmp_path):
    """'../outside.png' is a good image, but outside the split's folder: reported as the entry's problem, not read
    (an absolute path such as /dev/zero would be read until memory runs out)."""
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {}, [[10, 10, 20, 20]])
    (tmp_path / "train" / "1.png").rename(tmp_path / "outside.png")
    data = json.loads(ann_file.read_text())
    data["images"][0]["file_name"] = "../outside.png"
    ann_file.write_text(json.dumps(data))
    assert check_split(tmp_path, "train", progress=False) == [
        f"{ann_file}: images[0].file_name is '../outside.png', expected a path inside the image folder (relative, "
        "without '..')"]


def test_a_split_name_too_long_for_the_file_system_is_an_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    assert main(["--data_dir", str(tmp_path), "--split", "a" * 300]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/annotations/instances_{'a' * 300}.json: cannot look for the files of "
                          f"split '{'a' * 40}' (File name too long)")


def test_a_device_or_a_path_the_system_cannot_open_is_listed_unread(tmp_path):
    """README: datasets.check lists a device in the image folder without reading it (/dev/zero was read until the
    memory ran out; /dev/null stands in for it) and a path the system cannot open with the system's reason."""
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {}, [[10, 10, 20, 20]])
    data = json.loads(ann_file.read_text())
    names = ["device.png", "1.png/x.png", "a" * 300 + ".png", "loop.png"]
    data["images"] += [{"id": i + 2, "file_name": name} for i, name in enumerate(names)]
    ann_file.write_text(json.dumps(data))
    (tmp_path / "train" / "device.png").symlink_to("/dev/null")
    (tmp_path / "train" / "loop.png").symlink_to("loop.png")
    reasons = ["a device or socket, not an image file", "cannot read the image file (Not a directory)",
               "cannot read the image file (File name too long)",
               "cannot read the image file (Too many levels of symbolic links)"]
    assert check_split(tmp_path, "train", progress=False) == [
        f"image id {i + 2}: {tmp_path / 'train' / name}: {reason}"
        for i, (name, reason) in enumerate(zip(names, reasons))]


def test_boxes_of_positive_size_with_area_0_are_a_note(tmp_path):
    """The evaluation counts them as small objects whatever their size (see datasets.annotations.zero_area_note);
    entries without an id are named by their index."""
    ann_file = one_image_split(tmp_path, np.zeros((80, 100, 3), np.uint8), "1.png", {"width": 100, "height": 80},
                               [[10, 10, 60, 50], [5, 5, 20, 20], [0, 0, 0, 10]])
    data = json.loads(ann_file.read_text())
    for a, area in zip(data["annotations"], (0, 0, 0)):
        a["area"] = area
    del data["annotations"][1]["id"]
    ann_file.write_text(json.dumps(data))
    problems, notes = inspect_split(tmp_path, "train", progress=False)
    assert len(problems) == 1 and "has a width or height of 0 or less" in problems[0]
    assert notes == [f"{ann_file}: boxes of positive width and height given area 0 (2: annotation ids "
                     "10, annotations[1]): the evaluation counts them as small objects (area below 32^2) "
                     "whatever their size, which moves them into AP_S and out of AP_M and AP_L; leave `area` out (it "
                     "is then width x height) or give the object's area"]
