"""Edge cases of pairing, the center check and the choice of centers at test time that the reference tests leave
open (each was a planted bug that the rest of the suite let through): corners that share an x or a y, centers on
the left and bottom edges of the central region, and which forwards' centers a box is checked against."""
import math

import numpy as np
import pytest
import torch

from datasets.transforms import eval_input
from utils.decode import center_check, decode
from engine.inference import InferenceConfig, detect

BOX_LOGIT = 2.0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def peak_maps(h: int, w: int, points: dict, num_classes: int = 2) -> dict:
    """Eval-mode outputs (batch 1) of h x w cells: logit -10 everywhere but at `points` {kind: (x, y, label,
    logit)} (output units, exact offsets). Background corner embeddings (+100 tl, -100 br) never pair; the
    corners given share embedding 1."""
    out = {}
    for kind in ("tl", "br", "ct"):
        hm = torch.full((1, num_classes, h, w), -10.0, dtype=torch.float64)
        off = torch.zeros(1, 2, h, w, dtype=torch.float64)
        emb = torch.full((1, 1, h, w), 100.0 if kind == "tl" else -100.0, dtype=torch.float64)
        if kind in points:
            x, y, label, logit = points[kind]
            cx, cy = int(math.floor(x)), int(math.floor(y))
            hm[0, label, cy, cx] = logit
            off[0, :, cy, cx] = torch.tensor([x - cx, y - cy], dtype=torch.float64)
            emb[0, 0, cy, cx] = 1.0
        out[f"hm_{kind}"], out[f"off_{kind}"] = hm, off
        if kind != "ct":
            out[f"emb_{kind}"] = emb
    return out


@pytest.mark.parametrize("tl, br", [((5.5, 3.25), (5.5, 17.0)), ((2.25, 9.5), (20.75, 9.5)),
                                    ((7.0, 7.0), (7.0, 7.0))])
def test_corners_that_share_an_x_or_a_y_still_pair(tl, br):
    # Only br < tl rejects a pair (the official rule): equal coordinates make a valid, degenerate box.
    out = peak_maps(24, 24, {"tl": (*tl, 0, BOX_LOGIT), "br": (*br, 0, BOX_LOGIT)})
    boxes, _ = decode(out, topk=3)
    valid = boxes[0][boxes[0, :, 4] > -1].numpy()
    assert len(valid) == 1
    np.testing.assert_allclose(valid[0, :5], [*tl, *br, sigmoid(BOX_LOGIT)], rtol=1e-12)


def test_a_corner_just_past_the_other_is_rejected():
    out = peak_maps(24, 24, {"tl": (5.5, 3.25, 0, BOX_LOGIT), "br": (5.25, 17.0, 0, BOX_LOGIT)})
    assert (decode(out, topk=3)[0][..., 4] == -1).all()


def test_center_region_edges_are_all_outside():
    # A 30 x 30 box at the origin (area <= 150^2: n = 3): its central region is the open square (10, 20)^2, with
    # edges exactly representable in float32.
    box = np.array([[0, 0, 30, 30, 0.6, 0.6, 0.6, 1]], np.float32)
    for cx, cy in [(10, 15), (20, 15), (15, 10), (15, 20)]:  # left, right, top, bottom edge
        out = center_check(box, np.array([[cx, cy, 1, 0.9]], np.float32))
        assert out[0, 4] == -1, (cx, cy)
    for cx, cy in [(10.25, 15), (19.75, 15), (15, 10.25), (15, 19.75)]:  # just inside each edge
        out = center_check(box, np.array([[cx, cy, 1, 0.9]], np.float32))
        assert out[0, 4] == pytest.approx((2 * 0.6 + 0.9) / 3, rel=1e-6), (cx, cy)


def test_large_box_region_edges():
    # 300 x 200 from (100, 50) (area > 150^2: n = 5): region x in (220, 280), y in (130, 170).
    box = np.array([[100, 50, 400, 250, 0.5, 0.5, 0.5, 0]], np.float32)
    inside = [(220.5, 150), (279.5, 150), (250, 130.5), (250, 169.5)]
    edges = [(220, 150), (280, 150), (250, 130), (250, 170)]
    got = center_check(box, np.array([[x, y, 0, 0.2] for x, y in edges], np.float32))
    assert got[0, 4] == -1
    for x, y in inside:
        assert center_check(box, np.array([[x, y, 0, 0.2]], np.float32))[0, 4] == pytest.approx(0.4, rel=1e-6)


