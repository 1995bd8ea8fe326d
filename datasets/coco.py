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
- Checked when the data set is built: the annotation json (datasets/annotations.py).
- Checked when an item is read (the error names the image file): the file exists, can be opened, is no device or
  socket (a symbolic link to /dev/zero would be read until the memory runs out; a named pipe is read), decodes (a
  truncated JPEG does not) and has the json's `width` and `height` when those are given (of the upright image: when
  EXIF turns a photo by 90 degrees and the json has its stored size, the error says so). Grayscale, RGBA and 16-bit
  images are read as 8-bit BGR (see datasets/image_io.py).

A training item is the dict of docs/FORMAT.md (normalised image and triplet targets); an evaluation item is
dict(image_id=int, inputs=[(images (1 or 2, 3, H_in, W_in), EvalMeta) for each test scale]).
"""
import contextlib
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.annotations import (annotation_file_missing, check_coco_dict, coco_from_dict, evaluation_notes,
                                  is_file_name, read_json, training_notes)
from datasets.image_io import exif_orientation, load_image
from datasets.targets import MAX_OBJECTS, STRIDE, make_targets
from datasets.transforms import check_input_size, clip_boxes, eval_input, train_transform
from utils.errors import ArgumentError, DataError, MissingFileError


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
