"""A detection data set over any COCO-format json: COCO 2017 itself, the built-in shapes set, or your own data.

Layout: `{data_dir}/annotations/instances_{split}.json` and the images in `{data_dir}/{split}/`. A split to
evaluate may lack annotations (COCO test-dev: `annotations/image_info_test-dev2017.json`, which has images and
categories only, with the images in `test2017/`): `has_annotations` is then False and test.py writes results for
the evaluation server instead of scoring them.
- Classes come from the json: category ids sorted ascending map to labels 0..C-1 (`cat_ids[label]` is the id,
  `class_names[label]` its name); any number of classes.
- Training targets leave out crowd boxes (iscrowd 1) and boxes with zero or negative width or height; boxes that
  reach outside the image are clipped to it (and dropped when nothing is left). Images without annotations are
  kept and give empty targets. The COCO ground truth used for evaluation is left as the json has it
  (`ground_truth_notes` name the boxes it scores that training drops or clips, and boxes of positive size given
  area 0, for train.py and test.py to warn of).
- Checked when the data set is built (an error names the file, the entry and what was expected): the json exists
  and parses; it has `images`, `annotations` and `categories` lists; images have `id` and `file_name` (a path
  inside the image folder: relative, without '..'), annotations `image_id`, `category_id` and a `bbox` of 4 finite
  numbers, categories `id` and `name`; ids are unique and every annotation refers to a listed image and category;
  `area`, when given, is a number, not negative for a box of positive size (pycocotools' area ranges would leave
  the box out of the evaluation). Filled in when absent: annotation `id` (numbered after the largest given),
  `iscrowd` (0) and `area` (w * h). An annotation id 0 is numbered so too: pycocotools' matching reads id 0 as
  "no match", so that box would never count as found.
- Checked when an item is read (the error names the image file): the file exists, can be opened, is no device or
  socket (a symbolic link to /dev/zero would be read until the memory runs out; a named pipe is read), decodes (a
  truncated JPEG does not) and has the json's `width` and `height` when those are given (of the upright image: when
  EXIF turns a photo by 90 degrees and the json has its stored size, the error says so). Grayscale, RGBA and 16-bit
  images are read as 8-bit BGR (see datasets/image_io.py).

A training item is the dict of docs/FORMAT.md (normalised image and triplet targets); an evaluation item is
dict(image_id=int, inputs=[(images (1 or 2, 3, H_in, W_in), EvalMeta) for each test scale]).
"""
import contextlib
import io
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from datasets.image_io import exif_orientation, load_image
from datasets.targets import MAX_OBJECTS, STRIDE, make_targets
from datasets.transforms import check_input_size, clip_boxes, eval_input, train_transform
from utils.checks import is_id
from utils.errors import ArgumentError, DataError, MissingFileError


def splits_in(folder: Path) -> list[str]:
    """The split names of the annotation files in `folder` (instances_<split>.json, image_info_<split>.json)."""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:  # no such folder, or not readable: no splits to suggest
        return []
    found = (re.fullmatch(r"(?:instances|image_info)_(.+)\.json", name) for name in names)
    return sorted({m.group(1) for m in found if m})


def annotation_file_missing(path: Path) -> MissingFileError:
    """The error for the annotation json `path` that is not there, naming the splits whose files are beside it."""
    splits = splits_in(path.parent)
    return MissingFileError(f"{path}: annotation file not found (expected annotations/instances_<split>.json, or "
                            f"image_info_<split>.json for a split without annotations; splits there: "
                            f"{', '.join(splits) if splits else 'none'})")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise annotation_file_missing(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:  # permission denied
        raise DataError(f"{path}: cannot read the annotation file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid json (not UTF-8 text): {e}") from None
    # JSONDecodeError, and an integer of more digits than Python converts (4300), are ValueErrors; lists or objects
    # nested deeper than Python's recursion limit a RecursionError.
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: invalid json: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a json object with 'images', 'annotations' and 'categories', "
                         f"got a {type(data).__name__}")
    return data


