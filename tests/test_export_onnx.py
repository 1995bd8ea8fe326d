"""ONNX export: the standard-operator corner pooling against lib.cpool, an exported tiny_hourglass on onnxruntime
against PyTorch, and test.py --onnx against the PyTorch path."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import demo
from datasets.transforms import eval_input
from engine import Detector
from engine.inference import InferenceConfig, detect
from engine.onnx_backend import OnnxModel
from lib.cpool import bottom_pool, left_pool, right_pool, top_pool
from nets import build_model
from nets.export_pool import rounds_for, shifted_max_pool, use_export_pooling
from tools import export_onnx
from utils.checkpoint import save_checkpoint
from utils.errors import ArgumentError, CheckpointError, UserError, WriteError
from tests.test_demo import same_detections

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("centernet47_test_cli_onnx", REPO / "test.py")
test_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cli)

RACCOON = Path(__file__).parent / "data" / "raccoon"
CPOOL = {"top": top_pool, "bottom": bottom_pool, "left": left_pool, "right": right_pool}
SIZES = [(1, 1), (1, 6), (7, 1), (2, 2), (5, 13), (16, 9), (33, 17)]
# Operators of the ONNX standard (default domain) that the exported network may use: no custom ops, no plugins.
STANDARD_OPS = {"Conv", "Relu", "Add", "Max", "Pad", "Slice", "Resize", "ReduceMax", "Constant", "ConstantOfShape",
                "Concat", "Reshape", "Transpose", "Cast", "Identity", "Shape", "Gather", "Unsqueeze"}


def inputs(shape, seed: int) -> list[torch.Tensor]:
    """A random tensor and a tie-heavy one (values in {0, 1, 2}) of `shape`."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen), torch.randint(0, 3, shape, generator=gen).float()]


@pytest.mark.parametrize("direction", list(CPOOL))
def test_shifted_max_equals_cpool(direction):
    for i, (h, w) in enumerate(SIZES):
        for x in inputs((2, 3, h, w), i):
            expected = CPOOL[direction](x)
            assert torch.equal(shifted_max_pool(x, direction), expected)
            assert torch.equal(shifted_max_pool(x, direction, rounds=7), expected)  # more rounds than needed
    # ceil(log2 L) rounds are needed: with one fewer, the first of 33 increasing values misses the last one.
    line = torch.arange(33.0).view(1, 1, 33, 1)
    assert rounds_for(33) == 6 and rounds_for(32) == 5 and rounds_for(1) == 0
    assert shifted_max_pool(line, "top", rounds=5)[0, 0, 0, 0] == 32 - 1
    assert shifted_max_pool(line, "top", rounds=6)[0, 0, 0, 0] == 32


class FourPools(torch.nn.Module):
    def forward(self, x):
        return tuple(shifted_max_pool(x, d, rounds=rounds_for(40)) for d in CPOOL)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Constant folding")
def test_exported_pooling_is_exact_in_onnxruntime_at_any_size(tmp_path):
    path = tmp_path / "pools.onnx"
    torch.onnx.export(FourPools(), (torch.zeros(1, 3, 8, 8),), path, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=list(CPOOL),
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, **{d: {0: "n", 2: "h", 3: "w"} for d in CPOOL}})
    assert {n.op_type for n in onnx.load(path).graph.node} <= STANDARD_OPS
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i, (h, w) in enumerate(SIZES + [(40, 3)]):
        for x in inputs((2, 3, h, w), 100 + i):
            for direction, out in zip(CPOOL, session.run(None, {"x": x.numpy()})):
                assert np.array_equal(out, CPOOL[direction](x).numpy()), (direction, h, w)


def peaked_tiny(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """An untrained tiny_hourglass whose heatmap logits spread over about +-15 instead of clustering at the
    -2.19 bias: distinct scores, so that top-k, soft-NMS and thresholds take the same decisions in both runtimes
    (an untrained net's near-equal scores would let 1e-7 differences reorder them)."""
    torch.manual_seed(seed)
    model = build_model("tiny_hourglass", num_classes)
    with torch.no_grad():
        for name in ("hm_tl", "hm_br", "hm_ct"):
            getattr(model.branches[0], name)[-1].weight.mul_(1000)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("onnx")
    model = peaked_tiny(1)
    ckpt = root / "checkpoint.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "class_names": ["raccoon"],
                           "args": {"arch": "tiny_hourglass", "num_classes": 1, "img_size": 127}})
    out = root / "tiny.onnx"
    export_onnx.main(export_onnx.get_args_parser().parse_args(
        ["--ckpt", str(ckpt), "--out", str(out), "--dynamic", "--max_size", "511"]))
    return ckpt, out, model


