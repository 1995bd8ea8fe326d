"""engine/inference.py cases the other tests leave open (each was a planted bug the rest of the suite let through):
`center_check` off keeps the boxes that no center confirms, and a sample whose flipped copy alone, or one test scale
alone, has non-finite outputs is counted."""
import numpy as np
import pytest
import torch

from datasets.transforms import eval_input
from engine.inference import InferenceConfig, detect, detect_batch
from tests.test_non_finite import BACKGROUND, CPU, SIZE, keypoint_cells, outputs


def test_center_check_off_keeps_a_box_without_center_at_its_corner_score():
    out = outputs()
    y, x = keypoint_cells("C")["ct"]
    out["hm_ct"][0, :, y, x] = BACKGROUND  # C's center is gone
    inputs = [eval_input(np.zeros((SIZE, SIZE, 3), np.uint8), 1.0, False)]
    checked = detect(lambda images: out, inputs, InferenceConfig(center_check=True), CPU)
    kept = detect(lambda images: out, inputs, InferenceConfig(center_check=False), CPU)
    assert sorted(checked[:, 5].tolist()) == [0, 0]  # A and B
    assert sorted(kept[:, 5].tolist()) == [0, 0, 1]
    c_score = torch.sigmoid(torch.tensor(1.5)).item()  # (s_tl + s_br) / 2 of two corners of logit 1.5
    assert kept[kept[:, 5] == 1, 4].tolist() == [pytest.approx(c_score, rel=1e-6)]  # a float32 score


def test_a_flipped_copy_alone_with_non_finite_outputs_counts_its_sample():
    bad = outputs(2)  # the input and its flipped copy
    bad["off_br"][1].fill_(float("nan"))
    sample = [eval_input(np.zeros((SIZE, SIZE, 3), np.uint8), 1.0, True)]
    _, non_finite = detect_batch(lambda images: bad, [sample], InferenceConfig(), CPU)
    assert non_finite == 1


def test_non_finite_outputs_at_one_test_scale_of_several_count_their_sample():
    bad, clean = outputs(), outputs()
    bad["hm_tl"][0, 0, 5, 5] = float("nan")
    forwards = iter([bad, clean])  # the first scale's forward, then the second's
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    sample = [eval_input(image, 1.0, False), eval_input(image, 0.5, False)]
    _, non_finite = detect_batch(lambda images: next(forwards), [sample], InferenceConfig(), CPU)
    assert non_finite == 1
