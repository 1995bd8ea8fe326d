"""The annotation json of a COCO-format split: read, checked and completed (`check_coco_dict`), and the notes on
what it holds that training or the evaluation takes otherwise than it may seem (boxes scored as given, area 0,
categories without a box, boxes in fractions of the image), for datasets.check, train.py and test.py.

Checked (an error names the file, the entry and what was expected): the json exists and parses; it has `images`,
`annotations` and `categories` lists; images have `id` and `file_name` (a path inside the image folder: relative,
without '..'), annotations `image_id`, `category_id` and a `bbox` of 4 finite numbers, categories `id` and `name`;
ids are unique and every annotation refers to a listed image and category; `area`, when given, is a number, not
negative for a box of positive size (pycocotools' area ranges would leave the box out of the evaluation). Filled in
when absent: annotation `id` (numbered after the largest given), `iscrowd` (0) and `area` (w * h). An annotation id
0 is numbered so too: pycocotools' matching reads id 0 as "no match", so that box would never count as found.
"""
import contextlib
import io
import json
import math
import re
from pathlib import Path, PurePosixPath

from pycocotools.coco import COCO

from utils.checks import is_id
from utils.errors import DataError, MissingFileError


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


def coco_from_dict(data: dict) -> COCO:
    """pycocotools COCO over an already loaded dict (reading the json once), without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
