"""A tiny_hourglass checkpoint that ignores its input, and a data set that it detects perfectly.

Every 127 x 127 image holds one square, always at the same place, and the network puts exactly one box there,
whatever the pixels: its AP is 1.0 when every image is scored once, and visibly less when an evaluation skips an
image (an untrained network, with no detections on most images, cannot show that). The box's corners and center
come from biases alone, so one process and several give it exactly, and its score up to float32 rounding.

How the weights make that box: channel 0 of each pooling branch's output is 1 everywhere (its conv weights 0, its
BN shift 1; the normalised value of a zero input is zero in training and in evaluation alike). The first conv of
every head reads only that channel, from the cells above and to the left (weight -1 each, bias 1): after its ReLU,
channel 0 is 1 at the top-left output cell, whose two neighbours there are the zero padding, and 0 elsewhere, and
its other channels are 0. The last conv of each head maps that indicator to one value at the top-left cell and
another everywhere else: the three heatmaps peak there (logit 2) and are -20 elsewhere; the corner embeddings are
0 there and 10 (top-left) and -10 (bottom-right) elsewhere, so that no other pair of corners matches; the offsets
are the same everywhere and move the three keypoints from that cell to the box's corners and its center.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from nets import build_model
from utils.checkpoint import save_checkpoint

SIZE = 127  # the images and the network input; the output map has 32 x 32 cells of SIZE / 32 pixels
BOX_CELLS = (2.0, 2.0, 22.0, 22.0)  # x1 y1 x2 y2 in output cells; its center (12, 12) is in its middle third
PEAK_LOGIT, OTHER_LOGIT = 2.0, -20.0
CLASS_NAMES = ["square"]


def box_pixels() -> list[float]:
    """The box in image pixels, COCO x y w h."""
    x1, y1, x2, y2 = (v * SIZE / 32 for v in BOX_CELLS)
    return [x1, y1, x2 - x1, y2 - y1]


@torch.no_grad()
def set_head(head: torch.nn.Sequential, at_top_left: list[float], elsewhere: list[float]) -> None:
    first, last = head[0], head[2]
    first.weight.zero_()
    first.bias.zero_()
    first.weight[0, 0, 0, 1] = first.weight[0, 0, 1, 0] = -1.0  # the cell above, the cell to the left
    first.bias[0] = 1.0
    last.weight.zero_()
    last.weight[:, 0, 0, 0] = torch.tensor(at_top_left) - torch.tensor(elsewhere)
    last.bias.copy_(torch.tensor(elsewhere))


@torch.no_grad()
def fixed_box_network() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", len(CLASS_NAMES))
    branches = model.branches[-1]
    for pool in (branches.pool_tl, branches.pool_br, branches.pool_ct):
        conv, bn = pool.merge.out[0], pool.merge.out[1]
        conv.weight[0] = 0.0
        bn.running_mean[0], bn.running_var[0], bn.bias[0] = 0.0, 1.0, 1.0
    x1, y1, x2, y2 = BOX_CELLS
    for kind in ("tl", "br", "ct"):
        set_head(getattr(branches, f"hm_{kind}"), [PEAK_LOGIT], [OTHER_LOGIT])
    set_head(branches.emb_tl, [0.0], [10.0])
    set_head(branches.emb_br, [0.0], [-10.0])
    set_head(branches.off_tl, [x1, y1], [x1, y1])
    set_head(branches.off_br, [x2, y2], [x2, y2])
    set_head(branches.off_ct, [(x1 + x2) / 2, (y1 + y2) / 2], [(x1 + x2) / 2, (y1 + y2) / 2])
    return model


def save_fixed_box_checkpoint(path: Path) -> Path:
    state = {"model": fixed_box_network().state_dict(), "class_names": CLASS_NAMES, "epoch": 1,
             "args": {"arch": "tiny_hourglass", "num_classes": len(CLASS_NAMES), "img_size": SIZE}}
    save_checkpoint(path, state)
    return path


def write_square_split(root: Path, split: str, num_images: int) -> None:
    """`num_images` gray images with one bright square at `box_pixels()`, in the COCO layout of datasets/coco.py."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    x, y, w, h = box_pixels()
    images, annotations = [], []
    for i in range(1, num_images + 1):
        image = np.full((SIZE, SIZE, 3), 60 + 10 * i, np.uint8)
        cv2.rectangle(image, (round(x), round(y)), (round(x + w), round(y + h)), (230, 230, 230), -1)
        cv2.imwrite(str(root / split / f"{i:03d}.png"), image)
        images.append({"id": i, "file_name": f"{i:03d}.png", "width": SIZE, "height": SIZE})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [x, y, w, h], "area": w * h,
                            "iscrowd": 0})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": CLASS_NAMES[0]}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