def _entries(data: dict, key: str, path: Path, required: tuple[str, ...],
             problems: list[str]) -> list[tuple[int, dict]]:
    """(index in list `key`, entry) of the dict entries that have every `required` field; the others are reported in
    `problems`. The index is the entry's own, so that later problems name it even after an entry left out."""
    items = data.get(key)
    if not isinstance(items, list):
        problems.append(f"{path}: missing list '{key}' (a COCO detection file has 'images', 'annotations' and "
                        "'categories')")
        return []
    usable = []
    for i, item in enumerate(items):
        missing = [k for k in required if not isinstance(item, dict) or k not in item]
        if missing:
            problems.append(f"{path}: {key}[{i}] lacks {', '.join(repr(k) for k in missing)}")
        else:
            usable.append((i, item))
    return usable


def is_finite_number(value) -> bool:
    """An int or float (not a bool) that is finite as a float: json integers have no bound, and one past 1e308
    (10**400) is no float at all."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def is_box(value) -> bool:
    """A COCO bbox: a list of 4 finite numbers (not bools), x y width height; any width and height."""
    return isinstance(value, list) and len(value) == 4 and all(map(is_finite_number, value))


def has_positive_size(value) -> bool:
    """A COCO bbox (`is_box`) of positive width and height: one that training takes (clipped to its image)."""
    return is_box(value) and value[2] > 0 and value[3] > 0


def is_size(value) -> bool:
    """An image width or height: a positive whole number (100.0 too, not True, "100" or 10**400)."""
    return is_finite_number(value) and value > 0 and float(value).is_integer()


def is_file_name(value) -> bool:
    """An image's `file_name`: a relative path inside the split's image folder (subfolders allowed), as a non-empty
    string without a '..' part or a NUL byte; an absolute path or '../../etc/passwd' would read a file elsewhere."""
    if not isinstance(value, str) or "\0" in value:
        return False
    path = PurePosixPath(value)
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts


def shortened(value, width: int) -> str:
    """repr(value), cut to `width` characters with "..." (a 5000-digit id would fill the screen)."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _unique_ids(items: list[tuple[int, dict]], key: str, path: Path, problems: list[str]) -> set:
    first: dict[int, int] = {}  # id -> index of its first entry, named with each repeat
    for i, item in items:
        v = item["id"]
        if not is_id(v):
            problems.append(f"{path}: {key}[{i}].id must be an integer of 64 bits, got {shortened(v, 40)}")
        elif v in first:
            problems.append(f"{path}: {key}[{i}].id {v} appears more than once (first in {key}[{first[v]}])")
        else:
            first[v] = i
    return set(first)


OUTSIDE_TOLERANCE = 0.01  # of the image side a box may leave it by (at least 1 px: converters round)


def box_fault(box: list, width: int | None, height: int | None) -> str | None:
    """What makes bbox `box` (4 finite numbers) one that training drops or clips, in an image of `width` x `height`
    (None: not known, and only the box's own sides are looked at): "has a width or height of 0 or less", "leaves its
    WxH image" by more than OUTSIDE_TOLERANCE of the image's side, or "lies entirely outside its WxH image"; None
    for a box training takes as it is."""
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return "has a width or height of 0 or less"
    if width is None or height is None:
        return None
    beyond = max(-x, x + w - width) / width, max(-y, y + h - height) / height
    limits = max(OUTSIDE_TOLERANCE, 1 / width), max(OUTSIDE_TOLERANCE, 1 / height)
    if beyond[0] <= limits[0] and beyond[1] <= limits[1]:
        return None
    inside = x < width and y < height and x + w > 0 and y + h > 0
    return f"{'leaves' if inside else 'lies entirely outside'} its {width}x{height} image"


def evaluation_notes(data: dict, ann_file: Path) -> list[str]:
    """Warnings for an evaluation split (a checked dict) whose scores would not measure what the json's boxes
    suggest: `scored_as_given_note`, `zero_area_note` and `fraction_boxes_note`, those that apply."""
    notes = scored_as_given_note(data, ann_file), zero_area_note(data, ann_file), fraction_boxes_note(data, ann_file)
    return [note for note in notes if note]


def training_notes(data: dict, ann_file: Path) -> list[str]:
    """Warnings for a training split (a checked dict) that trains other than its json suggests:
    `unboxed_categories_note` and `fraction_boxes_note`, those that apply."""
    return [note for note in (unboxed_categories_note(data, ann_file), fraction_boxes_note(data, ann_file)) if note]


