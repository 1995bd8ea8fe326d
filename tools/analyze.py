"""Where the AP goes: an error breakdown of a results json with the AP50 each kind of error costs, and drawings of
the images with the most errors.

    python tools/analyze.py ckpt/NAME/results_val2017_checkpoint_s1_flip.json --data_dir data/coco --split val2017

It reads a results json or test.py's metrics json beside one (results_..._metrics.json, told apart by content): for
the latter it prints its 19 numbers first, then analyses the results json it was written for.

Every detection that pycocotools does not match to a ground-truth box at IoU 0.5 (same class, best score first,
the top 100 per image and class) is one error, by its IoU with the ground truth of its image (TIDE's definitions,
foreground IoU 0.5, background IoU 0.1):
  duplicate       IoU >= 0.5 with a box of its class that a better detection already matched
  classification  IoU >= 0.5 with a box of another class
  localisation    0.1 <= IoU < 0.5 with a box of its class
  background      anything else (including IoU 0.1..0.5 with another class only)
A ground-truth box is missed when nothing matched it and no classification or localisation error points at it.
"AP50 gained if fixed" is what AP50 gains when pycocotools' COCOeval is re-run with that one kind fixed:
classification and localisation errors get the class / the box of their ground truth (or are removed when that box
is already matched), duplicates and background detections are removed, missed boxes are removed from the ground
truth.
"""
import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from datasets.annotations import check_coco_dict, coco_from_dict, is_box, is_finite_number, read_json
from datasets.coco import split_files
from datasets.coco_eval import (ALL_METRIC_NAMES, ANALYSIS_DRAWING, FD_NAMES, METRIC_NAMES, analysis_folder,
                                 load_results, results_of_metrics)
from datasets.image_io import load_image
from utils.checks import check_non_negative_int, check_number, is_id
from utils.errors import ArgumentError, DataError, MissingFileError, run_cli
from utils.files import atomic_write, make_folder, same_file

FG_IOU, BG_IOU = 0.5, 0.1
KINDS = ("classification", "localisation", "duplicate", "background", "missed")
COLORS = {"match": (255, 160, 0), "ground truth": (0, 200, 0), "missed": (0, 200, 0), "classification": (0, 0, 255),
          "localisation": (0, 140, 255), "duplicate": (255, 0, 255), "background": (0, 0, 160)}  # BGR


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="COCO results json (test.py writes it beside the checkpoint), or its "
                   "<results>_metrics.json")
    p.add_argument("--data_dir", default="data/coco")
    p.add_argument("--split", default="val2017")
    p.add_argument("--num_images", type=int, default=8, help="worst images to draw (0: none)")
    p.add_argument("--score_thresh", type=float, default=0.3, help="detections drawn and counted per image")
    p.add_argument("--out", help="folder for the drawings (default: beside the results, <stem>_analysis); new, "
                   "unless --force")
    p.add_argument("--force", action="store_true", help="replace an earlier analysis in --out (never other files)")
    return p


def ap50(gt: dict, results: list[dict]) -> tuple[float, COCOeval]:
    """AP at IoU 0.5 (all areas, 100 detections), pycocotools' matching; -1 classes left out of the mean."""
    coco = coco_from_dict(gt)
    e = COCOeval(coco, load_results(coco, results), "bbox")
    e.params.iouThrs = np.array([FG_IOU])
    e.params.areaRng, e.params.areaRngLbl, e.params.maxDets = [[0, 1e10]], ["all"], [100]
    with contextlib.redirect_stdout(io.StringIO()):
        e.evaluate()
        e.accumulate()
    precision = e.eval["precision"][0, :, :, 0, 0]  # (R, K)
    valid = precision[:, (precision > -1).all(axis=0)]
    return (float(valid.mean()) if valid.size else 0.0), e


