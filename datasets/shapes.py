"""The built-in data set: coloured shapes on cluttered backgrounds, in the COCO layout, deterministic for a seed.

    python -m datasets.shapes --out data/shapes
    python train.py ... --dataset coco --data_dir data/shapes --train_split train --val_split val --img_size 127

writes `annotations/instances_{train,val}.json` and the JPEGs in `train/` and `val/` (400 + 100 images by default, a few
seconds). Four classes (rectangle, ellipse, triangle, cross), each of random size, aspect ratio and colour; shapes may
overlap, but none is covered by more than `--max_occlusion` of its area, and each box is the tight box of the shape's
visible pixels (at 1, a shape covered whole has none and is left out). Backgrounds are smooth random colour fields with
lines, soft blobs and pixel noise; `--empty` of the images have no shape. Images are `--min_size`..`--max_size` pixels a
side (128..192, at most MAX_SIDE), small enough for a CPU model at input 127. Harder: more `--clutter`, `--noise`,
`--max_occlusion`, smaller `--min_obj`. A folder that already holds a train or val split is refused unless --force is
given. The images of both splits are written to hidden folders and renamed into place when all are complete, and a
failure (a full disk, Ctrl-C) removes what this run wrote, so that the same command runs again (with --force, the
earlier data set stays unless the failure comes after all images were drawn).
"""
import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script from anywhere: import the repo, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from utils.checks import check_non_negative_int, check_number
from utils.errors import ArgumentError, run_cli
from utils.files import make_folder, write_coco_split, write_coco_splits

CLASSES = ("rectangle", "ellipse", "triangle", "cross")
MAX_SIDE = 4096  # pixels: an image side of 10^5 asked OpenCV for 120 GB
MAX_OBJECTS = 100  # shapes per image: each is tried up to 20 times at a cost of the image's area


@dataclass(frozen=True)
class ShapesConfig:
    min_size: int = 128  # image side range, pixels
    max_size: int = 192
    max_objects: int = 5  # shapes per non-empty image: 1..max_objects
    min_obj: int = 16  # shape box side range, pixels
    max_obj: int = 72
    empty: float = 0.1  # fraction of images without shapes
    clutter: int = 6  # lines and blobs drawn on each background
    noise: float = 8.0  # std of the pixel noise, grey levels
    max_occlusion: float = 0.4  # largest fraction of a shape that later shapes may cover
    jpeg_quality: int = 95


def shape_mask(rng: np.random.Generator, cls: int, w: int, h: int) -> np.ndarray:
    """(h, w) uint8 mask (1 inside) of a shape of class `cls` spanning its h x w box."""
    m = np.zeros((h, w), np.uint8)
    if cls == 0:
        m[:] = 1
    elif cls == 1:
        cv2.ellipse(m, (((w - 1) / 2, (h - 1) / 2), (w, h), 0), 1, -1)
    elif cls == 2:
        apex = int(rng.integers(0, w))
        pts = np.array([[apex, 0], [0, h - 1], [w - 1, h - 1]], np.int32)
        if rng.random() < 0.5:  # pointing down
            pts[:, 1] = h - 1 - pts[:, 1]
        cv2.fillPoly(m, [pts], 1)
    else:
        tw, th = max(2, int(w * rng.uniform(0.25, 0.45))), max(2, int(h * rng.uniform(0.25, 0.45)))
        m[(h - th) // 2:(h - th) // 2 + th, :] = 1
        m[:, (w - tw) // 2:(w - tw) // 2 + tw] = 1
    return m


def background(rng: np.random.Generator, h: int, w: int, cfg: ShapesConfig) -> np.ndarray:
    """(h, w, 3) float32 smooth colour field with lines and soft blobs."""
    coarse = rng.uniform(30, 225, (3, 4, 3)).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(cfg.clutter):
        color = rng.uniform(0, 255, 3).tolist()
        if rng.random() < 0.5:
            p1, p2 = rng.integers(0, [w, h], 2).tolist(), rng.integers(0, [w, h], 2).tolist()
            cv2.line(img, p1, p2, color, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            blob = np.zeros((h, w), np.float32)
            cv2.circle(blob, rng.integers(0, [w, h], 2).tolist(), int(rng.integers(3, 10)), 1.0, -1)
            blob = cv2.GaussianBlur(blob, (0, 0), 3)[:, :, None]
            img = img * (1 - blob) + np.array(color, np.float32) * blob
    return img


def make_image(rng: np.random.Generator, cfg: ShapesConfig) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One image: ((h, w, 3) uint8 BGR, [(class, [x, y, w, h]) of each shape])."""
    h, w = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, 2))
    img = background(rng, h, w, cfg)
    owner = np.full((h, w), -1, np.int32)
    areas, classes = [], []
    n = 0 if rng.random() < cfg.empty else int(rng.integers(1, cfg.max_objects + 1))
    for _ in range(n):
        for _attempt in range(20):
            cls = int(rng.integers(len(CLASSES)))
            side = rng.uniform(cfg.min_obj, cfg.max_obj)
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
            bw = int(np.clip(side * np.sqrt(aspect), cfg.min_obj, min(cfg.max_obj, w)))
            bh = int(np.clip(side / np.sqrt(aspect), cfg.min_obj, min(cfg.max_obj, h)))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            mask = np.zeros((h, w), bool)
            mask[y0:y0 + bh, x0:x0 + bw] = shape_mask(rng, cls, bw, bh) > 0
            covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(areas))
            visible = np.bincount(owner[owner >= 0], minlength=len(areas))
            if all(visible[j] - covered[j] >= (1 - cfg.max_occlusion) * areas[j] for j in range(len(areas))):
                break
        else:
            continue
        under = img[mask].mean(0)
        color = rng.uniform(0, 255, 3)
        while np.abs(color - under).sum() < 150:  # keep the shape visible against what lies under it
            color = rng.uniform(0, 255, 3)
        img[mask] = color
        owner[mask] = len(areas)
        areas.append(int(mask.sum()))
        classes.append(cls)
    img = np.clip(img + rng.normal(0, cfg.noise, img.shape), 0, 255).astype(np.uint8)
    objects = []
    for j, cls in enumerate(classes):
        ys, xs = np.nonzero(owner == j)
        if not len(xs):  # covered whole by later shapes, which --max_occlusion 1 allows: nothing to see, no box
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append((cls, [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]))
    return img, objects


def split_filler(split: str, num_images: int, seed: int, cfg: ShapesConfig) -> Callable[[Path], dict]:
    """The `fill` of utils.files.write_coco_split for `split`: it draws the images into the folder it is given and
    returns their annotation json."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2)])

    def fill(folder: Path) -> dict:
        images, annotations = [], []
        for i in range(num_images):
            img, objects = make_image(rng, cfg)
            name = f"{i + 1:06d}.jpg"
            (folder / name).write_bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])[1])
            images.append({"id": i + 1, "file_name": name, "width": img.shape[1], "height": img.shape[0]})
            for cls, box in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        return {"info": {"description": f"centernet47 built-in shapes, {split}, seed {seed}", "config": vars(cfg)},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]}

    return fill


