"""Image transforms with their boxes: CornerNet's training augmentation and the padded test input.

Coordinates are continuous pixels: pixel (row i, column j) covers [j, j + 1) x [i, i + 1), a box is x1 y1 x2 y2
with x2 = x1 + w. Each geometric step is an axis-aligned affine map of these coordinates; the boxes go through the
matrix, the pixels through slicing, `cv2.resize` (bilinear with pixel centers at i + 0.5, which realises exactly
that map) and `cv2.flip`. A horizontal flip of an image of width W maps x -> W - x.

Training (CornerNet's recipe): scale s from {0.6, ..., 1.3}; a square of side int(img_size * s) around a random
center of the original image (at least `border` pixels inside it, the border halved for small images) is cut
out, zero-padded where it leaves the image, and resized to img_size x img_size (CornerNet's `random_crop`: one
slice, one resize); horizontal flip with p 0.5; boxes clipped to the canvas [0, img_size], those with a side of
zero or less (or under `min_box_size`, 0 by default) dropped: as in the official code, a box smaller than one
pixel stays, and becomes a radius-0 peak of the targets. (The official code clips to [0, img_size - 1] and flips
x -> img_size - 1 - x, one pixel off the mirror x -> img_size - x of these coordinates, which its own test code
uses; README "Notes on the method".) Then brightness, contrast and saturation (each 1 + U(-0.4, 0.4), in random
order, blending with the grayscale of the unjittered canvas as CornerNet does), PCA lighting (std 0.1) and
normalisation. All of these are affine in the B, G, R values, so they are composed into one 3 x 4 colour matrix
and applied in one pass.

Test: the image resized by each test scale keeps its aspect ratio, padded with zeros (centered) to the next size
of the form 128k - 1 (`h | 127`); `boxes_to_original` maps boxes decoded on that input back to the image the way
the official test code does (output cells scaled by in / out, not by 4; see `boxes_to_resized`).
"""
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from datasets.targets import STRIDE
from utils.errors import ArgumentError

# Statistics of COCO in BGR order, in [0, 1] units (CornerNet's db/coco.py).
COCO_MEAN = np.array([0.40789654, 0.44719302, 0.47026115], np.float32)
COCO_STD = np.array([0.28863828, 0.27408164, 0.27809835], np.float32)
COCO_EIGEN_VALUES = np.array([0.2141788, 0.01817699, 0.00341571], np.float32)
COCO_EIGEN_VECTORS = np.array([[-0.58752847, -0.69563484, 0.41340352],
                               [-0.5832747, 0.00994535, -0.81221408],
                               [-0.56089297, 0.71832671, 0.41158938]], np.float32)
GRAY_WEIGHTS = np.array([0.114, 0.587, 0.299], np.float64)  # BGR -> gray, as cv2.COLOR_BGR2GRAY
RAND_SCALES = tuple(s / 10 for s in range(6, 14))
BORDER = 128
JITTER = 0.4
LIGHTING_STD = 0.1
# The most pixels of one test input (4095 x 4095: a 511 x 511 COCO image at the largest test scale, 8). Memory grows
# with them (a 127 x 100095 input, 12.7 M pixels, took 3.8 GB and 19 s for tiny_hourglass on the CPU, many times that
# for the hourglasses), and the padding to 128k - 1 makes a thin image's input far larger than the image itself.
MAX_INPUT_PIXELS = 4095 * 4095
# Each side of a test input is padded to the next size of the form 128k - 1 (`side | 127`, eval_sizes): this is the
# smallest test input, the least --max_size an ONNX export for images of any size may have.
MIN_TEST_INPUT = 127


