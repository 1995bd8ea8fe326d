"""Checks a whole COCO-format split once, before a long training run, and prints every problem it finds.

    python -m datasets.check --data_dir data/coco --split train2017

The annotation file must parse; every image, category and annotation entry is checked as the data set loader
checks it (datasets/coco.py), and every image file must exist, decode and have the width and height the json gives.
Problems are listed with the file and the entry (annotation ids included), all of them rather than the first;
the exit status is 1 when there is any, 0 when the split is clean.
"""
import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from datasets.coco import coco_problems, load_entry_image, read_json
from utils.errors import UserError


def image_problems(img_dir: Path, images: list, ann_file: Path, progress: bool = True) -> list[str]:
    """One line per image entry whose file is missing, does not decode, or has another size than declared."""
    problems = []
    entries = [im for im in images if isinstance(im, dict) and "file_name" in im]
    for im in tqdm(entries, desc="images", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            load_entry_image(img_dir, im, ann_file)
        except UserError as e:
            problems.append(f"image id {im.get('id')!r}: {e}")
    return problems


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


def check_split(data_dir: str | Path, split: str, progress: bool = True) -> list[str]:
    """Every problem of split `split` of the COCO-format folder `data_dir`."""
    root = Path(data_dir)
    ann_file = root / "annotations" / f"instances_{split}.json"
    data = read_json(ann_file)
    problems = annotation_ids(coco_problems(data, ann_file), data)
    img_dir = root / split
    if not img_dir.is_dir():
        return problems + [f"{img_dir}: image directory of split {split!r} not found"]
    images = data.get("images") if isinstance(data.get("images"), list) else []
    return problems + image_problems(img_dir, images, ann_file, progress)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m datasets.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder with annotations/ and the image folders")
    p.add_argument("--split", required=True, help="e.g. train2017: annotations/instances_SPLIT.json and SPLIT/")
    args = p.parse_args(argv)
    try:
        problems = check_split(args.data_dir, args.split)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in problems:
        print(line)
    print(f"{args.data_dir} {args.split}: {len(problems)} problem(s)" if problems else
          f"{args.data_dir} {args.split}: no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
