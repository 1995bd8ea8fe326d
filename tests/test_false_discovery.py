"""datasets/false_discovery.py: a case worked out by hand, and random data against a slow reference written from the
definitions (COCO's greedy matching, area ranges and 101-point interpolated AP), not from pycocotools' code."""
import json
import math

import numpy as np
import pytest

from datasets.annotations import coco_from_dict
from datasets.coco_eval import (ALL_METRIC_NAMES, METRIC_NAMES, evaluate_detections, load_results, metrics_path,
                                new_cocoeval, results_of_metrics)
from datasets.false_discovery import FD_IOU_THRESHOLDS, FD_NAMES, false_discovery_rates, format_rates

AREAS = {"all": (0, 1e10), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e10)}
CATS = [{"id": 1, "name": "cat"}, {"id": 4, "name": "dog"}]


def dataset(anns: list[dict], num_images: int = 1) -> dict:
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(num_images)]
    return {"images": images, "categories": CATS,
            "annotations": [{**a, "id": i + 1, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0}
                            for i, a in enumerate(anns)]}


def rates(gt: dict, results: list[dict]) -> dict:
    coco = coco_from_dict(gt)
    return false_discovery_rates(new_cocoeval(coco, load_results(coco, results), [c["id"] for c in CATS]))


def test_one_detection_at_iou_0_32_counts_up_to_threshold_0_3():
    # A 50 x 50 box (medium) and a 50 x 16 detection inside it: IoU 800 / 2500 = 0.32. It matches at the six
    # thresholds 0.05 ... 0.30 (AP 1) and at none of 0.35 ... 0.50 (AP 0): AP over 0.05:0.5 is 0.6, FD 40 %.
    gt = dataset([{"image_id": 1, "category_id": 1, "bbox": [100, 100, 50, 50]}])
    fd = rates(gt, [{"image_id": 1, "category_id": 1, "bbox": [100, 100, 50, 16], "score": 0.9}])
    assert fd["FD"] == pytest.approx(40.0, abs=1e-9) and fd["FD_M"] == pytest.approx(40.0, abs=1e-9)
    assert fd["FD5"] == pytest.approx(0.0, abs=1e-9) and fd["FD25"] == pytest.approx(0.0, abs=1e-9)
    assert fd["FD50"] == pytest.approx(100.0, abs=1e-9)
    assert math.isnan(fd["FD_S"]) and math.isnan(fd["FD_L"])  # no ground truth of that size: undefined, not 0
    printed = format_rates(fd).splitlines()
    assert len(printed) == 7 and printed[0].endswith("= 40.0 %") and printed[4].endswith("= n/a")
    assert "(FD25) @[ IoU=0.25" in printed[2]


def test_no_detection_is_fd_100_and_no_ground_truth_is_undefined():
    gt = dataset([{"image_id": 1, "category_id": 4, "bbox": [0, 0, 200, 200]}])
    fd = rates(gt, [])
    assert [fd[n] for n in ("FD", "FD5", "FD25", "FD50", "FD_L")] == [100.0] * 5
    assert math.isnan(fd["FD_S"]) and math.isnan(fd["FD_M"])
    fd = rates(dataset([]), [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 9, 9], "score": 0.5}])
    assert all(math.isnan(v) for v in fd.values())


def iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def reference_ap(gt: dict, results: list[dict], threshold: float, area: str) -> list[float]:
    """Per class with ground truth in `area`: 101-point interpolated AP at IoU `threshold`, matching as COCO does
    (best score first, top 100 per image and class; each detection takes the unmatched box of highest IoU >= the
    threshold, boxes outside the area only when no box inside is left; those matches and unmatched detections
    outside the area are ignored)."""
    lo, hi = AREAS[area]
    aps = []
    for cat in (c["id"] for c in CATS):
        scored, positives = [], 0  # (score, true positive)
        for image in gt["images"]:
            boxes = [a for a in gt["annotations"] if a["image_id"] == image["id"] and a["category_id"] == cat]
            ignored = [not lo <= a["area"] <= hi for a in boxes]
            positives += ignored.count(False)
            dets = sorted((r for r in results if r["image_id"] == image["id"] and r["category_id"] == cat),
                          key=lambda r: -r["score"])[:100]
            taken = [False] * len(boxes)
            for d in dets:
                match = None
                for want_ignored in (False, True):
                    best = -1.0
                    for j, box in enumerate(boxes):
                        overlap = iou(d["bbox"], box["bbox"])
                        if not taken[j] and ignored[j] == want_ignored and overlap >= threshold and overlap > best:
                            best, match = overlap, j
                    if match is not None:
                        break
                if match is not None:
                    taken[match] = True
                    if not ignored[match]:
                        scored.append((d["score"], True))
                elif lo <= d["bbox"][2] * d["bbox"][3] <= hi:
                    scored.append((d["score"], False))
        if positives == 0:
            continue
        scored.sort(key=lambda s: -s[0])
        tp = np.cumsum([s[1] for s in scored])
        fp = np.cumsum([not s[1] for s in scored])
        recall = tp / positives
        precision = tp / np.maximum(tp + fp, 1)
        for i in range(len(precision) - 2, -1, -1):  # the precision envelope: best precision at any higher recall
            precision[i] = max(precision[i], precision[i + 1])
        points = []
        for r in np.linspace(0, 1, 101):
            reached = np.flatnonzero(recall >= r)
            points.append(precision[reached[0]] if reached.size else 0.0)
        aps.append(float(np.mean(points)))
    return aps


