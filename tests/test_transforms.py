"""datasets/transforms.py: pixels and boxes move together; colour and test-input steps against slow references."""
import cv2
import numpy as np
import pytest

from datasets.transforms import (COCO_EIGEN_VALUES, COCO_EIGEN_VECTORS, COCO_MEAN, COCO_STD, RAND_SCALES,
                                 CropParams, apply_color_matrix, boxes_to_original, clip_boxes, crop_image,
                                 crop_matrix, eval_input, random_color_matrix, random_crop_params, train_transform,
                                 warp_boxes)


def smooth_image(rng, h, w):
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def pulled_back_centers(a, size):
    """Canvas pixel centers u + 0.5 (u < size) pulled back through the continuous map `a`: (xs (size,), ys (size,))
    in original-image coordinates."""
    inv = np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2]
    u = np.arange(size) + 0.5
    xs = inv[0, 0] * u + inv[0, 2]
    ys = inv[1, 1] * u + inv[1, 2]
    return xs, ys


def sample(image, xs, ys, box):
    """Bilinear samples at continuous points xs (W,) x ys (H,) from the image's pixel centers (i + 0.5), zeros
    outside it, the points clamped into box x0 y0 x1 y1 (cv2.resize repeats the crop's edge pixels)."""
    h, w = image.shape[:2]
    padded = np.zeros((h + 2, w + 2, 3), np.float64)
    padded[1:-1, 1:-1] = image
    x = np.clip(xs, box[0] + 0.5, box[2] - 0.5) - 0.5
    y = np.clip(ys, box[1] + 0.5, box[3] - 0.5) - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[None, :, None], (y - y0)[:, None, None]
    cx0, cx1 = np.clip(x0 + 1, 0, w + 1), np.clip(x0 + 2, 0, w + 1)
    cy0, cy1 = np.clip(y0 + 1, 0, h + 1), np.clip(y0 + 2, 0, h + 1)
    top = padded[cy0][:, cx0] * (1 - fx) + padded[cy0][:, cx1] * fx
    bottom = padded[cy1][:, cx0] * (1 - fx) + padded[cy1][:, cx1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("flip", [False, True])
def test_unit_scale_crop_is_an_exact_copy(flip):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 700, 3)).astype(np.uint8)
    p = CropParams(crop=255, center_x=600, center_y=40, flip=flip)
    want = np.zeros((255, 255, 3), np.uint8)
    want[87:, :227] = image[:168, 473:]  # crop origin (473, -87)
    np.testing.assert_array_equal(crop_image(image, p, 255), want[:, ::-1] if flip else want)


@pytest.mark.parametrize("crop", [int(511 * s) for s in RAND_SCALES])
def test_scaled_crop_matches_bilinear_reference(crop):
    rng = np.random.default_rng(crop)
    image = smooth_image(rng, 400, 560)
    p = CropParams(crop=crop, center_x=int(rng.integers(0, 560)), center_y=int(rng.integers(0, 400)),
                   flip=bool(crop % 2))
    got = crop_image(image, p, 511).astype(np.float64)
    xs, ys = pulled_back_centers(crop_matrix(p, 511), 511)
    x0, y0 = p.center_x - crop // 2, p.center_y - crop // 2
    want = sample(image, xs, ys, (x0, y0, x0 + crop, y0 + crop))
    assert np.abs(got - want).max() <= 1.5  # cv2 rounds its weights to 11 bits
    assert np.abs(got - want).mean() < 0.5


def test_boxes_follow_pixels_through_the_training_geometry():
    rng = np.random.default_rng(2)
    for _ in range(60):
        h, w = rng.integers(60, 900, 2)
        image = np.zeros((h, w, 3), np.uint8)
        x1, y1 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        x2, y2 = rng.integers(x1 + 20, w + 1), rng.integers(y1 + 20, h + 1)
        image[y1:y2, x1:x2] = 255
        p = random_crop_params(rng, h, w, 511)
        a = crop_matrix(p, 511)
        canvas = crop_image(image, p, 511)
        box, keep = clip_boxes(warp_boxes(np.array([[x1, y1, x2, y2]], np.float32), a), 511, 511)
        ys, xs = np.nonzero(canvas[:, :, 0] >= 128)  # pixels more than half covered by the rectangle
        assert keep[0] == (len(xs) > 0) or min(box[0, 2] - box[0, 0], box[0, 3] - box[0, 1]) < 1.5
        if len(xs):
            np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box[0], atol=1.0)
        whole = warp_boxes(np.array([[x1, y1, x2, y2]], np.float32), a)[0]
        if whole.min() > 2 and whole.max() < 509:
            # Sub-pixel check: the intensity centroid (pixel centers at i + 0.5) is the box center, and the
            # intensity sum its area; a half-pixel convention error would move the centroid by 0.5 k.
            m = canvas[:, :, 0].astype(np.float64) / 255
            cy, cx = (np.nonzero(m)[0] + 0.5) @ m[m > 0] / m.sum(), (np.nonzero(m)[1] + 0.5) @ m[m > 0] / m.sum()
            np.testing.assert_allclose([cx, cy], [(whole[0] + whole[2]) / 2, (whole[1] + whole[3]) / 2], atol=0.15)
            assert m.sum() == pytest.approx((whole[2] - whole[0]) * (whole[3] - whole[1]), rel=0.02)