def test_onnxruntime_outputs_equal_pytorch_at_two_sizes(exported):
    ckpt, path, model = exported
    proto = onnx.load(path)
    assert {n.op_type for n in proto.graph.node} <= STANDARD_OPS and all(o.domain in ("", "ai.onnx")
                                                                         for o in proto.opset_import)
    onnx_model = OnnxModel(path, torch.device("cpu"))
    assert (onnx_model.arch, onnx_model.class_names, onnx_model.img_size) == ("tiny_hourglass", ["raccoon"], 127)
    gen = torch.Generator().manual_seed(3)
    for shape in [(2, 3, 127, 127), (1, 3, 95, 223)]:
        image = torch.randn(shape, generator=gen)
        with torch.no_grad():
            expected = model(image)
        got = onnx_model(image)
        assert list(got) == list(expected)
        for k, ref in expected.items():
            assert got[k].shape == ref.shape
            # float32 sums of up to 9 * 128 products per conv, added in another order by another kernel, over
            # ~50 layers: round-off of order sqrt(n) * 6e-8 per layer and output scale, ~1e-5 in all. 1e-4 of the
            # output's scale leaves a wide margin (measured: below 3e-6 of it); pooling itself is exact.
            tol = 1e-4 * ref.abs().max().item()
            assert (got[k] - ref).abs().max().item() <= tol, k
    with pytest.raises(ValueError, match="k \\* 32 - 1"):
        onnx_model(torch.zeros(1, 3, 100, 127))
    with pytest.raises(ValueError, match="up to 511"):
        onnx_model(torch.zeros(1, 3, 543, 127))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Constant folding",
                            "ignore:You are trying to export the model with onnx",  # Upsample at opset 9: checked below
                            "ignore:Exporting to ONNX opset version 99")  # before the error the test expects
