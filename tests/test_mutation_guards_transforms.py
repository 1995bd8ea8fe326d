"""Box filtering and the rejection of far-outside boxes at their exact limits (planted < / <= bugs that the rest of
the suite let through)."""
import numpy as np

from datasets.transforms import clip_boxes, eval_input, far_outside


def test_a_box_exactly_min_size_after_clipping_is_kept():
    boxes = np.array([[-3, 0, 1, 5], [0, 10, 4, 11], [2, 2, 2.5, 9], [0, 0, 30, 0.75]], np.float32)
    out, keep = clip_boxes(boxes, 40, 40, min_size=1.0)
    np.testing.assert_array_equal(out[0], [0, 0, 1, 5])  # 1 pixel wide once clipped
    assert keep.tolist() == [True, True, False, False]


def test_a_box_of_zero_height_or_width_is_dropped_without_min_size():
    boxes = np.array([[0, 5, 10, 5], [3, 0, 3, 10], [45, 20, 55, 30], [0, 45, 10, 55]], np.float32)
    out, keep = clip_boxes(boxes, 50, 40)  # not square: x is clipped to the width, y to the height
    np.testing.assert_array_equal(out[2:], [[45, 20, 50, 30], [0, 40, 10, 40]])
    assert keep.tolist() == [False, False, True, False]


def test_far_outside_starts_exactly_at_the_margin_on_every_side():
    _, meta = eval_input(np.zeros((60, 90, 3), np.uint8), 1.0, flip=False)  # new_w 90, new_h 60
    inside = [10.0, 10.0, 20.0, 20.0]
    cases = {0: (-5.0, -4.75), 1: (-5.0, -4.75), 2: (95.0, 94.75), 3: (65.0, 64.75)}  # (rejected, kept) per side
    for side, (rejected, kept) in cases.items():
        boxes = np.array([inside, inside], np.float64)
        boxes[0, side], boxes[1, side] = rejected, kept
        assert far_outside(boxes, meta).tolist() == [True, False], side
