"""Checks a whole COCO-format split once, before a long training run, and prints every problem it finds.

    python -m datasets.check --data_dir data/coco --split train2017

The annotation file must parse; every image, category and annotation entry is checked as the data set loader checks it
(datasets/annotations.py), and every image file must exist, decode and have the width and height the json gives. Boxes
that the loader accepts but that cannot be right are reported too (training would drop or clip them, while
evaluation would keep them as ground truth): a width or height of 0 or less, and a box that leaves its image by more
than 1% of the image's side (at least 1 px: converters round), which includes a box entirely outside it; an image
entry without a valid width and height has its boxes checked against its decoded size. So are boxes that all lie
within [0, 1] x [0, 1] (fractions of the image, as YOLO writes them, where COCO's are pixels). An empty
'annotations' list is reported: there is nothing to train on or to evaluate against. Images whose EXIF orientation
is not 1 are listed as notes, not problems: they are read upright, as viewers show them, so their width, height and
boxes must be those of the upright image (an annotation tool that ignored the tag gave the stored image's). So are
images too large to evaluate (a test input of more than datasets.transforms.MAX_INPUT_PIXELS at scale 1): training
crops them, but train.py and test.py refuse a val split that holds one. So is a category name given to several ids,
and an image with more boxes to train on than datasets.targets.MAX_OBJECTS (128, the official cap): a crop of it
that holds more gives the objects past the first 128 no embeddings and offsets, only heatmap peaks. So are boxes of
positive size whose `area` is 0: the evaluation counts them as small objects, whatever their size. So are categories
that no box to train on has, such as the extra one of a Roboflow export: each is still a class of the network.
Problems are listed with the file and the entry (annotation ids included), all of them rather than the first;
the exit status is 1 when there is any, 0 when the split is clean. Runs from any folder as
`python PATH/TO/REPO/datasets/check.py ...` too.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):  # run as a script from anywhere: import the repo, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from datasets.annotations import (box_fault, coco_problems, fraction_boxes_note, has_positive_size, is_box,
                                  is_file_name, is_size, read_json, unboxed_categories_note, zero_area_note)
from datasets.coco import load_entry_image, split_files
from datasets.image_io import exif_orientation
from datasets.targets import MAX_OBJECTS
from datasets.transforms import check_input_size
from utils.checks import is_id
from utils.errors import ArgumentError, UserError, run_cli


def box_problems(data: dict, ann_file: Path, decoded_sizes: dict) -> list[str]:
    """One line per annotation whose box (4 finite numbers) has a width or height <= 0 or leaves its image by
    more than the tolerance (see the module docstring); entries with other problems are coco_problems' job.
    The image's size is the json's, or where it gives none (or an invalid one) the decoded one (`decoded_sizes`:
    (width, height) by image id)."""
    entries = data.get("images") if isinstance(data.get("images"), list) else []
    images = {im["id"]: im for im in entries if isinstance(im, dict) and is_id(im.get("id"))}
    annotations = data.get("annotations")
    if isinstance(annotations, list) and not annotations:
        return [f"{ann_file}: 'annotations' is empty: no box to train on or to evaluate against"]
    problems = []
    for i, a in enumerate(annotations if isinstance(annotations, list) else []):
        box = a.get("bbox") if isinstance(a, dict) else None
        if not is_box(box):
            continue
        im = images.get(a["image_id"], {}) if is_id(a.get("image_id")) else {}
        fault = box_fault(box, *(image_size(im, decoded_sizes) or (None, None)))
        if fault:
            file = f" (file {im.get('file_name')!r})" if fault.endswith("image") else ""
            problems.append(f"{ann_file}: annotations[{i}].bbox {box!r} {fault}{file}")
    return problems


def image_size(im: dict, decoded_sizes: dict) -> tuple | None:
    """(width, height) of image entry `im`: the json's when both are valid, else the decoded image's; None when
    neither is known (no such entry, or its file does not load)."""
    declared = im.get("width"), im.get("height")
    return declared if all(is_size(v) for v in declared) else decoded_sizes.get(im.get("id"))


@dataclass
class ImageReport:
    """What reading a split's image files found."""
    problems: list[str]  # one line per image that is missing, does not decode, or has another size than declared
    sizes: dict  # (width, height) of each decoded image, by image id
    turned: list[str]  # one note per image that EXIF turns or mirrors


def read_images(img_dir: Path, images: list, ann_file: Path, progress: bool = True) -> ImageReport:
    """Loads the file of every image entry as the loader does. An invalid width or height is left out of the size
    check, and a file name outside the image folder is not read: coco_problems reports both already."""
    report = ImageReport([], {}, [])
    entries = [im for im in images if isinstance(im, dict) and is_file_name(im.get("file_name"))]
    for im in tqdm(entries, desc="images", unit="img", disable=not progress, dynamic_ncols=True):
        valid = {k: v for k, v in im.items() if k not in ("width", "height") or is_size(v)}
        try:
            image = load_entry_image(img_dir, valid, ann_file)
        except UserError as e:
            report.problems.append(f"image id {im.get('id')!r}: {e}")
            continue
        if is_id(im.get("id")):
            report.sizes[im["id"]] = image.shape[1], image.shape[0]
        path = img_dir / im["file_name"]
        orientation = exif_orientation(path)
        if orientation != 1:
            report.turned.append(f"image id {im.get('id')!r}: {path}: EXIF orientation {orientation}: it is read "
                                 f"upright, as viewers show it ({image.shape[1]}x{image.shape[0]}); its width, "
                                 "height and boxes must be those of the upright image")
    return report


