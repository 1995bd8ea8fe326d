"""COCO box evaluation: detections in original-image pixels -> COCO results json -> pycocotools COCOeval.

`evaluate_detections` prints the standard 12-line table and a per-class AP table and returns the numbers. An empty
detection set scores AP 0 instead of failing inside pycocotools. Metrics with no ground truth in their area range
are -1, as pycocotools reports them.
"""
import contextlib
import io
import json
import os
import secrets
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(detections: dict[int, np.ndarray], cat_ids: list[int]) -> list[dict]:
    """{image_id: (M, 6) x1 y1 x2 y2 score label} -> COCO result entries (original category id, bbox x y w h)."""
    results = []
    for image_id, dets in detections.items():
        dets = np.asarray(dets, np.float64).reshape(-1, 6)
        labels = dets[:, 5].astype(np.int64)
        if len(dets) and (labels.min() < 0 or labels.max() >= len(cat_ids)):
            raise ValueError(f"detections of image {image_id}: label {labels.max()} outside 0..{len(cat_ids) - 1}")
        xywh = np.concatenate([dets[:, :2], dets[:, 2:4] - dets[:, :2]], axis=1).round(2).tolist()
        scores = dets[:, 4].tolist()
        results += [{"image_id": int(image_id), "category_id": int(cat_ids[c]), "bbox": box, "score": s}
                    for box, s, c in zip(xywh, scores, labels.tolist())]
    return results


def write_json_atomic(path: str | Path, obj) -> None:
    """Writes `obj` as json to `path` through a temporary file in the same folder, so a reader never sees half.
    The file gets the user's normal mode (0666 less the umask), not the 0600 of a mkstemp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_results(coco: COCO, results: list[dict]) -> COCO:
    """A COCO object holding `results`; unlike COCO.loadRes it accepts an empty list."""
    res = COCO()
    res.dataset = {"images": list(coco.dataset["images"]), "categories": list(coco.dataset["categories"]),
                   "annotations": []}
    for i, r in enumerate(results):
        x, y, w, h = r["bbox"]
        res.dataset["annotations"].append({**r, "id": i + 1, "area": w * h, "iscrowd": 0})
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def per_class_ap(coco_eval: COCOeval) -> np.ndarray:
    """(K,) AP over IoU 0.50:0.95 of each category (all areas, 100 detections), -1 where it has no ground truth."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T, R, K, A, M) -> (T, R, K)
    out = np.full(precision.shape[2], -1.0)
    for k in range(precision.shape[2]):
        valid = precision[:, :, k][precision[:, :, k] > -1]
        if valid.size:
            out[k] = valid.mean()
    return out


def evaluate_detections(coco: COCO, detections: dict[int, np.ndarray], cat_ids: list[int], class_names: list[str],
                        out_json: str | Path | None = None) -> dict:
    """Scores `detections` ({image_id: (M, 6) x1 y1 x2 y2 score label}, original pixels, contiguous labels) against
    `coco` over all its images (an image without an entry has no detections).

    Prints the 12-line COCO table and a per-class AP table; writes the COCO results json to `out_json` when given.
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl": float,
    "per_class": {class name: AP}}.
    """
    unknown = set(int(i) for i in detections) - set(coco.getImgIds())
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth: {sorted(unknown)[:10]}")
    results = detections_to_coco(detections, cat_ids)
    if out_json is not None:
        write_json_atomic(out_json, results)

    coco_eval = COCOeval(coco, load_results(coco, results), "bbox")
    coco_eval.params.catIds = list(cat_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    coco_eval.summarize()
    stats = {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}

    aps = per_class_ap(coco_eval)
    width = max([len(n) for n in class_names] + [5])
    print(f"{'class':<{width}}  AP")
    for name, ap in zip(class_names, aps):
        print(f"{name:<{width}}  {ap:.3f}" if ap >= 0 else f"{name:<{width}}  -")
    stats["per_class"] = {name: float(ap) for name, ap in zip(class_names, aps)}
    return stats
