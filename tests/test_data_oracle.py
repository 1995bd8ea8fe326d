"""Oracle checks on real photos (tests/data/raccoon), and on images far from the canvas' size and shape: the targets
decode back to the ground truth.

Decoding here is the plain reading of the targets, independent of utils/decode.py: each object's keypoint is
(cell of its index + offset) * in / out (input over map size, per axis), its heatmap is exactly 1 at that cell,
and the three keypoints of one object share one slot of the index arrays.
"""
import json
import math
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.coco import CocoDetection
from datasets.coco_eval import evaluate_detections
from datasets.targets import make_targets
from datasets.transforms import RAND_SCALES, boxes_to_original, random_crop_params

RACCOON = Path(__file__).parent / "data" / "raccoon"


def decode_targets(t: dict, in_w: int, in_h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets -> (boxes (n, 4) input pixels, centers (n, 2) input pixels, labels (n,)) of the masked slots."""
    map_h, map_w = np.asarray(t["hm_tl"]).shape[1:]
    n = int(np.asarray(t["mask"]).sum())
    assert np.asarray(t["mask"])[:n].all() and not np.asarray(t["mask"])[n:].any()
    pts, labels = {}, None
    for k in ("tl", "br", "ct"):
        ind = np.asarray(t[f"ind_{k}"])[:n]
        cells = np.stack([ind % map_w, ind // map_w], axis=1)
        hm = np.asarray(t[f"hm_{k}"])
        peak_labels = [np.flatnonzero(hm[:, y, x] == 1.0) for x, y in cells]
        assert all(len(p) >= 1 for p in peak_labels), f"{k}: an indexed cell is not a peak"
        here = np.array([p[0] for p in peak_labels], np.int64)
        labels = here if labels is None else labels
        assert (labels == here).all(), "the three keypoints of an object disagree on its class"
        # Every peak of the heatmap belongs to some object.
        peaks = {(int(c), int(y), int(x)) for c, y, x in zip(*np.nonzero(hm == 1.0))}
        assert peaks == {(int(c), int(y), int(x)) for c, (x, y) in zip(labels, cells)}
        pts[k] = (cells + np.asarray(t[f"off_{k}"])[:n]) * [in_w / map_w, in_h / map_h]
    return np.concatenate([pts["tl"], pts["br"]], axis=1), pts["ct"], labels


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("flipped", [False, True])
def test_eval_transform_targets_decode_to_ground_truth(scale, flipped):
    ds = CocoDetection(RACCOON, "val", train=False, test_scales=(scale,), test_flip=True)
    detections = {}
    for i in range(len(ds)):
        _, gt, labels = ds.load(i)
        sample = ds[i]
        images, meta = sample["inputs"][0]
        in_h, in_w = images.shape[2:]
        # Ground truth onto the input, written out independently of the transform code.
        b = gt.astype(np.float64).copy()
        b[:, [0, 2]] = b[:, [0, 2]] * meta.new_w / meta.orig_w + meta.pad_x
        b[:, [1, 3]] = b[:, [1, 3]] * meta.new_h / meta.orig_h + meta.pad_y
        if flipped:
            b[:, [0, 2]] = in_w - b[:, [2, 0]]
        t = make_targets(b, labels, ds.num_classes, in_h, in_w)
        boxes, centers, got_labels = decode_targets(t, in_w, in_h)
        assert got_labels.tolist() == labels.tolist()
        np.testing.assert_allclose(boxes, b, atol=1e-3)
        np.testing.assert_allclose(centers, (b[:, :2] + b[:, 2:]) / 2, atol=1e-3)
        map_w, map_h = (in_w + 1) // 4, (in_h + 1) // 4
        back = boxes_to_original(boxes * np.array([map_w / in_w, map_h / in_h] * 2), meta, flipped)
        assert np.abs(back - gt).max() <= 4 / scale  # within one output cell of the input
        # the official inverse divides by the test scale, not by int(W * scale) / W
        bias = np.array([meta.new_w / meta.orig_w, meta.new_h / meta.orig_h] * 2) / scale
        np.testing.assert_allclose(back, gt * bias, atol=1e-2)
        detections[sample["image_id"]] = np.concatenate([back, np.ones((len(back), 1)), labels[:, None]], axis=1)
    stats = evaluate_detections(ds.coco, detections, ds.cat_ids, ds.class_names)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def train_reference(gt: np.ndarray, height: int, width: int, seed: int, size: int):
    """Replays the geometric draws of the training transform from the same seed and moves the boxes by hand, in
    exact rational arithmetic: crop window [c - crop // 2, c - crop // 2 + crop) -> canvas scaled by size / crop,
    flip x -> size - x, clip, drop boxes of no width or height (a box under one pixel stays, as in the official
    code)."""
    p = random_crop_params(np.random.default_rng(seed), height, width, size)
    k = Fraction(size, p.crop)
    out = []
    for box in gt.astype(np.float64).tolist():
        x1, y1, x2, y2 = map(Fraction, box)
        x1, x2 = (x1 - (p.center_x - p.crop // 2)) * k, (x2 - (p.center_x - p.crop // 2)) * k
        y1, y2 = (y1 - (p.center_y - p.crop // 2)) * k, (y2 - (p.center_y - p.crop // 2)) * k
        if p.flip:
            x1, x2 = size - x2, size - x1
        x1, x2 = min(max(x1, 0), size), min(max(x2, 0), size)
        y1, y2 = min(max(y1, 0), size), min(max(y2, 0), size)
        if x2 > x1 and y2 > y1:
            out.append((x1, y1, x2, y2))
    return np.array(out, np.float64).reshape(-1, 4), p


def test_train_transform_targets_decode_to_moved_ground_truth():
    ds = CocoDetection(RACCOON, "train", train=True)
    seen_flip, seen_crop, seen_cut, compared = set(), set(), 0, 0
    for i in range(len(ds)):
        image, gt, _ = ds.load(i)
        for seed in range(20):
            seed += 100 * i
            t = {k: v.numpy() for k, v in ds.train_sample(i, np.random.default_rng(seed)).items()}
            want, p = train_reference(gt, image.shape[0], image.shape[1], seed, 511)
            boxes, centers, labels = decode_targets(t, 511, 511)
            assert len(boxes) == len(want) and (labels == 0).all()
            assert np.abs(boxes - want).max(initial=0) <= 4  # the goal: within one output cell
            np.testing.assert_allclose(boxes, want, atol=1e-3)  # in fact exact up to float32
            np.testing.assert_allclose(centers, (want[:, :2] + want[:, 2:]) / 2, atol=1e-3)
            seen_flip.add(p.flip)
            seen_crop.add(p.crop)
            seen_cut += len(want) < len(gt) or bool(np.any(want[:, [0, 1]] == 0) | np.any(want[:, [2, 3]] == 511))
            compared += len(want)
    assert seen_flip == {False, True} and seen_crop == {int(511 * s) for s in RAND_SCALES}
    assert seen_cut >= 8 and compared > 150  # crops that cut or drop boxes were exercised


def test_gaussian_radius_of_a_raccoon_box():
    """One hand-checked target: raccoon-102's box (0, 0, 118, 152) on the val input at scale 1."""
    ds = CocoDetection(RACCOON, "val", train=False)
    i = ds.image_ids.index(5)
    images, meta = ds[i]["inputs"][0]
    # 259 x 194 pixels -> input 383 x 255 (| 127), image centered: pad 383 // 2 - 259 // 2, 255 // 2 - 194 // 2.
    assert (meta.pad_x, meta.pad_y, meta.in_w, meta.in_h) == (62, 30, 383, 255)
    box = np.array([[0, 0, 118, 152]], np.float64) + [meta.pad_x, meta.pad_y] * 2
    t = make_targets(box, [0], 1, 255, 383)
    w, h = math.ceil(118 * 96 / 383), math.ceil(152 * 64 / 255)  # 30 x 39 cells (map / input ratio)
    o = 0.7
    r = int((-2 * o * (h + w) + math.sqrt((2 * o * (h + w)) ** 2 + 16 * o * (1 - o) * w * h)) / 2)
    hm = t["hm_tl"][0]
    y, x = divmod(int(t["ind_tl"][0]), 96)
    sigma = (2 * r + 1) / 6
    assert hm[y, x + r] == pytest.approx(math.exp(-r * r / (2 * sigma * sigma)), rel=1e-6)
    assert hm[y, x + r + 1] == 0


def extreme_split(root: Path) -> Path:
    """Images far from the 127 x 127 canvas, each with whole-pixel boxes on its edges and a sub-pixel one: 1 x 1
    (grayscale), 3000 x 20, 20 x 3000 and 40 x 30 (crops of 3 to 150 times its side, mostly zero padding). Each
    image's boxes are of one class; the category ids (9, 4) are not those labels (4 -> 0, 9 -> 1)."""
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    specs = [(1, 1, 9, [[0, 0, 1, 1]]),
             (3000, 20, 4, [[0, 0, 3000, 20], [2990, 5, 10, 10], [1500.25, 3.5, 0.5, 0.25]]),
             (20, 3000, 9, [[0, 0, 20, 3000], [5, 2990, 10, 10], [3.5, 1500.25, 0.25, 0.5]]),
             (40, 30, 4, [[0, 0, 40, 30], [39, 29, 1, 1], [10, 10, 0.3, 0.3]])]
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (w, h, cat, boxes) in enumerate(specs):
        pixels = rng.integers(0, 256, (h, w) if i == 0 else (h, w, 3), dtype=np.uint8)
        assert cv2.imwrite(str(root / "train" / f"{i}.png"), pixels)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        annotations += [{"image_id": i + 1, "category_id": cat, "bbox": b} for b in boxes]  # ids filled in
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 9, "name": "b"}, {"id": 4, "name": "a"}]}))
    return root


