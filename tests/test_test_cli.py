"""test.py end to end: an untrained tiny_hourglass checkpoint evaluated on the raccoon val images (5) on CPU."""
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import ALL_METRIC_NAMES, METRIC_NAMES, metrics_path
from datasets.false_discovery import FD_NAMES
from nets import build_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from datasets.coco_eval import results_path, settings_hash
from tests.test_train import sent_in_first_gather
from utils import dist
from utils.device import amp_dtype
from utils.errors import ArgumentError, DataError, MissingFileError, UserError
from engine.inference import InferenceConfig, changed_settings, official_config

REPO = Path(__file__).resolve().parents[1]
# test.py by path: a plain `import test` could find the standard library's `test` package
_spec = importlib.util.spec_from_file_location("centernet47_test_cli", REPO / "test.py")
test_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cli)
RACCOON = Path(__file__).parent / "data" / "raccoon"
VAL_IDS = {im["id"] for im in json.loads((RACCOON / "annotations" / "instances_val.json").read_text())["images"]}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 1)
    state = {"model": model.state_dict(), "args": {"arch": "tiny_hourglass", "num_classes": 1, "img_size": 127},
             "class_names": ["raccoon"], "epoch": 1}
    save_checkpoint(root / "tiny" / "checkpoint.pt", state)
    return root


def cli_args(ckpt_dir: Path, *extra: str):
    run = [] if "--ckpt" in extra else ["--log_name", "tiny"]
    return test_cli.get_args_parser().parse_args([
        *run, "--ckpt_dir", str(ckpt_dir), "--dataset", "coco", "--data_dir", str(RACCOON),
        "--val_split", "val", "--device", "cpu", "--num_workers", "0", "--topk", "20", *extra])


def read_results(path: Path) -> list[dict]:
    results = json.loads(path.read_text())
    for r in results:
        assert r["image_id"] in VAL_IDS and r["category_id"] == 1
        assert len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0 and 0 <= r["score"] <= 1
    return results