def write_split(out: Path, split: str, num_images: int, seed: int, cfg: ShapesConfig) -> dict:
    """Writes the images of `split` (replacing the folder out/split once all are written) and its annotation json;
    returns the json dict."""
    return write_coco_split(out, split, split_filler(split, num_images, seed, cfg), replace=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m datasets.shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/shapes", help="folder to write (created)")
    p.add_argument("--num_train", type=int, default=400)
    p.add_argument("--num_val", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace the train and val splits already in --out")
    for name, field in ShapesConfig.__dataclass_fields__.items():
        p.add_argument(f"--{name}", type=type(field.default), default=field.default)
    return p


def main(args: argparse.Namespace) -> None:
    cfg = ShapesConfig(**{k: getattr(args, k) for k in ShapesConfig.__dataclass_fields__})
    if not (0 < cfg.min_obj <= cfg.max_obj <= cfg.min_size <= cfg.max_size <= MAX_SIDE):
        raise ArgumentError(f"expected 0 < --min_obj <= --max_obj <= --min_size <= --max_size <= {MAX_SIDE}, got "
                            f"{cfg.min_obj}, {cfg.max_obj}, {cfg.min_size}, {cfg.max_size}")
    whole = {"--max_objects": (cfg.max_objects, 1, MAX_OBJECTS), "--clutter": (cfg.clutter, 0, 1000),
             "--jpeg_quality": (cfg.jpeg_quality, 0, 100), "--seed": (args.seed, 0, 2**63 - 1)}
    # 0 shapes and seed -1 were numpy tracebacks, 10^8 shapes ran for days, OpenCV took --jpeg_quality 500 as 100.
    for flag, (value, low, high) in whole.items():
        if not low <= value <= high:
            raise ArgumentError(f"{flag}: expected a whole number in [{low}, {high}], got {value}")
    for flag, value, high in (("--empty", cfg.empty, 1), ("--max_occlusion", cfg.max_occlusion, 1),
                              ("--noise", cfg.noise, math.inf)):
        check_number(flag, value, 0, high)
    for flag in ("num_train", "num_val"):
        check_non_negative_int(f"--{flag}", getattr(args, flag))
    out = make_folder(args.out, "--out")
    splits = (("train", args.num_train), ("val", args.num_val))
    existing = [p for split, _ in splits for p in (out / "annotations" / f"instances_{split}.json", out / split)
                if p.exists()]
    if existing and not args.force:
        raise ArgumentError(f"{existing[0]} exists: {out} already holds a data set; --force replaces its train and "
                            "val splits, or choose another --out")
    fills = {split: split_filler(split, n, args.seed, cfg) for split, n in splits}
    write_coco_splits(out, fills, replace=True, report=lambda split, data: print(
        f"{out / split}: {len(data['images'])} images, {len(data['annotations'])} shapes"))


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
