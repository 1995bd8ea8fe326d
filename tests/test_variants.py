"""The variants of the paper's ablation (--method, --corner_pool, --center_branch): their networks, loss and
decoding against the definitions, old checkpoints as centernet, and each variant through train, resume, test.py
with flip and multi-scale, ONNX export and Detector on the tiny arch."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from datasets.transforms import eval_input
from engine import Detector
from engine.inference import InferenceConfig, detect
from lib.cpool import bottom_pool, left_pool, right_pool, top_pool
from nets import METHODS, build_model, model_config, model_from_checkpoint, resolve_variant, saved_variant
from nets.corner_pool import CenterConv, CornerPool
from nets.export_pool import use_export_pooling
from nets.hourglass import OUTPUT_KEYS, CenterNet
from tests.test_official_parity import synthetic_outputs
from tests.test_demo import same_detections
from tools import export_onnx
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.decode import decode
from utils.errors import ArgumentError, CheckpointError
from utils.losses import LossConfig, centernet_loss, focal_loss, offset_loss

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("centernet47_test_cli_variants", REPO / "test.py")
test_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_cli)
CORNER_KEYS = {"hm_tl", "hm_br", "emb_tl", "emb_br", "off_tl", "off_br"}
CPU = torch.device("cpu")
RACCOON = REPO / "tests" / "data" / "raccoon"


def test_presets_and_overrides():
    assert resolve_variant() == resolve_variant("centernet") == {"corner_pool": "cascade", "center_branch": "pool"}
    assert resolve_variant("cornernet") == {"corner_pool": "plain", "center_branch": "none"}
    assert resolve_variant("cornernet", center_branch="conv") == {"corner_pool": "plain", "center_branch": "conv"}
    assert resolve_variant("centernet", corner_pool="plain") == {"corner_pool": "plain", "center_branch": "pool"}
    # a run from before the flags is centernet; the stored parts win over the stored preset
    assert saved_variant({"arch": "tiny_hourglass"}) == METHODS["centernet"]
    assert saved_variant({"method": "cornernet", "corner_pool": "plain", "center_branch": "pool"})["center_branch"] \
        == "pool"
    with pytest.raises(ValueError, match="unknown --center_branch 'both'"):
        resolve_variant(center_branch="both")


@pytest.mark.parametrize("corner_pool, center_branch", [(c, b) for c in ("cascade", "plain")
                                                        for b in ("pool", "conv", "none")])
def test_each_variant_has_its_outputs_and_only_its_modules(corner_pool, center_branch):
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 3, corner_pool=corner_pool, center_branch=center_branch)
    keys = CORNER_KEYS | ({"hm_ct", "off_ct"} if center_branch != "none" else set())
    out = model.eval()(torch.randn(1, 3, 63, 63))
    assert set(out) == keys == set(model.output_keys)
    names = set(model.state_dict())
    assert any(".pool_tl.look_h." in n for n in names) == (corner_pool == "cascade")
    assert any(".pool_ct." in n or ".hm_ct." in n or ".off_ct." in n for n in names) == (center_branch != "none")
    for stack in model.train()(torch.randn(2, 3, 63, 63)):
        assert set(stack) == keys


def test_centernet_is_the_network_of_before():
    """The default network is the one every earlier checkpoint holds: the branch modules in the order they were
    registered before the variants (an old checkpoint's optimizer state follows the parameter order), and the same
    network from a model_config without the variant keys."""
    default = build_model("tiny_hourglass", 2)
    modules = []
    for name, _ in default.branches[0].named_parameters():
        prefix = ".".join(name.split(".")[:2 if name.startswith("pool_") else 1])
        if prefix not in modules:
            modules.append(prefix)
    assert modules == ["pool_tl.conv_v", "pool_tl.look_h", "pool_tl.cascade_v", "pool_tl.conv_h", "pool_tl.look_v",
                       "pool_tl.cascade_h", "pool_tl.merge", "pool_br.conv_v", "pool_br.look_h", "pool_br.cascade_v",
                       "pool_br.conv_h", "pool_br.look_v", "pool_br.cascade_h", "pool_br.merge", "pool_ct.conv_col",
                       "pool_ct.conv_row", "pool_ct.merge", "hm_tl", "hm_br", "hm_ct", "emb_tl", "emb_br", "off_tl",
                       "off_br", "off_ct"]
    old_config = {k: v for k, v in model_config("tiny_hourglass", 2).items() if k not in ("corner_pool",
                                                                                          "center_branch")}
    shapes = [(n, tuple(p.shape)) for n, p in default.named_parameters()]
    assert shapes == [(n, tuple(p.shape)) for n, p in CenterNet(**old_config).named_parameters()]


def test_plain_corner_pool_is_cornernets_and_center_conv_has_no_maxima():
    """CornerNet's TL module: Top(a) + Left(c) of two 3x3 conv-BN-ReLU projections, then the shared merge; the
    center module of the conv variant: the same with a + b, no pooling."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 7)
    for vertical, horizontal, v, h in (("top", "left", top_pool, left_pool), ("bottom", "right", bottom_pool,
                                                                             right_pool)):
        module = CornerPool(8, 4, vertical, horizontal).eval()
        # the module's own operations, written out, on the same input in this process: equal bit for bit
        want = module.merge(x, v(module.conv_v(x)) + h(module.conv_h(x)))
        torch.testing.assert_close(module(x), want, rtol=0, atol=0)
        # and it is not the cascade: the cross-direction look would change the pooled map
        assert not torch.equal(v(module.conv_v(x)), v(module.conv_v(x) + h(module.conv_h(x))))
    center = CenterConv(8, 4).eval()
    torch.testing.assert_close(center(x), center.merge(x, center.conv_col(x) + center.conv_row(x)), rtol=0, atol=0)
    export = use_export_pooling(CornerPool(8, 4, "bottom", "right").eval())
    torch.testing.assert_close(export(x), export.merge(x, bottom_pool(export.conv_v(x)) + right_pool(export.conv_h(x))),
                               rtol=0, atol=0)


def corner_only(out: dict) -> dict:
    return {k: v for k, v in out.items() if not k.endswith("_ct")}


def test_loss_without_a_center_branch_leaves_out_the_center_terms_only():
    """CornerNet's AELoss: the CenterNet loss less the center focal and offset terms of each stack (same
    normalisation by the stack count); the center targets in the batch are not read."""
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 2).train()
    outputs = model(torch.randn(2, 3, 63, 63))
    hm = torch.zeros(2, 2, 16, 16)
    hm[0, 1, 3, 4] = hm[1, 0, 9, 2] = 1
    batch = {f"hm_{k}": hm for k in ("tl", "br", "ct")}
    batch.update({f"ind_{k}": torch.tensor([[52, 0], [146, 0]]) for k in ("tl", "br", "ct")})
    batch.update({f"off_{k}": torch.rand(2, 2, 2) for k in ("tl", "br", "ct")})
    batch["mask"] = torch.tensor([[1, 0], [1, 0]], dtype=torch.uint8)
    config = LossConfig()
    total, terms = centernet_loss(outputs, batch, config)
    corner_total, corner_terms = centernet_loss([corner_only(o) for o in outputs], batch, config)
    ct_focal = sum(focal_loss(o["hm_ct"], batch["hm_ct"]) for o in outputs) / len(outputs)
    ct_off = sum(offset_loss(o["off_ct"], batch["ind_ct"], batch["off_ct"], batch["mask"]) for o in outputs) \
        / len(outputs)
    torch.testing.assert_close(corner_terms["focal"], terms["focal"] - ct_focal)
    torch.testing.assert_close(corner_terms["off"], terms["off"] - ct_off)
    for k in ("pull", "push"):
        torch.testing.assert_close(corner_terms[k], terms[k], rtol=0, atol=0)
    torch.testing.assert_close(corner_total, sum(corner_terms.values()))
    no_center_targets = {k: v for k, v in batch.items() if not k.endswith("_ct")}
    torch.testing.assert_close(centernet_loss([corner_only(o) for o in outputs], no_center_targets, config)[0],
                               corner_total, rtol=0, atol=0)


