"""COCO box evaluation: detections in original-image pixels -> COCO results json -> pycocotools COCOeval.

`evaluate_detections` prints the standard 12-line table and a per-class AP table and returns the numbers. An empty
detection set scores AP 0 instead of failing inside pycocotools. Metrics with no ground truth in their area range
are -1, as pycocotools reports them. Beside the results json go the per-class table (CSV), the precision-recall
curves (PNG) and the metrics json (`metrics_path`): the 12 COCO numbers as COCOeval gives them (fractions, -1 where
no ground truth), then the paper's false discovery rates (datasets/false_discovery.py: percent, null where
undefined), named as in ALL_METRIC_NAMES. A split without annotations (COCO test-dev: images and categories only)
is not scored: its results json is written under the name the COCO evaluation server expects
(`server_results_name`).

test.py names its results after everything that makes them differ (`results_path`): the split, the model file,
the test scales and flip, and a short hash of any non-default post-processing settings; it never replaces earlier
results without --force (`check_results_free`), and replacing them removes their stale `<stem>_analysis/` folder.

Backends: "pycocotools" (the default), or "faster" (faster-coco-eval, the same algorithm in C++: its 12 numbers
and precision arrays equal pycocotools' on tests/test_coco_report.py's data to 1e-15).
"""
import contextlib
import hashlib
import importlib
import io
import json
import re
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_report import mean_valid, pr_figure, per_class_table, table_csv
from datasets.false_discovery import FD_NAMES, false_discovery_rates, format_rates
from utils.errors import ArgumentError, UserError
from utils.files import atomic_write, write_json

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
ALL_METRIC_NAMES = METRIC_NAMES + FD_NAMES  # the metrics json's keys, in this order
BACKENDS = ("pycocotools", "faster")


def detections_to_coco(detections: dict[int, np.ndarray], cat_ids: list[int]) -> list[dict]:
    """{image_id: (M, 6) x1 y1 x2 y2 score label} -> COCO result entries (original category id, bbox x y w h)."""
    results = []
    for image_id, dets in detections.items():
        dets = np.asarray(dets).reshape(-1, 6)
        labels = dets[:, 5].astype(np.int64)
        outside = labels[(labels < 0) | (labels >= len(cat_ids))]
        if outside.size:
            raise ValueError(f"detections of image {image_id}: label {outside[0]} outside 0..{len(cat_ids) - 1}")
        results += coco_entries(image_id, dets[:, :4], dets[:, 4], np.asarray(cat_ids, np.int64)[labels])
    return results


def coco_entries(image_id: int, boxes: np.ndarray, scores: np.ndarray, category_ids: np.ndarray) -> list[dict]:
    """(M, 4) x1 y1 x2 y2, (M,) scores and (M,) data set category ids of one image -> COCO result entries: bbox
    x y w h in pixels, 2 decimals (widths subtracted in float64, so any caller writes the same numbers)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2).tolist()
    return [{"image_id": int(image_id), "category_id": int(c), "bbox": box, "score": float(s)}
            for box, s, c in zip(xywh, np.asarray(scores, np.float64).tolist(), np.asarray(category_ids).tolist())]


def server_results_name(split: str, alg: str) -> str:
    """The COCO evaluation server's file name, detections_<split>_<alg>_results.json; `alg` keeps letters, digits
    and hyphens (underscores separate the fields)."""
    alg = re.sub(r"[^A-Za-z0-9-]+", "-", alg).strip("-") or "centernet47"
    return f"detections_{split}_{alg}_results.json"


def settings_hash(settings: dict) -> str:
    """8 hex digits that identify `settings` (json-able values); the same for the same values in any order."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def results_path(model: Path, split: str, scales: list[float], flip: bool, onnx: bool, settings: dict,
                 server: bool) -> Path:
    """Where test.py writes the results of the checkpoint or .onnx file `model` on `split`: beside `model`, as
    results_<split>_<model stem>[_onnx]_s<scales>[_flip][_<settings hash>].json, the hash only when `settings` (the
    post-processing settings that differ from the official ones, --amp, and the data folder when it is not the one
    the checkpoint trained on, {name: value}) is not empty. A split without annotations (`server`) gets the COCO
    server's name with the run folder, stem, scales, flip and hash in it."""
    tag = [model.stem] + (["onnx"] if onnx else [])
    extra = (["flip"] if flip else []) + ([settings_hash(settings)] if settings else [])
    if server:  # the server reads the algorithm name from the file name: letters, digits and hyphens
        # Scales in percent, as precise as in the other names (0.625 -> 62p5: rounded, it was 0.62's name).
        percents = (f"{s * 100:g}".replace(".", "p") for s in scales)
        alg = [model.parent.name, *tag, "s" + "-".join(percents), *extra]
        return model.parent / server_results_name(split, "-".join(alg))
    name = "_".join([f"results_{split}", *tag, "s" + "_".join(f"{s:g}" for s in scales), *extra])
    return model.parent / f"{name}.json"


