"""datasets/coco.py and datasets/annotations.py: loading, classes, training items, and every kind of bad input
(error or documented handling)."""
import argparse
import contextlib
import io
import json
import math
import struct
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Subset, default_collate

from datasets import build_dataset
from datasets.annotations import coco_problems
from datasets.coco import CocoDetection, check_same_categories
from datasets.coco_eval import evaluate_detections, load_results
from datasets.image_io import exif_orientation, load_image
from datasets.sampling import TrainSamples
from utils.errors import DataError

RACCOON = Path(__file__).parent / "data" / "raccoon"


def write_set(root: Path, data, images: dict, split: str = "train") -> Path:
    """A COCO-layout folder: `data` (dict, or bytes written verbatim) as the json, `images` {file name: array or
    bytes} in the split's folder."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    text = data if isinstance(data, bytes) else json.dumps(data).encode()
    (root / "annotations" / f"instances_{split}.json").write_bytes(text)
    for name, img in images.items():
        if isinstance(img, bytes):
            (root / split / name).write_bytes(img)
        else:
            assert cv2.imwrite(str(root / split / name), img)
    return root


def image(h=80, w=100, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def coco_dict(boxes=((10, 10, 30, 20),), cats=((1, "a"),), width=100, height=80, **ann_extra):
    return {"images": [{"id": 1, "file_name": "1.png", "width": width, "height": height}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": cats[0][0], "bbox": list(b), "iscrowd": 0,
                             "area": b[2] * b[3], **ann_extra} for i, b in enumerate(boxes)],
            "categories": [{"id": c, "name": n} for c, n in cats]}


def test_raccoon_loads_with_classes_from_the_json():
    ds = CocoDetection(RACCOON, "train", train=True)
    assert ds.class_names == ["raccoon"] and ds.cat_ids == [1] and ds.num_classes == 1
    assert len(ds) == 9 and sum(len(b) for b in ds.boxes) == 15
    assert sorted(ds.coco.getImgIds()) == sorted(ds.image_ids)


def test_non_contiguous_category_ids_sorted_to_labels(tmp_path):
    data = coco_dict(cats=((90, "z"), (3, "c"), (7, "g")))
    data["annotations"] += [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]},
                            {"id": 6, "image_id": 1, "category_id": 7, "bbox": [2, 2, 5, 5]}]
    ds = CocoDetection(write_set(tmp_path, data, {"1.png": image()}), "train", train=True)
    assert ds.cat_ids == [3, 7, 90] and ds.class_names == ["c", "g", "z"]
    assert ds.labels[0].tolist() == [2, 0, 1]


def test_training_item_matches_the_contract():
    ds = CocoDetection(RACCOON, "train", train=True)
    torch.manual_seed(0)
    batch = default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 511, 511) and batch["image"].dtype == torch.float32
    for k in ("tl", "br", "ct"):
        assert batch[f"hm_{k}"].shape == (2, 1, 128, 128) and batch[f"hm_{k}"].dtype == torch.float32
        assert batch[f"off_{k}"].shape == (2, 128, 2) and batch[f"off_{k}"].dtype == torch.float32
        assert batch[f"ind_{k}"].shape == (2, 128) and batch[f"ind_{k}"].dtype == torch.int64
    assert batch["mask"].shape == (2, 128) and batch["mask"].dtype == torch.bool
    # The image is normalised: roughly zero mean, unit spread.
    assert abs(batch["image"].mean()) < 1.5 and 0.3 < batch["image"].std() < 3


def test_augmentation_follows_torch_seed_and_differs_between_workers():
    ds = CocoDetection(RACCOON, "train", train=True)
    torch.manual_seed(1)
    a = ds[2]["image"]
    torch.manual_seed(1)
    assert torch.equal(a, ds[2]["image"])
    assert not torch.equal(a, ds[2]["image"])
    torch.manual_seed(2)
    loader = DataLoader(Subset(ds, [2] * 4), batch_size=1, num_workers=2)
    images = [b["image"] for b in loader]
    assert all(not torch.equal(images[0], x) for x in images[1:]) and not torch.equal(images[1], images[3])


def test_build_dataset_reads_the_flags():
    args = argparse.Namespace(dataset="coco", data_dir=str(RACCOON), img_size=255, test_flip=True)
    train = build_dataset(args, "train", train=True)
    assert train.img_size == 255 and train.train
    torch.manual_seed(0)
    assert train[0]["hm_tl"].shape == (1, 64, 64)
    plain = argparse.Namespace(dataset="coco", data_dir=str(RACCOON), img_size=511, test_flip=False)
    val = build_dataset(plain, "val", train=False)
    assert val.test_scales == (1.0,) and not val.test_flip and val.img_size == 511
    sample = build_dataset(args, "val", train=False, test_scales=[0.5, 1.0])[0]
    assert [t.shape[0] for t, _ in sample["inputs"]] == [2, 2]
    with pytest.raises(ValueError, match="--dataset 'voc'"):
        build_dataset(argparse.Namespace(dataset="voc", data_dir=str(RACCOON), img_size=511, test_flip=False), "val",
                      train=False)


def test_img_size_must_give_whole_output_cells():
    with pytest.raises(ValueError, match=r"k \* 4 - 1"):
        CocoDetection(RACCOON, "train", train=True, img_size=512)


# ---------------------------------------------------------------- bad input: errors at construction

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: data directory not found .*instances_train\.json.* "
                                                r"images in train/"):
        CocoDetection(tmp_path / "nowhere", "train", train=True)
    with pytest.raises(FileNotFoundError, match=r"image_info_test-dev2017\.json .*images in test2017/"):
        CocoDetection(tmp_path / "nowhere", "test-dev2017", train=False)
    json_file = RACCOON / "annotations" / "instances_train.json"
    with pytest.raises(DataError, match=f"{json_file} is not a folder; give the data directory .*images in train/"):
        CocoDetection(json_file, "train", train=True)


def test_missing_json(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"instances_train\.json: annotation file not found.*splits there: "
                                                r"none\)$"):
        CocoDetection(tmp_path, "train", train=True)


def test_a_split_name_not_there_is_told_the_splits_that_are(tmp_path):
    """The built-in shapes data has train and val, not COCO's default val2017: the error names what to pass."""
    write_set(tmp_path, coco_dict(), {}, split="val")
    (tmp_path / "annotations" / "image_info_test-dev2017.json").write_text("{}")
    (tmp_path / "annotations" / "notes.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json: annotation file not found .*splits there: "
                                                r"test-dev2017, val\)$"):
        CocoDetection(tmp_path, "val2017", train=False)