def fraction_boxes_note(data: dict, ann_file: Path) -> str | None:
    """A warning for the annotations of COCO dict `data` (entries of any shape: datasets.check passes it unchecked)
    whose boxes of positive size all lie within [0, 1] x [0, 1]: fractions of the image's width and height, as YOLO
    writes them (a converter that did not scale them to pixels), where COCO's are pixels. Training would learn
    boxes of a pixel at the image's corner, and no detection would match them. None otherwise."""
    annotations = data.get("annotations") if isinstance(data.get("annotations"), list) else []
    boxes = [a["bbox"] for a in annotations if isinstance(a, dict) and has_positive_size(a.get("bbox"))]
    if not boxes or any(x < 0 or y < 0 or x + w > 1 or y + h > 1 for x, y, w, h in boxes):
        return None
    return (f"{ann_file}: all {len(boxes)} boxes lie within the image's top left pixel, [0, 1] x [0, 1]: fractions "
            "of its width and height (YOLO's coordinates)? A COCO bbox is [x, y, width, height] in pixels")


def some_ids(ids: list) -> str:
    """`ids` for a message: the first 5, and how many more."""
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return ", ".join(map(str, ids[:5])) + more


def scored_as_given_note(data: dict, ann_file: Path) -> str | None:
    """A warning for an evaluation split (a checked dict) whose non-crowd boxes include some that training drops or
    clips (`box_fault`, against the json's image sizes): the evaluation scores them as the json gives them, and no
    detection, which is clipped to its image, matches them fully (a box of 300 x 300 from -20, -10 in a 259 x 194
    image: IoU 0.56 at best; one without width: none). None when there is none."""
    size_of = {im["id"]: (im.get("width"), im.get("height")) for im in data["images"]}
    ids = [a["id"] for a in data.get("annotations", [])
           if not a["iscrowd"] and box_fault(a["bbox"], *size_of[a["image_id"]])]
    if not ids:
        return None
    return (f"{ann_file}: {len(ids)} ground-truth boxes (annotation ids {some_ids(ids)}) have "
            "no width or height, or leave their image: training drops or clips them, but the evaluation scores them "
            "as the json gives them, where no detection (clipped to its image) matches them fully; "
            "`python -m datasets.check` lists them")


def zero_area_note(data: dict, ann_file: Path) -> str | None:
    """A warning for the annotations of COCO dict `data` (entries of any shape: datasets.check passes it unchecked)
    whose box has a positive width and height but whose `area` is 0, as converters write it for objects without a
    segmentation: the COCO evaluation sorts objects into small, medium and large by `area`, so it counts these as
    small whatever their size. None when there is none."""
    annotations = data.get("annotations") if isinstance(data.get("annotations"), list) else []
    ids = [a.get("id", f"annotations[{i}]") for i, a in enumerate(annotations)
           if isinstance(a, dict) and has_positive_size(a.get("bbox")) and is_finite_number(a.get("area"))
           and a["area"] == 0]
    if not ids:
        return None
    return (f"{ann_file}: boxes of positive width and height given area 0 ({len(ids)}: annotation ids "
            f"{some_ids(ids)}): the evaluation counts them as small objects (area below 32^2) whatever their size, "
            "which moves them into AP_S and out of AP_M and AP_L; leave `area` out (it is then width x height) or "
            "give the object's area")


def unboxed_categories_note(data: dict, ann_file: Path) -> str | None:
    """A note naming the categories of COCO dict `data` (entries of any shape: datasets.check passes it unchecked)
    that no box to train on has (not crowd, of positive width and height). Each is still a class, that a training
    split teaches as never present, and whose AP an evaluation of the split leaves out of the mean. Exporters add
    such entries: Roboflow one named after the data set, labelme2coco '_background_'. None when there is none, or no
    box at all (which is an error of its own)."""
    annotations = data.get("annotations") if isinstance(data.get("annotations"), list) else []
    boxed = {a["category_id"] for a in annotations if isinstance(a, dict) and is_id(a.get("category_id"))
             and has_positive_size(a.get("bbox")) and a.get("iscrowd", 0) != 1}
    categories = [c for c in data.get("categories") if isinstance(c, dict) and is_id(c.get("id"))] \
        if isinstance(data.get("categories"), list) else []
    unboxed = [f"{str(c.get('name'))!r} (id {c['id']})" for c in categories if c["id"] not in boxed]
    if not boxed or not unboxed:
        return None
    more = f" and {len(unboxed) - 5} more" if len(unboxed) > 5 else ""
    return (f"{ann_file}: no box here has category {', '.join(unboxed[:5])}{more} ({len(unboxed)} of the "
            f"{len(categories)} categories). Each is still a class of the network: trained on this split, it learns "
            "the class as never present; evaluated on it, the class's AP is '-', left out of the mean. An exporter's "
            "extra entry (Roboflow's named after the data set, labelme2coco's '_background_') is best left out of "
            "the 'categories' of every split")