def metrics_path(out_json: Path) -> Path:
    """The metrics json of the results json `out_json`: x.json -> x_metrics.json."""
    return out_json.with_name(out_json.stem + "_metrics.json")


def results_of_metrics(path: Path) -> Path | None:
    """The results json that the metrics json `path` describes: x_metrics.json -> x.json; None for another name."""
    return path.with_name(path.name[:-len("_metrics.json")] + ".json") if path.name.endswith("_metrics.json") else None


def companion_files(out_json: Path) -> list[Path]:
    """The files `evaluate_detections` writes for `out_json`: the json, its per-class CSV, its PR plot and its
    metrics json."""
    return [out_json] + [out_json.with_name(out_json.stem + end) for end in ("_per_class.csv", "_pr.png")] + \
        [metrics_path(out_json)]


def write_results(out_json: Path, results: list[dict]) -> None:
    """Writes the results json `out_json`, first removing what described the results it replaces (per-class CSV,
    plot, metrics json, analysis drawings), so that no interruption leaves new results beside old numbers."""
    remove_earlier_analysis(out_json)
    for stale in companion_files(out_json)[1:]:
        stale.unlink(missing_ok=True)
    write_json(out_json, results)


def remove_earlier_analysis(out_json: Path) -> None:
    """Removes tools/analyze.py's drawings of the results at `out_json` from their analysis folder, and the folder
    once empty; what else a user keeps there stays, and a folder that is a link stays a link."""
    folder = analysis_folder(out_json)
    if not folder.is_dir():
        return
    drawings = [p for p in folder.iterdir() if ANALYSIS_DRAWING.fullmatch(p.name) and p.is_file()
                and not p.is_symlink()]
    for p in drawings:
        p.unlink()
    kept = sorted(p.name for p in folder.iterdir())
    if kept or folder.is_symlink():
        print(f"removed the {len(drawings)} drawings in {folder}: they analysed the results that were replaced"
              + (f" (kept {', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''})" if kept else ""))
    else:
        folder.rmdir()
        print(f"removed {folder}: it analysed the results that were replaced")


def write_metrics(out_json: Path, stats: dict) -> None:
    """Writes the ALL_METRIC_NAMES entries of `stats` to `metrics_path(out_json)`; NaN (undefined) as null."""
    write_json(metrics_path(out_json), {name: None if np.isnan(stats[name]) else stats[name]
                                        for name in ALL_METRIC_NAMES})


ANALYSIS_DRAWING = re.compile(r"\d{3,}_errors_.+\.jpg")  # the names tools/analyze.py gives its drawings


def analysis_folder(out_json: Path) -> Path:
    """tools/analyze.py's default output folder for the results json `out_json`."""
    return out_json.with_name(out_json.stem + "_analysis")


def check_results_free(out_json: Path, force: bool) -> None:
    """Refuses (UserError) to replace earlier results at `out_json` (json, CSV, plot or analysis) without `force`."""
    held = [p.name for p in companion_files(out_json) + [analysis_folder(out_json)] if p.exists()]
    if held and not force:
        raise UserError(f"{out_json.parent} already holds {', '.join(held)} (results of this model with these "
                        "settings); pass --force to replace them, or evaluate a copy of the model under another name")


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
    return np.array([mean_valid(precision[:, :, k]) for k in range(precision.shape[2])])


def check_backend(backend: str) -> None:
    """Refuses (ArgumentError) a `backend` that cannot run here, for a caller to ask before the detections that it
    would score: faster-coco-eval is imported only when asked for, after them."""
    if backend == "faster":
        try:
            importlib.import_module("faster_coco_eval")
        except ImportError as e:
            raise ArgumentError(f"--eval_backend faster: faster-coco-eval cannot be imported ({e}); install it "
                                "(requirements.txt), or leave the flag out to score with pycocotools") from None


