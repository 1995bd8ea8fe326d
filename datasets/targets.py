"""Training targets of the keypoint triplet (top-left, bottom-right and center of each box) on the output map.

Coordinates are continuous input pixels. An input of in_w = 128k - 1 pixels gives an output map of
w = (in_w + 1) / 4 cells, and, as in the official code (sample/coco.py), a coordinate maps to the map by the ratio
w / in_w (128 / 511, not 1 / 4): a keypoint at input x lies in cell floor(x w / in_w) (clamped into the map) with
sub-cell offset x w / in_w - cell; the test-time inverse is datasets/transforms.py `boxes_to_resized`. Each
keypoint is an unnormalised gaussian bump, 1.0 exactly at its cell, drawn by maximum with what is already there.

The bump radius is CornerNet's `gaussian_radius` (official code, sample/utils.py of CornerNet and CenterNet) as it
is written there, quirk included: each of its three quadratics is solved as (b + sqrt(b^2 - 4ac)) / 2, not with
the textbook root (b -+ sqrt(...)) / (2a). The minimum of the three is then always the third one, about 0.27 x the
side of a square box (the textbook roots give about 0.08 x). The published CornerNet and CenterNet results were
trained with the official form, so it is kept; the reimplementation pytorch_simple_CenterNet_47 (github
zzzxxxttt) uses the textbook roots instead.
Box sizes enter in output cells rounded up (ceil(box_w w / in_w), the same for heights) and the radius is
truncated to an integer.
"""
from functools import lru_cache

import numpy as np

STRIDE = 4
MIN_OVERLAP = 0.7
CORNER_DELTA = 6  # sigma = diameter / 6 for the corners
CENTER_DELTA = 5  # sigma = diameter / 5 for the centers
MAX_OBJECTS = 128  # objects with offsets and indices per image: the official max_tag_len


def gaussian_radius(height: np.ndarray, width: np.ndarray, min_overlap: float = MIN_OVERLAP) -> np.ndarray:
    """CornerNet's radius (official form, see the module docstring) for boxes of `height` x `width` output cells;
    arrays of any matching shape -> float64 array of that shape."""
    h = np.asarray(height, np.float64)
    w = np.asarray(width, np.float64)
    # Corners moved in the same direction (both out or both in), then the two tight cases of opposite moves.
    b1, c1 = h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + np.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + np.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + np.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return np.minimum(np.minimum(r1, r2), r3)


@lru_cache(maxsize=1024)
def gaussian_1d(radius: int, delta: int) -> np.ndarray:
    """(2r + 1,) float32 exp(-d^2 / (2 sigma^2)), sigma = (2r + 1) / delta; the 2-D bump is its outer product.
    CornerNet zeroes values below eps * max; with delta <= 6 every value of the 2-D window is above exp(-9), so that
    never applies."""
    sigma = (2 * radius + 1) / delta
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(d * d) / (2 * sigma * sigma)).astype(np.float32)
    g.setflags(write=False)
    return g


def draw_gaussian(heatmap: np.ndarray, x: int, y: int, radius: int, delta: int) -> None:
    """Draws the bump of `radius` centered on cell (x, y) into `heatmap` (H, W) in place, by maximum; the part
    outside the map is cut off."""
    height, width = heatmap.shape
    g = gaussian_1d(radius, delta)
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    if left + right <= 0 or top + bottom <= 0:
        return
    patch = g[radius - top:radius + bottom, None] * g[None, radius - left:radius + right]
    region = heatmap[y - top:y + bottom, x - left:x + right]
    np.maximum(region, patch, out=region)


def keypoint_cells(points: np.ndarray, ratio: np.ndarray, map_w: int, map_h: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) input-pixel x y, ratio (2,) map / input size -> (cells (N, 2) int64 x y clamped into the map,
    offsets (N, 2) float32 x y)."""
    scaled = points * ratio
    cells = np.floor(scaled).astype(np.int64)
    cells[:, 0] = np.clip(cells[:, 0], 0, map_w - 1)
    cells[:, 1] = np.clip(cells[:, 1], 0, map_h - 1)
    return cells, (scaled - cells).astype(np.float32)


def make_targets(boxes: np.ndarray, labels: np.ndarray, num_classes: int, input_h: int, input_w: int,
                 max_objects: int = MAX_OBJECTS) -> dict[str, np.ndarray]:
    """Targets for one image.

    boxes (N, 4) x1 y1 x2 y2 in input pixels (already clipped to the input), labels (N,) contiguous class ids.
    Returns hm_tl / hm_br / hm_ct (C, h, w) float32 with h = (input_h + 1) // 4; off_tl / off_br / off_ct
    (max_objects, 2) float32 x y; ind_tl / ind_br / ind_ct (max_objects,) int64 = y * w + x; mask (max_objects,)
    bool, True for the first min(N, max_objects) objects, in the order given. Every object is drawn on the heatmaps;
    objects past `max_objects` get no offset or index (COCO has at most 93 per image).
    """
    map_h, map_w = (input_h + 1) // STRIDE, (input_w + 1) // STRIDE
    ratio = np.array([map_w / input_w, map_h / input_h])
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    out = {f"hm_{k}": np.zeros((num_classes, map_h, map_w), np.float32) for k in ("tl", "br", "ct")}
    points = {"tl": boxes[:, 0:2], "br": boxes[:, 2:4], "ct": (boxes[:, 0:2] + boxes[:, 2:4]) / 2}
    cells, offsets = {}, {}
    for k, p in points.items():
        cells[k], offsets[k] = keypoint_cells(p, ratio, map_w, map_h)

    box_w = np.ceil((boxes[:, 2] - boxes[:, 0]) * ratio[0])
    box_h = np.ceil((boxes[:, 3] - boxes[:, 1]) * ratio[1])
    radii = np.maximum(0, gaussian_radius(box_h, box_w).astype(np.int64)).tolist()
    for k, delta in (("tl", CORNER_DELTA), ("br", CORNER_DELTA), ("ct", CENTER_DELTA)):
        hm = out[f"hm_{k}"]
        for (x, y), label, r in zip(cells[k].tolist(), labels.tolist(), radii):
            draw_gaussian(hm[label], x, y, r, delta)

    n = min(len(boxes), max_objects)
    for k in ("tl", "br", "ct"):
        off = np.zeros((max_objects, 2), np.float32)
        ind = np.zeros(max_objects, np.int64)
        off[:n] = offsets[k][:n]
        ind[:n] = cells[k][:n, 1] * map_w + cells[k][:n, 0]
        out[f"off_{k}"], out[f"ind_{k}"] = off, ind
    mask = np.zeros(max_objects, bool)
    mask[:n] = True
    out["mask"] = mask
    return out
