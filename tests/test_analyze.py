"""tools/analyze.py on hand-made cases whose breakdown is known, and end to end with drawings, from a results json
or test.py's metrics json."""
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.coco_eval import FD_NAMES, METRIC_NAMES
from tools.analyze import KINDS, breakdown, draw_worst, get_args_parser, main
from utils.errors import ArgumentError, DataError, MissingFileError

REPO = Path(__file__).resolve().parents[1]
CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
GT_BOXES = [[10, 10, 100, 100], [150, 150, 80, 80]]  # both cats, in image 1
# AP50 when the second of two boxes is found only after one false positive: precision 1 up to recall 0.5,
# 2/3 above (101 recall points); and when it is never found: precision 1 up to recall 0.5, 0 above.
ONE_FP_BETWEEN = (51 + 50 * 2 / 3) / 101
HALF_FOUND = 51 / 101


def ground_truth(boxes=GT_BOXES) -> dict:
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, b in enumerate(boxes)]
    return {"images": [{"id": 1, "file_name": "1.jpg", "width": 300, "height": 300}], "annotations": anns,
            "categories": CATS}


def det(box, score, cat=1) -> dict:
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


FIRST, SECOND = det(GT_BOXES[0], 0.9), det(GT_BOXES[1], 0.7)
CASES = {
    # the only detection has the wrong class: all of the AP is classification's
    "classification": ([det(GT_BOXES[0], 0.9, cat=2)], ground_truth(GT_BOXES[:1]), 0.0, 1.0),
    # IoU 0.3 with its box
    "localisation": ([det([10, 10, 100, 30], 0.9)], ground_truth(GT_BOXES[:1]), 0.0, 1.0),
    # a second detection of the first box (IoU 0.81) between the two true ones
    "duplicate": ([FIRST, det([10, 10, 100, 81], 0.8), SECOND], ground_truth(), ONE_FP_BETWEEN, 1 - ONE_FP_BETWEEN),
    # a detection far from every box
    "background": ([FIRST, det([250, 10, 40, 40], 0.8), SECOND], ground_truth(), ONE_FP_BETWEEN, 1 - ONE_FP_BETWEEN),
    # the second box has no detection
    "missed": ([FIRST], ground_truth(), HALF_FOUND, 1 - HALF_FOUND),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_error_alone(kind):
    results, gt, want_base, want_gain = CASES[kind]
    base, table, _, _ = breakdown(gt, results)
    assert base == pytest.approx(want_base, abs=1e-9)
    assert table[kind] == (1, pytest.approx(want_gain, abs=1e-9))
    for other in KINDS:
        if other != kind:
            assert table[other] == (0, 0.0)


def test_fixed_target_already_matched_is_removed():
    # A wrong-class detection on a box that a correct detection already matched: fixing it removes it, which
    # lifts AP50 as removing a duplicate would.
    results = [FIRST, det(GT_BOXES[0], 0.8, cat=2), SECOND]
    base, table, _, status = breakdown(ground_truth(), results)
    assert base == pytest.approx(1.0)  # class dog has no ground truth: the error costs cat nothing
    assert table["classification"] == (1, pytest.approx(0.0, abs=1e-9))
    assert set(status.values()) == {"matched"}


def counts(table: dict) -> dict:
    return {kind: count for kind, (count, _) in table.items() if count}


def test_an_iou_of_exactly_0_5_with_a_matched_box_is_a_duplicate():
    # 100 x 50 inside the 100 x 100 box: IoU 5000 / 10000, exactly the foreground IoU (>=, as matching counts it)
    _, table, _, _ = breakdown(ground_truth(GT_BOXES[:1]), [FIRST, det([10, 10, 100, 50], 0.8)])
    assert counts(table) == {"duplicate": 1}


def test_overlapping_only_a_box_of_another_class_below_0_5_is_background():
    # a dog at IoU 0.3 with the only box, a cat: background (the cat box is missed), not localisation
    _, table, errors, status = breakdown(ground_truth(GT_BOXES[:1]), [det([10, 10, 100, 30], 0.9, cat=2)])
    assert counts(table) == {"background": 1, "missed": 1}
    assert errors == {0: ("background", None)} and status == {1: "missed"}


def test_fixing_errors_that_share_a_box_fixes_the_best_scoring_one():
    # Two localisation errors on the one box, a background detection between them: fixing gives the box to the
    # 0.9 one (a true positive first: AP50 1) and removes the 0.7 one; the 0.7 one fixed would give AP50 0.5.
    results = [det([10, 10, 100, 30], 0.9), det([250, 10, 40, 40], 0.8), det([10, 10, 100, 25], 0.7)]
    base, table, _, _ = breakdown(ground_truth(GT_BOXES[:1]), results)
    assert base == 0 and table["localisation"] == (2, pytest.approx(1.0, abs=1e-9))


def test_all_100_detections_of_an_image_are_evaluated():
    # 12 boxes found exactly: all matched (pycocotools' maxDets 10 would leave the last two missed, AP50 84 / 101)
    boxes = [[25 * i, 10, 20, 20] for i in range(12)]
    base, table, _, status = breakdown(ground_truth(boxes), [det(b, 0.99 - 0.01 * i) for i, b in enumerate(boxes)])
    assert base == pytest.approx(1.0) and counts(table) == {} and set(status.values()) == {"matched"}


def test_a_crowd_region_is_not_a_missed_box():
    gt = ground_truth(GT_BOXES)
    gt["annotations"][1]["iscrowd"] = 1  # nothing detected on it
    base, table, _, status = breakdown(gt, [FIRST])
    assert base == pytest.approx(1.0) and counts(table) == {} and status == {1: "matched"}


def test_the_images_with_the_most_errors_are_drawn_counting_scores_at_the_threshold(tmp_path):
    # Image 2 has two background detections, one scoring exactly --score_thresh; image 1 has one: image 2 is drawn.
    for name in ("1.jpg", "2.jpg"):
        cv2.imwrite(str(tmp_path / name), np.full((300, 300, 3), 200, np.uint8))
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 300, "height": 300} for i in (1, 2)],
          "annotations": [], "categories": CATS}
    results = [det([250, 10, 40, 40], 0.9), {**det([250, 10, 40, 40], 0.9), "image_id": 2},
               {**det([10, 200, 40, 40], 0.3), "image_id": 2}]
    errors = {i: ("background", None) for i in range(3)}
    drawings = draw_worst(gt, results, errors, {}, tmp_path, 1, 0.3)
    assert [name for name, _ in drawings] == ["002_errors_2.jpg"]


