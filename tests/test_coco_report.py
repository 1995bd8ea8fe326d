"""After evaluation: the per-class CSV against pycocotools run on each class alone, the precision-recall PNG,
faster-coco-eval against pycocotools, and a split without annotations (COCO test-dev) that is written, not scored."""
import contextlib
import csv
import io
import json
import math

import cv2
import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from datasets import coco_eval, coco_report
from datasets.annotations import coco_from_dict
from datasets.coco_eval import (METRIC_NAMES, detections_to_coco, evaluate_detections, metrics_path,
                                server_results_name)
from datasets.false_discovery import FD_NAMES
from tests.test_coco_eval import CAT_IDS, NAMES, ground_truth, noisy_detections


def one_class_stats(coco, detections, cat_id) -> np.ndarray:
    """pycocotools' 12 numbers with only `cat_id` evaluated (the independent reference for a CSV row)."""
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(coco, coco.loadRes(detections_to_coco(detections, CAT_IDS)), "bbox")
        e.params.catIds = [cat_id]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_per_class_csv_and_pr_plot(tmp_path):
    coco = ground_truth(seed=0, num_images=30)
    dets = noisy_detections(coco, seed=4)
    out = tmp_path / "results_val_s1.json"
    evaluate_detections(coco, dets, CAT_IDS, NAMES, out_json=out)
    with open(tmp_path / "results_val_s1_per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == NAMES and [int(r["category_id"]) for r in rows] == CAT_IDS
    columns = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}
    for row, cat_id in zip(rows, CAT_IDS):
        want = one_class_stats(coco, dets, cat_id)
        assert int(row["ground_truth"]) == len(coco.getAnnIds(catIds=[cat_id], iscrowd=False)) > 0
        for name, i in columns.items():
            if want[i] < 0:
                assert row[name] == ""  # no ground truth of that size
            else:
                assert float(row[name]) == pytest.approx(want[i], abs=6e-5)  # 4 decimals
    png = cv2.imread(str(tmp_path / "results_val_s1_pr.png"))
    assert png is not None and png.shape == (500, 1200, 3)
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 10  # curves drawn, not a blank canvas


def test_faster_backend_equals_pycocotools(capsys):
    for seed in range(3):
        coco = ground_truth(seed=seed, num_images=30)
        dets = noisy_detections(coco, seed=seed + 10)
        ref = evaluate_detections(coco, dets, CAT_IDS, NAMES)
        ref_out = capsys.readouterr().out
        fast = evaluate_detections(coco, dets, CAT_IDS, NAMES, backend="faster")
        fast_out = capsys.readouterr().out
        # The same algorithm in float64: differences are rounding, far below the printed 3 decimals.
        np.testing.assert_allclose([fast[k] for k in METRIC_NAMES], [ref[k] for k in METRIC_NAMES], rtol=0, atol=1e-9)
        np.testing.assert_allclose(list(fast["per_class"].values()), list(ref["per_class"].values()), atol=1e-9)
        assert fast_out == ref_out  # the same 12 lines and per-class table
    assert evaluate_detections(coco, {}, CAT_IDS, NAMES, backend="faster")["AP"] == 0
    with pytest.raises(ValueError, match="unknown evaluation backend 'x'"):
        evaluate_detections(coco, dets, CAT_IDS, NAMES, backend="x")


def test_split_without_annotations_is_written_for_the_server(tmp_path, capsys):
    data = dict(ground_truth().dataset)
    del data["annotations"]
    coco = coco_from_dict(data)
    dets = noisy_detections(ground_truth(), seed=1)
    out = tmp_path / server_results_name("test-dev2017", "my_run-s100-flip")
    assert out.name == "detections_test-dev2017_my-run-s100-flip_results.json"
    assert evaluate_detections(coco, dets, CAT_IDS, NAMES, out_json=out) == {}  # no metrics: the server scores
    # The whole output, exactly: one line and no table (the temporary path may hold any characters, "-1" too).
    assert capsys.readouterr().out == (
        f"no annotations in this split (such as COCO test-dev): {len(detections_to_coco(dets, CAT_IDS))} detections "
        f"of {len(coco.getImgIds())} images written to {out}; AP comes from the COCO evaluation server (zip the json "
        "and upload it)\n")
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    with pytest.raises(ValueError, match="no annotations to score against"):
        evaluate_detections(coco, dets, CAT_IDS, NAMES)