def test_missing_image_directory(tmp_path):
    write_set(tmp_path, coco_dict(), {}, split="train")
    (tmp_path / "train").rmdir()
    with pytest.raises(FileNotFoundError, match="image directory of split 'train' not found"):
        CocoDetection(tmp_path, "train", train=True)


@pytest.mark.parametrize("text,match", [(b'{"images": [', "invalid json"), (b"[1, 2]", "expected a json object"),
                                        (b'{"images": "\xff"}', "invalid json")])
def test_invalid_json(tmp_path, text, match):
    write_set(tmp_path, text, {})
    with pytest.raises(ValueError, match=r"instances_train\.json: " + match):
        CocoDetection(tmp_path, "train", train=True)


@pytest.mark.parametrize("text, match", [(b"[" * 100000 + b"]" * 100000, "RecursionError"),
                                         (b'{"images": ' + b"7" * 5000 + b"}", "ValueError: Exceeds the limit")])
def test_json_beyond_what_python_parses_is_a_data_error(tmp_path, text, match):
    """Nesting past Python's recursion limit, and an integer of more than 4300 digits, were a RecursionError and a
    ValueError traceback, neither naming the file."""
    write_set(tmp_path, text, {})
    with pytest.raises(DataError, match=rf"instances_train\.json: invalid json: {match}"):
        CocoDetection(tmp_path, "train", train=True)


@pytest.mark.parametrize("huge", ["1" + "0" * 400, "1e400"])  # no float holds the first; json reads the second as inf
@pytest.mark.parametrize("where, key, value, match", [
    ("annotations", "bbox", [1, 2, "HUGE", 4], r"annotations\[0\]\.bbox is .*expected \[x, y, width, height\]"),
    ("annotations", "area", "HUGE", r"annotations\[0\]\.area is .*expected a number"),
    ("images", "width", "HUGE", r"images\[0\] \(file '1.png'\) has width .*expected a positive whole number")])
def test_numbers_beyond_a_float_are_named(tmp_path, huge, where, key, value, match):
    """An integer past 1e308 made math.isfinite and float() raise OverflowError (a traceback naming nothing)."""
    data = coco_dict()
    data[where][0][key] = value
    write_set(tmp_path, json.dumps(data).replace('"HUGE"', huge).encode(), {})
    with pytest.raises(DataError, match=rf"instances_train\.json: {match}"):  # the file, then the entry
        CocoDetection(tmp_path, "train", train=True)


def drop(data, where, key):
    entry = data if where is None else data[where][0]
    del entry[key]
    return data


@pytest.mark.parametrize("where,key,match", [
    (None, "images", "missing list 'images'"), (None, "annotations", "missing list 'annotations'"),
    (None, "categories", "missing list 'categories'"), ("images", "file_name", r"images\[0\] lacks 'file_name'"),
    ("images", "id", r"images\[0\] lacks 'id'"), ("annotations", "bbox", r"annotations\[0\] lacks 'bbox'"),
    ("annotations", "category_id", r"annotations\[0\] lacks 'category_id'"),
    ("annotations", "image_id", r"annotations\[0\] lacks 'image_id'"),
    ("categories", "name", r"categories\[0\] lacks 'name'")])
def test_missing_keys(tmp_path, where, key, match):
    write_set(tmp_path, drop(coco_dict(), where, key), {})
    with pytest.raises(ValueError, match=match):
        CocoDetection(tmp_path, "train", train=True)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, float("nan")], [1, 2, "3", 4], None,
                                  [1, 2, True, 4]])  # a bool passes isinstance(v, int)
def test_malformed_bbox(tmp_path, bbox):
    data = coco_dict()
    data["annotations"][0]["bbox"] = bbox
    write_set(tmp_path, data, {})
    with pytest.raises(ValueError, match=r"annotations\[0\]\.bbox is .*expected \[x, y, width, height\]"):
        CocoDetection(tmp_path, "train", train=True)


def test_unknown_category_id(tmp_path):
    write_set(tmp_path, coco_dict(cats=((1, "a"),), category_id=5), {})
    with pytest.raises(ValueError, match=r"annotations\[0\]\.category_id 5 is not in 'categories' \(ids \[1\]\)"):
        CocoDetection(tmp_path, "train", train=True)