def data_dir(tmp_path: Path) -> Path:
    """A data folder whose split val holds one 300 x 300 grey image, 1.jpg, and no annotations file yet."""
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "val").mkdir()
    cv2.imwrite(str(data / "val" / "1.jpg"), np.full((300, 300, 3), 200, np.uint8))
    return data


def test_cli_prints_the_table_and_draws_the_worst_image(tmp_path, capsys):
    data = data_dir(tmp_path)
    (data / "annotations" / "instances_val.json").write_text(json.dumps(ground_truth()))
    results = tmp_path / "results.json"
    results.write_text(json.dumps(CASES["background"][0]))
    args = get_args_parser().parse_args([str(results), "--data_dir", str(data), "--split", "val"])
    table = main(args)
    assert table["background"][0] == 1
    out = capsys.readouterr().out
    assert f"AP50 {ONE_FP_BETWEEN:.4f}" in out and f"background            1  +{1 - ONE_FP_BETWEEN:.4f}" in out
    assert "count  AP50 gained if fixed" in out  # the column holds what fixing adds, not the AP50 after it
    drawn = list((tmp_path / "results_analysis").iterdir())
    assert [p.name for p in drawn] == ["001_errors_1.jpg"]
    image = cv2.imread(str(drawn[0]))
    assert image.shape == (300, 300, 3) and (image != 200).any()
    with pytest.raises(ArgumentError, match="results_analysis exists; pass another --out, or --force"):
        main(args)
    results.write_text(json.dumps([det(GT_BOXES[0], 0.9, cat=7)]))
    with pytest.raises(DataError, match="entry 0 has image_id 1 / category_id 7"):
        main(get_args_parser().parse_args([str(results), "--data_dir", str(data), "--split", "val", "--out",
                                           str(tmp_path / "x")]))
    for image_id in ([1], {"id": 1}, True):  # a list or dict would be a TypeError of the set lookup
        results.write_text(json.dumps([{**FIRST, "image_id": image_id}]))
        with pytest.raises(DataError, match=r"entry 0 has image_id .* not in the split's annotations"):
            main(get_args_parser().parse_args([str(results), "--data_dir", str(data), "--split", "val", "--out",
                                               str(tmp_path / "x")]))
    # what pycocotools would fail on with a TypeError or ValueError, far from the entry
    for box, score in [([1, 2, "3", 4], 0.9), ([1, 2, 3], 0.9), ([1, 2, -3, 4], 0.9), ([1, 2, 3, -4], 0.9),
                       (GT_BOXES[0], "high"), (GT_BOXES[0], None), ([1, 2, 3, float("nan")], 0.9)]:
        results.write_text(json.dumps([FIRST, det(box, score)]))
        with pytest.raises(DataError, match=r"entry 1 has bbox .* expected \[x, y, width, height\]"):
            main(get_args_parser().parse_args([str(results), "--data_dir", str(data), "--split", "val", "--out",
                                               str(tmp_path / "x")]))


