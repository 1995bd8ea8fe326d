"""Validation images for tensorboard: true boxes drawn where the annotations put them, and RunLogger.images
writing them to the event file."""
import struct

import numpy as np
import torch
from tensorboardX.proto import event_pb2

from datasets.coco import CocoDetection
from engine.inference import InferenceConfig
from engine.visualize import val_images
from nets import build_model
from tests.test_test_cli import RACCOON
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


def read_events(path) -> list:
    """The records of a tensorboard event file (length, crc, payload, crc)."""
    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events


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