def classify_errors(gt: dict, e: COCOeval) -> tuple[dict, dict]:
    """({result index: (kind, target ground-truth id or None)} for unmatched detections,
    {ground-truth id: "matched" | "missed" | "target"})."""
    gt_by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        if not a["iscrowd"]:
            gt_by_image.setdefault(a["image_id"], []).append(a)
    matched = {g for ev in e.evalImgs if ev for g, m in zip(ev["gtIds"], ev["gtMatches"][0]) if m > 0}
    errors = {}
    for ev in (ev for ev in e.evalImgs if ev):
        for j, dt_id in enumerate(ev["dtIds"]):
            if ev["dtMatches"][0, j] > 0 or ev["dtIgnore"][0, j]:
                continue
            det = e.cocoDt.anns[dt_id]
            gts = gt_by_image.get(det["image_id"], [])
            ious = mask_utils.iou([det["bbox"]], [g["bbox"] for g in gts], [0] * len(gts))[0] if gts else np.zeros(0)
            same = np.array([g["category_id"] == det["category_id"] for g in gts], bool)
            best_same = int(np.argmax(np.where(same, ious, -1))) if same.any() else None
            best_other = int(np.argmax(np.where(~same, ious, -1))) if (~same).any() else None
            iou_same = ious[best_same] if best_same is not None else 0.0
            iou_other = ious[best_other] if best_other is not None else 0.0
            if iou_same >= FG_IOU:
                kind = ("duplicate", gts[best_same]["id"])
            elif iou_other >= FG_IOU:
                kind = ("classification", gts[best_other]["id"])
            elif iou_same >= BG_IOU:
                kind = ("localisation", gts[best_same]["id"])
            else:
                kind = ("background", None)
            errors[dt_id - 1] = kind  # load_results numbers the results from 1, in order
    targets = {t for kind, t in errors.values() if kind in ("classification", "localisation")}
    status = {a["id"]: "matched" if a["id"] in matched else "target" if a["id"] in targets else "missed"
              for anns in gt_by_image.values() for a in anns}
    return errors, status


def fixed(kind: str, gt: dict, results: list[dict], errors: dict, status: dict) -> tuple[dict, list[dict]]:
    """The ground truth and results with every error of `kind` fixed (see the module docstring)."""
    if kind == "missed":
        return {**gt, "annotations": [a for a in gt["annotations"] if status.get(a["id"]) != "missed"]}, results
    box_of = {a["id"]: a for a in gt["annotations"]}
    used = {g for g, s in status.items() if s == "matched"}
    out = []
    for i in sorted(range(len(results)), key=lambda i: -results[i]["score"]):
        r = results[i]
        if i not in errors or errors[i][0] != kind:
            out.append(r)
            continue
        target = errors[i][1]
        if kind in ("duplicate", "background") or target in used:
            continue
        used.add(target)
        field = "category_id" if kind == "classification" else "bbox"
        out.append({**r, field: box_of[target][field]})
    return gt, out


def breakdown(gt: dict, results: list[dict]) -> tuple[float, dict[str, tuple[int, float]], dict, dict]:
    """(base AP50, {kind: (count, AP50 gained if fixed)}, errors, ground-truth status) as above."""
    base, e = ap50(gt, results)
    errors, status = classify_errors(gt, e)
    table = {}
    for kind in KINDS:
        count = sum(s == "missed" for s in status.values()) if kind == "missed" else \
            sum(k == kind for k, _ in errors.values())
        table[kind] = (count, ap50(*fixed(kind, gt, results, errors, status))[0] - base if count else 0.0)
    return base, table, errors, status


def pixel(value: float, size: int) -> int:
    """A box coordinate as a pixel of a canvas `size` wide (or high), boxes far outside (1e308) drawn at its edge:
    OpenCV refuses coordinates beyond 32 bits."""
    return int(min(max(value, -1), size + 1))