def test_random_crop_params_ranges_and_border():
    rng = np.random.default_rng(3)
    crops = {int(511 * s) for s in RAND_SCALES}
    flips = []
    for _ in range(300):
        h, w = rng.integers(1, 1200, 2)
        p = random_crop_params(rng, h, w, 511)
        assert p.crop in crops
        bx = 128 if w > 256 else None
        if bx:
            assert bx <= p.center_x < w - bx
        assert 0 <= p.center_x < w and 0 <= p.center_y < h
        flips.append(p.flip)
    assert 0.4 < np.mean(flips) < 0.6
    # A 200-pixel side halves the border to 64: centers in [64, 136).
    cs = [random_crop_params(rng, 200, 200, 511).center_x for _ in range(500)]
    assert min(cs) >= 64 and max(cs) < 136 and max(cs) - min(cs) > 50


def color_reference(image, rng):
    """CornerNet's sequential steps in float64: x / 255, brightness / contrast / saturation in random order with
    the grayscale of the unjittered image, PCA lighting, normalisation; then HWC -> CHW."""
    x = image.astype(np.float64) / 255
    gray = x @ np.array([0.114, 0.587, 0.299])
    gray_mean = gray.mean()
    for step in rng.permutation(3):
        alpha = 1 + rng.uniform(-0.4, 0.4)
        if step == 0:
            x = x * alpha
        elif step == 1:
            x = alpha * x + (1 - alpha) * gray_mean
        else:
            x = alpha * x + (1 - alpha) * gray[:, :, None]
    x = x + COCO_EIGEN_VECTORS.astype(np.float64) @ (COCO_EIGEN_VALUES * rng.normal(0, 0.1, 3))
    x = (x - COCO_MEAN) / COCO_STD
    return x.transpose(2, 0, 1)


def test_color_matrix_equals_sequential_jitter_lighting_normalisation():
    for seed in range(10):
        image = np.random.default_rng(100 + seed).integers(0, 256, (37, 53, 3)).astype(np.uint8)
        got = apply_color_matrix(image, random_color_matrix(np.random.default_rng(seed), image))
        want = color_reference(image, np.random.default_rng(seed))
        assert got.dtype == np.float32 and got.shape == (3, 37, 53) and got.flags.c_contiguous
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_train_transform_output_and_box_filtering():
    image = smooth_image(np.random.default_rng(4), 300, 400)
    boxes = np.array([[0, 0, 400, 300], [10, 10, 10.5, 200], [100, 100, 101, 101]], np.float32)
    labels = np.array([0, 1, 2])
    rng, legacy_rng = np.random.default_rng(5), np.random.default_rng(5)
    kept_tiny = 0
    for _ in range(20):
        chw, b, lab = train_transform(image, boxes, labels, 511, rng)
        assert chw.shape == (3, 511, 511) and chw.dtype == np.float32
        assert b.dtype == np.float32 and len(b) == len(lab)
        assert (b >= 0).all() and (b <= 511).all()
        assert ((b[:, 2] - b[:, 0]) > 0).all() and ((b[:, 3] - b[:, 1]) > 0).all()
        # As the official code, a box under one canvas pixel stays (box 1: 0.5 px wide, at most 0.83 on the
        # canvas); the old rule (--min_box_size 1) drops it.
        kept_tiny += 1 in lab.tolist()
        _, old_b, old_lab = train_transform(image, boxes, labels, 511, legacy_rng, min_box_size=1.0)
        assert 1 not in old_lab.tolist() and ((old_b[:, 2:] - old_b[:, :2]) >= 1).all()
    assert kept_tiny > 0