def test_empty_annotations_say_there_is_nothing_to_evaluate(tmp_path, capsys):
    coco = coco_from_dict({**ground_truth().dataset, "annotations": []})
    dets = noisy_detections(ground_truth(), seed=1)
    out = tmp_path / "results_val_checkpoint_s1.json"
    stats = evaluate_detections(coco, dets, CAT_IDS, NAMES, out_json=out)
    fd = {name: stats.pop(name) for name in FD_NAMES}
    assert stats == {**dict.fromkeys(METRIC_NAMES, -1.0), "per_class": dict.fromkeys(NAMES, -1.0)}
    assert all(math.isnan(v) for v in fd.values())
    assert capsys.readouterr().out == (
        f"nothing to evaluate: this split's 'annotations' list is empty (no ground-truth box); "
        f"{len(detections_to_coco(dets, CAT_IDS))} detections of {len(coco.getImgIds())} images written to {out}\n")
    # no table, no PR plot of AP 0; the metrics say there are none (a stale file of earlier results would not)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, metrics_path(out).name]
    assert json.loads(metrics_path(out).read_text()) == {**dict.fromkeys(METRIC_NAMES, -1), **dict.fromkeys(FD_NAMES)}


def test_no_detection_at_all_is_scored_with_a_warning(capsys):
    coco = ground_truth(seed=0, num_images=5)
    stats = evaluate_detections(coco, {}, CAT_IDS, NAMES)
    printed = capsys.readouterr().out
    assert stats["AP"] == 0 and printed.startswith("warning: the model detected nothing in 5 images (AP 0 below)")
    evaluate_detections(coco, noisy_detections(coco, seed=2), CAT_IDS, NAMES)
    assert "detected nothing" not in capsys.readouterr().out


@pytest.mark.parametrize("annotated", [True, False])
def test_replaced_results_never_sit_beside_the_old_numbers(tmp_path, monkeypatch, annotated):
    """test.py --force interrupted (Ctrl-C) while scoring, or a split whose annotations became empty: the new
    results json must not be left beside the per-class CSV, plot, metrics and analysis of the results it replaced."""
    coco = ground_truth(seed=0, num_images=10)
    if not annotated:
        coco = coco_from_dict({**coco.dataset, "annotations": []})
    out = tmp_path / "results_val_s1.json"
    stale = [out.with_name(out.stem + end) for end in ("_per_class.csv", "_pr.png", "_metrics.json")]
    for path in [out, *stale]:
        path.write_text("old")
    (tmp_path / "results_val_s1_analysis").mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(coco_eval, "run_cocoeval", interrupted)
    with pytest.raises(KeyboardInterrupt) if annotated else contextlib.nullcontext():
        evaluate_detections(coco, noisy_detections(ground_truth(seed=0, num_images=10), seed=4), CAT_IDS, NAMES,
                            out_json=out)
    assert json.loads(out.read_text()) != "old"
    assert not (tmp_path / "results_val_s1_analysis").exists()
    left = [path for path in stale if path.exists()]
    assert left == ([] if annotated else [stale[2]]) and all(path.read_text() != "old" for path in left)


def test_csv_tells_an_ap_of_zero_from_no_ground_truth():
    row = {"class": "cat", "category_id": 2, "ground_truth": 3, "AP": 0.0, "AP50": 0.5, "AP75": 0.0, "APs": -1.0,
           "APm": 0.0, "APl": -1.0, "AR100": 0.0}
    line = coco_report.table_csv([row]).decode().splitlines()[1]
    assert line == "cat,2,3,0.0000,0.5000,0.0000,,0.0000,,0.0000"


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the curves are recorded, not drawn
def test_pr_plot_curves_are_the_coco_summary_numbers(monkeypatch):
    """The legend's AP of each curve is the mean of the curve, which for the three overall curves is pycocotools'
    AP50, AP75 and AP, and for each class the class's AP."""
    from matplotlib.axes import Axes

    coco = ground_truth(seed=0, num_images=30)
    results = coco_eval.load_results(coco, detections_to_coco(noisy_detections(coco, seed=4), CAT_IDS))
    with contextlib.redirect_stdout(io.StringIO()):
        e = coco_eval.run_cocoeval(coco, results, CAT_IDS)
    labels = []
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, label, **kw: labels.append(label))
    coco_report.pr_figure(e, NAMES, "run")
    names = [label.rsplit(" (", 1)[0] for label in labels]
    shown = [float(label.rsplit(" ", 1)[1].strip("()")) for label in labels]
    per_class = coco_eval.per_class_ap(e)
    assert names == ["IoU 0.50", "IoU 0.75", "IoU 0.50:0.95"] + NAMES and all(per_class >= 0)
    # 3 decimals shown; the same means summed in another order otherwise
    assert shown == pytest.approx([e.stats[1], e.stats[2], e.stats[0], *per_class], abs=5e-4 + 1e-12)
    assert len(set(shown[:3])) == 3
