"""The detector as one object, for your own code (a service, a notebook, a labelling tool) and for demo.py:

    from engine import Detector
    detector = Detector.from_checkpoint("ckpt/NAME/checkpoint.pt", test_flip=True)
    found = detector("photo.jpg")          # or a BGR numpy image, or a list of either
    found.boxes, found.scores, found.labels, found.names, found.category_ids
    found.to_coco(image_id=42)             # COCO result dicts; found.to_dict() for json

A `.pt` checkpoint (train.py, tools/convert_official.py) runs on PyTorch, an `.onnx` file (tools/export_onnx.py)
on onnxruntime; both go through the test-time pipeline of engine/inference.py, as test.py does.
"""
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.coco_eval import coco_entries
from datasets.image_io import as_bgr8, load_image
from datasets.transforms import check_input_size, eval_input
from engine.inference import (MAX_TEST_SCALE, InferenceConfig, check_distinct, detect_batch, network_for,
                              official_config)
from engine.onnx_backend import OnnxModel
from nets import model_from_checkpoint
from utils.checkpoint import load_inference_checkpoint
from utils.checks import are_distinct_ids, check_number, check_positive_int, is_id
from utils.cpu_memory import keep_freed_memory
from utils.device import one_thread_after_fork, select_device
from utils.errors import ArgumentError


@dataclass
class Detections:
    """The detections of one image, best first, in its original pixels."""
    boxes: np.ndarray  # (N, 4) float32 x1 y1 x2 y2
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64 class indices into the detector's class_names (0..C-1)
    names: list[str]  # (N,) the class name of each box
    # (N,) int64 the data set's category id of each box (COCO's have gaps: not labels + 1); None for a checkpoint
    # written before checkpoints stored them
    category_ids: np.ndarray | None = None

    @classmethod
    def from_rows(cls, rows: np.ndarray, class_names: list[str],
                  category_ids: list[int] | None = None) -> "Detections":
        """From the (N, 6) x1 y1 x2 y2 score label rows of engine.inference.detect; `category_ids[label]` is the
        data set's id of class `label`."""
        labels = rows[:, 5].astype(np.int64)
        ids = None if category_ids is None else np.asarray(category_ids, np.int64).reshape(-1)[labels]
        return cls(rows[:, :4].astype(np.float32), rows[:, 4].astype(np.float32), labels,
                   [class_names[i] for i in labels], ids)

    def rows(self) -> np.ndarray:
        """(N, 6) float32 x1 y1 x2 y2 score label, as engine.inference.detect and engine.visualize.draw use."""
        return np.concatenate([self.boxes, self.scores[:, None], self.labels[:, None].astype(np.float32)], axis=1)

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO result entries (the results json of test.py and the COCO evaluation server): image_id,
        category_id, bbox x y w h (pixels, 2 decimals) and score, one per detection."""
        # int() took 3.7 as image 3 and None as a TypeError that was no UserError
        if isinstance(image_id, bool) or not (isinstance(image_id, numbers.Integral) and is_id(int(image_id))):
            raise ArgumentError(f"image_id: expected a whole number within 64 bits (the image's id in the data set), "
                                f"got {image_id!r}")
        if self.category_ids is None:
            raise ArgumentError("these detections have no category ids: their checkpoint was written before "
                                "checkpoints stored them; add them once with tools/upgrade_checkpoint.py "
                                "--category_ids")
        return coco_entries(image_id, self.boxes, self.scores, self.category_ids)

    def to_dict(self) -> dict:
        """The detections as json-serialisable lists: boxes (x1 y1 x2 y2), scores, labels, names, category_ids
        (None when unknown)."""
        return {"boxes": self.boxes.tolist(), "scores": self.scores.tolist(), "labels": self.labels.tolist(),
                "names": list(self.names),
                "category_ids": None if self.category_ids is None else self.category_ids.tolist()}


def check_scales(test_scales: float | tuple[float, ...]) -> list[float]:
    """One scale or a sequence of them as a list of positive finite floats, else an ArgumentError."""
    scales = [test_scales] if isinstance(test_scales, numbers.Real) else test_scales
    if isinstance(scales, (str, bytes)) or not hasattr(scales, "__len__") or not len(scales):
        raise ArgumentError(f"test_scales: expected a number or a sequence of numbers, got {test_scales!r}")
    return check_distinct("test_scales", [check_number("test_scales", s, 0, MAX_TEST_SCALE, above=True)
                                          for s in scales])


def load_network(path: str | Path, device: torch.device, onnx: bool | None = None
                 ) -> tuple[object, list[str], list[int] | None]:
    """(network callable on an image batch in eval mode, class names, their category ids or None) from a
    checkpoint, or from a file of tools/export_onnx.py when `onnx` is True (None: when the name ends in .onnx)."""
    path = Path(path)
    if onnx or (onnx is None and path.suffix.lower() == ".onnx"):
        model = OnnxModel(path, device)
        return model, model.class_names, model.category_ids
    state = load_inference_checkpoint(path)
    return model_from_checkpoint(state, path).to(device).eval(), state["class_names"], state.get("category_ids")


def check_settings(test_flip, test_scales, score_thresh, batch_size, amp) -> list[float]:
    """The Detector's arguments that need no model, checked (ArgumentError); returns the test scales as a list."""
    scales = check_scales(test_scales)
    check_number("score_thresh", score_thresh, 0, 1)
    check_positive_int("batch_size", batch_size)
    for name, value in (("test_flip", test_flip), ("amp", amp)):
        if not isinstance(value, bool):
            raise ArgumentError(f"{name}: expected True or False, got {value!r}")
    return scales