def test_evaluates_and_writes_json(ckpt_dir, capsys):
    args = cli_args(ckpt_dir, "--arch", "tiny_hourglass", "--test_flip", "--test_scales", "0.5,1")
    given = dict(vars(args))
    stats = test_cli.main(args)
    assert vars(args) == given  # the caller's flags as given (test_scales was a list after, arch set), to run again
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in printed and "raccoon" in printed
    out = ckpt_dir / "tiny" / f"results_val_checkpoint_s0.5_1_flip_{settings_hash({'topk': 20})}.json"
    results = read_results(out)
    # the metrics are those of the results file, scored by pycocotools directly
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(RACCOON / "annotations" / "instances_val.json"))
        reference = COCOeval(gt, gt.loadRes(str(out)), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert [stats[k] for k in METRIC_NAMES] == pytest.approx(list(reference.stats), abs=1e-12)
    assert stats["per_class"] == {"raccoon": pytest.approx(stats["AP"], abs=1e-12)}
    # the 19 printed numbers in the metrics json: COCO's as pycocotools gives them, FD (percent) after them
    metrics = json.loads(metrics_path(out).read_text())
    assert list(metrics) == list(ALL_METRIC_NAMES)
    assert [metrics[k] for k in METRIC_NAMES] == pytest.approx(list(reference.stats), abs=1e-12)
    assert all(metrics[k] is None or 0 <= metrics[k] <= 100 for k in FD_NAMES)
    fd_lines = [line for line in printed.splitlines() if "False Discovery" in line]
    assert [line.split("(")[1].split(")")[0] for line in fd_lines] == list(FD_NAMES)
    per_image = {i: sum(r["image_id"] == i for r in results) for i in VAL_IDS}
    assert 0 < max(per_image.values()) <= 100
    assert not list(out.parent.glob("*.tmp"))


def test_a_scoring_backend_that_is_not_installed_is_refused_before_the_detections(ckpt_dir, monkeypatch):
    """Not after them, which took the whole evaluation and left a results json without its metrics."""
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # its import raises ImportError
    before = sorted((ckpt_dir / "tiny").iterdir())
    with pytest.raises(ArgumentError, match=r"^--eval_backend faster: faster-coco-eval cannot be imported"):
        test_cli.main(cli_args(ckpt_dir, "--eval_backend", "faster", "--test_scales", "0.5,1"))
    assert sorted((ckpt_dir / "tiny").iterdir()) == before


def test_errors(ckpt_dir, tmp_path):
    with pytest.raises(MissingFileError, match="checkpoint not found"):
        test_cli.main(cli_args(tmp_path))
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(ArgumentError, match=f"--ckpt {onnx_file} is an ONNX file; pass it as --onnx {onnx_file}$"):
        test_cli.main(cli_args(ckpt_dir, "--ckpt", str(onnx_file)))
    with pytest.raises(ArgumentError, match="--arch small_hourglass does not match"):
        test_cli.main(cli_args(ckpt_dir, "--arch", "small_hourglass"))
    both = cli_args(ckpt_dir, "--ckpt", str(tmp_path / "other.pt"))
    both.log_name = "tiny"  # --ckpt won without a word
    with pytest.raises(ArgumentError, match="both name the checkpoint to evaluate: give one$"):
        test_cli.main(both)
    with pytest.raises(ArgumentError, match="--img_size 511 does not match"):
        test_cli.main(cli_args(ckpt_dir, "--img_size", "511"))
    with pytest.raises(UserError, match="--test_scales"):
        test_cli.main(cli_args(ckpt_dir, "--test_scales", "1,x"))
    for scales in ("1,,2", "1e9", "0", "9"):  # an empty entry was dropped; 1e9 failed in OpenCV once work started
        with pytest.raises(ArgumentError, match=r"--test_scales: expected .*got"):
            test_cli.main(cli_args(ckpt_dir, "--test_scales", scales))
    with pytest.raises(ArgumentError, match="--num_workers: expected a whole number of at least 0, got -1"):
        test_cli.main(cli_args(ckpt_dir, "--num_workers", "-1"))
    other = load_checkpoint(ckpt_dir / "tiny" / "checkpoint.pt")
    other["class_names"] = ["dog"]
    save_checkpoint(tmp_path / "other" / "checkpoint.pt", other)
    with pytest.raises(DataError, match=r"trained on classes \['dog'\]"):
        test_cli.main(cli_args(tmp_path, "--log_name", "other"))


def test_a_log_name_that_is_not_one_folder_name_is_refused(ckpt_dir, tmp_path):
    """As train.py refuses it: `..` or a path read a checkpoint outside --ckpt_dir and wrote the results beside it."""
    save_checkpoint(tmp_path / "checkpoint.pt", load_checkpoint(ckpt_dir / "tiny" / "checkpoint.pt"))
    nested = tmp_path / "ckpt"
    nested.mkdir()
    for log_name in ("..", "../ckpt/..", "a/b"):
        with pytest.raises(ArgumentError, match=r"^--log_name .*: expected a folder name, without path separators"):
            test_cli.main(cli_args(nested, "--log_name", log_name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "ckpt"]


def test_results_names_carry_the_split_model_scales_flip_and_changed_settings():
    model = Path("run") / "epoch_10.pt"
    assert changed_settings(official_config(1), 1, amp=False) == {}
    assert changed_settings(official_config(3), 3, amp=False) == {}  # merging is official with several scales
    assert changed_settings(InferenceConfig(topk=20, merge=True), 1, amp=True) == {"topk": 20, "merge": True,
                                                                                  "amp": True}
    # fp16 keeps the name --amp results had before --amp_dtype; bf16 gives other detections, so another name
    assert changed_settings(official_config(1), 1, amp="fp16") == {"amp": True}
    assert changed_settings(official_config(1), 1, amp="bf16") == {"amp": "bf16"}
    assert results_path(model, "val2017", [1.0], True, False, {}, False) == \
        Path("run") / "results_val2017_epoch_10_s1_flip.json"
    assert results_path(model, "val", [0.5, 1.0], False, True, {"topk": 20}, False).name == \
        f"results_val_epoch_10_onnx_s0.5_1_{settings_hash({'topk': 20})}.json"
    assert settings_hash({"topk": 20, "amp": True}) == settings_hash({"amp": True, "topk": 20}) != \
        settings_hash({"topk": 21, "amp": True})
    assert results_path(model, "test-dev2017", [0.5, 1.0], True, False, {}, True).name == \
        "detections_test-dev2017_run-epoch-10-s50-100-flip_results.json"
    # Scales that differ get names that differ, in the server's name too (it rounded to whole percents).
    for split, server in (("val2017", False), ("test-dev2017", True)):
        names = {results_path(model, split, scales, True, False, {}, server).name
                 for scales in ([0.62, 1.0], [0.625, 1.0], [0.63, 1.0], [1.0], [1.004], [0.6, 1.2, 1.8])}
        assert len(names) == 6
    assert results_path(model, "test-dev2017", [0.625, 1.0, 1.8], False, False, {}, True).name == \
        "detections_test-dev2017_run-epoch-10-s62p5-100-180_results.json"


def test_amp_dtype_reaches_cuda_autocast_and_is_one_setting_on_the_cpu():
    """test.py --amp was always fp16 autocast on CUDA, where train.py --amp_dtype bf16 trains (and validates) in
    bf16: its AP could not be reproduced. On the CPU --amp is the bf16 network whatever the dtype flag."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    args = test_cli.get_args_parser().parse_args(["--amp", "--amp_dtype", "bf16"])
    assert test_cli.autocast_setting(args.amp, args.amp_dtype, cuda) == "bf16"
    assert amp_dtype(cuda, test_cli.autocast_setting(args.amp, args.amp_dtype, cuda)) == torch.bfloat16
    assert amp_dtype(cuda, test_cli.autocast_setting(True, "fp16", cuda)) == torch.float16
    assert test_cli.autocast_setting(True, "bf16", cpu) is test_cli.autocast_setting(True, "fp16", cpu) is True
    assert test_cli.autocast_setting(False, "bf16", cuda) is False


def test_results_of_other_models_and_settings_never_replace_each_other(ckpt_dir, tmp_path, capsys):
    """Two checkpoints of one folder and two --topk values give three results files; evaluating one of them again
    is refused without --force (nothing is touched), and with --force its stale analysis folder goes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("checkpoint.pt", "epoch_1.pt"):
        (run_dir / name).write_bytes((ckpt_dir / "tiny" / "checkpoint.pt").read_bytes())

    def evaluate(name: str, topk: str, *extra: str) -> None:
        args = cli_args(ckpt_dir, "--ckpt", str(run_dir / name), "--test_scales", "0.5", *extra)
        args.topk = int(topk)
        test_cli.main(args)

    evaluate("checkpoint.pt", "20")
    evaluate("epoch_1.pt", "20")
    evaluate("checkpoint.pt", "10")
    jsons = sorted(p.name for p in run_dir.glob("results_*.json"))
    assert len(jsons) == 6 and len({p.name for p in run_dir.glob("results_*_per_class.csv")}) == 3
    assert len([name for name in jsons if name.endswith("_metrics.json")]) == 3
    first = run_dir / f"results_val_checkpoint_s0.5_{settings_hash({'topk': 20})}.json"
    assert first.name in jsons
    before, before_metrics = first.read_bytes(), metrics_path(first).read_bytes()
    (run_dir / f"{first.stem}_analysis").mkdir()
    with pytest.raises(UserError, match="pass --force"):
        evaluate("checkpoint.pt", "20")
    assert first.read_bytes() == before and metrics_path(first).read_bytes() == before_metrics
    assert (run_dir / f"{first.stem}_analysis").is_dir()
    capsys.readouterr()
    evaluate("checkpoint.pt", "20", "--force")
    assert f"removed {run_dir / (first.stem + '_analysis')}" in capsys.readouterr().out
    assert not (run_dir / f"{first.stem}_analysis").exists() and first.is_file()
    assert sorted(p.name for p in run_dir.glob("results_*.json")) == jsons


def run_test_py(data_dir: Path, *args: str, nproc: int) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(REPO / "test.py"), "--data_dir", str(data_dir), "--val_split", "val",
           "--device", "cpu", "--num_workers", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same arithmetic in every process
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_match_one(squares_dir, fixed_box_checkpoint, tmp_path):
    """2 gloo processes split the 3 val images (2 + 1) and gather them: every image in the results json once, with
    the same detections and AP as one process. The fixed-box network finds each square (tests/fixed_box.py), so
    an image evaluated twice and another never would change both. Its boxes come from biases alone: they are
    compared exactly, the scores within float32 rounding."""
    val = json.loads((squares_dir / "annotations" / "instances_val.json").read_text())
    image_ids = [im["id"] for im in val["images"]]
    runs = {}
    for nproc in (1, 2):
        ckpt = tmp_path / f"run{nproc}" / "checkpoint.pt"
        ckpt.parent.mkdir()
        ckpt.symlink_to(fixed_box_checkpoint)
        proc = run_test_py(squares_dir, "--ckpt", str(ckpt), nproc=nproc)
        lines = [line for line in proc.stdout.splitlines() if "Average Precision" in line or "Recall" in line]
        assert len(lines) == 12, proc.stdout  # the table is printed once, by rank 0
        results = json.loads(results_path(ckpt, "val", [1.0], False, False, {}, False).read_text())
        assert sorted(r["image_id"] for r in results) == image_ids, f"{nproc} process(es): {results}"
        runs[nproc] = lines, sorted(results, key=lambda r: r["image_id"])
    assert runs[2][0] == runs[1][0]
    assert float(runs[1][0][0].rsplit("=", 1)[1]) == 1.0  # AP: each box is exactly its square
    for got, expected in zip(runs[2][1], runs[1][1]):
        assert got["bbox"] == expected["bbox"] and got["score"] == pytest.approx(expected["score"], abs=1e-6)


def test_a_corrupt_image_is_the_same_one_line_error_with_loader_workers(ckpt_dir, tmp_path):
    """A loader worker's exception comes back from DataLoader with the worker's traceback in its message: the
    error the user sees must be the dataset's own, whatever --num_workers. (A corrupt image: a missing one is
    refused before any worker starts.)"""
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "instances_val.json").write_bytes((RACCOON / "annotations" / "instances_val.json")
                                                              .read_bytes())
    images = sorted((RACCOON / "val").iterdir())
    (data / "val").mkdir()
    for image in images[1:]:
        (data / "val" / image.name).symlink_to(image)
    (data / "val" / images[0].name).write_bytes(images[0].read_bytes()[:2000])  # a JPEG cut short
    errors = []
    for workers in ("0", "1"):
        with pytest.raises(DataError) as e:
            test_cli.main(cli_args(ckpt_dir, "--data_dir", str(data), "--num_workers", workers, "--force"))
        errors.append(str(e.value))
    assert images[0].name in errors[0] and "\n" not in errors[0]
    assert errors[1] == errors[0]


def test_a_missing_val_image_is_named_with_how_many_are_missing_before_any_detection(ckpt_dir, tmp_path,
                                                                                      monkeypatch):
    """README: a missing one is named, with how many are missing, before any detection (the last image here: an
    evaluation reached it after detecting all the others)."""
    data = tmp_path / "data"
    shutil.copytree(RACCOON, data)
    images = sorted((data / "val").iterdir())
    images[-1].unlink()

    def detection_started(*args, **kwargs):
        raise AssertionError("detection started")

    monkeypatch.setattr(test_cli, "evaluate", detection_started)
    before = sorted((ckpt_dir / "tiny").iterdir())
    with pytest.raises(MissingFileError, match=rf"{re.escape(str(images[-1]))}: image file not found \(1 of the "
                                               rf"{len(images)} images of .* are not there\)"):
        test_cli.main(cli_args(ckpt_dir, "--data_dir", str(data)))
    assert sorted((ckpt_dir / "tiny").iterdir()) == before  # no results file begun


def test_a_val_split_with_boxes_training_drops_or_clips_is_evaluated_with_a_warning(ckpt_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """A box without width and one that leaves its image: the evaluation scores them as the json gives them (no
    detection matches them fully), which test.py said nothing of; nor of a box given area 0 (counted as small)."""
    data = tmp_path / "data"
    shutil.copytree(RACCOON, data)
    ann_file = data / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    coco["annotations"][0]["bbox"][2] = 0
    width = next(im["width"] for im in coco["images"] if im["id"] == coco["annotations"][1]["image_id"])
    coco["annotations"][1]["bbox"][2] = width * 1.5
    coco["annotations"][2]["area"] = 0
    ann_file.write_text(json.dumps(coco))
    monkeypatch.setattr(test_cli, "evaluate", lambda *args, **kwargs: {})
    test_cli.main(cli_args(ckpt_dir, "--data_dir", str(data)))
    out = capsys.readouterr().out
    ids = f"{coco['annotations'][0]['id']}, {coco['annotations'][1]['id']}"
    assert f"\nwarning: {ann_file}: 2 ground-truth boxes (annotation ids {ids}) have no width or height, or leave " \
        "their image" in out
    assert f"\nwarning: {ann_file}: boxes of positive width and height given area 0 (1: annotation ids " \
        f"{coco['annotations'][2]['id']}): the evaluation counts them as small objects" in out


def test_a_split_of_another_data_set_gets_results_of_its_own(ckpt_dir, tmp_path):
    """The same checkpoint on the "val" of the data it trained on and on the "val" of another folder: two results
    files (the other named with a hash of its folder), neither refused nor replaced."""
    state = load_checkpoint(ckpt_dir / "tiny" / "checkpoint.pt")
    state["args"]["data_dir"] = str(RACCOON)
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", state)
    other = tmp_path / "other_data"
    shutil.copytree(RACCOON, other)
    for data in (RACCOON, other):
        test_cli.main(cli_args(tmp_path, "--log_name", "run", "--data_dir", str(data)))
    settings = {"topk": 20}  # cli_args' own
    own = tmp_path / "run" / f"results_val_checkpoint_s1_{settings_hash(settings)}.json"
    theirs = own.with_name(f"results_val_checkpoint_s1_"
                           f"{settings_hash({**settings, 'data_dir': str(other.resolve())})}.json")
    assert sorted((tmp_path / "run").glob("results_val_checkpoint_s1*.json")) == sorted(
        [own, theirs, metrics_path(own), metrics_path(theirs)])


def test_processes_given_different_flags_are_refused_before_reading_anything(monkeypatch):
    """A node of a multi-node evaluation with another --topk (or scale, or flip) scored its share of the images
    otherwise, and the results mixed both without a word. The gather over two processes is played by one: rank 1's
    flags are its own with another --topk."""
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "_holders", 0)
    monkeypatch.setattr(dist, "all_gather_object", lambda flags: [flags, {**flags, "--topk": 10}])
    args = test_cli.get_args_parser().parse_args(["--ckpt", "missing.pt", "--data_dir", "missing", "--device", "cpu"])
    with pytest.raises(ArgumentError, match=r"given different flags: --topk 70 on rank 0, 10 on rank 1\. Start"):
        test_cli.main(args)


def test_processes_reading_copies_of_the_val_split_of_other_sizes_are_refused(ckpt_dir, monkeypatch):
    """Each process scores every world_size-th image of its own copy: a node whose copy lacked images left some out of
    the AP, and scored others twice, without a word. The gather over two processes is played by one: rank 1 read
    one image fewer."""
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "_holders", 0)
    monkeypatch.setattr(dist, "all_gather_object",
                        lambda obj: [obj, {**obj, "images": obj["images"] - 1} if "images" in (obj or {}) else obj])
    before = sorted((ckpt_dir / "tiny").iterdir())
    with pytest.raises(DataError, match=r"^the processes of this run read different inputs: images (\d+) on rank 0, "):
        test_cli.main(cli_args(ckpt_dir))
    assert sorted((ckpt_dir / "tiny").iterdir()) == before


