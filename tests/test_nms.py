"""lib/nms soft_nms / soft_nms_merge against the slow Python reference in tests/nms_reference.py."""
import math

import numpy as np
import pytest

from lib.nms import soft_nms, soft_nms_merge
from tests.nms_reference import soft_nms_inplace_reference, soft_nms_reference


def clustered_boxes(rng: np.random.Generator, n: int, merge: bool, tied_scores: bool = False) -> np.ndarray:
    """(n, 5 or 7) float32: boxes jittered around a few cluster boxes, so that many pairs overlap a lot."""
    clusters = rng.integers(1, 6)
    x1y1 = rng.uniform(0, 300, (clusters, 2))
    wh = rng.uniform(4, 150, (clusters, 2))
    which = rng.integers(0, clusters, n)
    tl = x1y1[which] + rng.normal(0, 0.1, (n, 2)) * wh[which]
    br = tl + wh[which] * rng.uniform(0.7, 1.3, (n, 2))
    scores = rng.choice([0.2, 0.5, 0.9], n) if tied_scores else rng.uniform(0, 1, n)
    cols = [tl, br, scores[:, None]]
    if merge:
        cols.append(rng.uniform(0, 1, (n, 2)))
    return np.concatenate(cols, axis=1).astype(np.float32)


def check_same(got: np.ndarray, want: np.ndarray) -> None:
    # Both compute in float64 (the extension in a float64 work array) and round once to float32: where their float64
    # sums run in another order they differ by a float32 rounding (6e-8 relative). rtol 1e-5 leaves a wide margin
    # and is still far below what a wrong decay or merge weight moves (the IoU's +1 alone: 1e-2 for 100 px boxes).
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", [0, 1, 2])
@pytest.mark.parametrize("merge", [False, True])
def test_matches_reference_on_random_clusters(method, merge):
    rng = np.random.default_rng(100 + method + 10 * merge)
    for trial in range(30):
        dets = clustered_boxes(rng, int(rng.integers(1, 80)), merge, tied_scores=trial % 3 == 0)
        sigma, Nt = float(rng.uniform(0.2, 1.0)), float(rng.uniform(0.2, 0.7))
        before = dets.copy()
        if merge:
            weight_exp = float(rng.choice([1, 6, 10]))
            got = soft_nms_merge(dets, sigma=sigma, Nt=Nt, threshold=0.01, method=method, weight_exp=weight_exp)
            want = soft_nms_reference(dets, sigma, Nt, 0.01, method, merge=True, weight_exp=weight_exp)
        else:
            got = soft_nms(dets, sigma=sigma, Nt=Nt, threshold=0.01, method=method)
            want = soft_nms_reference(dets, sigma, Nt, 0.01, method)
        check_same(got, want)
        np.testing.assert_array_equal(dets, before)  # the input is not modified
        assert np.all(np.diff(got[:, 4]) <= 0), "kept boxes come out highest score first"
        assert np.all(got[:, 4] >= 0.01)


@pytest.mark.parametrize("method", [0, 1, 2])
@pytest.mark.parametrize("merge", [False, True])
def test_inplace_matches_reference_on_random_clusters(method, merge):
    rng = np.random.default_rng(200 + method + 10 * merge)
    stale_rows = 0
    for trial in range(30):
        dets = clustered_boxes(rng, int(rng.integers(1, 80)), merge, tied_scores=trial % 3 == 0)
        dets[rng.random(len(dets)) < 0.1, 4] = 0.005  # below the threshold from the start: kept unless decayed
        sigma, Nt = float(rng.uniform(0.2, 1.0)), float(rng.uniform(0.2, 0.7))
        if merge:
            weight_exp = float(rng.choice([1, 6, 10]))
            got = soft_nms_merge(dets, sigma, Nt, 0.01, method, weight_exp, inplace=True)
            want = soft_nms_inplace_reference(dets, sigma, Nt, 0.01, method, merge=True, weight_exp=weight_exp)
        else:
            got = soft_nms(dets, sigma, Nt, 0.01, method, inplace=True)
            want = soft_nms_inplace_reference(dets, sigma, Nt, 0.01, method)
        check_same(got, want)
        stale_rows += len(got) - len(soft_nms(dets[:, :5], sigma, Nt, 0.01, method))
    assert stale_rows > 0


def test_inplace_keeps_a_stale_copy():
    # Hard NMS: B (the same box as A) drops to 0 and is overwritten by C, the last row, whose old row stays.
    a, b, c = [0, 0, 10, 10, 0.9], [0, 0, 10, 10, 0.5], [50, 50, 60, 60, 0.3]
    dets = np.array([a, b, c], np.float32)
    np.testing.assert_array_equal(soft_nms(dets, Nt=0.5, method=0, inplace=True), np.array([a, c, c], np.float32))
    np.testing.assert_array_equal(soft_nms(dets, Nt=0.5, method=0), np.array([a, c], np.float32))


def test_hand_computed_pair():
    # IoU with the +1 convention: boxes of 11 x 11 = 121 shifted by 1 in x and y overlap 10 x 10 = 100.
    dets = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [50, 50, 60, 60, 0.7]], np.float32)
    iou = 100 / (121 + 121 - 100)
    gauss = soft_nms(dets, sigma=0.5, method=2)
    np.testing.assert_allclose(gauss[:, 4], [0.9, 0.7, 0.8 * math.exp(-iou * iou / 0.5)], rtol=1e-6)
    np.testing.assert_array_equal(gauss[2, :4], [1, 1, 11, 11])
    linear = soft_nms(dets, Nt=0.3, method=1)
    np.testing.assert_allclose(linear[:, 4], [0.9, 0.7, 0.8 * (1 - iou)], rtol=1e-6)
    hard = soft_nms(dets, Nt=0.3, method=0)
    np.testing.assert_array_equal(hard, dets[[0, 2]])
    assert len(soft_nms(dets, Nt=0.8, method=0)) == 3  # IoU 0.70 is not above Nt = 0.8