def draw_worst(gt: dict, results: list[dict], errors: dict, status: dict, img_dir: Path, count: int,
               score_thresh: float) -> list[tuple[str, bytes]]:
    """The `count` images with the most errors (detections above `score_thresh` and missed boxes), drawn: each
    drawing's file name and JPEG bytes, all made before any is written, so that an image that cannot be read
    leaves an earlier analysis as it was."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    per_image: dict[int, list[tuple[list, str, str]]] = {im["id"]: [] for im in gt["images"]}
    bad = dict.fromkeys(per_image, 0)
    for a in gt["annotations"]:
        if not a["iscrowd"]:
            kind = "missed" if status.get(a["id"]) == "missed" else "ground truth"
            per_image[a["image_id"]].append((a["bbox"], kind, f"{kind}: {names[a['category_id']]}"))
            bad[a["image_id"]] += kind == "missed"
    for i, r in enumerate(results):
        if r["score"] >= score_thresh:
            kind = errors[i][0] if i in errors else "match"
            per_image[r["image_id"]].append((r["bbox"], kind, f"{names[r['category_id']]} {r['score']:.2f}"))
            bad[r["image_id"]] += i in errors
    files = {im["id"]: im["file_name"] for im in gt["images"]}
    worst = [image_id for image_id in sorted(bad, key=lambda k: -bad[k])[:count] if bad[image_id]]
    # Images in other folders or of other formats may share a stem (cam1/0001.jpg, cam2/0001.jpg): their
    # drawings add the image id, as one would otherwise overwrite the other.
    stems = [Path(files[image_id]).stem for image_id in worst]
    drawings = []
    for image_id, stem in zip(worst, stems):
        canvas = load_image(img_dir / files[image_id])
        height, width = canvas.shape[:2]
        for (x, y, w, h), kind, text in per_image[image_id]:
            color = COLORS[kind]
            corners = (pixel(x, width), pixel(y, height)), (pixel(x + w, width), pixel(y + h, height))
            cv2.rectangle(canvas, *corners, color, 2 if kind == "missed" else 1)
            label = text if kind in ("match", "ground truth") else f"{kind}: {text}"
            cv2.putText(canvas, label, (corners[0][0] + 2, corners[0][1] + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        color, 1)
        encoded, data = cv2.imencode(".jpg", canvas)
        if not encoded:  # JPEG holds at most 65535 pixels a side
            raise DataError(f"{img_dir / files[image_id]}: OpenCV cannot encode its drawing as JPEG")
        name = stem if stems.count(stem) == 1 else f"{stem}_id{image_id}"
        drawings.append((f"{bad[image_id]:03d}_errors_{name}.jpg", data.tobytes()))
    return drawings


def write_drawings(out: Path, drawings: list[tuple[str, bytes]], stale: list[Path]) -> list[Path]:
    """Writes `drawings` into `out`, then removes the `stale` ones of an earlier analysis that none replaced. With
    nothing to draw (--num_images 0, or no error to show), `out` is not created."""
    if drawings:
        make_folder(out, "--out")
    written = []
    for name, data in drawings:
        written.append(out / name)
        atomic_write(written[-1], lambda f, data=data: f.write(data))
    for p in stale:
        if p not in written:
            p.unlink()
    return written


def read_json_file(path: Path):
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise MissingFileError(f"{path}: cannot read the json ({e.strerror})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the json ({e.strerror or e})") from None
    except ValueError as e:  # not json, or not UTF-8 text
        raise DataError(f"{path}: cannot read the json ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: cannot read the json (nested too deeply)") from None


def read_input(path: Path) -> tuple[Path, object, dict | None]:
    """(results json path, its content, the metrics or None) for `path`: a results json (a list), or test.py's
    metrics json (a dict of ALL_METRIC_NAMES), which leads to the results json it was written for."""
    content = read_json_file(path)
    if isinstance(content, list):
        return path, content, None
    if not (isinstance(content, dict) and set(ALL_METRIC_NAMES) <= set(content)):
        raise DataError(f"{path} is neither a COCO results json (a list of detections) nor test.py's metrics json "
                        f"(an object of {', '.join(ALL_METRIC_NAMES)})")
    wrong = next((name for name in ALL_METRIC_NAMES if not (is_finite_number(content[name]) or
                                                            (name in FD_NAMES and content[name] is None))), None)
    if wrong:
        raise DataError(f"{path}: {wrong} is {content[wrong]!r}, where test.py's metrics json holds a number"
                        + (" or null" if wrong in FD_NAMES else ""))
    results_path = results_of_metrics(path)
    if results_path is None:
        raise ArgumentError(f"{path} holds test.py's metrics but is not named <results>_metrics.json: give the "
                            "results json it was written for instead")
    if not results_path.is_file():
        raise MissingFileError(f"{path} holds test.py's metrics, but its results json {results_path} is missing")
    return results_path, read_json_file(results_path), content


def format_metrics(metrics: dict) -> str:
    """The metrics json's numbers on two lines: COCO's fractions (-1: no ground truth), FD in percent."""
    coco = " ".join(f"{name} {metrics[name]:.3f}" for name in METRIC_NAMES)
    fd = " ".join(f"{name} " + ("n/a" if metrics[name] is None else f"{metrics[name]:.1f}") for name in FD_NAMES)
    return f"{coco}\n{fd} (percent)"


def check_results(results, path: Path, gt: dict) -> list[dict]:
    images, cats = {im["id"] for im in gt["images"]}, {c["id"] for c in gt["categories"]}
    for i, r in enumerate(results if isinstance(results, list) else [None]):
        if not isinstance(r, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise DataError(f"{path}: entry {i} is not {{image_id, category_id, bbox, score}}")
        box, score = r["bbox"], r["score"]
        if not is_box(box) or box[2] < 0 or box[3] < 0 or not is_finite_number(score):
            raise DataError(f"{path}: entry {i} has bbox {box!r} and score {score!r}; expected [x, y, width, height] "
                            "(4 finite numbers, width and height at least 0) and a finite number")
        if not (is_id(r["image_id"]) and is_id(r["category_id"])) or r["image_id"] not in images \
                or r["category_id"] not in cats:
            raise DataError(f"{path}: entry {i} has image_id {r['image_id']} / category_id {r['category_id']}, "
                            "not in the split's annotations (another --split?)")
    return results


def earlier_drawings(out: Path, results_path: Path, force: bool) -> list[Path]:
    """The drawings of an earlier analysis in `out` that --force replaces (none when `out` does not exist). Refuses
    an existing `out` without --force, and with it anything but a folder of this tool's drawings (a file, the
    results, a folder of other files), which no flag replaces."""
    if not out.exists():
        return []
    if not out.is_dir():
        what = "the results json" if same_file(out, results_path) else "a file"
        raise ArgumentError(f"{out} exists and is {what}, not an earlier analysis folder; pass another --out")
    others = sorted(p.name for p in out.iterdir() if not (p.is_file() and ANALYSIS_DRAWING.fullmatch(p.name)))
    if others:
        raise ArgumentError(f"{out} exists and holds {others[0]}, which this tool does not write (not an earlier "
                            "analysis folder); pass another --out")
    if not force:
        raise ArgumentError(f"{out} exists; pass another --out, or --force to replace the earlier analysis")
    return sorted(out.iterdir())


def main(args: argparse.Namespace) -> dict[str, tuple[int, float]]:
    check_number("--score_thresh", args.score_thresh, 0, 1)
    check_non_negative_int("--num_images", args.num_images)  # a negative slice end would draw all but the last images
    ann_file, img_dir = split_files(Path(args.data_dir), args.split)
    data = read_json(ann_file)
    if not data.get("annotations"):  # missing (a test-dev split) or empty
        raise DataError(f"{ann_file} has no ground-truth boxes ('annotations' missing or empty): the errors of a "
                        f"results json can only be analysed on a split with annotations")
    gt = check_coco_dict(data, ann_file)
    results_path, results, metrics = read_input(Path(args.results))
    results = check_results(results, results_path, gt)
    out = Path(args.out) if args.out else analysis_folder(results_path)
    stale = earlier_drawings(out, results_path, args.force)
    if metrics is not None:  # only now: a refused command prints its error line alone
        print(f"{args.results}:\n{format_metrics(metrics)}")
    base, table, errors, status = breakdown(gt, results)
    print(f"{results_path}: {len(results)} detections, {len(status)} ground-truth boxes; AP50 {base:.4f}")
    print(f"{'error':<15} {'count':>7}  AP50 gained if fixed")
    for kind, (count, gain) in table.items():
        print(f"{kind:<15} {count:>7}  {gain:+.4f}")
    drawings = draw_worst(gt, results, errors, status, img_dir, args.num_images, args.score_thresh)
    drawn = write_drawings(out, drawings, stale)  # only now: a failure above keeps the earlier analysis
    if drawn:
        print(f"{len(drawn)} images with the most errors drawn in {out}")
    elif args.num_images == 0:
        print("no image drawn: --num_images 0")
    else:
        print(f"no image drawn: no missed box and no wrong detection scoring at least --score_thresh "
              f"{args.score_thresh}" + (" (the results hold no detection)" if not results else ""))
    return table


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