def test_unknown_image_id_and_duplicate_ids(tmp_path):
    data = coco_dict()
    data["annotations"][0]["image_id"] = 9
    write_set(tmp_path, data, {})
    with pytest.raises(ValueError, match=r"annotations\[0\]\.image_id 9 is not in 'images'"):
        CocoDetection(tmp_path, "train", train=True)
    data = coco_dict()
    data["images"].append(dict(data["images"][0]))
    write_set(tmp_path, data, {})
    with pytest.raises(ValueError, match=r"images\[1\]\.id 1 appears more than once \(first in images\[0\]\)"):
        CocoDetection(tmp_path, "train", train=True)
    data = coco_dict(boxes=((1, 1, 5, 5), (2, 2, 5, 5)))
    data["annotations"][1]["id"] = 1
    write_set(tmp_path, data, {})
    with pytest.raises(ValueError,
                       match=r"annotations\[1\]\.id 1 appears more than once \(first in annotations\[0\]\)"):
        CocoDetection(tmp_path, "train", train=True)
    write_set(tmp_path, {"images": [], "annotations": [], "categories": []}, {})
    with pytest.raises(ValueError, match="'categories' is empty"):
        CocoDetection(tmp_path, "train", train=True)


def test_problems_after_an_entry_without_a_field_name_the_entry_by_its_own_index():
    # The entries after one that lacked a required field were named by their place among the others: images[0] for
    # the second image, and `python -m datasets.check` added the wrong annotation's id to the line.
    data = {"images": [{"id": 1}, {"id": 2, "file_name": "../x.png", "width": 0}],
            "annotations": [{"image_id": 1}, {"id": 7, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3]},
                            {"id": 7, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]}],
            "categories": [{"name": "a"}, {"id": 1, "name": "a"}]}
    assert coco_problems(data, Path("x.json")) == [
        "x.json: categories[0] lacks 'id'",
        "x.json: images[0] lacks 'file_name'",
        "x.json: annotations[0] lacks 'category_id', 'bbox'",
        "x.json: images[1].file_name is '../x.png', expected a path inside the image folder (relative, without '..')",
        "x.json: images[1] (file '../x.png') has width 0, expected a positive whole number",
        "x.json: annotations[1].bbox is [1, 2, 3], expected [x, y, width, height] (4 finite numbers)",
        "x.json: annotations[2].id 7 appears more than once (first in annotations[1])"]


@pytest.mark.parametrize("where, key, value, match", [
    ("images", "id", [1], r"images\[0\]\.id must be an integer of 64 bits, got \[1\]"),
    ("annotations", "image_id", [1], r"annotations\[0\]\.image_id \[1\] is not in 'images'"),
    ("annotations", "category_id", {"id": 1}, r"annotations\[0\]\.category_id \{'id': 1\} is not in 'categories'"),
    ("annotations", "image_id", True, r"annotations\[0\]\.image_id True is not in 'images'"),
    ("annotations", "area", "abc", r"annotations\[0\]\.area is 'abc', expected a number"),
    # pycocotools leaves a negative area out of every area range, "all" included: missing the box cost nothing
    ("annotations", "area", -5, r"annotations\[0\]\.area is -5 for a box of positive width and height: the "
                                r"evaluation would leave it out of every area range"),
    ("annotations", "iscrowd", "yes", r"annotations\[0\]\.iscrowd is 'yes', expected 0 or 1"),
    ("annotations", "iscrowd", 2, r"annotations\[0\]\.iscrowd is 2"),
    *[(where, "id", 2**63, rf"{where}\[0\]\.id must be an integer of 64 bits, got 92233720368547758")
      for where in ("images", "annotations", "categories")],
    *[("images", "file_name", name, r"images\[0\]\.file_name is .*, expected a path inside the image folder")
      for name in ("../../outside.png", "/etc/hostname", "a/../../x.png", "", "a\0b.png", 7, ["1.png"])]])
def test_ids_and_fields_of_the_wrong_type_are_named(tmp_path, where, key, value, match):
    """Lists or objects as ids (unhashable), True as an id, or an area / iscrowd pycocotools cannot use: each is the
    entry's problem, not a TypeError from a set lookup or from pycocotools after the results are written. So is an
    id beyond 64 bits (json integers have no bound: 10**400 passed, to fail as an OverflowError where ids become
    tensors), and a file name that leaves the split's image folder ('..', an absolute path) or is not a path at all
    (reading it could take any file of the machine as an image: /dev/zero forever)."""
    data = coco_dict()
    data[where][0][key] = value
    write_set(tmp_path, data, {})
    with pytest.raises(DataError, match=match):
        CocoDetection(tmp_path, "train", train=True)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("area", [5, None])
def test_a_box_whose_area_passes_a_float_loads_clipped(tmp_path, area):
    """Width and height 10**200 are finite, but their product 10**400 is no float: filling the area raised
    OverflowError (a traceback naming nothing), even where the json gives the area (setdefault computed it); the
    box's corner, past float32's range, gave numpy's overflow warning when the boxes were stored in float32."""
    data = coco_dict(boxes=((10, 10, 10**200, 10**200),))
    if area is None:
        del data["annotations"][0]["area"]
    else:
        data["annotations"][0]["area"] = area
    ds = CocoDetection(write_set(tmp_path, data, {"1.png": image()}), "train", train=True)
    assert ds.coco.loadAnns(ds.coco.getAnnIds())[0]["area"] == (math.inf if area is None else area)
    np.testing.assert_array_equal(ds.load(0)[1], [[10, 10, 100, 80]])  # clipped to the 100 x 80 image