def annotation_ids(problems: list[str], data: dict) -> list[str]:
    """Adds the annotation id to each `annotations[i]` problem, so that it can be found in the json."""
    annotations = data.get("annotations") if isinstance(data.get("annotations"), list) else []
    out = []
    for line in problems:
        marker = line.find("annotations[")
        if marker >= 0:
            i = int(line[marker + len("annotations["):line.index("]", marker)])
            ann = annotations[i] if i < len(annotations) and isinstance(annotations[i], dict) else {}
            if "id" in ann:
                line += f" (annotation id {ann['id']!r})"
        out.append(line)
    return out


def inspect_split(data_dir: str | Path, split: str, progress: bool = True) -> tuple[list[str], list[str]]:
    """(every problem, notes on images that EXIF turns) of split `split` of the COCO-format folder `data_dir` (its
    files as the loader finds them: datasets.coco.split_files)."""
    ann_file, img_dir = split_files(Path(data_dir), split)
    data = read_json(ann_file)
    images = data.get("images") if isinstance(data.get("images"), list) else []
    if img_dir.is_dir():
        report = read_images(img_dir, images, ann_file, progress)
    else:
        report = ImageReport([f"{img_dir}: image directory of split {split!r} not found"], {}, [])
    image_info = ann_file.name.startswith("image_info_")  # a test split: images without annotations
    problems = coco_problems(data, ann_file, require_annotations=not image_info) + \
        box_problems(data, ann_file, report.sizes) + [p for p in [fraction_boxes_note(data, ann_file)] if p]
    notes = report.turned + too_large_notes(images, img_dir, report.sizes) + repeated_name_notes(data, ann_file) + \
        crowded_notes(data, img_dir) + [note for note in [zero_area_note(data, ann_file),
                                                          unboxed_categories_note(data, ann_file)] if note]
    return annotation_ids(problems, data) + report.problems, notes


def repeated_name_notes(data: dict, ann_file: Path) -> list[str]:
    """One note per category name given to more than one id: each id is a class of its own, which the per-class
    table, drawings and detections then name alike (a merge of two label sets, say, that was meant to join them)."""
    ids_of: dict[str, list] = {}
    for c in data.get("categories") if isinstance(data.get("categories"), list) else []:
        if isinstance(c, dict) and "name" in c and "id" in c:
            ids_of.setdefault(str(c["name"]), []).append(c["id"])
    return [f"{ann_file}: category name {name!r} is given to ids {', '.join(map(repr, ids))}: each is a class of "
            "its own, named alike in results and drawings" for name, ids in ids_of.items() if len(ids) > 1]


def crowded_notes(data: dict, img_dir: Path) -> list[str]:
    """One note per image entry with more than MAX_OBJECTS boxes that training uses (not crowd, of positive width
    and height): past MAX_OBJECTS in one crop, datasets.targets.make_targets leaves objects out of the embedding
    and offset losses, which nothing else reports (the official code stops with an IndexError)."""
    counts: dict = {}
    for a in data.get("annotations") if isinstance(data.get("annotations"), list) else []:
        if isinstance(a, dict) and is_id(a.get("image_id")) and has_positive_size(a.get("bbox")) \
                and a.get("iscrowd", 0) != 1:
            counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    images = data.get("images") if isinstance(data.get("images"), list) else []
    crowded = [im for im in images if isinstance(im, dict) and is_id(im.get("id"))
               and counts.get(im["id"], 0) > MAX_OBJECTS]
    return [f"image id {im['id']!r}: {img_dir / str(im.get('file_name'))}: {counts[im['id']]} boxes to train on; in "
            f"a crop holding more than {MAX_OBJECTS}, those past the first {MAX_OBJECTS} train the heatmaps only, "
            "without embeddings and offsets" for im in crowded]


def too_large_notes(images: list, img_dir: Path, decoded_sizes: dict) -> list[str]:
    """One note per image entry too large to evaluate at test scale 1 (datasets.transforms.check_input_size), by its
    json size or else its decoded one: a training split may hold it, a val split may not."""
    notes = []
    for im in images:
        size = image_size(im, decoded_sizes) if isinstance(im, dict) and is_id(im.get("id")) else None
        if size is None:
            continue
        try:
            check_input_size(int(size[0]), int(size[1]), 1.0)
        except ArgumentError as e:
            notes.append(f"image id {im.get('id')!r}: {img_dir / str(im.get('file_name'))}: {e}. Training crops it, "
                         "but train.py and test.py refuse it in a val split")
    return notes


def check_split(data_dir: str | Path, split: str, progress: bool = True) -> list[str]:
    """Every problem of split `split` of the COCO-format folder `data_dir` (see `inspect_split`)."""
    return inspect_split(data_dir, split, progress)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m datasets.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder with annotations/ and the image folders")
    p.add_argument("--split", required=True,
                   help="e.g. train2017: annotations/instances_SPLIT.json and SPLIT/ (found as the loader finds "
                        "them: image_info_SPLIT.json for a test split, test2017/ for test-dev)")
    args = p.parse_args(argv)
    try:
        problems, notes = inspect_split(args.data_dir, args.split)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in problems:
        print(line)
    for line in notes:
        print(f"note: {line}")
    print(f"{args.data_dir} {args.split}: {len(problems)} problem(s)" if problems else
          f"{args.data_dir} {args.split}: no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, None))
