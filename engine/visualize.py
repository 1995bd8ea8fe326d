"""Boxes drawn on images: demo.py's output and the validation images in tensorboard."""
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.image_io import as_bgr8
from engine.inference import InferenceConfig, detect

TRUE_COLOR = (0, 255, 0)  # BGR


def draw(image: np.ndarray, dets: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Boxes (M, 6) x1 y1 x2 y2 score label drawn on a copy of the BGR image; a gray, BGRA or 16-bit image is
    converted as the Detector converts it (any other is an ArgumentError naming its shape and dtype)."""
    # 16-bit: OpenCV's text drawing asserted 8 bits; gray: the boxes were drawn in shades of gray
    canvas = as_bgr8(image).copy()
    for x1, y1, x2, y2, score, label in dets:
        color = tuple(int(c) for c in np.random.default_rng(int(label)).integers(64, 256, 3))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(canvas, p1, p2, color, 2)
        text = f"{class_names[int(label)]} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(p1[1] - th - 4, 0)
        cv2.rectangle(canvas, (p1[0], top), (p1[0] + tw + 2, top + th + 4), color, -1)
        cv2.putText(canvas, text, (p1[0] + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    return canvas


def val_images(model, dataset: Dataset, cfg: InferenceConfig, device: torch.device, count: int = 4,
               score_thresh: float = 0.3, amp: bool | str = False) -> list[np.ndarray]:
    """The first `count` images of an evaluation CocoDetection, (H, W, 3) uint8 RGB, with the true boxes in thin
    green lines and the detections scoring at least `score_thresh` drawn by `draw`."""
    was_training = model.training
    model.eval()
    out = []
    for index in range(min(count, len(dataset))):
        dets = detect(model, dataset[index]["inputs"], cfg, device, amp)
        image, boxes, _ = dataset.load(index)
        canvas = draw(image, dets[dets[:, 4] >= score_thresh], dataset.class_names)
        for x1, y1, x2, y2 in boxes:
            cv2.rectangle(canvas, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))), TRUE_COLOR, 1)
        out.append(canvas[:, :, ::-1].copy())
    model.train(was_training)
    return out