def test_images_of_one_stem_in_other_folders_each_get_their_drawing(tmp_path, capsys):
    # cam1/1.jpg, cam2/1.jpg and 1.png, each with one missed box: all three drawings were named 001_errors_1.jpg,
    # and two of them overwrote each other while the tool said three were drawn.
    data = data_dir(tmp_path)
    files = ["cam1/1.jpg", "cam2/1.jpg", "1.png"]
    for name in files:
        (data / "val" / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(data / "val" / name), np.full((300, 300, 3), 200, np.uint8))
    gt = {"images": [{"id": i + 1, "file_name": name, "width": 300, "height": 300} for i, name in enumerate(files)],
          "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": GT_BOXES[0], "area": 9000,
                           "iscrowd": 0} for i in range(3)], "categories": CATS}
    (data / "annotations" / "instances_val.json").write_text(json.dumps(gt))
    results = tmp_path / "results.json"
    results.write_text("[]")
    main(get_args_parser().parse_args([str(results), "--data_dir", str(data), "--split", "val"]))
    assert capsys.readouterr().out.splitlines()[-1].startswith("3 images with the most errors drawn")
    assert sorted(p.name for p in (tmp_path / "results_analysis").iterdir()) == \
        ["001_errors_1_id1.jpg", "001_errors_1_id2.jpg", "001_errors_1_id3.jpg"]


def test_cli_explains_a_split_without_annotations_and_an_empty_drawing(tmp_path, capsys):
    data = data_dir(tmp_path)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([det(GT_BOXES[0], 0.9), det(GT_BOXES[1], 0.8)]))  # both true boxes, found
    args = get_args_parser().parse_args([str(results), "--data_dir", str(data), "--split", "val"])
    for gt in ({k: v for k, v in ground_truth().items() if k != "annotations"}, {**ground_truth(), "annotations": []}):
        (data / "annotations" / "instances_val.json").write_text(json.dumps(gt))
        with pytest.raises(DataError, match="has no ground-truth boxes .'annotations' missing or empty."):
            main(args)
    (data / "annotations" / "instances_val.json").write_text(json.dumps(ground_truth()))
    main(args)
    assert capsys.readouterr().out.splitlines()[-1] == \
        "no image drawn: no missed box and no wrong detection scoring at least --score_thresh 0.3"
    assert not (tmp_path / "results_analysis").exists()  # it was created, empty