def test_decoding_without_centers_is_the_corner_pairing_and_skips_the_check():
    out = synthetic_outputs(seed=5, height=200, width=150, scale=1.0)
    boxes, centers = decode(out)
    corner_boxes, no_centers = decode(corner_only(out))
    assert no_centers is None
    torch.testing.assert_close(corner_boxes, boxes, rtol=0, atol=0)
    image = np.zeros((200, 150, 3), np.uint8)
    inputs = [eval_input(image, 1.0, flip=True)]
    checked = detect(lambda images: out, inputs, InferenceConfig(), CPU)
    unchecked = detect(lambda images: out, inputs, InferenceConfig(center_check=False), CPU)
    cornernet = detect(lambda images: corner_only(out), inputs, InferenceConfig(), CPU)
    np.testing.assert_array_equal(unchecked, cornernet)
    assert len(cornernet) > len(checked) > 0  # the check drops the boxes without a center in their region


def test_old_checkpoints_load_as_centernet(tmp_path):
    """A checkpoint with neither variant flags in its args nor variant keys in its model_config (as every
    checkpoint before the variants) builds the centernet network; one whose variant does not fit its weights
    names the first misfit."""
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 1)
    old_config = {k: v for k, v in model_config("tiny_hourglass", 1).items() if k not in ("corner_pool",
                                                                                          "center_branch")}
    args = {"arch": "tiny_hourglass", "img_size": 127}
    for name, extra in (("no_config", {}), ("old_config", {"model_config": old_config})):
        state = {"model": model.state_dict(), "class_names": ["a"], "args": args, **extra}
        loaded = model_from_checkpoint(state, name)
        assert (loaded.corner_pool, loaded.center_branch) == ("cascade", "pool")
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v)
    wrong = {"model": model.state_dict(), "class_names": ["a"], "args": {**args, "method": "cornernet"}}
    with pytest.raises(CheckpointError, match="do not fit the network they name: .*look_h"):
        model_from_checkpoint(wrong, "wrong.pt")
    odd = {"model": model.state_dict(), "class_names": ["a"], "args": {**args, "corner_pool": "diagonal"}}
    with pytest.raises(CheckpointError, match="odd.pt: unknown --corner_pool 'diagonal'"):
        model_from_checkpoint(odd, "odd.pt")
    config = model_config("tiny_hourglass", 1)
    for bad, message in (([1, 2], "its model_config is a list, not a dict"),
                         ({**config, "depth": 3}, "does not build a network: .*'depth'"),
                         ({**config, "num_classes": "1"}, "'class_names' lists 1 classes, but the network has '1' "),
                         ({**config, "cnv_dim": "256"}, "does not build a network")):
        state = {"model": model.state_dict(), "class_names": ["a"], "args": args, "model_config": bad}
        with pytest.raises(CheckpointError, match=message):  # each was a TypeError traceback
            model_from_checkpoint(state, "bad.pt")


