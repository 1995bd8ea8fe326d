"""The test-time pipeline, shared by test.py and validation during training.

For one image: for each test scale (and its flipped copy): forward -> decode (pairing, center check) ->
boxes back to original pixels; then all boxes together -> soft-NMS per class -> the best `max_per_image`.
`evaluate` runs it over a data set (split across processes under torchrun) and scores it with pycocotools.

Defaults are those of the official CenterNet test code (test/coco.py with db/detection.py and the
config/CenterNet-*.json files): top_k 70, ae_threshold 0.5, nms_kernel 3, num_dets 1000, nms_threshold 0.5,
nms_algorithm exp_soft_nms (gaussian, sigma 0.5), max_per_image 100; merge_bbox true with weight_exp 10 as in
the multi-scale configs (and the seed's test.py); the single-scale configs use plain soft-NMS (`merge=False`).
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets.coco_eval import evaluate_detections
from datasets.transforms import boxes_to_original
from lib.nms import soft_nms, soft_nms_merge
from utils.decode import decode
from utils.device import autocast
from utils.dist import all_gather_object, is_main, rank, world_size


@dataclass(frozen=True)
class InferenceConfig:
    K: int = 70
    ae_threshold: float = 0.5
    num_dets: int = 1000
    kernel: int = 3
    nms_threshold: float = 0.5
    sigma: float = 0.5
    nms_method: int = 2  # 0 hard, 1 linear, 2 gaussian
    merge: bool = True
    weight_exp: float = 10.0
    score_threshold: float = 0.001  # soft-NMS drops boxes below it
    max_per_image: int = 100


def build_eval_config(args) -> InferenceConfig:
    """From the flags of test.py (--topk --ae_threshold --nms_threshold --w_exp --no_merge); a script without
    some of them (train.py) gets the defaults."""
    default = InferenceConfig()
    return InferenceConfig(
        K=getattr(args, "topk", default.K),
        ae_threshold=getattr(args, "ae_threshold", default.ae_threshold),
        nms_threshold=getattr(args, "nms_threshold", default.nms_threshold),
        weight_exp=getattr(args, "w_exp", default.weight_exp),
        merge=not getattr(args, "no_merge", not default.merge),
    )


def parse_scales(text: str) -> list[float]:
    """--test_scales of test.py and demo.py: "0.5,1,1.5" -> [0.5, 1.0, 1.5]; anything else ends the program with
    one line saying what was expected."""
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--test_scales: expected comma-separated numbers such as 0.5,1,1.5, got {text!r}")
    if not scales or not all(0 < s < float("inf") for s in scales):
        raise SystemExit(f"--test_scales: expected positive finite scales, got {text!r}")
    return scales


def nms_per_class(rows: np.ndarray, cfg: InferenceConfig) -> np.ndarray:
    """(N, 8) x1 y1 x2 y2 score tl_score br_score label -> (M, 6) x1 y1 x2 y2 score label after soft-NMS in each
    class, the best `max_per_image` by score."""
    kept = []
    for label in np.unique(rows[:, 7]):
        boxes = rows[rows[:, 7] == label, :7]
        if cfg.merge:
            boxes = soft_nms_merge(boxes, cfg.sigma, cfg.nms_threshold, cfg.score_threshold, cfg.nms_method,
                                   cfg.weight_exp)
        else:
            boxes = soft_nms(boxes[:, :5], cfg.sigma, cfg.nms_threshold, cfg.score_threshold, cfg.nms_method)
        kept.append(np.concatenate([boxes[:, :5], np.full((len(boxes), 1), label, np.float32)], axis=1))
    if not kept:
        return np.zeros((0, 6), np.float32)
    kept = np.concatenate(kept)
    order = np.argsort(-kept[:, 4], kind="stable")[: cfg.max_per_image]
    return kept[order]


def to_original(dets: torch.Tensor, meta, flipped: bool) -> np.ndarray:
    """(D, 8) decoded rows of one input (output-map units) -> the valid ones (score >= 0) in original pixels."""
    rows = dets[dets[:, 4] >= 0].float().cpu().numpy()
    rows[:, :4] = boxes_to_original(rows[:, :4], meta, flipped)
    return rows


@torch.no_grad()
def detect(model, inputs: list, cfg: InferenceConfig, device: torch.device, amp: bool = False) -> np.ndarray:
    """One eval sample's `inputs` ([(images (1 or 2, 3, H, W), meta) per test scale], image 1 flipped) ->
    (M, 6) float32 x1 y1 x2 y2 score label in original-image pixels, best first. `model` maps an image batch to
    the eval-mode output dict of CONTRACT.md."""
    return detect_batch(model, [inputs], cfg, device, amp)[0]


@torch.no_grad()
def detect_batch(model, samples: list[list], cfg: InferenceConfig, device: torch.device,
                 amp: bool = False) -> list[np.ndarray]:
    """`detect` for several samples at once (frames of a video, photos of one size): their inputs at each test
    scale must have the same shape; one forward per scale on the batch of all their images. One (M, 6) array per
    sample, the same as `detect` gives for it alone."""
    rows = [[] for _ in samples]
    for scale_inputs in zip(*samples):  # [(images, meta) of each sample] at one test scale
        images = torch.cat([im for im, _ in scale_inputs])
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        dets = decode(out, K=cfg.K, ae_threshold=cfg.ae_threshold, num_dets=cfg.num_dets, kernel=cfg.kernel)
        per_sample = len(scale_inputs[0][0])  # 2 with the flipped copy
        for j, (_, meta) in enumerate(scale_inputs):
            rows[j] += [to_original(dets[j * per_sample + i], meta, flipped=i == 1) for i in range(per_sample)]
    return [nms_per_class(np.concatenate(r), cfg) for r in rows]


def first_item(batch: list):
    """DataLoader collate for batches of one eval sample: the sample itself."""
    return batch[0]


def detect_dataset(model, dataset, cfg: InferenceConfig, device: torch.device, num_workers: int = 2,
                   amp: bool = False, progress: bool = True) -> dict[int, np.ndarray]:
    """{image_id: (M, 6)} over the whole `dataset`; each process runs every world_size-th image and the results
    of all processes are gathered into every one of them."""
    loader = DataLoader(Subset(dataset, range(rank(), len(dataset), world_size())), batch_size=1, shuffle=False,
                        num_workers=num_workers, collate_fn=first_item, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    detections = {}
    for sample in tqdm(loader, desc="eval", disable=not (progress and is_main()), dynamic_ncols=True):
        detections[int(sample["image_id"])] = detect(model, sample["inputs"], cfg, device, amp)
    model.train(was_training)
    merged = {}
    for part in all_gather_object(detections):
        merged.update(part)
    return merged


def evaluate(model, dataset, cfg: InferenceConfig, device: torch.device, num_workers: int = 2, amp: bool = False,
             out_json=None, progress: bool = True) -> dict:
    """Detects over `dataset` and scores with pycocotools on the main process (which prints the tables and writes
    `out_json` when given); every process returns the metrics dict of `evaluate_detections`."""
    detections = detect_dataset(model, dataset, cfg, device, num_workers, amp, progress)
    stats = None
    if is_main():
        stats = evaluate_detections(dataset.coco, detections, dataset.cat_ids, dataset.class_names,
                                    out_json=out_json)
    return all_gather_object(stats)[0]