def split_and_results(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """The val split of ground_truth() and, at tmp_path / name, the background case's detections."""
    data = data_dir(tmp_path)
    (data / "annotations" / "instances_val.json").write_text(json.dumps(ground_truth()))
    results = tmp_path / name
    results.write_text(json.dumps(CASES["background"][0]))
    return data, results


def analyze(path: Path, data: Path, *extra: str) -> dict:
    return main(get_args_parser().parse_args([str(path), "--data_dir", str(data), "--split", "val", *extra]))


def test_cli_reads_the_metrics_json_of_test_py_as_well(tmp_path, capsys):
    data, results = split_and_results(tmp_path, "results_val.json")
    metrics = tmp_path / "results_val_metrics.json"
    values = {**{name: 0.25 for name in METRIC_NAMES}, "APs": -1, **{name: 12.5 for name in FD_NAMES}, "FD_S": None}
    metrics.write_text(json.dumps(values))

    def run(path, *extra):
        return analyze(path, data, *extra)

    assert run(metrics)["background"][0] == 1  # the results json beside it, analysed
    out = capsys.readouterr().out
    assert "AP 0.250 AP50 0.250" in out and "APs -1.000" in out and "FD 12.5" in out and "FD_S n/a" in out
    assert f"AP50 {ONE_FP_BETWEEN:.4f}" in out and (tmp_path / "results_val_analysis").is_dir()  # results' folder
    assert run(results, "--out", str(tmp_path / "b"))["background"][0] == 1 and "FD" not in capsys.readouterr().out
    with pytest.raises(ArgumentError, match="results_val_analysis exists; pass another --out, or --force"):
        run(metrics)
    assert capsys.readouterr().out == ""  # a refused command prints its error alone, not the metrics first
    other = tmp_path / "other.json"
    for content in ({"AP": 0.5}, "text"):
        other.write_text(json.dumps(content))
        with pytest.raises(DataError, match="neither a COCO results json .a list of detections. nor test.py's "
                                            "metrics json"):
            run(other)
    other.write_text(json.dumps(values))
    with pytest.raises(ArgumentError, match="not named <results>_metrics.json"):
        run(other)
    results.unlink()
    with pytest.raises(MissingFileError, match="its results json .*results_val.json is missing"):
        run(metrics, "--out", str(tmp_path / "c"))


def test_force_replaces_an_earlier_analysis_and_nothing_else(tmp_path, capsys):
    data, results = split_and_results(tmp_path, "results.json")
    out = tmp_path / "results_analysis"

    def run(*extra):
        return analyze(results, data, *extra)

    run()
    (out / "002_errors_old.jpg").write_bytes(b"a drawing of an earlier analysis")
    assert run("--force")["background"][0] == 1
    assert [p.name for p in out.iterdir()] == ["001_errors_1.jpg"]  # the earlier drawings gone, the new one there
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArgumentError, match="results_analysis exists and holds notes.txt, which this tool does not "
                                            "write"):
        run("--force")
    assert sorted(p.name for p in out.iterdir()) == ["001_errors_1.jpg", "notes.txt"]
    with pytest.raises(ArgumentError, match="results.json exists and is the results json, not an earlier analysis"):
        run("--out", str(results), "--force")
    with pytest.raises(ArgumentError, match="instances_val.json exists and is a file, not an earlier analysis"):
        run("--out", str(data / "annotations" / "instances_val.json"), "--force")
    with pytest.raises(ArgumentError, match="holds 1.jpg, which this tool does not write"):
        run("--out", str(data / "val"), "--force")  # the images
    assert json.loads(results.read_text()) == CASES["background"][0] and (data / "val" / "1.jpg").is_file()