def test_clip_boxes_partly_and_wholly_outside_and_zero_size():
    boxes = np.array([[-10, -5, 50, 40], [90, 90, 130, 120], [120, 10, 150, 20], [5, 5, 5, 30], [5, 5, 30, -2]],
                     np.float32)
    out, keep = clip_boxes(boxes, 100, 100)
    np.testing.assert_array_equal(out[0], [0, 0, 50, 40])
    np.testing.assert_array_equal(out[1], [90, 90, 100, 100])
    assert keep.tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("img_size", [127, 511])
def test_a_box_outside_the_crop_is_dropped_where_it_touches_it(img_size):
    """Boxes of whole pixels touching each side of the crop from outside, and overlapping it by one pixel, at many
    crops, flipped and not: kept exactly when they overlap the crop (integer comparisons). A touching box must not
    become a sliver of width 1e-13 at the canvas edge: that is a radius-0 target where there is no object."""
    for crop in sorted({int(img_size * s) for s in RAND_SCALES}):
        for center in range(0, 3000, 7):
            for flip in (False, True):
                p = CropParams(crop=crop, center_x=center, center_y=center + 3, flip=flip)
                x0, y0 = center - crop // 2, center + 3 - crop // 2
                x1, y1 = x0 + crop, y0 + crop
                boxes = []
                for overlap in (0, 1):
                    boxes += [[x1 - overlap, y0 + 5, x1 + 7, y0 + 20], [x0 - 7, y0 + 5, x0 + overlap, y0 + 20],
                              [x0 + 5, y1 - overlap, x0 + 20, y1 + 7], [x0 + 5, y0 - 7, x0 + 20, y0 + overlap]]
                boxes = np.array(boxes, np.float32)
                _, keep = clip_boxes(warp_boxes(boxes, crop_matrix(p, img_size)), img_size, img_size)
                overlaps = (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)
                np.testing.assert_array_equal(keep, overlaps, err_msg=f"crop {crop} at {center}, flip {flip}")