def reference_fd(gt: dict, results: list[dict], thresholds, area: str) -> float:
    aps = [ap for t in thresholds for ap in reference_ap(gt, results, t, area)]
    return 100 * (1 - np.mean(aps)) if aps else float("nan")


def random_case(seed: int) -> tuple[dict, list[dict]]:
    """Boxes of every size on 6 images, detections jittered from them (some far off, some with the other class),
    plus false positives; distinct scores, so that the order is the same whatever the sort."""
    rng = np.random.default_rng(seed)
    anns, results = [], []
    for image_id in range(1, 7):
        for _ in range(rng.integers(1, 6)):
            w, h = rng.choice([12, 50, 150]) * rng.uniform(0.7, 1.3, 2)
            x, y = rng.uniform(0, 400), rng.uniform(0, 300)
            cat = int(rng.choice([1, 4]))
            anns.append({"image_id": image_id, "category_id": cat, "bbox": [x, y, w, h]})
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, rng.choice([0.05, 0.3]), 4) * [w, h, w, h]
                box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
                results.append({"image_id": image_id, "category_id": cat if rng.random() < 0.9 else 5 - cat,
                                "bbox": box})
        for _ in range(rng.integers(0, 3)):
            results.append({"image_id": image_id, "category_id": int(rng.choice([1, 4])),
                            "bbox": [*rng.uniform(0, 400, 2), *rng.uniform(5, 120, 2)]})
    for r, score in zip(results, rng.permutation(len(results))):
        r["score"] = (score + 1) / (len(results) + 1)
    return dataset(anns, 6), results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rates_match_the_slow_reference(seed):
    gt, results = random_case(seed)
    fd = rates(gt, results)
    expected = {"FD": reference_fd(gt, results, FD_IOU_THRESHOLDS, "all"),
                "FD5": reference_fd(gt, results, [0.05], "all"), "FD25": reference_fd(gt, results, [0.25], "all"),
                "FD50": reference_fd(gt, results, [0.5], "all"),
                "FD_S": reference_fd(gt, results, FD_IOU_THRESHOLDS, "small"),
                "FD_M": reference_fd(gt, results, FD_IOU_THRESHOLDS, "medium"),
                "FD_L": reference_fd(gt, results, FD_IOU_THRESHOLDS, "large")}
    assert 0 < fd["FD"] < 100  # neither perfect nor empty: the case tests the matching
    # the same sums in another order: float64 rounding, far below 1e-9 percent
    assert fd == pytest.approx(expected, abs=1e-9, nan_ok=True)


def test_faster_backend_gives_the_same_rates():
    pytest.importorskip("faster_coco_eval")
    gt, results = random_case(3)
    coco = coco_from_dict(gt)
    ref = rates(gt, results)
    fast = false_discovery_rates(new_cocoeval(coco, load_results(coco, results), [1, 4], backend="faster"))
    assert fast == pytest.approx(ref, abs=1e-9, nan_ok=True)


def test_metrics_json_is_named_after_the_results_and_holds_every_printed_number(tmp_path, capsys):
    assert metrics_path(tmp_path / "x.json") == tmp_path / "x_metrics.json"
    assert results_of_metrics(tmp_path / "x_metrics.json") == tmp_path / "x.json"
    assert results_of_metrics(tmp_path / "x.json") is None
    gt, results = random_case(4)
    gt["annotations"] = [a for a in gt["annotations"] if a["bbox"][2] * a["bbox"][3] > 32 ** 2]  # no small box
    coco = coco_from_dict(gt)
    detections = {}
    for r in results:
        x, y, w, h = r["bbox"]
        row = [x, y, x + w, y + h, r["score"], [1, 4].index(r["category_id"])]
        detections.setdefault(r["image_id"], []).append(row)
    out = tmp_path / "results_val.json"
    stats = evaluate_detections(coco, {k: np.array(v) for k, v in detections.items()}, [1, 4], ["cat", "dog"],
                                out_json=out)
    printed = capsys.readouterr().out.splitlines()
    coco_lines = [i for i, line in enumerate(printed) if "Average Precision" in line or "Average Recall" in line]
    fd_lines = [i for i, line in enumerate(printed) if "False Discovery" in line]
    assert len(coco_lines) == 12 and fd_lines == list(range(coco_lines[-1] + 1, coco_lines[-1] + 8))
    assert printed[fd_lines[4]].endswith("= n/a")  # FD_S
    metrics = json.loads((tmp_path / "results_val_metrics.json").read_text())
    assert list(metrics) == list(ALL_METRIC_NAMES) == list(METRIC_NAMES + FD_NAMES)
    assert metrics["APs"] == -1 and metrics["FD_S"] is None  # COCO's -1 kept; FD undefined, not a number
    for name in ALL_METRIC_NAMES:
        assert metrics[name] == stats[name] or (metrics[name] is None and math.isnan(stats[name]))
    # the printed COCO numbers are these, to the 3 decimals printed
    for i, name in zip(coco_lines, METRIC_NAMES):
        assert float(printed[i].rsplit("=", 1)[1]) == pytest.approx(metrics[name], abs=5e-4 + 1e-12)
    assert float(printed[fd_lines[0]].rsplit("=", 1)[1].rstrip(" %")) == pytest.approx(metrics["FD"], abs=0.05 + 1e-9)