def coco_problems(data: dict, path: Path, require_annotations: bool = True) -> list[str]:
    """Every problem of a COCO detection dict (see the module docstring), each naming its entry; [] if usable.
    Without `require_annotations`, a dict without an 'annotations' list is accepted."""
    problems: list[str] = []
    categories = _entries(data, "categories", path, ("id", "name"), problems)
    images = _entries(data, "images", path, ("id", "file_name"), problems)
    annotations = [] if "annotations" not in data and not require_annotations else \
        _entries(data, "annotations", path, ("image_id", "category_id", "bbox"), problems)
    if isinstance(data.get("categories"), list) and not data["categories"]:
        problems.append(f"{path}: 'categories' is empty; at least one class is needed")
    cat_ids = _unique_ids(categories, "categories", path, problems)
    image_ids = _unique_ids(images, "images", path, problems)
    for i, im in images:
        if not is_file_name(im["file_name"]):
            problems.append(f"{path}: images[{i}].file_name is {shortened(im['file_name'], 80)}, expected a path "
                            "inside the image folder (relative, without '..')")
        for k in ("width", "height"):
            v = im.get(k, 1)
            if not is_size(v):
                problems.append(f"{path}: images[{i}] (file {im['file_name']!r}) has {k} {v!r}, expected a "
                                "positive whole number")
    for i, a in annotations:
        box = a["bbox"]
        if not is_box(box):
            problems.append(f"{path}: annotations[{i}].bbox is {box!r}, expected [x, y, width, height] "
                            "(4 finite numbers)")
        if not is_id(a["image_id"]) or a["image_id"] not in image_ids:
            problems.append(f"{path}: annotations[{i}].image_id {a['image_id']!r} is not in 'images'")
        if not is_id(a["category_id"]) or a["category_id"] not in cat_ids:
            problems.append(f"{path}: annotations[{i}].category_id {a['category_id']!r} is not in 'categories' "
                            f"(ids {sorted(cat_ids, key=str)})")
        area, crowd = a.get("area", 0), a.get("iscrowd", 0)
        if not is_finite_number(area):
            problems.append(f"{path}: annotations[{i}].area is {area!r}, expected a number")
        elif area < 0 and has_positive_size(box):  # (a box without width is dropped anyway)
            problems.append(f"{path}: annotations[{i}].area is {area!r} for a box of positive width and height: "
                            "the evaluation would leave it out of every area range, so missing it would cost "
                            "nothing; expected a number of at least 0")
        if crowd not in (0, 1) or isinstance(crowd, float):
            problems.append(f"{path}: annotations[{i}].iscrowd is {crowd!r}, expected 0 or 1")
    _unique_ids([(i, a) for i, a in annotations if "id" in a], "annotations", path, problems)
    return problems


def check_coco_dict(data: dict, path: Path, require_annotations: bool = True) -> dict:
    """Validates a COCO detection dict (see the module docstring), raising DataError with its first problem, and
    fills in the optional annotation fields. Without `require_annotations`, a dict without an 'annotations' list is
    accepted (and left without one)."""
    problems = coco_problems(data, path, require_annotations)
    if problems:
        more = f" (and {len(problems) - 1} more problems: list them all with `python -m datasets.check`)" \
            if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    annotations = data.get("annotations", [])
    next_id = 1 + max([a["id"] for a in annotations if isinstance(a.get("id"), int)], default=0)
    for a in annotations:
        # pycocotools' matching marks a detection matched by the id of its ground truth, and 0 reads as unmatched:
        # a box of id 0 (Roboflow, Label Studio and labelme2coco number from 0) was never counted as found.
        if a.get("id", 0) == 0:
            a["id"], next_id = next_id, next_id + 1
        a.setdefault("iscrowd", 0)
        if "area" not in a:  # in floats: whole numbers past 1e154 multiply to an int that no float holds
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
    return data