def forward_reference(boxes, image_w, image_h, scale):
    """Where original boxes land on the test input: resized by int(size * scale) / size, then centered by
    (input // 2 - resized // 2) in an input of size resized | 127; in output units (x map / input size)."""
    new_w, new_h = int(image_w * scale), int(image_h * scale)
    in_w, in_h = new_w | 127, new_h | 127
    b = boxes.astype(np.float64).copy()
    b[:, [0, 2]] = b[:, [0, 2]] * new_w / image_w + (in_w // 2 - new_w // 2)
    b[:, [1, 3]] = b[:, [1, 3]] * new_h / image_h + (in_h // 2 - new_h // 2)
    b[:, [0, 2]] *= ((in_w + 1) // 4) / in_w
    b[:, [1, 3]] *= ((in_h + 1) // 4) / in_h
    return b, in_w, in_h


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.0, 1.25, 1.5])
def test_eval_input_layout_and_boxes_round_trip(scale):
    rng = np.random.default_rng(int(scale * 100))
    h, w = 194, 259
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    images, meta = eval_input(image, scale, flip=True)
    new_w, new_h = int(w * scale), int(h * scale)
    assert images.shape == (2, 3, new_h | 127, new_w | 127) and images.dtype.is_floating_point
    assert (images.shape[2] + 1) % 128 == 0 and (images.shape[3] + 1) % 128 == 0
    np.testing.assert_array_equal(images[1].numpy(), images[0].numpy()[:, :, ::-1])
    pad_value = -COCO_MEAN / COCO_STD
    np.testing.assert_allclose(images[0, :, 0, 0].numpy(), pad_value, atol=1e-6)
    np.testing.assert_allclose(images[0, :, -1, -1].numpy(), pad_value, atol=1e-6)
    if scale == 1.0:
        x0, y0 = meta.pad_x, meta.pad_y
        want = (image.astype(np.float32) / 255 - COCO_MEAN) / COCO_STD
        np.testing.assert_allclose(images[0, :, y0:y0 + h, x0:x0 + w].numpy(), want.transpose(2, 0, 1), atol=1e-5)

    boxes = np.stack([rng.uniform(0, w / 2, 30), rng.uniform(0, h / 2, 30), rng.uniform(w / 2, w, 30),
                      rng.uniform(h / 2, h, 30)], axis=1)
    on_input, in_w, in_h = forward_reference(boxes, w, h, scale)
    assert (meta.in_w, meta.in_h) == (in_w, in_h)
    # the official inverse divides by the test scale, not by int(W * scale) / W
    back = boxes * np.array([new_w / w, new_h / h] * 2) / scale
    np.testing.assert_allclose(boxes_to_original(on_input, meta, flipped=False), back, atol=1e-3)
    flipped = on_input.copy()
    flipped[:, [0, 2]] = (in_w + 1) // 4 - on_input[:, [2, 0]]
    np.testing.assert_allclose(boxes_to_original(flipped, meta, flipped=True), back, atol=1e-3)


def test_boxes_to_original_clips_to_the_image():
    _, meta = eval_input(np.zeros((100, 150, 3), np.uint8), 1.0, flip=False)
    out = boxes_to_original(np.array([[0, 0, 1000, 1000], [1, 1, 2, 2]]), meta, flipped=False)
    np.testing.assert_allclose(out[0], [0, 0, 150, 100])
    assert out.dtype == np.float32 and out.shape == (2, 4)
    assert boxes_to_original(np.zeros((0, 4)), meta, flipped=True).shape == (0, 4)
    # A side that scales below one pixel is resized to 1 (not 0): clipped to that pixel and divided by the scale,
    # a box reached 1 / 0.3 = 3.33 px on an image 1 px high.
    for shape, scale in (((1, 500, 3), 0.3), ((7, 9, 3), 0.1), ((1, 1, 3), 0.3)):
        _, meta = eval_input(np.zeros(shape, np.uint8), scale, flip=False)
        for flipped in (False, True):
            out = boxes_to_original(np.array([[-1, -1, 1000, 1000]]), meta, flipped)
            np.testing.assert_array_equal(out[0], [0, 0, shape[1], shape[0]])


@pytest.mark.parametrize("scale", [0.6, 1.0, 1.37])
def test_eval_input_pixels_follow_the_meta(scale):
    image = np.zeros((211, 307, 3), np.uint8)
    image[40:150, 100:260] = 255
    image = cv2.GaussianBlur(image, (0, 0), 3)  # smooth edges: resampling keeps the centroid
    images, meta = eval_input(image, scale, flip=True)
    for i, flipped in enumerate((False, True)):
        # Back to [0, 1] intensities; the rectangle's centroid on the input, mapped back, is the original center.
        m = (images[i, 0].numpy() * COCO_STD[0] + COCO_MEAN[0]).astype(np.float64)
        m[m < 1e-3] = 0
        cy = (np.nonzero(m)[0] + 0.5) @ m[m > 0] / m.sum()
        cx = (np.nonzero(m)[1] + 0.5) @ m[m > 0] / m.sum()
        ratio = np.array([(meta.in_w + 1) // 4 / meta.in_w, (meta.in_h + 1) // 4 / meta.in_h] * 2)
        center = boxes_to_original(np.array([[cx, cy, cx, cy]]) * ratio, meta, flipped)[0, :2]
        bias = np.array([meta.new_w / meta.orig_w, meta.new_h / meta.orig_h]) / scale
        np.testing.assert_allclose(center, np.array([180, 95]) * bias, atol=0.05)


def test_eval_input_drops_the_last_column_of_a_128k_minus_1_image():
    # As the official crop_image: a 511 x 383 image (already 128k - 1) fills the input but for its last column
    # and row, which stay zero padding; a 510 x 382 image fills its input exactly (pad 0 on both sides).
    image = np.full((383, 511, 3), 200, np.uint8)
    images, meta = eval_input(image, 1.0, flip=True)
    assert (meta.in_w, meta.in_h, meta.pad_x, meta.pad_y) == (511, 383, 0, 0)
    pad_value = -COCO_MEAN / COCO_STD
    np.testing.assert_allclose(images[0, :, :, -1].numpy(), np.repeat(pad_value[:, None], 383, 1), atol=1e-6)
    np.testing.assert_allclose(images[0, :, -1, :].numpy(), np.repeat(pad_value[:, None], 511, 1), atol=1e-6)
    inside = (200 / 255 - COCO_MEAN) / COCO_STD
    np.testing.assert_allclose(images[0, :, :-1, :-1].numpy().reshape(3, -1).min(1), inside, atol=1e-5)
    np.testing.assert_allclose(images[1, :, :, 0].numpy(), images[0, :, :, -1].numpy())
    images, meta = eval_input(np.full((382, 510, 3), 200, np.uint8), 1.0, flip=False)
    assert (meta.in_w, meta.in_h, meta.pad_x, meta.pad_y) == (511, 383, 0, 0)
    np.testing.assert_allclose(images[0, :, :382, :510].numpy().reshape(3, -1).max(1), inside, atol=1e-5)
