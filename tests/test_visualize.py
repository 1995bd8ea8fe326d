"""Validation images for tensorboard: true boxes drawn where the annotations put them, and RunLogger.images
writing them to the event file."""

import cv2
import numpy as np
import pytest
import torch

from datasets.coco import CocoDetection
from engine.inference import InferenceConfig
from engine.visualize import draw, val_images
from nets import build_model
from tests.tensorboard_events import read_events
from tests.test_test_cli import RACCOON
from utils.errors import ArgumentError
from utils.logger import RunLogger


def test_val_images_show_the_true_boxes():
    dataset = CocoDetection(RACCOON, "val", train=False, img_size=127)
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 1).train()
    images = val_images(model, dataset, InferenceConfig(topk=10), torch.device("cpu"), count=2, score_thresh=2.0)
    assert model.training and len(images) == 2  # the mode is restored
    for index, image in enumerate(images):
        original, boxes, _ = dataset.load(index)
        assert image.shape == original.shape and image.dtype == np.uint8
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[0])
        assert image[y1, (x1 + x2) // 2].tolist() == [0, 255, 0]  # RGB green on the top edge
        assert image[(y1 + y2) // 2, x1].tolist() == [0, 255, 0]
        inside = image[y1 + 2:y2 - 1, x1 + 2:x2 - 1]
        np.testing.assert_array_equal(inside, original[y1 + 2:y2 - 1, x1 + 2:x2 - 1, ::-1])  # BGR -> RGB


def test_draw_takes_the_image_arrays_the_detector_takes():
    """A gray, BGRA or 16-bit array given to the Detector is drawn on as its BGR conversion: 16-bit was an OpenCV
    assertion, gray was drawn in shades of gray; a float image is refused naming its dtype."""
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    rows = np.array([[10, 20, 50, 40, 0.9, 1]], np.float32)
    expected = draw(bgr, rows, ["a", "b"])
    assert not np.array_equal(expected, bgr)  # the box is there, on a copy
    np.testing.assert_array_equal(draw(cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), rows, ["a", "b"]), expected)
    np.testing.assert_array_equal(draw(bgr.astype(np.uint16) * 257, rows, ["a", "b"]), expected)
    gray = bgr[:, :, 0].copy()
    np.testing.assert_array_equal(draw(gray, rows, ["a", "b"]), draw(cv2.merge([gray] * 3), rows, ["a", "b"]))
    with pytest.raises(ArgumentError, match="dtype float32"):
        draw(bgr.astype(np.float32), rows, ["a", "b"])
    # draw takes one image: the hint for a stacked batch must not send a list of them here
    with pytest.raises(ArgumentError, match=r"shape \(2, 60, 80, 3\).*several images stacked: pass one at a time"):
        draw(np.stack([bgr, bgr]), rows, ["a", "b"])


def test_logger_writes_images(tmp_path):
    logger = RunLogger(tmp_path, enabled=True)
    image = np.zeros((20, 30, 3), np.uint8)
    logger.images("val/boxes", [image, image], step=7)
    logger.close()
    events = read_events(next(tmp_path.glob("events.out.tfevents.*")))
    values = [(e.step, v.tag, v.image.height, v.image.width) for e in events for v in e.summary.value]
    assert values == [(7, "val/boxes/0", 20, 30), (7, "val/boxes/1", 20, 30)]
    RunLogger(tmp_path / "off", enabled=False).images("x", [image], 0)
    assert not (tmp_path / "off").exists()