def load_entry_image(img_dir: Path, info: dict, ann_file: Path) -> np.ndarray:
    """The image of an `images` entry of `ann_file`, (H, W, 3) uint8 BGR; DataError / MissingFileError naming the
    file when it is missing, is a device or socket, does not decode, or has another size than the entry's width and
    height. The file name must pass `is_file_name`."""
    if not is_file_name(info["file_name"]):
        raise DataError(f"{ann_file}: image file name {str(info['file_name'])[:80]!r} is not a path inside {img_dir}")
    path = img_dir / info["file_name"]
    try:
        image = load_image(path)
    except MissingFileError as e:
        raise MissingFileError(f"{e}{missing_file_hint(img_dir, info['file_name'], ann_file)}") from None
    h, w = image.shape[:2]
    declared = info.get("width", w), info.get("height", h)
    if declared != (w, h):
        raise DataError(f"{path}: decoded size {w}x{h} differs from width x height {declared[0]}x{declared[1]} in "
                        f"{ann_file}{turned_note(path, declared, (w, h))}")
    return image


def missing_file_hint(img_dir: Path, file_name: str, ann_file: Path) -> str:
    """The file of `img_dir` that `file_name` of `ann_file` (not there) most likely means, as "; ..." to add to the
    error, or "" when none is found: a few stats, for an error that may be reported for every image of a split."""
    posix = file_name.replace("\\", "/")  # a json written on Windows: '\\' is part of a file's name here
    if posix != file_name and is_file_name(posix) and (img_dir / posix).is_file():
        return f"; {ann_file} separates the folders of its file_name with '\\' (Windows), where '/' is needed: " \
               f"{posix!r} exists"
    name = PurePosixPath(file_name)
    if len(name.parts) > 1 and (img_dir / name.name).is_file():
        return f"; {name.name!r} is in {img_dir} itself: its file_name in {ann_file} starts with the folder " \
               f"{str(name.parent)!r} (as Label Studio's images/ and labelme2coco's JPEGImages/ do), so the split's " \
               f"image folder must be the one that holds {str(name.parent)!r}"
    other = other_case(img_dir, file_name)
    return f"; {other!r} exists: file names differ by letter case here, unlike on Windows and macOS; rename the " \
           f"file or correct its file_name in {ann_file}" if other else ""


def other_case(img_dir: Path, file_name: str) -> str | None:
    """A file of `img_dir` that `file_name` (not there) names in other letter case: its ending (a camera's .JPG for
    .jpg), or its whole name, lower or upper case; None when there is none. A few stats, not a listing of the
    folder."""
    path = PurePosixPath(file_name)
    names = (path.with_suffix(path.suffix.swapcase()), path.with_name(path.name.lower()),
             path.with_name(path.name.upper()))
    return next((str(n) for n in names if str(n) != file_name and (img_dir / n).is_file()), None)


def turned_note(path: Path, declared: tuple, decoded: tuple[int, int]) -> str:
    """Explains a decoded (width, height) that is the declared one swapped, when EXIF turns the file by 90
    degrees: the annotation tool read the stored pixels, not the upright image that viewers (and imread) show."""
    orientation = exif_orientation(path)
    if declared != decoded[::-1] or orientation < 5:
        return ""
    return (f": its EXIF orientation {orientation} turns it by 90 degrees, and it is read upright as viewers show "
            "it, so the json's width and height (and most likely its boxes) are those of the stored, unturned image")