def test_merge_hand_computed():
    # Hard NMS with merge: mw = 1 for the suppressed box; x1 uses tl scores, x2 the br scores as weights.
    dets = np.array([[0, 0, 10, 10, 0.9, 0.6, 0.2], [2, 2, 12, 12, 0.8, 0.2, 0.6]], np.float32)
    got = soft_nms_merge(dets, Nt=0.3, method=0, weight_exp=8)
    assert got.shape == (1, 7)
    np.testing.assert_allclose(got[0, :2], (0 * 0.6 + 2 * 0.2) / 0.8, rtol=1e-6)
    np.testing.assert_allclose(got[0, 2:4], (10 * 0.2 + 12 * 0.6) / 0.8, rtol=1e-6)
    np.testing.assert_array_equal(got[0, 4:], dets[0, 4:])


def test_whole_rows_move_together():
    # The best box is not the first row: its own corner scores (not the first row's) must come with it.
    dets = np.array([[100, 100, 110, 110, 0.3, 0.11, 0.12], [0, 0, 10, 10, 0.9, 0.21, 0.22]], np.float32)
    got = soft_nms_merge(dets)
    np.testing.assert_array_equal(got, dets[[1, 0]])


def test_ties_take_the_first_row():
    dets = np.array([[0, 0, 10, 10, 0.5], [0, 0, 10, 10.5, 0.5], [1, 0, 10, 10, 0.5]], np.float32)
    got = soft_nms(dets, method=0, Nt=0.5)
    np.testing.assert_array_equal(got, dets[:1])
    check_same(soft_nms(dets, method=2), soft_nms_reference(dets, method=2))


def test_empty_single_and_threshold():
    for fn, cols in ((soft_nms, 5), (soft_nms_merge, 7)):
        assert fn(np.zeros((0, cols), np.float32)).shape == (0, cols)
        one = np.arange(1, cols + 1, dtype=np.float32)[None] / 10
        one[0, 2:4] += 1
        np.testing.assert_array_equal(fn(one), one)
        low = one.copy()
        low[0, 4] = 0.0005
        assert fn(low, threshold=0.001).shape == (0, cols)


def test_input_conversion_and_errors():
    dets = np.array([[0, 0, 10, 10, 1], [1, 1, 11, 11, 1]], np.int64)
    check_same(soft_nms(dets), soft_nms_reference(dets))
    check_same(soft_nms(dets.astype(np.float64).tolist()), soft_nms_reference(dets))
    with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
        soft_nms(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, 7\)"):
        soft_nms_merge(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
        soft_nms(np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="real numbers"):
        soft_nms(np.array([["a"] * 5]))
    with pytest.raises(ValueError, match="method"):
        soft_nms(np.zeros((1, 5), np.float32), method=3)
    with pytest.raises(ValueError, match="sigma"):
        soft_nms(np.zeros((1, 5), np.float32), sigma=0)


def test_nms_per_class_keeps_classes_apart_and_caps():
    from engine.inference import InferenceConfig, nms_per_class

    box = [0, 0, 10, 10]
    rows = np.array([box + [0.9, 0.9, 0.9, 0], box + [0.8, 0.8, 0.8, 3], box + [0.7, 0.7, 0.7, 0]], np.float32)
    hard = InferenceConfig(nms_method=0, merge=False)
    got = nms_per_class(rows, hard)
    np.testing.assert_array_equal(got, np.array([box + [0.9, 0], box + [0.8, 3]], np.float32))
    merged = nms_per_class(rows, InferenceConfig(merge=True))
    np.testing.assert_allclose(merged[:, 4], [0.9, 0.8, 0.7 * math.exp(-1 / 0.5)], rtol=1e-6)
    assert nms_per_class(np.zeros((0, 8), np.float32), hard).shape == (0, 6)

    rng = np.random.default_rng(0)
    many = clustered_boxes(rng, 300, merge=True)
    many = np.concatenate([many, rng.integers(0, 5, (300, 1))], axis=1).astype(np.float32)
    ties = np.array([box + [0.5, 0.5, 0.5, c] for c in range(3)] + [box + [0.9, 0.9, 0.9, 3]], np.float32)
    assert len(nms_per_class(ties, InferenceConfig(max_per_image=2))) == 4  # all at the 2nd best score stay
    capped = nms_per_class(many, InferenceConfig(merge=True, max_per_image=100))
    assert capped.shape == (100, 6) and np.all(np.diff(capped[:, 4]) <= 0)
    everything = nms_per_class(many, InferenceConfig(merge=True, max_per_image=10**6))
    np.testing.assert_array_equal(capped, everything[:100])
    for label in range(5):
        rows_c = many[many[:, 7] == label, :7]
        want = soft_nms_reference(rows_c, 0.5, 0.5, 0.001, 2, merge=True, weight_exp=10)
        np.testing.assert_allclose(everything[everything[:, 5] == label, :5], want[:, :5], rtol=1e-5, atol=1e-4)