def test_optional_annotation_fields_are_filled(tmp_path):
    data = coco_dict(boxes=((10, 10, 30, 20), (40, 5, 10, 10)))
    for a in data["annotations"]:
        del a["id"], a["area"], a["iscrowd"]
    data["annotations"][1]["id"] = 7
    ds = CocoDetection(write_set(tmp_path, data, {"1.png": image()}), "train", train=True)
    anns = ds.coco.loadAnns(ds.coco.getAnnIds())
    assert sorted(a["id"] for a in anns) == [7, 8]
    assert sorted(a["area"] for a in anns) == [100, 600] and all(a["iscrowd"] == 0 for a in anns)


def test_annotation_id_0_counts_when_found(tmp_path, capsys):
    # Roboflow, Label Studio and labelme2coco number annotations from 0; pycocotools takes a match with the ground
    # truth of id 0 for no match, and the perfect detections below scored AP 0.25 instead of 1.
    data = coco_dict(boxes=((10, 10, 30, 20), (50, 40, 40, 30)))
    for i, a in enumerate(data["annotations"]):
        a["id"] = i
    ds = CocoDetection(write_set(tmp_path, data, {"1.png": image()}), "train", train=False)
    assert sorted(a["id"] for a in ds.coco.loadAnns(ds.coco.getAnnIds())) == [1, 2]
    boxes = ds.boxes[0]
    detections = {1: np.concatenate([boxes, np.ones((2, 1)), ds.labels[0][:, None]], axis=1)}
    stats = evaluate_detections(ds.coco, detections, ds.cat_ids, ds.class_names)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)


# ---------------------------------------------------------------- bad input: errors when an item is read

def test_missing_image_file(tmp_path):
    ds = CocoDetection(write_set(tmp_path, coco_dict(), {}), "train", train=True)
    with pytest.raises(FileNotFoundError, match=r"train/1\.png: image file not found$"):
        ds[0]


def test_a_file_name_with_windows_separators_says_so(tmp_path):
    # "sub\\1.png" names one file called so on Linux: the error said only that it was not found, next to sub/1.png.
    data = coco_dict()
    data["images"][0]["file_name"] = "sub\\1.png"
    (tmp_path / "train" / "sub").mkdir(parents=True)
    ds = CocoDetection(write_set(tmp_path, data, {"sub/1.png": image()}), "train", train=True)
    with pytest.raises(FileNotFoundError, match=r"train/sub\\1\.png: image file not found; .*instances_train\.json "
                                                 r"separates the folders of its file_name with '\\' \(Windows\), where "
                                                 r"'/' is needed: 'sub/1\.png' exists"):
        ds[0]


@pytest.mark.parametrize("file_name,on_disk", [("sub/1.png", "sub/1.PNG"), ("IMG_1.JPG", "IMG_1.jpg"),
                                               ("Img_1.png", "img_1.png"), ("img_1.png", "IMG_1.PNG")])
def test_a_file_name_in_other_letter_case_says_so(tmp_path, file_name, on_disk):
    # A camera's IMG_1.JPG listed as IMG_1.jpg by a converter is found on Windows and macOS, not on Linux: the error
    # said only "image file not found", beside the file.
    data = coco_dict()
    data["images"][0]["file_name"] = file_name
    (tmp_path / "train" / "sub").mkdir(parents=True)
    ds = CocoDetection(write_set(tmp_path, data, {on_disk: image()}), "train", train=True)
    with pytest.raises(FileNotFoundError, match=rf"train/{file_name}: image file not found; '{on_disk}' exists: file "
                                                r"names differ by letter case here, .* correct its file_name in "
                                                r".*instances_train\.json$"):
        ds[0]


def test_a_file_name_with_a_folder_the_image_folder_lacks_says_so(tmp_path):
    # Label Studio writes "images/1.png", relative to its export folder; with the images/ folder itself linked as
    # the split's, the error said only "image file not found", beside the file.
    data = coco_dict()
    data["images"][0]["file_name"] = "images/1.png"
    ds = CocoDetection(write_set(tmp_path, data, {"1.png": image()}), "train", train=True)
    with pytest.raises(FileNotFoundError, match=r"train/images/1\.png: image file not found; '1\.png' is in "
                                                r".*/train itself: its file_name in .*instances_train\.json starts "
                                                r"with the folder 'images' .* must be the one that holds 'images'$"):
        ds[0]


@pytest.mark.parametrize("content,match", [(b"", "image file is empty"), (b"not an image at all", "cannot decode")])
def test_undecodable_image(tmp_path, content, match):
    ds = CocoDetection(write_set(tmp_path, coco_dict(), {"1.png": content}), "train", train=False)
    with pytest.raises(ValueError, match=r"1\.png: " + match):
        ds[0]


def test_truncated_jpeg(tmp_path):
    ok, buf = cv2.imencode(".jpg", image())
    data = coco_dict()
    data["images"][0]["file_name"] = "1.jpg"
    ds = CocoDetection(write_set(tmp_path, data, {"1.jpg": buf.tobytes()[:-300]}), "train", train=True)
    with pytest.raises(ValueError, match=r"1\.jpg: truncated JPEG"):
        ds[0]
    write_set(tmp_path, data, {"1.jpg": buf.tobytes()})
    assert ds.load(0)[0].shape == (80, 100, 3)