def warp_boxes(boxes: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(N, 4) boxes through an axis-aligned affine `a` (2, 3) with a possible flip; x1 <= x2 is kept."""
    xs = boxes[:, [0, 2]] * a[0, 0] + a[0, 2]
    ys = boxes[:, [1, 3]] * a[1, 1] + a[1, 2]
    return np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1).astype(np.float32)


def clip_boxes(boxes: np.ndarray, width: float, height: float, min_size: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Clips (N, 4) boxes to [0, width] x [0, height]; returns (clipped boxes, keep (N,) bool) where kept boxes have
    both sides > min_size (> 0 when min_size is 0)."""
    out = boxes.copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    keep = (w > 0) & (h > 0) & (w >= min_size) & (h >= min_size)
    return out, keep


def _border(border: int, size: int) -> int:
    """CornerNet's rule: halve the border until the center range [border, size - border) is not empty."""
    i = 1
    while size - border // i <= border // i:
        i *= 2
    return border // i


@dataclass(frozen=True)
class CropParams:
    crop: int  # side of the square cut from the original image, int(img_size * scale)
    center_x: int  # its center, in original pixels
    center_y: int
    flip: bool


def random_crop_params(rng: np.random.Generator, height: int, width: int, img_size: int,
                       rand_scales=RAND_SCALES, border: int = BORDER, flip_prob: float = 0.5) -> CropParams:
    """Draws the geometric augmentation of one image (these are the first draws from `rng`)."""
    crop = int(img_size * rand_scales[rng.integers(len(rand_scales))])
    bx, by = _border(border, width), _border(border, height)
    cx = int(rng.integers(bx, width - bx))
    cy = int(rng.integers(by, height - by))
    return CropParams(crop, cx, cy, bool(rng.random() < flip_prob))


def crop_matrix(p: CropParams, img_size: int) -> np.ndarray:
    """(2, 3) continuous map original -> canvas: the crop's top-left corner (center - crop // 2) goes to 0,
    the crop is scaled by img_size / crop, then flipped (x -> img_size - x) when p.flip."""
    k = img_size / p.crop
    left, top = p.center_x - p.crop // 2, p.center_y - p.crop // 2
    a = np.array([[k, 0.0, -k * left],
                  [0.0, k, -k * top]])
    if p.flip:  # as k * (right - x): the crop's right edge lands on exactly 0, as its left edge does unflipped
        # (img_size + k * left, equal in exact arithmetic, can miss 0 by 1e-13: a box touching the crop from outside
        # would stay, as a sliver)
        a[0] = [-k, 0.0, k * (left + p.crop)]
    return a


def crop_image(image: np.ndarray, p: CropParams, img_size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (img_size, img_size, 3) uint8: the crop x crop square from (center - crop // 2), zeros
    outside the image, resized to img_size and flipped when p.flip; pixels move as `crop_matrix` says."""
    h, w = image.shape[:2]
    x0, y0 = p.center_x - p.crop // 2, p.center_y - p.crop // 2
    x1, y1 = x0 + p.crop, y0 + p.crop
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        crop = image[y0:y1, x0:x1]
    else:
        crop = np.zeros((p.crop, p.crop, 3), np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    if p.crop != img_size:
        crop = cv2.resize(crop, (img_size, img_size), interpolation=cv2.INTER_LINEAR)
    return cv2.flip(crop, 1) if p.flip else np.ascontiguousarray(crop)


def random_color_matrix(rng: np.random.Generator, canvas: np.ndarray, mean=COCO_MEAN, std=COCO_STD,
                        eig_val=COCO_EIGEN_VALUES, eig_vec=COCO_EIGEN_VECTORS) -> np.ndarray:
    """(3, 4) matrix M with normalised = M[:, :3] @ bgr_uint8 + M[:, 3] that does colour jitter, lighting and
    normalisation of the (H, W, 3) uint8 `canvas`.

    Each jitter step maps x (in [0, 1]) to alpha * x + (1 - alpha) * t, t = 0 (brightness), the mean gray of the
    canvas (contrast) or the pixel's gray (saturation); tracking x -> a * x + b * gray + c gives the composition.
    """
    gray_mean = float(GRAY_WEIGHTS @ np.asarray(cv2.mean(canvas)[:3])) / 255.0
    a, b, c = 1.0, 0.0, 0.0
    for step in rng.permutation(3):
        alpha = 1.0 + rng.uniform(-JITTER, JITTER)
        a, b, c = alpha * a, alpha * b, alpha * c
        if step == 1:
            c += (1 - alpha) * gray_mean
        elif step == 2:
            b += 1 - alpha
    light = eig_vec.astype(np.float64) @ (eig_val * rng.normal(0.0, LIGHTING_STD, 3))
    m = np.empty((3, 4))
    m[:, :3] = a * np.eye(3) + b * GRAY_WEIGHTS[None, :]
    m[:, :3] /= 255.0 * std[:, None]
    m[:, 3] = (c + light - mean) / std
    return m


def normalize_matrix(mean=COCO_MEAN, std=COCO_STD) -> np.ndarray:
    """(3, 4) colour matrix of plain normalisation, (x / 255 - mean) / std."""
    m = np.zeros((3, 4))
    m[:, :3] = np.diag(1.0 / (255.0 * std))
    m[:, 3] = -mean / std
    return m


def apply_color_matrix(image: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 C-contiguous, each pixel mapped by the (3, 4) matrix `m`."""
    hwc = cv2.transform(image.astype(np.float32), m.astype(np.float32))
    out = np.empty((3, *image.shape[:2]), np.float32)
    cv2.split(hwc, [out[0], out[1], out[2]])  # into the planes of `out`: faster than a strided transpose
    return out


def train_transform(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, img_size: int,
                    rng: np.random.Generator, min_box_size: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CornerNet augmentation of one image.

    image (H, W, 3) uint8 BGR, boxes (N, 4) x1 y1 x2 y2 inside the image, labels (N,) ->
    (image (3, S, S) float32 normalised, boxes (M, 4) float32 on the canvas, labels (M,)), S = img_size.
    """
    p = random_crop_params(rng, image.shape[0], image.shape[1], img_size)
    canvas = crop_image(image, p, img_size)
    boxes, keep = clip_boxes(warp_boxes(boxes, crop_matrix(p, img_size)), img_size, img_size, min_box_size)
    chw = apply_color_matrix(canvas, random_color_matrix(rng, canvas))
    return chw, boxes[keep], labels[keep]


@dataclass(frozen=True)
class EvalMeta:
    """How an original image became a test input: resized to (new_w, new_h) = int(orig * scale), then placed at
    (pad_x, pad_y) on a zero input of size (in_w, in_h), the next sizes of the form 128k - 1."""
    orig_w: int
    orig_h: int
    scale: float  # the test scale
    new_w: int
    new_h: int
    pad_x: int
    pad_y: int
    in_w: int
    in_h: int


def eval_sizes(side: int, scale: float) -> tuple[int, int]:
    """(resized, input) length of an image side at a test scale: int(side * scale), at least 1, and the next
    128k - 1 (`| 127`), the length of the zero input it is placed on."""
    resized = max(1, int(side * scale))
    return resized, resized | MIN_TEST_INPUT


def check_input_size(width: int, height: int, scale: float) -> None:
    """An ArgumentError naming the image's size and the scale when its test input at `scale` has more than
    MAX_INPUT_PIXELS pixels (before anything of that size is allocated)."""
    in_w, in_h = eval_sizes(width, scale)[1], eval_sizes(height, scale)[1]
    if in_w * in_h > MAX_INPUT_PIXELS:
        raise ArgumentError(f"an image of {width} x {height} pixels at test scale {scale:g} makes a network input of "
                            f"{in_w} x {in_h} pixels (each side padded to the next 128k - 1), more than the "
                            f"{MAX_INPUT_PIXELS} one input may have; test it at a smaller scale, or crop or shrink it")


def eval_input(image: np.ndarray, scale: float, flip: bool) -> tuple[torch.Tensor, EvalMeta]:
    """(H, W, 3) uint8 BGR -> (images (1 or 2, 3, H_in, W_in) float32 normalised, meta). The image is resized to
    (int(W * scale), int(H * scale)) and padded with zeros, centered, to (that | 127); image 1 (flip) is the
    horizontally flipped copy of image 0. An input of more than MAX_INPUT_PIXELS pixels is an ArgumentError.

    As the official `crop_image` (its window around the center is `in // 2` wide on each side), a resized side
    that is already of the form 128k - 1 loses its last column (row): it is left zero."""
    h, w = image.shape[:2]
    check_input_size(w, h, scale)
    (new_w, in_w), (new_h, in_h) = eval_sizes(w, scale), eval_sizes(h, scale)
    meta = EvalMeta(orig_w=w, orig_h=h, scale=scale, new_w=new_w, new_h=new_h, pad_x=in_w // 2 - new_w // 2,
                    pad_y=in_h // 2 - new_h // 2, in_w=in_w, in_h=in_h)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    image = image[:new_h - (new_h == in_h), :new_w - (new_w == in_w)]
    canvas = cv2.copyMakeBorder(image, meta.pad_y, in_h - image.shape[0] - meta.pad_y, meta.pad_x,
                                in_w - image.shape[1] - meta.pad_x, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    chw = apply_color_matrix(canvas, normalize_matrix())
    images = np.stack([chw, chw[:, :, ::-1]]) if flip else chw[None]
    return torch.from_numpy(images), meta


def boxes_to_resized(boxes: np.ndarray, meta: EvalMeta, flipped: bool) -> np.ndarray:
    """(N, 4) x1 y1 x2 y2 in output-map units of the input described by `meta` (of its flipped copy when
    `flipped`) -> (N, 4) float64 pixels of the resized image, not clipped. As the official code (and its
    training targets): an output map of w_out = (in_w + 1) / 4 columns spans the input's in_w pixels (ratio
    in_w / w_out, 3.992 at 511), and the flip is undone on the map, x -> w_out - x."""
    out_w, out_h = (meta.in_w + 1) // STRIDE, (meta.in_h + 1) // STRIDE
    b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    if flipped:
        b[:, [0, 2]] = out_w - b[:, [2, 0]]
    b[:, [0, 2]] = b[:, [0, 2]] * (meta.in_w / out_w) - meta.pad_x
    b[:, [1, 3]] = b[:, [1, 3]] * (meta.in_h / out_h) - meta.pad_y
    return b


def far_outside(resized: np.ndarray, meta: EvalMeta, margin: float = 5.0) -> np.ndarray:
    """(N, 4) boxes in resized-image pixels -> (N,) bool, True for those the official code rejects: a side more
    than `margin` pixels beyond the resized image (x1 <= -5, x2 >= new_w + 5, and the same for y)."""
    return ((resized[:, 0] <= -margin) | (resized[:, 2] >= meta.new_w + margin)
            | (resized[:, 1] <= -margin) | (resized[:, 3] >= meta.new_h + margin))


def resized_to_original(resized: np.ndarray, meta: EvalMeta) -> np.ndarray:
    """(N, 4) boxes in resized-image pixels -> (N, 4) float32 original pixels: clipped to the resized image, then
    divided by the test scale (as the official code; int(W * scale) / W differs from the scale by < 1 / W), and
    clipped to the original image (which only a side resized up to 1 pixel from below 1 can leave)."""
    b = resized.copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, meta.new_w)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, meta.new_h)
    b = np.minimum(b / meta.scale, [meta.orig_w, meta.orig_h, meta.orig_w, meta.orig_h])
    return b.astype(np.float32)


def boxes_to_original(boxes: np.ndarray, meta: EvalMeta, flipped: bool) -> np.ndarray:
    """(N, 4) boxes in output-map units -> (N, 4) float32 original pixels, clipped to the image."""
    return resized_to_original(boxes_to_resized(boxes, meta, flipped), meta)
