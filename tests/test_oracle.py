"""Oracle tests of the coordinate chain: perfect network outputs built from the ground truth go through the real
test-time pipeline (decode -> boxes to original pixels -> center check -> soft-NMS ->
evaluate_detections) and must give AP >= 0.95.

The outputs of each test input (scale, flip) come from the data code's own pieces: the ground-truth boxes are
placed on the input by EvalMeta's definition (input = original * scale + pad; the flipped copy maps x -> W_in - x),
checked against where the image's pixels actually are, and turned into heatmaps, offsets and indices by
datasets.targets.make_targets. Heatmap logits are logit(clamp(gaussian)), each object's corner embeddings are its
index (background -1, matching no object), offsets are exact at the keypoint cells.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.coco import CocoDetection
from datasets.coco_eval import evaluate_detections
from datasets.shapes import ShapesConfig, write_split
from datasets.targets import make_targets
from datasets.transforms import COCO_MEAN, COCO_STD
from engine.inference import InferenceConfig, detect

RACCOON = Path(__file__).parent / "data" / "raccoon"
EPS = 1e-4


def boxes_on_input(boxes: np.ndarray, meta, flipped: bool) -> np.ndarray:
    """(N, 4) original pixels -> input pixels of the test input described by `meta` (its flipped copy if asked)."""
    out = boxes.astype(np.float64).copy()
    out[:, [0, 2]] = out[:, [0, 2]] * meta.new_w / meta.orig_w + meta.pad_x
    out[:, [1, 3]] = out[:, [1, 3]] * meta.new_h / meta.orig_h + meta.pad_y
    if flipped:
        out[:, [0, 2]] = meta.in_w - out[:, [2, 0]]
    return out


def check_placement(images: torch.Tensor, meta) -> None:
    """The image content occupies [pad, pad + scaled size) of the input, the rest is zero padding; image 1, when
    present, is the mirror of image 0. Catches a meta that does not describe the pixels."""
    assert images.shape[-2:] == (meta.in_h, meta.in_w)
    padding = torch.from_numpy(-COCO_MEAN / COCO_STD)[:, None, None]
    content = (images[0] - padding).abs().amax(dim=0) > 1e-3  # (H_in, W_in), True where not zero padding
    ys, xs = torch.nonzero(content, as_tuple=True)
    assert xs.min() >= meta.pad_x - 1 and xs.max() < meta.pad_x + meta.new_w + 1
    assert ys.min() >= meta.pad_y - 1 and ys.max() < meta.pad_y + meta.new_h + 1
    assert xs.min() <= meta.pad_x + 1 and ys.min() <= meta.pad_y + 1  # real photos have content at their edges
    if len(images) == 2:
        assert torch.equal(images[1], images[0].flip(-1))


def perfect_outputs(boxes: np.ndarray, labels: np.ndarray, num_classes: int, in_h: int, in_w: int) -> dict:
    """Eval-mode output dict (batch 1) of a network that predicts `boxes` (input pixels) exactly."""
    t = make_targets(boxes, labels, num_classes, in_h, in_w, max_objects=128)
    n = int(t["mask"].sum())
    h, w = t["hm_tl"].shape[1:]
    out = {}
    for kind in ("tl", "br", "ct"):
        hm = torch.from_numpy(t[f"hm_{kind}"]).clamp(EPS, 1 - EPS)
        out[f"hm_{kind}"] = torch.logit(hm)[None]
        off = torch.zeros(2, h * w)
        off[:, t[f"ind_{kind}"][:n]] = torch.from_numpy(t[f"off_{kind}"][:n]).T
        out[f"off_{kind}"] = off.reshape(1, 2, h, w)
        if kind != "ct":
            emb = torch.full((h * w,), -1.0)
            emb[t[f"ind_{kind}"][:n]] = torch.arange(n, dtype=torch.float32)
            out[f"emb_{kind}"] = emb.reshape(1, 1, h, w)
    return out


class OracleModel:
    """Stands in for the network: returns, input after input, the perfect outputs prepared for it."""

    def __init__(self, outputs: list[dict]):
        self.outputs = iter(outputs)

    def __call__(self, images: torch.Tensor) -> dict:
        per_image = [next(self.outputs) for _ in range(len(images))]
        out = {k: torch.cat([o[k] for o in per_image]) for k in per_image[0]}
        assert out["hm_tl"].shape[-2:] == ((images.shape[2] + 1) // 4, (images.shape[3] + 1) // 4)
        return out


def oracle_ap(data_dir: Path, split: str, scales: tuple, flip: bool) -> dict:
    dataset = CocoDetection(data_dir, split, train=False, test_scales=scales, test_flip=flip)
    cfg = InferenceConfig()
    detections = {}
    for index in range(len(dataset)):
        _, boxes, labels = dataset.load(index)
        sample = dataset[index]
        outputs = []
        for images, meta in sample["inputs"]:
            check_placement(images, meta)
            for flipped in ([False, True] if flip else [False]):
                outputs.append(perfect_outputs(boxes_on_input(boxes, meta, flipped), labels, dataset.num_classes,
                                               meta.in_h, meta.in_w))
        detections[sample["image_id"]] = detect(OracleModel(outputs), sample["inputs"], cfg, torch.device("cpu"))
    return evaluate_detections(dataset.coco, detections, dataset.cat_ids, dataset.class_names)


@pytest.mark.parametrize("scales, flip", [((1.0,), False), ((1.0,), True), ((0.75, 1.25), True)])
def test_oracle_raccoon(scales, flip):
    stats = oracle_ap(RACCOON, "val", scales, flip)
    assert stats["AP"] >= 0.95, stats


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_split(root, "val", 24, seed=0, cfg=ShapesConfig())
    return root


@pytest.mark.parametrize("scales, flip", [((1.0,), False), ((1.0,), True), ((0.75, 1.25), True)])
def test_oracle_shapes(shapes_dir, scales, flip):
    stats = oracle_ap(shapes_dir, "val", scales, flip)
    assert stats["AP"] >= 0.95, stats