def test_a_jpeg_with_data_after_its_end_loads_and_one_cut_in_its_scan_does_not(tmp_path):
    """A phone's "motion photo" appends an MP4 after the JPEG's end-of-image marker; the video's bytes may hold a
    start-of-scan marker (0xFFDA) with no end-of-image after it, which must not make the photo look cut short."""
    jpeg = cv2.imencode(".jpg", image())[1].tobytes()
    video = b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda\x00\x0c" + bytes(range(40))
    motion_photo = load_image(write_bytes(tmp_path / "motion.jpg", jpeg + video))
    np.testing.assert_array_equal(motion_photo, load_image(write_bytes(tmp_path / "plain.jpg", jpeg)))
    scan = jpeg.index(b"\xff\xda")  # cv2's JPEG has no thumbnail: its first 0xFFDA is the start of its scan
    cut = jpeg[:(scan + len(jpeg)) // 2]
    with pytest.raises(ValueError, match=r"cut\.jpg: truncated JPEG"):
        load_image(write_bytes(tmp_path / "cut.jpg", cut))


def test_a_jpeg_cut_in_its_scan_is_found_behind_a_thumbnail_or_fill_bytes(tmp_path):
    """The end-of-image marker is looked for after the start of the scan, found by walking the header segments: an
    EXIF thumbnail before the scan has an end-of-image of its own, and a marker may follow fill bytes (0xFF)."""
    jpeg = cv2.imencode(".jpg", image())[1].tobytes()
    exif = b"Exif\x00\x00" + b"\xff\xd8" + bytes(16) + b"\xff\xd9"  # a thumbnail's start and end markers
    plain = load_image(write_bytes(tmp_path / "plain.jpg", jpeg))
    for extra in (b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif, b"\xff\xff"):
        whole = jpeg[:2] + extra + jpeg[2:]
        np.testing.assert_array_equal(load_image(write_bytes(tmp_path / "whole.jpg", whole)), plain)
        scan = whole.index(b"\xff\xda")  # the image's own: neither the thumbnail nor the fill bytes hold one
        with pytest.raises(DataError, match=r"cut\.jpg: truncated JPEG"):
            load_image(write_bytes(tmp_path / "cut.jpg", whole[:(scan + len(whole)) // 2]))


def test_an_image_too_large_to_evaluate_is_named_before_any_work(tmp_path):
    """A 6000 x 4000 val photo (input 6015 x 4095, over 4095 x 4095 pixels): train.py trained an epoch, then stopped
    at its validation with the image's size but not its file. By the json's size the eval set refuses it when built
    (for the largest test scale); an entry without a size is named when read. Training items crop: not refused."""
    data = coco_dict(width=6000, height=4000)
    root = write_set(tmp_path, data, {}, split="val")
    with pytest.raises(DataError, match=r"val/1\.png \(.*instances_val\.json\): an image of 6000 x 4000 pixels at "
                                        r"test scale 1 makes a network input of 6015 x 4095 pixels"):
        CocoDetection(root, "val", train=False)
    data["images"][0].update(width=4000, height=2000)
    write_set(tmp_path, data, {}, split="val")
    CocoDetection(root, "val", train=False)
    with pytest.raises(DataError, match=r"1\.png .*at test scale 1\.5 makes a network input of 6015 x 3071"):
        CocoDetection(root, "val", train=False, test_scales=(1, 1.5))
    CocoDetection(write_set(tmp_path, data, {}, split="train"), "train", train=True)
    del data["images"][0]["width"], data["images"][0]["height"]
    ds = CocoDetection(write_set(tmp_path, data, {"1.png": np.zeros((4096, 4096), np.uint8)}, split="val"), "val",
                       train=False)
    with pytest.raises(DataError, match=r"val/1\.png .*an image of 4096 x 4096 pixels at test scale 1"):
        ds[0]


def test_image_size_differs_from_json(tmp_path):
    ds = CocoDetection(write_set(tmp_path, coco_dict(width=80, height=100), {"1.png": image()}), "train", train=True)
    with pytest.raises(ValueError, match=r"1\.png: decoded size 100x80 differs from width x height 80x100"):
        ds[0]


def test_gray_rgba_and_16_bit_images_become_8_bit_bgr(tmp_path):
    img = image()
    gray = img[:, :, 1]
    cases = {"gray.png": gray, "rgba.png": np.dstack([img, np.full(gray.shape, 9, np.uint8)]),
             "deep.png": img.astype(np.uint16) * 257, "deep_gray.png": gray.astype(np.uint16) * 257}
    want = {"gray.png": np.dstack([gray] * 3), "rgba.png": img, "deep.png": img, "deep_gray.png": np.dstack([gray] * 3)}
    data = coco_dict()
    data["images"] = [{"id": i + 1, "file_name": n} for i, n in enumerate(cases)]
    ds = CocoDetection(write_set(tmp_path, data, cases), "train", train=True)
    for i, name in enumerate(cases):
        got, _, _ = ds.load(i)
        assert got.dtype == np.uint8 and got.shape == (80, 100, 3), name
        np.testing.assert_array_equal(got, want[name], err_msg=name)
        torch.manual_seed(i)
        assert ds[i]["image"].shape == (3, 511, 511)


def test_boxes_outside_zero_size_crowd_and_empty_images(tmp_path):
    boxes = ((-10, -10, 30, 30),  # partly outside: clipped to (0, 0, 20, 20)
             (90, 70, 50, 50),  # partly outside: clipped to (90, 70, 100, 80)
             (120, 10, 20, 20),  # wholly outside: dropped
             (5, 5, 0, 10), (5, 5, 10, 0), (5, 5, -3, 4),  # zero or negative size: dropped
             (40, 40, 10, 10))  # crowd: not a target
    data = coco_dict(boxes=boxes)
    data["annotations"][-1]["iscrowd"] = 1
    data["images"].append({"id": 2, "file_name": "2.png", "width": 100, "height": 80})
    ds = CocoDetection(write_set(tmp_path, data, {"1.png": image(), "2.png": image(seed=1)}), "train", train=True)
    _, b, labels = ds.load(0)
    np.testing.assert_array_equal(b, [[0, 0, 20, 20], [90, 70, 100, 80]])
    assert labels.tolist() == [0, 0]
    assert len(ds.coco.getAnnIds(imgIds=[1], iscrowd=None)) == 7  # the ground truth keeps everything

    torch.manual_seed(0)
    empty = ds[1]
    assert not empty["mask"].any() and all(empty[f"hm_{k}"].sum() == 0 for k in ("tl", "br", "ct"))
    ev = CocoDetection(tmp_path, "train", train=False)
    assert ev[1]["image_id"] == 2 and ev[1]["inputs"][0][0].shape == (1, 3, 127, 127)


@pytest.mark.parametrize("value,ok", [(100.0, True), (100.5, False), (0, False), ("100", False)])
def test_image_width_must_be_a_positive_whole_number(tmp_path, value, ok):
    write_set(tmp_path, coco_dict(width=value), {"1.png": image()})
    if ok:
        assert CocoDetection(tmp_path, "train", train=True).load(0)[0].shape == (80, 100, 3)
    else:
        with pytest.raises(ValueError, match=r"images\[0\] \(file '1.png'\) has width .* positive whole number"):
            CocoDetection(tmp_path, "train", train=True)


def with_exif_orientation(jpeg: bytes, orientation: int, order: str = ">") -> bytes:
    """`jpeg` with an APP1 Exif segment holding only the Orientation tag (0x0112), in big-endian (">") or
    little-endian ("<") TIFF layout."""
    tiff = (b"MM" if order == ">" else b"II") + struct.pack(order + "HI", 42, 8) + struct.pack(order + "H", 1) + \
        struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(order + "I", 0)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    return jpeg[:2] + app1 + jpeg[2:]


@pytest.mark.parametrize("orientation, rotate", [(1, None), (3, cv2.ROTATE_180), (6, cv2.ROTATE_90_CLOCKWISE),
                                                 (8, cv2.ROTATE_90_COUNTERCLOCKWISE)])
def test_exif_orientation_is_applied_as_viewers_show_the_photo(tmp_path, orientation, rotate):
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :15] = 255  # a white band on the stored image's left
    jpeg = cv2.imencode(".jpg", stored)[1].tobytes()
    plain = load_image(write_bytes(tmp_path / "plain.jpg", jpeg))
    got = load_image(write_bytes(tmp_path / "exif.jpg", with_exif_orientation(jpeg, orientation)))
    np.testing.assert_array_equal(got, plain if rotate is None else cv2.rotate(plain, rotate))  # exact permutation


@pytest.mark.parametrize("orientation, order, json_size, note",
                         [(6, ">", (100, 80), True), (8, "<", (100, 80), True), (3, ">", (80, 100), False),
                          (1, "<", (80, 100), False)])
def test_a_size_mismatch_of_a_photo_turned_by_exif_says_so(tmp_path, orientation, order, json_size, note):
    """A 100x80 photo stored with EXIF orientation 6 or 8 is read as 80x100; an annotation tool that ignored the
    tag wrote 100x80. A swapped size without such a tag (1, or 3: 180 degrees) gets no note."""
    jpeg = with_exif_orientation(cv2.imencode(".jpg", image())[1].tobytes(), orientation, order)
    data = coco_dict(width=json_size[0], height=json_size[1])
    data["images"][0]["file_name"] = "1.jpg"
    ds = CocoDetection(write_set(tmp_path, data, {"1.jpg": jpeg}), "train", train=True)
    with pytest.raises(ValueError) as e:
        ds.load(0)
    assert str(e.value).startswith(f"{tmp_path / 'train' / '1.jpg'}: decoded size")
    hint = f": its EXIF orientation {orientation} turns it by 90 degrees"
    assert (hint in str(e.value)) == note, str(e.value)


def test_the_exif_orientation_is_found_behind_large_segments(tmp_path):
    """An Exif block after two 64 KiB ICC segments (APP2) is applied by imread, but was not found: only the first
    128 KiB of the file were read."""
    icc = b"\xff\xe2" + struct.pack(">H", 65535) + bytes(65533)
    jpeg = with_exif_orientation(cv2.imencode(".jpg", image())[1].tobytes(), 6)
    path = write_bytes(tmp_path / "icc.jpg", jpeg[:2] + icc + icc + jpeg[2:])
    assert load_image(path).shape[:2] == (100, 80)  # 100 x 80 stored, read turned
    assert exif_orientation(path) == 6


@pytest.mark.parametrize("suffix, orientation, turn", [(".png", 6, cv2.ROTATE_90_CLOCKWISE),
                                                       (".webp", 8, cv2.ROTATE_90_COUNTERCLOCKWISE),
                                                       (".tiff", 3, cv2.ROTATE_180)])
def test_the_orientation_imread_applies_to_png_webp_and_tiff_files_is_found(tmp_path, suffix, orientation, turn):
    """imread turns these files by their orientation tag as it turns JPEGs (a TIFF by its own tags; OpenCV 5.0
    decodes no TIFF turned by 90 degrees), but only a JPEG's tag was read: datasets.check listed no note for them,
    and a size error of a PNG turned by 90 degrees said nothing of the turn."""
    stored = PIL.Image.fromarray(image()[:, :, ::-1])
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    tag = {"tiffinfo": {0x0112: orientation}} if suffix == ".tiff" else {"exif": exif.tobytes()}
    lossless = {"lossless": True} if suffix == ".webp" else {}
    stored.save(tmp_path / f"plain{suffix}", **lossless)
    stored.save(tmp_path / f"turned{suffix}", **lossless, **tag)
    plain = load_image(tmp_path / f"plain{suffix}")
    np.testing.assert_array_equal(load_image(tmp_path / f"turned{suffix}"), cv2.rotate(plain, turn))  # lossless
    assert exif_orientation(tmp_path / f"turned{suffix}") == orientation
    assert exif_orientation(tmp_path / f"plain{suffix}") == 1


def test_an_eval_split_warns_of_the_boxes_training_drops_or_clips_but_the_evaluation_scores_as_given(tmp_path):
    """Training drops a box without width and clips one that leaves its image, while the COCO evaluation scores
    both as the json gives them: detections equal to the training boxes scored AP 0.46 (AP50 0.75) with no word of
    why. A box within the tolerance (a converter's rounding) and a crowd region (ignored by the evaluation) are not
    named."""
    data = coco_dict(boxes=((10, 10, 30, 20), (20, 20, 0, 10), (-30, 10, 60, 20), (0, 0, 100.5, 80), (-50, 0, 80, 5)))
    data["annotations"][-1]["iscrowd"] = 1
    write_set(tmp_path, data, {"1.png": image()})
    assert CocoDetection(tmp_path, "train", train=True).ground_truth_notes == []
    [note] = CocoDetection(tmp_path, "train", train=False).ground_truth_notes
    assert note == (f"{tmp_path / 'annotations' / 'instances_train.json'}: 2 ground-truth boxes (annotation ids 2, 3) "
                    "have no width or height, or leave their image: training drops or clips them, but the evaluation "
                    "scores them as the json gives them, where no detection (clipped to its image) matches them "
                    "fully; `python -m datasets.check` lists them")


def test_boxes_in_fractions_of_the_image_are_a_warning_of_both_splits(tmp_path):
    """A YOLO-to-COCO converter that did not scale the boxes to pixels: each lies within the image's top left pixel.
    Nothing said so before the first epoch ended with "trained on no box at all ... lower --min_box_size"."""
    data = coco_dict(boxes=((0.1, 0.2, 0.3, 0.25), (0.5, 0.5, 0.5, 0.5), (0.2, 0.2, 0, 0.1)))
    write_set(tmp_path, data, {"1.png": image()})
    warning = (f"{tmp_path / 'annotations' / 'instances_train.json'}: all 2 boxes lie within the image's top left "
               "pixel, [0, 1] x [0, 1]: fractions of its width and height (YOLO's coordinates)? A COCO bbox is "
               "[x, y, width, height] in pixels")
    assert CocoDetection(tmp_path, "train", train=True).training_notes == [warning]
    assert warning in CocoDetection(tmp_path, "train", train=False).ground_truth_notes
    data["annotations"][1]["bbox"] = [0.5, 0.5, 0.5, 1.5]  # one box of pixels: a set in pixels with small boxes
    write_set(tmp_path, data, {})
    assert CocoDetection(tmp_path, "train", train=True).training_notes == []


def test_an_eval_split_warns_of_boxes_of_positive_size_with_area_0(tmp_path):
    """Converters write area 0 for objects without a segmentation. The evaluation sorts objects by `area`, so a
    60 x 50 box given area 0 is a small object: detections equal to the ground truth scored AP_S 1 and AP_M -1 (no
    medium object) where the box is a medium one, with no word of why. An area left out is filled in as w * h."""
    data = coco_dict(boxes=((10, 10, 60, 50), (5, 5, 20, 20)))
    data["annotations"][0]["area"] = 0
    del data["annotations"][1]["area"]
    write_set(tmp_path, data, {"1.png": image()})
    ds = CocoDetection(tmp_path, "train", train=False)
    assert ds.ground_truth_notes == [
        f"{tmp_path / 'annotations' / 'instances_train.json'}: boxes of positive width and height given area 0 "
        "(1: annotation ids 1): the evaluation counts them as small objects (area below 32^2) whatever their size, "
        "which moves them into AP_S and out of AP_M and AP_L; leave `area` out (it is then width x height) or give "
        "the object's area"]
    results = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in data["annotations"]]
    evaluation = COCOeval(ds.coco, load_results(ds.coco, results), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    ap_small, ap_medium = evaluation.stats[3:5]
    assert (ap_small, ap_medium) == (pytest.approx(1), -1)  # the 60 x 50 box counted as small
    data["annotations"][0]["area"] = 3000
    write_set(tmp_path, data, {"1.png": image()})
    assert CocoDetection(tmp_path, "train", train=False).ground_truth_notes == []


def test_a_training_image_of_the_wrong_size_is_skipped_with_what_is_wrong(tmp_path):
    data = coco_dict(width=80, height=100)
    data["images"].append({"id": 2, "file_name": "2.png", "width": 100, "height": 80})
    ds = CocoDetection(write_set(tmp_path, data, {"1.png": image(), "2.png": image(seed=1)}), "train", train=True)
    with pytest.warns(UserWarning, match=r"skipping a training image that cannot be used: .*1\.png: decoded size "
                                         r"100x80 differs from width x height 80x100"):
        item = TrainSamples(ds, seed=0, epoch=0)[0]
    assert item["unreadable"] == 1


def test_a_run_of_unreadable_training_images_counts_each_once(tmp_path):
    """Images 1, 2 and 3 of 5 cut short: items 1, 2 and 3 each read the next readable image, 4. Each item counted
    the images it skipped (3 + 2 + 1 = 6 for 3 images), which the epoch log printed as 'unreadable images skipped'
    and --max_bad_fraction compared with the epoch's size: a run of k missing files (an interrupted copy) counted
    k (k + 1) / 2."""
    data = coco_dict()
    data["images"] = [{"id": i + 1, "file_name": f"{i}.png", "width": 100, "height": 80} for i in range(5)]
    files = {f"{i}.png": image(seed=i) if i in (0, 4) else b"\x89PNG cut short" for i in range(5)}
    ds = CocoDetection(write_set(tmp_path, data, files), "train", train=True)
    with pytest.warns(UserWarning, match="skipping a training image that cannot be used"):
        counts = [int(TrainSamples(ds, seed=0, epoch=0)[i]["unreadable"]) for i in range(5)]
    assert counts == [0, 1, 1, 1, 0]


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_train_and_val_sets_of_other_categories_are_named_with_their_files_and_names(tmp_path):
    def split(name: str, cats) -> CocoDetection:
        write_set(tmp_path, coco_dict(cats=cats), {"1.png": image()}, split=name)
        return CocoDetection(tmp_path, name, train=True)

    train_set = split("train", [(i, f"c{i}") for i in range(1, 9)])
    val_set = split("val", [(1, "c1"), (2, "dog"), (3, "c3")])
    train_file, val_file = train_set.ann_file, val_set.ann_file
    with pytest.raises(DataError) as e:
        check_same_categories(train_set, val_set)
    assert str(e.value) == (f"{train_file} and {val_file} have different categories (only in {train_file}: 'c2', "
                            f"'c4', 'c5', 'c6', 'c7' and 1 more; only in {val_file}: 'dog')")
    swapped = split("val", [(1, "c2"), (2, "c1")] + [(i, f"c{i}") for i in range(3, 9)])
    with pytest.raises(DataError, match=r"\(the same names, ordered by category id as 'c1', 'c2', 'c3', 'c4', 'c5' "
                                        r"and 3 more in the first and 'c2', 'c1', 'c3', 'c4', 'c5' and 3 more in the"):
        check_same_categories(train_set, swapped)
    check_same_categories(train_set, split("val", [(i + 10, f"c{i}") for i in range(1, 9)]))


def test_a_subfolder_and_a_symlink_to_an_image_load_but_a_device_is_not_read(tmp_path):
    """A symbolic link to a device (/dev/zero was read until the memory ran out) is refused unread; /dev/null stands
    in for it here."""
    data = coco_dict()
    data["images"] = [{"id": 1, "file_name": "sub/1.png"}, {"id": 2, "file_name": "link.png"},
                      {"id": 3, "file_name": "device.png"}]
    write_set(tmp_path, data, {"2.png": image()})
    (tmp_path / "train" / "sub").mkdir()
    (tmp_path / "train" / "2.png").rename(tmp_path / "train" / "sub" / "1.png")
    (tmp_path / "train" / "link.png").symlink_to(tmp_path / "train" / "sub" / "1.png")
    (tmp_path / "train" / "device.png").symlink_to("/dev/null")
    ds = CocoDetection(tmp_path, "train", train=False)
    assert ds.load(0)[0].shape == ds.load(1)[0].shape == (80, 100, 3)
    with pytest.raises(DataError, match=r"device\.png: a device or socket, not an image file"):
        ds.load(2)


def test_an_image_path_the_system_cannot_open_is_named(tmp_path):
    """Errors of the operating system other than a missing file were OSError tracebacks, in the loader and in
    datasets.check (permission denied too, which tests running as root cannot make)."""
    data = coco_dict()
    data["images"] = [{"id": 1, "file_name": "1.png/x.png"}, {"id": 2, "file_name": "a" * 300 + ".png"},
                      {"id": 3, "file_name": "loop.png"}]
    write_set(tmp_path, data, {"1.png": image()})
    (tmp_path / "train" / "loop.png").symlink_to("loop.png")
    ds = CocoDetection(tmp_path, "train", train=False)
    for i, reason in enumerate(["Not a directory", "File name too long", "Too many levels of symbolic links"]):
        with pytest.raises(DataError, match=f"train/{data['images'][i]['file_name']}: cannot read the image file "
                                            rf"\({reason}\)"):
            ds.load(i)


FIRST_CALL_SLOW_LOADER = '''
import time
SLOW = [True]  # the first item of the process pays a one-off set-up

class COCO:
    def __init__(self, root, split, **kwargs):
        pass

    def __len__(self):
        return 2

    def __getitem__(self, i):
        if SLOW[0]:
            SLOW[0] = False
            time.sleep(0.5)
        return i

COCO_eval = COCO
'''


def test_the_data_bench_times_the_seed_loader_warm_as_ours(tmp_path, monkeypatch):
    """bench/bench_data.py runs the seed's loader in a fresh process per round: it timed that process's first items,
    set-up included, beside our warmed-up loader (a 1.2-1.8x slower seed on tests/data/raccoon). A stand-in seed
    whose first item takes 0.5 s: timed cold, 2 items would read at most 4 samples/s. Warm, they take microseconds;
    8 samples/s leaves them 0.25 s, for a loaded machine or a container paused by its CPU quota (up to 0.1 s).
    The stand-in's `datasets` has no __init__.py (a checkout may have none): with this repository on PYTHONPATH (an
    IDE's default) the seed's process imported ours instead ("cannot import name 'COCO_eval'")."""
    from bench.bench_data import run_seed

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "coco.py").write_text(FIRST_CALL_SLOW_LOADER)
    rates = run_seed(tmp_path, tmp_path, 127, 1)
    assert rates["train"] > 8 and rates["eval"] > 8, rates