def split_files(root: Path, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of `split`: instances_{split}.json and {split}/, or for a split without
    annotations image_info_{split}.json, and COCO's test-dev images in test2017/ (test-dev is a subset of test)."""
    ann_file = root / "annotations" / f"instances_{split}.json"
    info_file = root / "annotations" / f"image_info_{split}.json"
    img_dir = root / split
    try:
        if not ann_file.is_file() and info_file.is_file():
            ann_file = info_file
        if not img_dir.is_dir() and split.startswith("test-dev"):
            img_dir = root / split.replace("test-dev", "test", 1)
    except OSError as e:  # a split name too long for the file system, a folder without permission
        raise DataError(f"{ann_file}: cannot look for the files of split {split[:40]!r} ({e.strerror or e})") from None
    return ann_file, img_dir


def check_split_files(root: Path, split: str) -> tuple[Path, Path]:
    """`split_files(root, split)`, refused (MissingFileError naming it) where the data folder, the annotation json or
    the image folder is not there, and (DataError) where the data folder is a file; reads no file."""
    ann_file, img_dir = split_files(root, split)
    if not root.is_dir():
        expected = (f"expected inside it annotations/instances_{split}.json, or image_info_{split}.json for a "
                    f"split without annotations, and the images in {img_dir.name}/")
        if root.exists():  # most often the json itself: "not found" would be wrong
            raise DataError(f"{root} is not a folder; give the data directory ({expected})")
        raise MissingFileError(f"{root}: data directory not found ({expected})")
    if not ann_file.is_file():
        raise annotation_file_missing(ann_file)
    if not img_dir.is_dir():
        raise MissingFileError(f"{img_dir}: image directory of split {split!r} not found")
    return ann_file, img_dir


def coco_from_dict(data: dict) -> COCO:
    """pycocotools COCO over an already loaded dict (reading the json once), without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """COCO-format detection data; see the module docstring.

    data_dir: folder with annotations/ and the image folders; split: e.g. "train2017" or "val";
    train: training items (augmentation + targets) or evaluation items; img_size: training canvas, k * 4 - 1
    (the networks check their own unit, 128k - 1 for the full ones);
    test_scales, test_flip: the evaluation inputs; max_objects: objects with offsets and indices per image;
    min_box_size: training boxes with a side under this many canvas pixels after the augmentation are dropped
    (0: only empty ones, as the official code).
    """

    def __init__(self, data_dir: str | Path, split: str, train: bool, img_size: int = 511,
                 test_scales: Sequence[float] = (1.0,), test_flip: bool = False, max_objects: int = MAX_OBJECTS,
                 min_box_size: float = 0.0):
        self.ann_file, self.img_dir = check_split_files(Path(data_dir), split)
        if (img_size + 1) % STRIDE:  # the targets' map size; the network checks its own, coarser unit
            raise DataError(f"img_size must be of the form k * {STRIDE} - 1 (the networks want 128k - 1: 127, 255, "
                             f"383, 511, ...), got {img_size}")
        if not test_scales or min(test_scales) <= 0:
            raise DataError(f"test_scales must be positive numbers, got {list(test_scales)}")
        self.train, self.img_size, self.max_objects, self.min_box_size = train, img_size, max_objects, min_box_size
        self.test_scales, self.test_flip = tuple(float(s) for s in test_scales), test_flip

        data = check_coco_dict(read_json(self.ann_file), self.ann_file, require_annotations=train)
        self.has_annotations = "annotations" in data
        self.coco = coco_from_dict(data)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in categories]
        self.class_names = [str(c["name"]) for c in categories]
        self.images = list(data["images"])
        self.image_ids = [im["id"] for im in self.images]
        self.boxes, self.labels = self._training_boxes(data.get("annotations", []))
        # For train.py and test.py to show: the evaluation of such boxes is not what training learns.
        self.ground_truth_notes = [] if train else evaluation_notes(data, self.ann_file)
        # For train.py to log: what training on the split learns other than its json suggests.
        self.training_notes = training_notes(data, self.ann_file) if train else []
        if not train:
            self._check_input_sizes()

    def _check_input_sizes(self) -> None:
        """A DataError naming the first image whose test input at the largest test scale would be too large for
        the network (datasets.transforms.check_input_size), by the json's width and height: before any work, where
        train.py would otherwise stop at the first validation, after an epoch of training. Images without a width
        and height are checked when read."""
        for im in self.images:
            if "width" in im and "height" in im:
                with self._naming_the_file(im):
                    check_input_size(int(im["width"]), int(im["height"]), max(self.test_scales))

    def check_images_there(self) -> None:
        """A MissingFileError naming the first image of the split whose file is not there, with how many are not:
        for an evaluation, which stops at a missing image only when it reaches it (train.py after an epoch of
        training). Reads no image: one stat each (5000 for COCO's val2017)."""
        missing = [im for im in self.images if not (self.img_dir / im["file_name"]).exists()]
        if missing:
            try:
                load_entry_image(self.img_dir, missing[0], self.ann_file)  # its error, with the hints of a read
            except MissingFileError as e:
                raise MissingFileError(f"{e} ({len(missing)} of the {len(self.images)} images of {self.ann_file} "
                                       "are not there)") from None

    @contextlib.contextmanager
    def _naming_the_file(self, im: dict):
        """Turns the ArgumentError of an image too large at a test scale into a DataError naming its file."""
        try:
            yield
        except ArgumentError as e:
            raise DataError(f"{self.img_dir / im['file_name']} ({self.ann_file}): {e}") from None

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _training_boxes(self, annotations: list[dict]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per image (in self.images order): boxes (n, 4) float32 x1 y1 x2 y2 and labels (n,) int64 of the
        non-crowd annotations with positive width and height."""
        label_of = {c: i for i, c in enumerate(self.cat_ids)}
        row_of = {im_id: i for i, im_id in enumerate(self.image_ids)}
        per_image: list[list] = [[] for _ in self.image_ids]
        for a in annotations:
            x, y, w, h = a["bbox"]
            if not a["iscrowd"] and w > 0 and h > 0:
                per_image[row_of[a["image_id"]]].append((x, y, x + w, y + h, label_of[a["category_id"]]))
        rows = [np.array(r, np.float64).reshape(-1, 5) for r in per_image]
        # Coordinates past float32's range (valid json) are cut to it: load() clips them to the image anyway.
        limit = np.finfo(np.float32).max
        return [r[:, :4].clip(-limit, limit).astype(np.float32) for r in rows], [r[:, 4].astype(np.int64) for r in rows]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8 BGR, boxes (n, 4) float32 clipped to the image, labels (n,) int64)."""
        image = load_entry_image(self.img_dir, self.images[index], self.ann_file)
        h, w = image.shape[:2]
        boxes, keep = clip_boxes(self.boxes[index], w, h)
        return image, boxes[keep], self.labels[index][keep]

    def train_sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The training dict of docs/FORMAT.md for image `index`, augmentation drawn from `rng`."""
        image, boxes, labels = self.load(index)
        image, boxes, labels = train_transform(image, boxes, labels, self.img_size, rng, self.min_box_size)
        targets = make_targets(boxes, labels, self.num_classes, self.img_size, self.img_size, self.max_objects)
        return {"image": torch.from_numpy(image), **{k: torch.from_numpy(v) for k, v in targets.items()}}

    def eval_sample(self, index: int) -> dict:
        image, _, _ = self.load(index)
        with self._naming_the_file(self.images[index]):
            inputs = [eval_input(image, s, self.test_flip) for s in self.test_scales]
        return {"image_id": self.image_ids[index], "inputs": inputs}

    def __getitem__(self, index: int) -> dict:
        if not self.train:
            return self.eval_sample(index)
        # For direct use (a notebook, your own loader): drawn from torch's generator, which DataLoader seeds
        # differently in each worker. train.py instead gives each sample its own seed (datasets/sampling.py).
        return self.train_sample(index, np.random.default_rng(int(torch.randint(0, 2 ** 62, ()))))


def check_same_categories(train_set: CocoDetection, val_set: CocoDetection) -> None:
    """DataError naming both annotation files and the first differing class names, unless the two sets have the same
    class names in the same order (by category id), as the network's outputs must mean the same classes in both."""
    train, val = train_set.class_names, val_set.class_names
    if train == val:
        return
    only_train, only_val = [n for n in train if n not in val], [n for n in val if n not in train]
    if only_train or only_val:
        difference = "; ".join(f"only in {ann_file}: {first_names(names)}" for ann_file, names in
                               ((train_set.ann_file, only_train), (val_set.ann_file, only_val)) if names)
    else:
        difference = (f"the same names, ordered by category id as {first_names(train)} in the first and "
                      f"{first_names(val)} in the second")
    raise DataError(f"{train_set.ann_file} and {val_set.ann_file} have different categories ({difference})")


def first_names(names: list[str], count: int = 5) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(repr(n) for n in names[:count]) + more