def test_train_samples_of_extreme_images_decode_to_the_exact_reference(tmp_path):
    """Training items of images much smaller than the crop and of aspect ratio 150, against `train_reference`:
    every box that overlaps the crop (sub-pixel ones included) and no other, in its class's heatmap."""
    ds = CocoDetection(extreme_split(tmp_path), "train", train=True, img_size=127)
    assert ds.cat_ids == [4, 9]
    tiny = dropped = 0
    for i in range(len(ds)):
        image, gt, labels = ds.load(i)
        assert image.shape[2] == 3 and (labels == labels[0]).all()
        for seed in range(40):
            t = {k: v.numpy() for k, v in ds.train_sample(i, np.random.default_rng(seed)).items()}
            want, _ = train_reference(gt, image.shape[0], image.shape[1], seed, 127)
            boxes, centers, got_labels = decode_targets(t, 127, 127)
            assert len(boxes) == len(want) and (got_labels == labels[0]).all()
            np.testing.assert_allclose(boxes, want, atol=1e-3)
            np.testing.assert_allclose(centers, (want[:, :2] + want[:, 2:]) / 2, atol=1e-3)
            tiny += int(np.any(want[:, 2:] - want[:, :2] < 1))
            dropped += len(gt) - len(want)
    assert tiny > 0 and dropped > 0
