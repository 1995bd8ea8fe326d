"""Soft-NMS at its exact limits: an IoU equal to Nt, a score equal to the threshold, a kept box whose corner
score is 0; and the per-class step passing sigma and Nt where they belong. Each was a planted bug that the random
reference tests let through (exact ties are rare in random data)."""
import math

import numpy as np
import pytest

from lib.nms import soft_nms, soft_nms_merge
from engine.inference import InferenceConfig, nms_per_class

# +1 convention: A is 10 x 10 = 100, B its top half 10 x 5 = 50, inside A: IoU exactly 50 / 100 = 0.5.
A, B = [0, 0, 9, 9], [0, 0, 9, 4]


@pytest.mark.parametrize("method", [0, 1])
def test_an_iou_equal_to_nt_does_not_decay(method):
    dets = np.array([A + [0.9], B + [0.8]], np.float32)
    np.testing.assert_array_equal(soft_nms(dets, Nt=0.5, method=method), dets)
    assert soft_nms(dets, Nt=0.4999, method=method)[1:, 4].tolist() == ([] if method == 0 else [pytest.approx(0.4)])


def test_a_score_equal_to_the_threshold_is_kept():
    dets = np.array([A + [0.9], [50, 50, 60, 60, 0.25]], np.float32)
    np.testing.assert_array_equal(soft_nms(dets, threshold=0.25), dets)
    # linear decay to exactly the threshold: 0.5 * (1 - IoU 0.5) = 0.25
    dets = np.array([A + [0.9], B + [0.5]], np.float32)
    np.testing.assert_array_equal(soft_nms(dets, Nt=0.3, threshold=0.25, method=1)[:, 4], np.float32([0.9, 0.25]))
    assert len(soft_nms(dets, Nt=0.3, threshold=0.2501, method=1)) == 1


def test_merge_keeps_the_corners_of_a_box_whose_corner_score_is_zero():
    dets = np.array([[0, 0, 10, 10, 0.9, 0.0, 0.0], [0, 0, 10, 10.5, 0.5, 0.0, 0.0]], np.float32)
    got = soft_nms_merge(dets, Nt=0.3, method=0)
    np.testing.assert_array_equal(got, dets[:1])


def test_nms_per_class_passes_sigma_and_nt_to_their_places():
    dets = np.array([A + [0.9], B + [0.8]], np.float32)
    rows = np.concatenate([dets, dets[:, 4:5], dets[:, 4:5], np.zeros((2, 1), np.float32)], axis=1)
    for merge in (False, True):
        gauss = nms_per_class(rows, InferenceConfig(sigma=0.3, nms_threshold=0.7, merge=merge))
        assert gauss[1, 4] == pytest.approx(0.8 * math.exp(-0.25 / 0.3), rel=1e-6)
        linear = nms_per_class(rows, InferenceConfig(sigma=0.3, nms_threshold=0.4, nms_method=1, merge=merge))
        assert linear[1, 4] == pytest.approx(0.4, rel=1e-6)
