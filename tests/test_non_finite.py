"""Network outputs holding NaN or infinity (a diverged network, 16-bit overflow) through the test-time pipeline: a
cell whose outputs are not finite holds no keypoint, so the detections are those of the same outputs without a
keypoint there (utils/decode.py), the images are counted in one warning, and every json written stays valid."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
import engine.detector
from datasets import build_dataset
from datasets.image_io import write_image
from datasets.transforms import eval_input
from engine.detector import Detector
from engine.inference import InferenceConfig, detect, detect_batch, evaluate
from nets import model_from_checkpoint
from tests.fixed_box import CLASS_NAMES, SIZE, fixed_box_network, write_square_split
from utils.checkpoint import load_inference_checkpoint, save_checkpoint
from utils.errors import CheckpointError

CPU = torch.device("cpu")
CELLS = 32  # the output map of a 127 x 127 input
BACKGROUND = -20.0  # heatmap logit of a cell without a keypoint: its score, 2e-9, is below soft-NMS's threshold
# class, x1, y1, x2, y2 (cells), embedding, heatmap logit: A and B overlap (soft-NMS decays B by A), C is alone
OBJECTS = {"A": (0, 2, 2, 10, 10, 0.0, 2.0), "B": (0, 4, 4, 14, 14, 3.0, 1.0), "C": (1, 16, 16, 28, 28, -3.0, 1.5)}


def keypoint_cells(name: str) -> dict[str, tuple[int, int]]:
    """{kind: (y, x)} of object `name`'s three keypoints."""
    _, x1, y1, x2, y2, _, _ = OBJECTS[name]
    return {"tl": (y1, x1), "br": (y2, x2), "ct": ((y1 + y2) // 2, (x1 + x2) // 2)}


def outputs(n: int = 1) -> dict[str, torch.Tensor]:
    """The eval outputs of `n` identical images holding OBJECTS (a background whose corner embeddings pair with
    nothing): three boxes, A, B and C, with their centers in their central regions."""
    out = {f"hm_{k}": torch.full((n, 2, CELLS, CELLS), BACKGROUND) for k in ("tl", "br", "ct")}
    out.update({f"off_{k}": torch.full((n, 2, CELLS, CELLS), 0.5) for k in ("tl", "br", "ct")})
    out["emb_tl"], out["emb_br"] = torch.full((n, 1, CELLS, CELLS), 10.0), torch.full((n, 1, CELLS, CELLS), -10.0)
    for name, (label, *_, emb, logit) in OBJECTS.items():
        for kind, (y, x) in keypoint_cells(name).items():
            out[f"hm_{kind}"][:, label, y, x] = logit
            if kind != "ct":
                out[f"emb_{kind}"][:, 0, y, x] = emb
    return out


def run(out: dict, center_check: bool = True) -> np.ndarray:
    inputs = [eval_input(np.zeros((SIZE, SIZE, 3), np.uint8), 1.0, False)]
    return detect(lambda images: out, inputs, InferenceConfig(center_check=center_check), CPU)


def test_the_clean_outputs_give_three_boxes():
    assert len(run(outputs())) == 3
    assert len(run(outputs(), center_check=False)) == 3


@pytest.mark.parametrize("center_check", [True, False])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["hm_tl", "hm_br", "hm_ct", "off_tl", "off_br", "off_ct", "emb_tl", "emb_br"])
def test_a_non_finite_output_at_a_keypoint_gives_the_detections_without_that_keypoint(key, value, center_check):
    """Before: a NaN offset kept its box with a NaN corner and, through gaussian soft-NMS, made B's score NaN; a
    NaN embedding paired A's top-left corner with B's bottom-right one; an infinite logit scored 1."""
    kind = key.split("_")[1]
    y, x = keypoint_cells("A")[kind]
    bad = outputs()
    bad[key][0, 0, y, x] = value
    without = outputs()
    without[f"hm_{kind}"][0, :, y, x] = BACKGROUND
    expected = run(without, center_check)
    assert not np.isnan(expected).any()
    np.testing.assert_array_equal(run(bad, center_check), expected)  # the same float operations on the same boxes


def test_losing_a_corner_loses_its_box_and_lifts_the_box_it_decayed():
    """What the previous test compares with: A is gone, and B keeps the score soft-NMS took from it for A."""
    clean, without = run(outputs(), center_check=False), outputs()
    without["off_tl"][0, 0, 2, 2] = float("nan")
    found = run(without, center_check=False)
    assert len(found) == 2 and found[:, 4].max() < clean[:, 4].max()
    score_b = [s for s, label in zip(found[:, 4], found[:, 5]) if label == 0]
    assert score_b == [pytest.approx((torch.sigmoid(torch.tensor(1.0)).item()))]  # (s_tl + s_br) / 2, undecayed


@pytest.mark.parametrize("label", [0, 1])  # 1: no class has a keypoint at a cell where any output is bad
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_cell_beside_a_keypoint_does_not_suppress_it(value, label):
    """Before: a NaN logit next to A's top-left corner made the 3 x 3 maximum NaN around it, which removed the
    corners of A and B."""
    bad = outputs()
    bad["hm_tl"][0, label, 3, 3] = value
    np.testing.assert_array_equal(run(bad), run(outputs()))


def test_a_map_with_fewer_finite_cells_than_topk_makes_no_box_from_the_others():
    """All cells of the top-left map but A's and C's are NaN: the top K takes bad cells too, which pair with
    nothing, so A and C remain (B lost its corner)."""
    bad = outputs()
    keep = bad["hm_tl"][0, :, 2, 2].clone(), bad["hm_tl"][0, :, 16, 16].clone()
    bad["hm_tl"].fill_(float("nan"))
    bad["hm_tl"][0, :, 2, 2], bad["hm_tl"][0, :, 16, 16] = keep
    without = outputs()
    without["hm_tl"][0, :, 4, 4] = BACKGROUND
    for center_check in (True, False):
        found = run(bad, center_check)
        assert len(found) == 2
        np.testing.assert_array_equal(found, run(without, center_check))


def test_a_batch_counts_the_samples_with_non_finite_outputs_and_keeps_the_others():
    bad = outputs(3)
    bad["off_br"][1].fill_(float("nan"))  # sample 1: every output of the bottom-right corners
    bad["hm_ct"][2, 0, 0, 0] = float("inf")  # sample 2: one background cell
    sample = [eval_input(np.zeros((SIZE, SIZE, 3), np.uint8), 1.0, False)]
    found, non_finite = detect_batch(lambda images: bad, [sample] * 3, InferenceConfig(), CPU)
    assert non_finite == 2
    assert len(found[1]) == 0
    np.testing.assert_array_equal(found[0], run(outputs()))
    np.testing.assert_array_equal(found[2], found[0])


def test_fp16_outputs_are_finite_where_their_sum_would_not_be():
    """The outputs of fp16 autocast: each value fits fp16 (and is exact there), the sum of a map does not."""
    half = {key: value.half() for key, value in outputs().items()}
    sample = [eval_input(np.zeros((SIZE, SIZE, 3), np.uint8), 1.0, False)]
    found, non_finite = detect_batch(lambda images: half, [sample], InferenceConfig(), CPU)
    assert non_finite == 0
    np.testing.assert_array_equal(found[0], run(outputs()))


class EveryOtherNaN(torch.nn.Module):
    """The fixed-box network, whose outputs are all NaN on every other call (a 16-bit overflow on some images)."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = fixed_box_network().eval(), 0

    def forward(self, images):
        out = self.net(images)
        self.calls += 1
        return {k: v.fill_(float("nan")) for k, v in out.items()} if self.calls % 2 == 0 else out


def strict_json(path: Path):
    """The json at `path`, refusing NaN and Infinity as other languages' parsers (and the COCO server) do."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluation_warns_with_the_count_and_writes_valid_json(tmp_path, capsys):
    write_square_split(tmp_path, "val", num_images=4)
    args = argparse.Namespace(dataset="coco", data_dir=str(tmp_path), img_size=SIZE, test_flip=False)
    dataset = build_dataset(args, "val", train=False)
    out_json = tmp_path / "results.json"
    stats = evaluate(EveryOtherNaN(), dataset, InferenceConfig(), CPU, num_workers=0, out_json=out_json,
                     progress=False)
    assert "the network output NaN or infinity for 2 of 4 images" in capsys.readouterr().out
    results = strict_json(out_json)
    assert len(results) == 2 and all(np.isfinite(r["bbox"]).all() and np.isfinite(r["score"]) for r in results)
    strict_json(tmp_path / "results_metrics.json")
    assert 0 < stats["AP"] < 1


def test_the_detector_counts_and_demo_warns(tmp_path, monkeypatch, capsys):
    net = EveryOtherNaN()
    monkeypatch.setattr(engine.detector, "load_network", lambda path, device, onnx=None: (net, CLASS_NAMES, [1]))
    detector = Detector.from_checkpoint("unused.pt", device="cpu")
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    assert [len(found) for found in detector([image] * 4)] == [1, 1, 1, 1]  # a batch: one forward
    assert detector.non_finite == 0
    assert len(detector(image)) == 0 and detector.non_finite == 1
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "in" / name, image)
    args = demo.get_args_parser().parse_args(["--ckpt", "unused.pt", "--images", str(tmp_path / "in"), "--out",
                                              str(tmp_path / "out"), "--device", "cpu", "--batch_size", "1"])
    demo.main(args)
    assert "the network output NaN or infinity for 1 of 2 images" in capsys.readouterr().err
    written = strict_json(tmp_path / "out" / "detections.json")
    assert [len(image["detections"]) for image in written["images"]] == [1, 0]  # calls 3 and 4


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_whose_weights_are_not_finite_is_refused_naming_the_file_and_weight(tmp_path, value):
    """Before: it loaded, and test.py scored its NaN outputs AP 0 after running every image."""
    net = fixed_box_network()
    with torch.no_grad():
        net.branches[-1].hm_tl[2].bias[0] = value
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": net.state_dict(), "class_names": CLASS_NAMES, "epoch": 1,
                           "args": {"arch": "tiny_hourglass", "num_classes": 1, "img_size": SIZE}})
    for load in (lambda: model_from_checkpoint(load_inference_checkpoint(path), path),
                 lambda: Detector.from_checkpoint(path, device="cpu")):
        with pytest.raises(CheckpointError, match=f"{path}: its weight branches.0.hm_tl.2.bias holds 1 NaN or "
                                                  "infinite values of 1, so its outputs would not be finite"):
            load()
