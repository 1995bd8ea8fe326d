"""datasets/coco_eval.py against pycocotools driven directly (loadRes + COCOeval per category)."""
import contextlib
import io
import json
import re
import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from datasets.annotations import coco_from_dict
from datasets.coco_eval import METRIC_NAMES, analysis_folder, evaluate_detections, write_results

CAT_IDS = [2, 5, 11]  # non-contiguous on purpose
NAMES = ["cat", "dog", "fox"]


def ground_truth(seed=0, num_images=12):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 400), rng.uniform(0, 300)
            w, h = rng.uniform(4, 200), rng.uniform(4, 150)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(rng.choice(CAT_IDS)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
    return coco_from_dict({"images": images, "annotations": anns,
                           "categories": [{"id": c, "name": n} for c, n in zip(CAT_IDS, NAMES)]})


def noisy_detections(coco, seed=1):
    """Jittered ground truth with random scores and labels, plus false positives, as {image_id: (M, 6)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for image_id in coco.getImgIds():
        rows = []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.08, 4) * [w, h, w, h]
            label = CAT_IDS.index(a["category_id"]) if rng.random() < 0.85 else int(rng.integers(3))
            rows.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3], rng.uniform(0.2, 1), label])
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 500, 2)
            rows.append([x, y, x + rng.uniform(5, 100), y + rng.uniform(5, 100), rng.uniform(0, 0.6), rng.integers(3)])
        if rows:
            out[image_id] = np.array(rows, np.float32)
    return out


def reference_eval(coco, detections, cat_ids=None):
    """pycocotools the usual way: a result list built row by row, loadRes, COCOeval."""
    results = [{"image_id": int(i), "category_id": CAT_IDS[int(r[5])],
                "bbox": [float(r[0]), float(r[1]), float(r[2] - r[0]), float(r[3] - r[1])], "score": float(r[4])}
               for i, rows in detections.items() for r in rows]
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(coco, coco.loadRes(results), "bbox")
        if cat_ids is not None:
            e.params.catIds = cat_ids
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_metrics_equal_pycocotools(capsys):
    coco = ground_truth()
    dets = noisy_detections(coco)
    stats = evaluate_detections(coco, dets, CAT_IDS, NAMES)
    want = reference_eval(coco, dets)
    np.testing.assert_allclose([stats[k] for k in METRIC_NAMES], want, atol=1e-4)
    assert 0.2 < stats["AP"] < 0.95
    for c, name in zip(CAT_IDS, NAMES):
        assert stats["per_class"][name] == pytest.approx(reference_eval(coco, dets, [c])[0], abs=1e-4)
    out = capsys.readouterr().out
    assert out.count("Average Precision") == 6 and out.count("Average Recall") == 6
    assert all(re.search(rf"^{n} +{stats['per_class'][n]:.3f}$", out, re.M) for n in NAMES)


def test_ground_truth_as_detections_scores_one():
    coco = ground_truth(seed=3)
    dets = {}
    for a in coco.loadAnns(coco.getAnnIds()):
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            dets.setdefault(a["image_id"], []).append([x, y, x + w, y + h, 1.0, CAT_IDS.index(a["category_id"])])
    stats = evaluate_detections(coco, {k: np.array(v) for k, v in dets.items()}, CAT_IDS, NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in stats["per_class"].values())


@pytest.mark.parametrize("dets", [{}, {100: np.zeros((0, 6))}])
def test_empty_detections_score_zero(dets):
    stats = evaluate_detections(ground_truth(), dets, CAT_IDS, NAMES)
    assert stats["AP"] == 0 and stats["AR100"] == 0 and all(v == 0 for v in stats["per_class"].values())


def test_results_json_written_atomically_with_original_ids(tmp_path):
    coco = ground_truth()
    dets = noisy_detections(coco)
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text("old")
    evaluate_detections(coco, dets, CAT_IDS, NAMES, out_json=path)
    results = json.loads(path.read_text())
    # No temporary file left behind; the per-class table, the curves and the metrics beside the results.
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json", "results_metrics.json",
                                                             "results_per_class.csv", "results_pr.png"]
    assert len(results) == sum(len(v) for v in dets.values())
    first_id = next(iter(dets))
    r, row = results[0], dets[first_id][0]
    assert r["image_id"] == first_id and r["category_id"] == CAT_IDS[int(row[5])]
    np.testing.assert_allclose(r["bbox"], [row[0], row[1], row[2] - row[0], row[3] - row[1]], atol=0.01)
    assert r["score"] == pytest.approx(float(row[4]))
    evaluate_detections(coco, {}, CAT_IDS, NAMES, out_json=path)
    assert json.loads(path.read_text()) == []


def test_bad_detections_are_errors():
    coco = ground_truth()
    with pytest.raises(ValueError, match="image ids not in the ground truth: \\[7\\]"):
        evaluate_detections(coco, {7: np.zeros((1, 6))}, CAT_IDS, NAMES)
    with pytest.raises(ValueError, match="label 3 outside 0..2"):
        evaluate_detections(coco, {100: np.array([[0, 0, 5, 5, 0.5, 3]])}, CAT_IDS, NAMES)
    # the label outside is named, not the largest one (labels 0 and -1 were refused as "label 0 outside 0..2")
    with pytest.raises(ValueError, match="label -1 outside 0..2"):
        evaluate_detections(coco, {100: np.array([[0, 0, 5, 5, 0.5, 0], [0, 0, 5, 5, 0.4, -1]])}, CAT_IDS, NAMES)


def test_replaced_results_take_only_their_drawings_from_the_analysis_folder(tmp_path, capsys):
    """test.py --force removed the whole `<results>_analysis` folder, a user's notes in it too, and a folder that was
    a link failed half-way, after the metrics, CSV and plot were gone."""
    out_json = tmp_path / "results.json"
    folder = analysis_folder(out_json)
    folder.mkdir()
    (folder / "003_errors_7.jpg").write_bytes(b"drawing")
    (folder / "notes.txt").write_text("mine")
    write_results(out_json, [])
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and json.loads(out_json.read_text()) == []
    assert f"removed the 1 drawings in {folder}: they analysed the results that were replaced (kept notes.txt)" \
        in capsys.readouterr().out
    elsewhere = tmp_path / "storage"
    elsewhere.mkdir()
    (elsewhere / "001_errors_2.jpg").write_bytes(b"drawing")
    (folder / "notes.txt").unlink()
    folder.rmdir()
    folder.symlink_to(elsewhere, target_is_directory=True)
    write_results(out_json, [{"image_id": 1}])
    assert folder.is_symlink() and not any(elsewhere.iterdir())
    assert json.loads(out_json.read_text()) == [{"image_id": 1}]
    folder.unlink()
    folder.mkdir()
    (folder / "001_errors_2.jpg").write_bytes(b"drawing")
    write_results(out_json, [])
    assert not folder.exists()


def test_a_link_named_like_a_drawing_is_kept_with_the_analysis_folder(tmp_path, capsys):
    """tools/analyze.py writes files, never links: a link in its folder is the user's, whatever its name."""
    out_json = tmp_path / "results.json"
    folder = analysis_folder(out_json)
    folder.mkdir()
    (tmp_path / "mine.jpg").write_bytes(b"photo")
    (folder / "002_errors_5.jpg").symlink_to(tmp_path / "mine.jpg")
    write_results(out_json, [])
    assert [p.name for p in folder.iterdir()] == ["002_errors_5.jpg"] and (folder / "002_errors_5.jpg").is_symlink()
    assert "removed the 0 drawings" in capsys.readouterr().out