# The test-time pipeline: which forwards' centers a box is checked against. A 100 x 100 image, one class-0 box
# (5, 20, 65, 80) (center (35, 50), central region (25, 45) x (40, 60)) predicted by one forward; each forward
# predicts at most one center. With top_k 1, a forward without a center of the box has its top center on class 1.
IMAGE_BOX = (5.0, 20.0, 65.0, 80.0)
CENTER = (35.0, 50.0)


def to_output_units(x: float, y: float, meta, flipped: bool) -> tuple[float, float]:
    """Original pixels -> output-map units of the test input `meta` describes (its flipped copy if asked)."""
    out_w, out_h = (meta.in_w + 1) // 4, (meta.in_h + 1) // 4
    u = (x * meta.scale + meta.pad_x) * out_w / meta.in_w
    v = (y * meta.scale + meta.pad_y) * out_h / meta.in_h
    return (out_w - u if flipped else u), v


def forward_outputs(meta, flipped: bool, with_box: bool, center_logit: float | None) -> dict:
    out_h, out_w = (meta.in_h + 1) // 4, (meta.in_w + 1) // 4
    points = {}
    if with_box:
        (x1, y1), (x2, y2) = (to_output_units(x, y, meta, flipped) for x, y in (IMAGE_BOX[:2], IMAGE_BOX[2:]))
        if flipped:
            x1, x2 = x2, x1
        points.update(tl=(x1, y1, 0, BOX_LOGIT), br=(x2, y2, 0, BOX_LOGIT))
    if center_logit is not None:
        points["ct"] = (*to_output_units(*CENTER, meta, flipped), 0, center_logit)
    else:
        points["ct"] = (1.5, 1.5, 1, 5.0)  # the top center is of the other class
    return peak_maps(out_h, out_w, points)


def run_detect(scales: tuple, box_at: tuple, centers: dict) -> np.ndarray:
    """Detections of the pipeline when the box comes from forward `box_at` = (scale, flipped) and forward (scale,
    flipped) predicts the box's center with logit centers[(scale, flipped)] (no center where absent)."""
    image = np.zeros((100, 100, 3), np.uint8)
    inputs = [eval_input(image, s, flip=True) for s in scales]
    keys = ("hm_tl", "hm_br", "hm_ct", "off_tl", "off_br", "off_ct", "emb_tl", "emb_br")
    calls = []  # one forward per scale on the image and its flipped copy
    for _, meta in inputs:
        pair = [forward_outputs(meta, f, (meta.scale, f) == box_at, centers.get((meta.scale, f)))
                for f in (False, True)]
        calls.append({k: torch.cat([o[k] for o in pair]) for k in keys})
    calls = iter(calls)
    return detect(lambda images: next(calls), inputs, InferenceConfig(topk=1), torch.device("cpu"))


def fused(center_logit: float) -> float:
    return (2 * sigmoid(BOX_LOGIT) + sigmoid(center_logit)) / 3


def test_the_center_of_the_flipped_forward_counts_where_it_is_in_the_image():
    dets = run_detect((1.0,), (1.0, False), {(1.0, True): 1.0})
    assert dets.shape == (1, 6)
    np.testing.assert_allclose(dets[0, :4], IMAGE_BOX, atol=1e-3)
    assert dets[0, 4] == pytest.approx(fused(1.0), rel=1e-6) and dets[0, 5] == 0
    # a box of the flipped forward, checked against the center of the unflipped one
    dets = run_detect((1.0,), (1.0, True), {(1.0, False): 0.5})
    np.testing.assert_allclose(dets[0, :4], IMAGE_BOX, atol=1e-3)
    assert dets[0, 4] == pytest.approx(fused(0.5), rel=1e-6)


def test_centers_come_from_the_scale_nearest_to_one_only():
    # scales 0.5 and 1.25: the centers of scale 1.25 (nearest to 1) check every box, those of 0.5 none.
    for box_at in [(0.5, False), (1.25, True)]:
        dets = run_detect((0.5, 1.25), box_at, {(1.25, True): 0.25})
        assert dets.shape == (1, 6) and dets[0, 4] == pytest.approx(fused(0.25), rel=1e-6)
        assert len(run_detect((0.5, 1.25), box_at, {(0.5, False): 0.25, (0.5, True): 0.25})) == 0
    # with scale 1 present, a center seen only at another scale does not keep the box
    assert len(run_detect((1.0, 1.5), (1.0, False), {(1.5, False): 0.0, (1.5, True): 0.0})) == 0
    dets = run_detect((1.0, 1.5), (1.5, False), {(1.0, True): 0.0})
    assert dets.shape == (1, 6) and dets[0, 4] == pytest.approx(fused(0.0), rel=1e-6)