def new_cocoeval(coco: COCO, results: COCO, cat_ids: list[int], backend: str = "pycocotools"):
    """A box COCOeval of `backend` on `results` against `coco`, restricted to `cat_ids`, not yet evaluated."""
    if backend == "pycocotools":
        coco_eval = COCOeval(coco, results, "bbox")
    elif backend == "faster":
        from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster  # only when asked for

        coco_eval = COCOeval_faster(FasterCOCO(coco.dataset), FasterCOCO(results.dataset), "bbox",
                                    print_function=print)
    else:
        raise ValueError(f"unknown evaluation backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    coco_eval.params.catIds = list(cat_ids)
    return coco_eval


def run_cocoeval(coco: COCO, results: COCO, cat_ids: list[int], backend: str = "pycocotools"):
    """A finished box evaluation (its `stats` and `eval` arrays as pycocotools has them); prints the 12-line table."""
    coco_eval = new_cocoeval(coco, results, cat_ids, backend)
    table = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.redirect_stdout(table):
        coco_eval.summarize()
    # faster-coco-eval adds AR at IoU 0.50 and 0.75 after pycocotools' 12 lines.
    print("\n".join([line for line in table.getvalue().splitlines() if " @[ " in line][:len(METRIC_NAMES)]))
    return coco_eval


def evaluate_detections(coco: COCO, detections: dict[int, np.ndarray], cat_ids: list[int], class_names: list[str],
                        out_json: str | Path | None = None, backend: str = "pycocotools") -> dict:
    """Scores `detections` ({image_id: (M, 6) x1 y1 x2 y2 score label}, original pixels, contiguous labels) against
    `coco` over all its images (an image without an entry has no detections).

    Prints the 12-line COCO table and a per-class AP table; when `out_json` is given, also the paper's false
    discovery rates between the two (a second COCOeval, datasets/false_discovery.py), and writes there the COCO
    results json and beside it `<stem>_per_class.csv`, `<stem>_pr.png` and `<stem>_metrics.json`. Returns {"AP",
    "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl": float, "per_class": {class
    name: AP}}, plus FD_NAMES (percent, NaN where undefined) when `out_json` is given. Without ground truth (no
    'annotations' in `coco`), only writes `out_json`, says where AP comes from and returns {}; with an empty
    'annotations' list, only writes `out_json` (and its metrics json), says there is nothing to evaluate and
    returns every metric as -1 (pycocotools' value for no ground truth; a training run's validation logs it), FD
    as NaN. No detection at all is scored (AP 0, FD 100) with a warning saying so.
    """
    unknown = set(int(i) for i in detections) - set(coco.getImgIds())
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth: {sorted(unknown)[:10]}")
    results = detections_to_coco(detections, cat_ids)
    if "annotations" not in coco.dataset:
        if out_json is None:
            raise ValueError("this split has no annotations to score against and no results file was asked for")
        write_results(Path(out_json), results)
        print(f"no annotations in this split (such as COCO test-dev): {len(results)} detections of "
              f"{len(coco.getImgIds())} images written to {out_json}; AP comes from the COCO evaluation server "
              "(zip the json and upload it)")
        return {}
    if not coco.dataset["annotations"]:
        stats = {**dict.fromkeys(METRIC_NAMES, -1.0), "per_class": dict.fromkeys(class_names, -1.0)}
        if out_json is not None:
            write_results(Path(out_json), results)
            stats.update(dict.fromkeys(FD_NAMES, float("nan")))
            write_metrics(Path(out_json), stats)
        print(f"nothing to evaluate: this split's 'annotations' list is empty (no ground-truth box); {len(results)} "
              f"detections of {len(coco.getImgIds())} images" + (f" written to {out_json}" if out_json else ""))
        return stats
    if not results:
        print(f"warning: the model detected nothing in {len(coco.getImgIds())} images (AP 0 below): an untrained or "
              "diverged checkpoint, or images unlike its training data?")
    if out_json is not None:
        out_json = Path(out_json)
        write_results(out_json, results)

    results_coco = load_results(coco, results)
    coco_eval = run_cocoeval(coco, results_coco, cat_ids, backend)
    stats = {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}
    if out_json is not None:
        stats.update(false_discovery_rates(new_cocoeval(coco, results_coco, cat_ids, backend)))
        print(format_rates(stats))

    aps = per_class_ap(coco_eval)
    width = max([len(n) for n in class_names] + [5])
    print(f"{'class':<{width}}  AP")
    for name, ap in zip(class_names, aps):
        print(f"{name:<{width}}  {ap:.3f}" if ap >= 0 else f"{name:<{width}}  -")
    stats["per_class"] = {name: float(ap) for name, ap in zip(class_names, aps)}
    if out_json is not None:
        gt_counts = [len(coco.getAnnIds(catIds=[c], iscrowd=False)) for c in cat_ids]
        csv = table_csv(per_class_table(coco_eval, class_names, cat_ids, gt_counts))
        atomic_write(companion_files(out_json)[1], lambda f: f.write(csv))
        try:
            png = pr_figure(coco_eval, class_names, out_json.stem)
        except ModuleNotFoundError as e:  # matplotlib is in requirements.txt, but `make gpu-check PY=...` may lack it
            print(f"no precision-recall plot: {e}")
        else:
            atomic_write(companion_files(out_json)[2], lambda f: f.write(png))
        write_metrics(out_json, stats)
    return stats
