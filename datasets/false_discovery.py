"""The false discovery rates of the CenterNet paper (Duan et al. 2019, Table 3), from the same detections as the
COCO table: a second COCOeval with 10 IoU thresholds 0.05:0.05:0.5 instead of 0.5:0.05:0.95.

    FD         1 - AP averaged over IoU 0.05:0.05:0.5 (all areas, 100 detections per image)
    FD5, FD25, FD50    1 - AP at the single IoU 0.05, 0.25, 0.5
    FD_S, FD_M, FD_L   FD over COCO's small / medium / large areas

in percent, as the paper gives them. The official code takes the mean of 1 - precision over the same entries that
COCO averages for AP, which is 1 - AP. Where COCO has no AP (-1: no ground truth in that area range), FD is NaN
(null in json, "n/a" printed). No detection at all with ground truth present is AP 0, so FD 100.
"""
import contextlib
import io

import numpy as np

from datasets.coco_report import mean_valid

FD_NAMES = ("FD", "FD5", "FD25", "FD50", "FD_S", "FD_M", "FD_L")
# Built as pycocotools builds COCO's (linspace). 0.15 and 0.35 come out one float above those decimals
# (0.15000000000000002), as with arange: an IoU of exactly 0.35 does not count at 0.35
FD_IOU_THRESHOLDS = np.linspace(0.05, 0.5, 10)
# (name, IoU threshold index or None for all, COCO area label)
_SUMMARY = (("FD", None, "all"), ("FD5", 0, "all"), ("FD25", 4, "all"), ("FD50", 9, "all"),
            ("FD_S", None, "small"), ("FD_M", None, "medium"), ("FD_L", None, "large"))


def false_discovery_rates(coco_eval) -> dict[str, float]:
    """{FD name: percent or NaN} of `coco_eval`, a box COCOeval (pycocotools or faster-coco-eval) with its ground
    truth, detections and catIds set but not yet evaluated: it is evaluated here at IoU 0.05:0.05:0.5."""
    params = coco_eval.params  # COCO's defaults: areas all, small, medium, large; maxDets 1, 10, 100
    params.iouThrs = FD_IOU_THRESHOLDS.copy()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"][..., -1]  # (T, R, K, A) at 100 detections
    rates = {}
    for name, iou_index, area in _SUMMARY:
        p = precision[:, :, :, params.areaRngLbl.index(area)]
        ap = mean_valid(p if iou_index is None else p[iou_index])
        rates[name] = 100.0 * (1.0 - ap) if ap >= 0 else float("nan")
    return rates


def format_rates(rates: dict[str, float]) -> str:
    """The FD lines in the layout of COCO's table, percent with one decimal (the paper's), n/a where undefined."""
    lines = []
    for name, iou_index, area in _SUMMARY:
        iou = "0.05:0.50" if iou_index is None else f"{FD_IOU_THRESHOLDS[iou_index]:.2f}"
        value = rates[name]
        shown = "n/a" if np.isnan(value) else f"{value:.1f} %"
        lines.append(f" {'False Discovery':<18} {'(' + name + ')':<6} @[ IoU={iou:<9} | area={area:>6s} | "
                     f"maxDets=100 ] = {shown}")
    return "\n".join(lines)
