"""datasets/targets.py against slow per-pixel references."""
import math

import numpy as np
import pytest

from datasets.targets import draw_gaussian, gaussian_radius, keypoint_cells, make_targets


def radius_reference(h: float, w: float, o: float) -> float:
    """CornerNet's official form, one box at a time: for each case's quadratic a r^2 + b r + c = 0 the value
    (b + sqrt(b^2 - 4ac)) / 2."""
    cases = [(1.0, h + w, w * h * (1 - o) / (1 + o)),
             (4.0, 2 * (h + w), (1 - o) * w * h),
             (4 * o, -2 * o * (h + w), (o - 1) * w * h)]
    return min((b + math.sqrt(b * b - 4 * a * c)) / 2 for a, b, c in cases)


def test_gaussian_radius_matches_reference_on_random_boxes():
    rng = np.random.default_rng(0)
    h, w = rng.uniform(0, 200, 500), rng.uniform(0, 200, 500)
    for o in (0.3, 0.7, 0.9):
        got = gaussian_radius(h, w, o)
        want = np.array([radius_reference(a, b, o) for a, b in zip(h, w)])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gaussian_radius_known_values():
    # 10 x 10 cells, overlap 0.7: the third case, b = -2 * 0.7 * 20, 4ac = -4 * 2.8 * 30.
    assert gaussian_radius(10, 10) == pytest.approx((-28 + math.sqrt(28 ** 2 + 336)) / 2)
    assert gaussian_radius(0, 0) == 0
    # Official form: about 0.27 x the side of a square box (the textbook roots would give about 0.08 x).
    assert gaussian_radius(100, 100) == pytest.approx(27.33, abs=0.01)


def heatmap_reference(shape, x, y, r, delta, base=None):
    """Full-map evaluation of the bump, restricted to the (2r+1)^2 window, max with `base`."""
    hm = np.zeros(shape, np.float64) if base is None else base.astype(np.float64).copy()
    sigma = (2 * r + 1) / delta
    for yy in range(shape[0]):
        for xx in range(shape[1]):
            if abs(xx - x) <= r and abs(yy - y) <= r:
                v = math.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma * sigma))
                hm[yy, xx] = max(hm[yy, xx], v)
    return hm


@pytest.mark.parametrize("delta", [5, 6])
def test_draw_gaussian_matches_reference_inside_and_at_edges(delta):
    rng = np.random.default_rng(1)
    for _ in range(40):
        h, w = rng.integers(1, 20, 2)
        base = rng.uniform(0, 1, (h, w)).astype(np.float32) * (rng.random() < 0.5)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(0, 12))
        hm = base.copy()
        draw_gaussian(hm, x, y, r, delta)
        # float32: two 1-D factors rounded, then their product (3 roundings of 2^-24, 1.8e-7 relative) against the
        # float64 reference; the bump is above exp(-delta^2 / 4) >= 1.2e-4 at its window's corners, so atol only
        # covers the cells it leaves at 0.
        np.testing.assert_allclose(hm, heatmap_reference((h, w), x, y, r, delta, base), rtol=1e-6, atol=1e-7)
        assert hm[y, x] == 1.0


@pytest.mark.parametrize("delta", [5, 6])
def test_draw_gaussian_off_the_map_draws_only_the_part_inside(delta):
    # Centers up to r + 2 cells outside every edge: the window's overlap with the map (possibly none) is drawn.
    rng = np.random.default_rng(2)
    for _ in range(60):
        h, w = rng.integers(1, 12, 2)
        r = int(rng.integers(0, 6))
        x, y = int(rng.integers(-r - 2, w + r + 2)), int(rng.integers(-r - 2, h + r + 2))
        base = rng.uniform(0, 1, (h, w)).astype(np.float32)
        hm = base.copy()
        draw_gaussian(hm, x, y, r, delta)
        np.testing.assert_allclose(hm, heatmap_reference((h, w), x, y, r, delta, base), rtol=1e-6, atol=1e-7)