class Detector:
    """Calls on a BGR image ((H, W, 3) uint8 numpy array, as cv2.imread gives) or an image file give its
    `Detections`; on a list of them, one `Detections` per image. Images whose network inputs have the same shape
    share one forward, `batch_size` images at a time."""

    def __init__(self, model, class_names: list[str], device: torch.device, test_flip: bool = False,
                 test_scales: tuple[float, ...] = (1.0,), score_thresh: float = 0.0, batch_size: int = 4,
                 config: InferenceConfig | None = None, category_ids: list[int] | None = None, amp: bool = False):
        """`model` maps (N, 3, H, W) images to the eval-mode output dict of docs/FORMAT.md; `config` defaults to
        the official settings for the number of `test_scales`; detections scoring below `score_thresh` are
        dropped; `category_ids` are the data set's ids of the classes (None: unknown). `amp`: the 16-bit path (the
        bf16 network on the CPU, fp16 autocast on CUDA); a network is run prepared for inference on the CPU, in a
        process that keeps freed memory for the next forward (utils/cpu_memory.py) and whose forked children run
        torch on one thread (utils.device.one_thread_after_fork)."""
        scales = check_settings(test_flip, test_scales, score_thresh, batch_size, amp)
        if amp and isinstance(model, OnnxModel):
            raise ArgumentError("amp: an ONNX model runs in the precision it was exported in; drop amp")
        if category_ids is not None and len(category_ids) != len(class_names):
            raise ArgumentError(f"category_ids: expected one per class ({len(class_names)}), got "
                                f"{len(category_ids)}")
        # numpy's integers as ints; within 64 bits: Detections makes an int64 array of them
        ids = None if category_ids is None else \
            [int(c) if isinstance(c, numbers.Integral) else c for c in category_ids]
        if ids is not None and not are_distinct_ids(ids):
            raise ArgumentError(f"category_ids: expected one whole number per class ({len(class_names)}), each within "
                                f"64 bits and none twice, got {category_ids!r}")
        self.model, self.class_names, self.device, self.amp = model, list(class_names), device, amp
        self.set_up_network()
        self.category_ids = ids
        self.test_flip, self.test_scales = test_flip, scales
        self.score_thresh, self.batch_size = score_thresh, batch_size
        self.config = config or official_config(len(scales))
        if isinstance(model, OnnxModel):
            model.require_dynamic("photos and video frames")
        self.scaled_down = 0  # images shrunk to fit an ONNX export's --max_size, for the caller to report
        self.non_finite = 0  # images whose network outputs held NaN or infinity (detect_batch), for the caller too

    def set_up_network(self) -> None:
        """`network`, what detect_batch runs for `model` (on the CPU: prepared for inference, in a process set up
        for it: freed memory kept, one thread in processes forked from it)."""
        if self.device.type == "cpu":
            keep_freed_memory()
            one_thread_after_fork()
        self.network = network_for(self.model, self.device, self.amp)

    def __getstate__(self) -> dict:
        """Pickled (for a spawned process) without `network`, which is `model` prepared again when unpickled: after
        the first image its weights are packed for oneDNN, which cannot be pickled ('Cannot access storage of
        OpaqueTensorImpl'), and it held the weights a second time."""
        return {name: value for name, value in self.__dict__.items() if name != "network"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.set_up_network()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", test_flip: bool = False,
                        test_scales: float | tuple[float, ...] = (1.0,), score_thresh: float = 0.0,
                        batch_size: int = 4, onnx: bool | None = None,
                        config: InferenceConfig | None = None, amp: bool = False) -> "Detector":
        """A detector for the checkpoint at `path` (or the .onnx file: see `load_network`) on `device` (auto, cpu,
        cuda, cuda:N or a torch.device). Bad arguments are refused before the file is read."""
        check_settings(test_flip, test_scales, score_thresh, batch_size, amp)
        torch_device = select_device(device)
        model, class_names, category_ids = load_network(path, torch_device, onnx)
        return cls(model, class_names, torch_device, test_flip, test_scales, score_thresh, batch_size, config,
                   category_ids, amp)

    def __call__(self, images: np.ndarray | str | Path | list) -> "Detections | list[Detections]":
        """Detections of one image (array or path), or a list of them for a list."""
        if isinstance(images, (list, tuple)):
            # Read batch by batch: a list of a thousand photo paths held every decoded photo at once (6 MB each).
            return [Detections.from_rows(rows, self.class_names, self.category_ids)
                    for start in range(0, len(images), self.batch_size)
                    for rows in self.detect_rows([self.read_listed(images, i)
                                                  for i in range(start, min(start + self.batch_size, len(images)))])]
        return Detections.from_rows(self.detect_rows([self.read(images)])[0], self.class_names, self.category_ids)

    def read_listed(self, images: list | tuple, index: int) -> np.ndarray:
        """`read` of images[index], its size checked: an array that cannot be detected is named by its position,
        which is all that tells it from the others (cv2.imread's None for one unreadable file of many)."""
        try:
            image = self.read(images[index])
            self.check_size(image)
        except ArgumentError as error:
            raise ArgumentError(f"images[{index}]: {error}") from None
        return image

    @staticmethod
    def read(image: np.ndarray | str | Path) -> np.ndarray:
        """An image argument as a (H, W, 3) uint8 BGR array: a file is read (datasets.image_io.load_image), an
        array converted as the reader converts a file (gray, BGRA, 16-bit: datasets.image_io.as_bgr8)."""
        if isinstance(image, (str, os.PathLike)):
            return load_image(image)
        return as_bgr8(image)

    def check_size(self, image: np.ndarray) -> None:
        """An ArgumentError naming the image's size when one of its test inputs would have more than
        datasets.transforms.MAX_INPUT_PIXELS pixels (calling the detector on it raises the same)."""
        fit = self.export_fit(image)
        for scale in self.test_scales:
            check_input_size(image.shape[1], image.shape[0], scale * fit)

    def export_fit(self, image: np.ndarray) -> float:
        """1, or the factor by which the test scales of `image` shrink so that its inputs fit an ONNX export's
        --max_size (its boxes still come back in original pixels)."""
        if not isinstance(self.model, OnnxModel):
            return 1.0
        return self.model.fit_scale(*image.shape[:2], self.test_scales)

    def fit_scale(self, image: np.ndarray) -> float:
        """`export_fit`, counting the image in `scaled_down` when it shrinks (detect_rows' call, once per image)."""
        fit = self.export_fit(image)
        self.scaled_down += fit < 1
        return fit

    def detect_rows(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(M, 6) x1 y1 x2 y2 score label rows of each BGR image, scoring at least `score_thresh`; images whose
        inputs have the same shapes share one forward."""
        inputs = [[eval_input(image, s * fit, self.test_flip) for s in self.test_scales]
                  for image, fit in zip(images, map(self.fit_scale, images))]
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(inputs):
            groups.setdefault(tuple(batch.shape for batch, _ in sample), []).append(i)
        rows = [None] * len(images)
        for members in groups.values():
            found, non_finite = detect_batch(self.network, [inputs[i] for i in members], self.config, self.device,
                                             self.amp)
            self.non_finite += non_finite
            for i, dets in zip(members, found):
                rows[i] = dets[dets[:, 4] >= self.score_thresh]
        return rows