def test_a_checkpoint_or_data_that_one_process_cannot_read_stops_every_process(ckpt_dir, monkeypatch):
    """A node without the checkpoint failed alone; the others went on to their first gather and ended in a
    `Connection closed by peer` traceback. The gather over two processes is played by one, rank 1 reporting its
    error."""
    elsewhere = MissingFileError("checkpoint not found: /elsewhere/checkpoint.pt")
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, elsewhere])
    before = sorted((ckpt_dir / "tiny").iterdir())
    with pytest.raises(MissingFileError, match=r"^rank 1: checkpoint not found: /elsewhere/checkpoint\.pt$"):
        test_cli.main(cli_args(ckpt_dir))
    assert sorted((ckpt_dir / "tiny").iterdir()) == before


def test_processes_evaluating_an_onnx_file_beside_checkpoints_are_refused(monkeypatch):
    """--ckpt and --onnx are paths, which may differ between the nodes, but not whether they are given: a node
    evaluating the .onnx export scored its share on onnxruntime, the others theirs on PyTorch."""
    rank_1 = sent_in_first_gather(test_cli.main, test_cli.get_args_parser().parse_args(
        ["--ckpt", "elsewhere.pt", "--data_dir", "missing", "--device", "cpu"]), monkeypatch)
    monkeypatch.setattr(dist, "all_gather_object", lambda flags: [flags, rank_1])
    args = test_cli.get_args_parser().parse_args(["--onnx", "model.onnx", "--data_dir", "missing", "--device", "cpu"])
    with pytest.raises(ArgumentError, match=r"given different flags: --ckpt 'not given' on rank 0, 'given' on rank 1; "
                                            r"--onnx 'given' on rank 0, 'not given' on rank 1\. Start"):
        test_cli.main(args)