def train_args(shapes_dir: Path, ckpt_dir: Path, *extra: str):
    return train.get_args_parser().parse_args([
        "--log_name", "run", "--ckpt_dir", str(ckpt_dir), "--data_dir", str(shapes_dir), "--train_split", "train",
        "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu", "--lr", "1e-3", "--val_interval", "0", *extra])


def eval_args(ckpt: Path, shapes_dir: Path, *extra: str):
    return test_cli.get_args_parser().parse_args([
        "--ckpt", str(ckpt), "--data_dir", str(shapes_dir), "--val_split", "val", "--device", "cpu",
        "--num_workers", "0", "--topk", "20", *extra])


VARIANTS = {  # the ablation's networks that centernet's own tests do not cover
    "cornernet": (["--method", "cornernet"], ("plain", "none")),
    "cre": (["--method", "cornernet", "--center_branch", "conv"], ("plain", "conv")),
    "cre_ctp": (["--corner_pool", "plain"], ("plain", "pool")),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_trains_resumes_evaluates_exports_and_detects(name, shapes_dir, tmp_path):
    flags, (corner_pool, center_branch) = VARIANTS[name]
    train.main(train_args(shapes_dir, tmp_path, "--num_epochs", "1", *flags))
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    assert (state["args"]["corner_pool"], state["args"]["center_branch"]) == (corner_pool, center_branch)
    assert (state["model_config"]["corner_pool"], state["model_config"]["center_branch"]) == (corner_pool,
                                                                                             center_branch)
    before = path.read_bytes()
    with pytest.raises(ArgumentError, match=f"--resume: {path} is a .* network \\(--corner_pool {corner_pool} "
                                            f"--center_branch {center_branch}\\)"):
        train.main(train_args(shapes_dir, tmp_path, "--num_epochs", "2", "--resume"))  # the centernet default
    assert path.read_bytes() == before
    train.main(train_args(shapes_dir, tmp_path, "--num_epochs", "2", "--resume", *flags))
    assert load_checkpoint(path)["epoch"] == 2

    for extra in (["--test_flip"], ["--test_flip", "--test_scales", "0.5,1"]):
        stats = test_cli.main(eval_args(path, shapes_dir, *extra))
        assert 0 <= stats["AP"] <= 1
    if center_branch == "none":
        with pytest.raises(ArgumentError, match="without a center branch .* has no center check"):
            test_cli.main(eval_args(path, shapes_dir, "--center_check", "off"))

    # Detector on an untrained network of the variant whose heatmap logits are spread (tests/test_export_onnx.py
    # peaked_tiny), so that the two runtimes' round-off cannot reorder near-equal scores; its checkpoint names the
    # variant by its flags only, as a converted official checkpoint does.
    torch.manual_seed(1)
    model = build_model("tiny_hourglass", 1, corner_pool=corner_pool, center_branch=center_branch)
    with torch.no_grad():
        for heads in model.branches:
            for head in (heads.hm_tl, heads.hm_br) + ((heads.hm_ct,) if center_branch != "none" else ()):
                head[-1].weight.mul_(1000)
    state = {"model": model.state_dict(), "class_names": ["raccoon"],
             "args": {"arch": "tiny_hourglass", "img_size": 127, "method": "centernet", "corner_pool": corner_pool,
                      "center_branch": center_branch}}
    peaked, onnx = tmp_path / "peaked.pt", tmp_path / "peaked.onnx"
    save_checkpoint(peaked, state)
    export_onnx.main(export_onnx.get_args_parser().parse_args(
        ["--ckpt", str(peaked), "--out", str(onnx), "--dynamic", "--max_size", "767"]))
    images = sorted((RACCOON / "val").glob("*.jpg"))[:2]
    found = {}
    for source in (peaked, onnx):
        detector = Detector.from_checkpoint(source, device="cpu", test_flip=True, test_scales=(0.5, 1.0))
        assert (detector.model.corner_pool, detector.model.center_branch) == (corner_pool, center_branch)
        assert list(detector.model.output_keys) == [k for k in OUTPUT_KEYS if center_branch != "none" or
                                                    not k.endswith("_ct")]
        found[source.suffix] = [(i, box, float(s)) for i, d in enumerate(detector(images))
                                for box, s in zip(d.boxes, d.scores)]
    assert len(found[".pt"]) > 10 and same_detections(found[".onnx"], found[".pt"])
    stats = test_cli.main(test_cli.get_args_parser().parse_args([
        "--onnx", str(onnx), "--data_dir", str(RACCOON), "--val_split", "val", "--device", "cpu", "--num_workers",
        "0", "--test_flip"]))
    assert 0 <= stats["AP"] <= 1


def test_a_checkpoint_from_before_the_variants_resumes_as_centernet(shapes_dir, tmp_path):
    train.main(train_args(shapes_dir, tmp_path, "--num_epochs", "1"))
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    for entry in (state["args"], state["model_config"]):
        for key in ("method", "corner_pool", "center_branch"):
            entry.pop(key, None)
    save_checkpoint(path, state)
    with pytest.raises(ArgumentError, match=r"is a centernet network \(--corner_pool cascade --center_branch pool\)"
                                            ", not cornernet"):
        train.main(train_args(shapes_dir, tmp_path, "--num_epochs", "2", "--resume", "--method", "cornernet"))
    train.main(train_args(shapes_dir, tmp_path, "--num_epochs", "2", "--resume"))
    resumed = load_checkpoint(path)
    assert resumed["epoch"] == 2 and resumed["args"]["method"] == "centernet"
    assert (resumed["model_config"]["corner_pool"], resumed["model_config"]["center_branch"]) == ("cascade", "pool")


def test_center_check_off_evaluates_a_centernet_checkpoint_without_it(shapes_dir, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 4)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "class_names": ["rectangle", "ellipse", "triangle", "cross"],
                           "args": {"arch": "tiny_hourglass", "img_size": 127}})
    test_cli.main(eval_args(ckpt, shapes_dir, "--test_flip"))
    test_cli.main(eval_args(ckpt, shapes_dir, "--test_flip", "--center_check", "off"))
    printed = capsys.readouterr().out
    assert "centernet, center check on" in printed and "centernet, center check off" in printed
    results = sorted(p.name for p in tmp_path.glob("results_*.json") if "_per_class" not in p.name
               and not p.name.endswith("_metrics.json"))
    assert len(results) == 2  # the unchecked results are named after the changed setting, beside the official
