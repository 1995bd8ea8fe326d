"""What test.py writes beside a results json after evaluation: the per-class table as CSV and the precision-recall
curves (overall and per class) as PNG, both made from the arrays of a finished COCOeval (written by coco_eval.py).

COCOeval.eval["precision"] is (T, R, K, A, M): 10 IoU thresholds 0.50:0.05:0.95, 101 recall points, K classes,
areas (all, small, medium, large), max detections (1, 10, 100); -1 where a class has no ground truth.
eval["recall"] is (T, K, A, M).
"""
import csv
import io

import numpy as np

CSV_COLUMNS = ("class", "category_id", "ground_truth", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
MAX_LEGEND = 20  # classes named in the per-class plot's legend; more would hide the curves


def mean_valid(values: np.ndarray) -> float:
    """COCO's summary mean: entries of -1 (no ground truth) left out; -1 when nothing is left."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_class_table(coco_eval, class_names: list[str], cat_ids: list[int], gt_counts: list[int]) -> list[dict]:
    """One row per class: the COCO metrics restricted to it (-1: no ground truth in that area range)."""
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]
    rows = []
    for k, (name, cat_id, count) in enumerate(zip(class_names, cat_ids, gt_counts)):
        p = precision[:, :, k, :, -1]  # (T, R, A) at 100 detections
        rows.append({"class": name, "category_id": cat_id, "ground_truth": count,
                     "AP": mean_valid(p[:, :, 0]), "AP50": mean_valid(p[0, :, 0]), "AP75": mean_valid(p[5, :, 0]),
                     "APs": mean_valid(p[:, :, 1]), "APm": mean_valid(p[:, :, 2]), "APl": mean_valid(p[:, :, 3]),
                     "AR100": mean_valid(recall[:, k, 0, -1])})
    return rows


def table_csv(rows: list[dict]) -> bytes:
    """Metrics with 4 decimals; an empty cell where the class has no ground truth (-1 in COCOeval)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if v >= 0 else "") if isinstance(v, float) else v for k, v in row.items()})
    return text.getvalue().encode()


def pr_figure(coco_eval, class_names: list[str], title: str) -> bytes:
    """PNG: left, precision against recall over all classes at IoU 0.50, 0.75 and averaged over 0.50:0.95; right,
    each class averaged over the IoU thresholds, its AP in the legend."""
    # Imported here: evaluation itself does not need matplotlib (a GPU machine's own Python may lack it).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    recall_points = np.linspace(0, 1, precision.shape[1])
    has_gt = (precision > -1).any(axis=(0, 1))
    fig = Figure(figsize=(12, 5), dpi=100)
    FigureCanvasAgg(fig)
    overall, by_class = fig.subplots(1, 2)

    def mean_over_classes(p: np.ndarray) -> np.ndarray:  # (R, K) -> (R,), classes with ground truth
        return p[:, has_gt].mean(axis=1) if has_gt.any() else np.zeros(len(recall_points))

    curves = {"IoU 0.50": mean_over_classes(precision[0]), "IoU 0.75": mean_over_classes(precision[5]),
              "IoU 0.50:0.95": mean_over_classes(precision.mean(axis=0))}
    for label, curve in curves.items():
        overall.plot(recall_points, curve, label=f"{label} (AP {curve.mean():.3f})")
    overall.set_title(f"{title}: all classes")
    for k in np.flatnonzero(has_gt):
        curve = precision[:, :, k].mean(axis=0)
        by_class.plot(recall_points, curve, label=f"{class_names[k]} ({curve.mean():.3f})", linewidth=1)
    by_class.set_title("per class, IoU 0.50:0.95" + (f" ({has_gt.sum()} classes)" if has_gt.sum() > MAX_LEGEND else ""))
    for ax in (overall, by_class):
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    overall.legend(loc="lower left")
    if 0 < has_gt.sum() <= MAX_LEGEND:
        by_class.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return png.getvalue()