def test_keypoint_cells_scaled_and_clamped():
    cells, offs = keypoint_cells(np.array([[0.0, 0.0], [5.0, 9.5], [511.0, 510.9], [3.999, 4.0]]),
                                 np.array([0.25, 0.25]), 128, 128)
    assert cells.tolist() == [[0, 0], [1, 2], [127, 127], [0, 1]]
    np.testing.assert_allclose(offs, [[0, 0], [0.25, 0.375], [0.75, 0.725], [0.99975, 0]], atol=1e-6)


def targets_reference(boxes, labels, num_classes, in_h, in_w, max_objects):
    """One object at a time, every map pixel evaluated."""
    h, w = (in_h + 1) // 4, (in_w + 1) // 4
    hms = {k: np.zeros((num_classes, h, w)) for k in ("tl", "br", "ct")}
    offs = {k: np.zeros((max_objects, 2)) for k in hms}
    inds = {k: np.zeros(max_objects, np.int64) for k in hms}
    for i, ((x1, y1, x2, y2), c) in enumerate(zip(boxes, labels)):
        r = max(0, int(radius_reference(math.ceil((y2 - y1) * h / in_h), math.ceil((x2 - x1) * w / in_w), 0.7)))
        for k, (px, py), delta in (("tl", (x1, y1), 6), ("br", (x2, y2), 6), ("ct", ((x1 + x2) / 2, (y1 + y2) / 2), 5)):
            cx, cy = min(int(px * w / in_w), w - 1), min(int(py * h / in_h), h - 1)
            hms[k][c] = heatmap_reference((h, w), cx, cy, r, delta, hms[k][c])
            if i < max_objects:
                offs[k][i] = (px * w / in_w - cx, py * h / in_h - cy)
                inds[k][i] = cy * w + cx
    return hms, offs, inds


@pytest.mark.parametrize("n,max_objects", [(0, 8), (1, 8), (7, 8), (12, 8)])
def test_make_targets_matches_reference(n, max_objects):
    rng = np.random.default_rng(n)
    in_h, in_w, num_classes = 127, 255, 3
    xy = rng.uniform(0, [in_w, in_h], (n, 2))
    wh = rng.uniform(0.5, 120, (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [in_w, in_h])], axis=1)
    if n:
        boxes[0] = [0, 0, in_w, in_h]  # corners on the last cells, offset 0.75
    labels = rng.integers(0, num_classes, n)
    t = make_targets(boxes, labels, num_classes, in_h, in_w, max_objects)
    hms, offs, inds = targets_reference(boxes, labels, num_classes, in_h, in_w, max_objects)
    for k in ("tl", "br", "ct"):
        assert t[f"hm_{k}"].shape == (num_classes, 32, 64) and t[f"hm_{k}"].dtype == np.float32
        np.testing.assert_allclose(t[f"hm_{k}"], hms[k], rtol=1e-6, atol=1e-7)  # as in the test above
        np.testing.assert_allclose(t[f"off_{k}"], offs[k], atol=1e-5)
        assert t[f"off_{k}"].dtype == np.float32 and t[f"ind_{k}"].dtype == np.int64
        np.testing.assert_array_equal(t[f"ind_{k}"], inds[k])
    assert t["mask"].dtype == bool
    assert t["mask"].tolist() == [True] * min(n, max_objects) + [False] * max(0, max_objects - n)


def test_targets_peak_is_one_at_every_keypoint_cell():
    boxes = np.array([[10, 20, 200, 180], [300.5, 3.2, 480.7, 500.1], [100, 100, 104, 103]], np.float64)
    labels = np.array([0, 1, 0])
    t = make_targets(boxes, labels, 2, 511, 511)
    for k in ("tl", "br", "ct"):
        hm = t[f"hm_{k}"]
        for i in range(3):
            y, x = divmod(int(t[f"ind_{k}"][i]), 128)
            assert hm[labels[i], y, x] == 1.0
        assert (hm == 1.0).sum() == 3