def test_an_analysis_that_fails_leaves_the_earlier_one_as_it_was(tmp_path):
    """--force removed the earlier drawings before drawing: an image gone, or a box OpenCV refused (1e308), left
    the folder empty. Now the drawings are made first, and far-off boxes drawn at the image's edge."""
    data, results = split_and_results(tmp_path, "results.json")
    out = tmp_path / "results_analysis"
    analyze(results, data)
    earlier = (out / "001_errors_1.jpg").read_bytes()
    image = (data / "val" / "1.jpg").read_bytes()
    (data / "val" / "1.jpg").unlink()
    with pytest.raises(MissingFileError, match="1.jpg"):
        analyze(results, data, "--force")
    assert [p.name for p in out.iterdir()] == ["001_errors_1.jpg"]
    assert (out / "001_errors_1.jpg").read_bytes() == earlier
    (data / "val" / "1.jpg").write_bytes(image)
    results.write_text(json.dumps([*CASES["background"][0], det([1e308, 5, 10, 10], 0.95)]))
    assert analyze(results, data, "--force")["background"][0] == 2
    assert [p.name for p in out.iterdir()] == ["002_errors_1.jpg"]  # two errors now; the earlier drawing replaced
    assert cv2.imread(str(out / "002_errors_1.jpg")).shape == (300, 300, 3)


def test_json_that_python_cannot_hold_is_a_data_error(tmp_path):
    """Each was a traceback: RecursionError (deep nesting), OverflowError (an integer score beyond a float),
    ValueError in formatting the metrics ("AP": "x")."""
    data, results = split_and_results(tmp_path, "results.json")
    cases = [(results, "[" * 100_000 + "]" * 100_000, "nested too deeply"),
             (results, json.dumps([det(GT_BOXES[0], 10**400)]), r"entry 0 has bbox .* and score 1000"),
             (results, json.dumps([det([1, 2, 3, 10**400], 0.5)]), r"entry 0 has bbox \[1, 2, 3, 1000")]
    values = {**{name: 0.25 for name in METRIC_NAMES}, **{name: 12.5 for name in FD_NAMES}}
    metrics = tmp_path / "results_metrics.json"
    cases += [(metrics, json.dumps({**values, "AP": "x"}), "AP is 'x', where test.py's metrics json holds a number$"),
              (metrics, json.dumps({**values, "FD": [1]}), r"FD is \[1\], where .* holds a number or null")]
    for path, text, message in cases:
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            analyze(path, data)
        results.write_text(json.dumps(CASES["background"][0]))
    assert not (tmp_path / "results_analysis").exists()


def test_num_images_must_not_be_negative(tmp_path, capsys):
    data, results = split_and_results(tmp_path, "results.json")
    with pytest.raises(ArgumentError, match="--num_images: expected a whole number of at least 0, got -1"):
        analyze(results, data, "--num_images", "-1")
    assert not (tmp_path / "results_analysis").exists()
    analyze(results, data, "--num_images", "0")
    assert not (tmp_path / "results_analysis").exists()  # it was created, empty
    # the background error is there: the message gives the flag as the reason, not "no wrong detection"
    assert capsys.readouterr().out.splitlines()[-1] == "no image drawn: --num_images 0"


def test_the_command_line_ends_a_mistake_in_one_error_line(tmp_path):
    data = data_dir(tmp_path)
    (data / "annotations" / "instances_val.json").write_text(json.dumps(ground_truth()))
    missing = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "analyze.py"), str(missing), "--data_dir", str(data),
                           "--split", "val"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: {missing}: cannot read the json (No such file or directory)"]


def test_a_drawing_the_disk_refuses_is_an_error_not_a_silent_gap(tmp_path):
    """Files limited to 1 KiB (RLIMIT_FSIZE, as a full disk refuses a write): cv2.imwrite's False was ignored and
    the drawing silently missing; now the run ends in one error line naming it, and no part-written file is left."""
    data = data_dir(tmp_path)
    (data / "annotations" / "instances_val.json").write_text(json.dumps(ground_truth()))
    results = tmp_path / "results.json"
    results.write_text(json.dumps(CASES["background"][0]))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "analyze.py"), str(results), "--data_dir", str(data),
                           "--split", "val"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size)
    drawing = tmp_path / "results_analysis" / "001_errors_1.jpg"
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"error: cannot write {drawing}"), proc.stderr
    assert not any((tmp_path / "results_analysis").iterdir())