def test_an_opset_below_what_the_export_needs_is_refused_and_the_lowest_that_works_works(exported, tmp_path):
    ckpt, _, model = exported
    out = tmp_path / "low.onnx"
    args = ["--ckpt", str(ckpt), "--out", str(out), "--dynamic", "--max_size", "255", "--opset"]
    with pytest.raises(ArgumentError, match=f"--opset 8: the export needs opset {export_onnx.MIN_OPSET} or later"):
        export_onnx.main(export_onnx.get_args_parser().parse_args(args + ["8"]))
    assert not out.exists()
    with pytest.raises(ArgumentError, match="--opset 99: this torch .* cannot export it"):  # torch raised RuntimeError
        export_onnx.main(export_onnx.get_args_parser().parse_args(args + ["99"]))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a_file").write_text("")
    with pytest.raises(WriteError, match=f"--out {tmp_path / 'a_file'} is a file"):
        export_onnx.main(export_onnx.get_args_parser().parse_args(
            ["--ckpt", str(ckpt), "--out", str(tmp_path / "a_file" / "x.onnx")]))
    export_onnx.main(export_onnx.get_args_parser().parse_args(args + [str(export_onnx.MIN_OPSET)]))
    assert onnx.load(out).opset_import[0].version == export_onnx.MIN_OPSET
    image = torch.randn(1, 3, 255, 95, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(image)
    for k, got in OnnxModel(out, torch.device("cpu"))(image).items():  # the tolerance of the test above
        assert (got - expected[k]).abs().max().item() <= 1e-4 * expected[k].abs().max().item(), k


def test_static_export_and_refusals(exported, tmp_path):
    ckpt, path, _ = exported
    out = tmp_path / "static.onnx"
    args = ["--ckpt", str(ckpt), "--out", str(out), "--img_size", "63"]
    export_onnx.main(export_onnx.get_args_parser().parse_args(args))
    static = OnnxModel(out, torch.device("cpu"))
    assert static.session.get_inputs()[0].shape == ["batch", 3, 63, 63]
    assert static(torch.zeros(3, 3, 63, 63))["hm_tl"].shape == (3, 1, 16, 16)
    with pytest.raises(ValueError, match="export it with --dynamic"):
        static(torch.zeros(1, 3, 127, 127))
    before = out.read_bytes()
    with pytest.raises(UserError, match="exists"):
        export_onnx.main(export_onnx.get_args_parser().parse_args(args))
    assert out.read_bytes() == before
    with pytest.raises(ArgumentError, match="k \\* 32 - 1"):
        export_onnx.main(export_onnx.get_args_parser().parse_args(args[:-1] + ["64", "--force"]))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {broken}: the file is truncated or corrupt"):
        export_onnx.main(export_onnx.get_args_parser().parse_args(["--ckpt", str(broken), "--out", str(out),
                                                                         "--force"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "static.onnx"]  # no temporary files left


def test_never_writes_over_a_checkpoint_or_a_folder_and_refuses_size_0(exported, tmp_path):
    ckpt, _, _ = exported
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(ckpt.read_bytes())
    (run / "link.pt").symlink_to(run / "checkpoint.pt")
    os.link(run / "checkpoint.pt", run / "hard.pt")
    (run / "other.pt").write_bytes(ckpt.read_bytes())
    before = ckpt.read_bytes()

    def export(out: Path, *extra: str) -> None:
        export_onnx.main(export_onnx.get_args_parser().parse_args(
            ["--ckpt", str(run / "checkpoint.pt"), "--out", str(out), "--force", *extra]))

    for out in ("checkpoint.pt", "link.pt", "hard.pt"):
        with pytest.raises(UserError, match=f"--out {run / out} is the input checkpoint .*, such as "
                                            f"{run / out.replace('.pt', '.onnx')}$"):
            export(run / out)
    os.link(run / "checkpoint.pt", run / "hard.onnx")  # it suggested the very name it refused
    with pytest.raises(UserError, match=f"--out {run / 'hard.onnx'} is the input checkpoint "
                                        f"{run / 'checkpoint.pt'}; choose another name$"):
        export(run / "hard.onnx")
    (run / "hard.onnx").unlink()
    with pytest.raises(UserError, match="is a checkpoint; an export never replaces one"):
        export(run / "other.pt")
    with pytest.raises(UserError, match=f"--out {run} is a folder; give the file to write, such as "
                                        f"{run / 'model.onnx'}"):
        export(run)
    for extra in (["--img_size", "0"], ["--dynamic", "--max_size", "0"]):
        with pytest.raises(ArgumentError, match="k \\* 32 - 1"):
            export(run / "model.onnx", *extra)
    assert all((run / name).read_bytes() == before for name in ("checkpoint.pt", "link.pt", "hard.pt", "other.pt"))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "hard.pt", "link.pt", "other.pt"]


def test_max_size_without_dynamic_and_an_onnx_file_as_ckpt_are_refused(exported, tmp_path):
    """--max_size without --dynamic was ignored: the file came out fixed to the checkpoint's 127 x 127, and
    --img_size with --dynamic was recorded as the training input size. An .onnx given as --ckpt was called a
    truncated or corrupt checkpoint."""
    ckpt, path, _ = exported

    def export(*argv: str) -> None:
        export_onnx.main(export_onnx.get_args_parser().parse_args(["--out", str(tmp_path / "x.onnx"), *argv]))

    with pytest.raises(ArgumentError, match="--max_size 255 sizes a --dynamic export; without --dynamic the input is "
                                            "fixed to --img_size: add --dynamic or drop --max_size"):
        export("--ckpt", str(ckpt), "--max_size", "255")
    with pytest.raises(ArgumentError, match="--img_size 255 fixes the input side, which --dynamic frees"):
        export("--ckpt", str(ckpt), "--dynamic", "--img_size", "255")  # it went into the metadata as the training size
    with pytest.raises(ArgumentError, match="--max_size 63 is below the smallest test input, 127"):
        export("--ckpt", str(ckpt), "--dynamic", "--max_size", "63")  # a file that Detector and test.py refused
    with pytest.raises(ArgumentError, match=f"--ckpt {path} is an ONNX file; export again from the checkpoint it was "
                                            "made from"):
        export("--ckpt", str(path), "--dynamic")
    assert not any(tmp_path.iterdir())


def test_an_out_ending_in_a_slash_is_refused_as_a_folder(exported, tmp_path):
    ckpt, _, _ = exported
    with pytest.raises(UserError, match=f"--out {tmp_path}/onnx/ names a folder; give the file to write, such as "
                                        f"{tmp_path}/onnx/model.onnx"):  # it wrote a file named onnx
        export_onnx.main(export_onnx.get_args_parser().parse_args(
            ["--ckpt", str(ckpt), "--dynamic", "--out", f"{tmp_path}/onnx/"]))
    assert not any(tmp_path.iterdir())


def test_demo_scales_images_larger_than_the_export_down_and_refuses_a_fixed_size_file(exported, tmp_path, capsys):
    """raccoon-13 (660 x 495) does not fit the export's 511: it runs at scale 511 / 660, with the boxes the
    PyTorch network gives at that scale in original pixels; raccoon-148 (500 x 375) runs as it is."""
    ckpt, path, model = exported
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("raccoon-13.jpg", "raccoon-148.jpg"):
        shutil.copy(RACCOON / "val" / name, folder)
    args = ["--onnx", str(path), "--images", str(folder), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--score_thresh", "0"]
    written = demo.main(demo.get_args_parser().parse_args(args))
    assert "larger images are scaled down to fit" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert saved["complete"] is True and not saved["skipped"] and saved == written
    for name, scale in (("raccoon-13.jpg", 511 / 660), ("raccoon-148.jpg", 1.0)):
        image = cv2.imread(str(folder / name))
        dets = detect(model, [eval_input(image, scale, False)], InferenceConfig(), torch.device("cpu"))
        got = [(0, d["box"], d["score"]) for image in saved["images"] if image["file"] == str(folder / name)
               for d in image["detections"]]
        # json rounding (0.01 px, 1e-4) plus onnxruntime's float32 round-off (scores ~1e-6)
        assert len(dets) > 0 and same_detections(got, [(0, d[:4], float(d[4])) for d in dets], box_tol=0.02,
                                                 score_tol=2e-4)
        assert all(0 <= d[0] <= d[2] <= image.shape[1] and 0 <= d[1] <= d[3] <= image.shape[0] for _, d, _ in got)

    static = tmp_path / "static.onnx"
    export_onnx.main(export_onnx.get_args_parser().parse_args(["--ckpt", str(ckpt), "--out", str(static),
                                                              "--img_size", "63"]))
    with pytest.raises(ArgumentError, match="takes 63 x 63 inputs only; photos and video frames need other sizes"):
        demo.main(demo.get_args_parser().parse_args(args[:1] + [str(static)] + args[2:5] + [str(tmp_path / "o2")]))
    assert not (tmp_path / "o2").exists()


def test_the_detector_counts_only_the_images_it_scales_down(exported):
    """demo.py's note that images are scaled down to fit the export comes from this count."""
    _, path, _ = exported
    detector = Detector.from_checkpoint(path, device="cpu")
    assert detector.fit_scale(np.zeros((375, 500, 3), np.uint8)) == 1.0 and detector.scaled_down == 0  # fits 511
    assert detector.fit_scale(np.zeros((495, 660, 3), np.uint8)) == pytest.approx(511 / 660)
    assert detector.scaled_down == 1


def test_malformed_metadata_is_a_clear_error(exported, tmp_path):
    _, path, _ = exported
    for name, value in (("not_json", "{"), ("no_arch", '{"class_names": ["raccoon"]}'), ("a_list", "[1]")):
        proto = onnx.load(path)
        next(e for e in proto.metadata_props if e.key == "centernet47").value = value
        onnx.save(proto, tmp_path / f"{name}.onnx")
        with pytest.raises(UserError, match=f"{name}.onnx: its 'centernet47' metadata is malformed"):
            OnnxModel(tmp_path / f"{name}.onnx", torch.device("cpu"))


def test_metadata_that_does_not_fit_the_network_is_refused(exported, tmp_path):
    """Class names edited in (or another network's put on) the file: detections of class 2 would index past the
    names, or a class would be silently unnamed."""
    _, path, _ = exported
    entry = next(e for e in onnx.load(path).metadata_props if e.key == "centernet47")
    for name, change, message in [
            ("two_names", {"class_names": ["raccoon", "dog"], "category_ids": [1, 2]},
             "its metadata names 2 classes, but the network's hm_\\w+ output has 1 class channels"),
            ("two_ids", {"category_ids": [1, 2]}, "its metadata has 2 category ids for 1 classes")]:
        proto = onnx.load(path)
        next(e for e in proto.metadata_props if e.key == "centernet47").value = json.dumps(
            {**json.loads(entry.value), **change})
        onnx.save(proto, tmp_path / f"{name}.onnx")
        with pytest.raises(CheckpointError, match=f"{name}.onnx: {message}"):
            OnnxModel(tmp_path / f"{name}.onnx", torch.device("cpu"))


def test_export_pooling_keeps_the_pytorch_outputs():
    """The swapped pooling changes nothing in PyTorch either: outputs identical to the lib.cpool network."""
    model = peaked_tiny(2, seed=1)
    image = torch.randn(1, 3, 63, 95)
    with torch.no_grad():
        expected = model(image)
        got = use_export_pooling(model, rounds=rounds_for(24))(image)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_test_py_onnx_gives_the_pytorch_ap(exported, tmp_path):
    """Same detections (hence the same AP) from both paths on the raccoon val images, at scale 0.5 with flip."""
    ckpt, path, _ = exported
    common = ["--dataset", "coco", "--data_dir", str(RACCOON), "--val_split", "val", "--device", "cpu",
              "--num_workers", "0", "--test_flip", "--test_scales", "0.5"]
    torch_stats = test_cli.main(test_cli.get_args_parser().parse_args(["--ckpt", str(ckpt), *common]))
    onnx_stats = test_cli.main(test_cli.get_args_parser().parse_args(["--onnx", str(path), *common]))

    torch_results = json.loads((ckpt.parent / f"results_val_{ckpt.stem}_s0.5_flip.json").read_text())
    onnx_results = json.loads((path.parent / f"results_val_{path.stem}_onnx_s0.5_flip.json").read_text())
    assert len(onnx_results) == len(torch_results) > 20
    unmatched = list(torch_results)
    for a in onnx_results:  # in any order: equal scores may come in either order
        b = next((b for b in unmatched if b["image_id"] == a["image_id"] and abs(a["score"] - b["score"]) <= 1e-5
                  and np.allclose(a["bbox"], b["bbox"], atol=1e-2)), None)
        assert b is not None, a
        unmatched.remove(b)
    assert abs(onnx_stats["AP"] - torch_stats["AP"]) <= 1e-6 and abs(onnx_stats["AP50"] - torch_stats["AP50"]) <= 1e-6
    with pytest.raises(ArgumentError, match="drop --ckpt"):
        test_cli.main(test_cli.get_args_parser().parse_args(["--onnx", str(path), "--ckpt", str(ckpt), *common]))
    # At scale 1 the 660 x 495 photo becomes a 767-pixel input, beyond the export's 511: refused before any work
    # (was a traceback from onnxruntime's size check after the first images were scored).
    larger = [*common[:-1], "1", "--force"]
    (path.parent / f"results_val_{path.stem}_onnx_s1_flip.json").unlink(missing_ok=True)
    with pytest.raises(ArgumentError, match=r"takes inputs up to 511 pixels, but 1 image\(s\) of val are larger at "
                                            r"test scale 1 \(raccoon-13.jpg: 767\); export again with --max_size 767"):
        test_cli.main(test_cli.get_args_parser().parse_args(["--onnx", str(path), *larger]))
    assert not (path.parent / f"results_val_{path.stem}_onnx_s1_flip.json").exists()


def test_the_inference_bench_exports_a_model_its_onnx_row_loads(tmp_path):
    """bench/bench_infer.py's onnxruntime row exported with no class names, which the loader refuses since it checks
    their count against the heatmaps' channels: the bench died there with its default flags."""
    from bench.bench_infer import onnx_session

    session = onnx_session(build_model("tiny_hourglass", 3).eval(), 127, str(tmp_path))
    outputs = session(torch.rand(1, 3, 127, 127))
    assert len(session.class_names) == 3 and outputs["hm_tl"].shape == (1, 3, 32, 32)


def test_the_inference_bench_times_every_row_by_its_clock_under_its_own_header(monkeypatch, capsys):
    """With --clock cpu the post-processing and pipeline rows were wall time beside CPU-time forward rows, and on
    the CPU the pipeline rows (ms, boxes kept) were printed under the forward table's header (ms, speed-up, ...):
    their box count sat in its ms column. A CPU clock that moves 1 s per reading times every call at 1000 ms."""
    from bench import bench_infer

    readings = iter(range(10 ** 6))
    monkeypatch.setattr(bench_infer.time, "process_time", lambda: float(next(readings)))
    monkeypatch.setattr(bench_infer, "matmul_peaks", lambda clock: {"fp32": 1.0, "bf16": 1.0})
    monkeypatch.setattr(bench_infer, "cpu_forward_rows", lambda *args: print("forward row"))
    monkeypatch.setattr(bench_infer, "build_model", lambda arch, classes: torch.nn.Identity())  # no forward
    monkeypatch.setattr(bench_infer, "detect", lambda *args: np.zeros((3, 6), np.float32))
    args = bench_infer.get_args_parser().parse_args(["--archs", "tiny_hourglass", "--clock", "cpu",
                                                     "--post_repeats", "1", "--forward_repeats", "1", "--no-onnx"])
    bench_infer.main(args)
    lines = capsys.readouterr().out.splitlines()
    timed = [line for line in lines if line.startswith(("post-processing", "pipeline"))]
    assert len(timed) == 4 and all(line.split()[-2] == "1000.0" for line in timed), timed
    header = lines[lines.index(timed[2]) - 1]
    assert header.split() == ["stage", "ms", "/", "image", "boxes", "kept"]
