"""Converts an official CenterNet checkpoint (github Duankaiwen/CenterNet, CenterNet-52 / CenterNet-104 `.pkl`
state dicts), or an official CornerNet one (github princeton-vl/CornerNet, `CornerNet_500000.pkl`, Hourglass-104),
into a centernet47 checkpoint that test.py and demo.py read.

    python tools/convert_official.py --src CenterNet-104_480000.pkl --arch large_hourglass \
        --out ckpt/official_104/checkpoint.pt
    python tools/convert_official.py --src CornerNet_500000.pkl --arch large_hourglass \
        --out ckpt/cornernet_104/checkpoint.pt
    python test.py --ckpt ckpt/official_104/checkpoint.pt --data_dir data/coco --test_flip

--method auto (the default) tells the two apart by their keys: CornerNet's state dict has no center branch
(`ct_heats`, `ct_regrs`, `ct_cnvs`); a CornerNet checkpoint becomes `--method cornernet`, a CenterNet one
`--method centernet`. Each has the same layers in the same order as our network of that method; only the names
differ (CornerNet's corner pooling modules are named as CenterNet's, without the cascade's `look` layers). Each
official name is rewritten part by part (`kps.0.low2.low1.1.conv1` -> `hourglasses.0.inner.down.1.conv1`), and the
result must cover our model exactly, with the same shapes. BN counters that PyTorch 0.4 did not save are set to
zero.
"""
import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from nets import METHODS, model_config
from nets.hourglass import CenterNet
from utils.checkpoint import read_plain, save_checkpoint
from utils.errors import CheckpointError, UserError, run_cli
from utils.files import file_to_write

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]

# COCO's category id of each class above (ids run 1..90 with gaps).
COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
            34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
            62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]

SHOWN = 4  # entries named in an error

# The archs of the official networks: CenterNet-52, and CenterNet-104 and CornerNet.
OFFICIAL_ARCHS = ("small_hourglass", "large_hourglass")

# (pattern, replacement) applied in order to the official name without its `module.` prefixes.
RULES = [
    (r"^pre\.0\.conv\.", "stem.0.0."), (r"^pre\.0\.bn\.", "stem.0.1."), (r"^pre\.1\.", "stem.1."),
    (r"^kps\.", "hourglasses."), (r"\.up1(?=\.)", ".skip"), (r"\.low1(?=\.)", ".down"),
    (r"\.low2(?=\.)", ".inner"), (r"\.low3(?=\.)", ".up"),
    (r"^cnvs\.(\d+)\.conv\.", r"cnvs.\1.0."), (r"^cnvs\.(\d+)\.bn\.", r"cnvs.\1.1."),
    (r"^inters_\.", "inter_feats."), (r"^cnvs_\.", "inter_cnvs."),
    (r"^(tl|br)_cnvs\.(\d+)\.p1_conv1\.", r"branches.\2.pool_\1.conv_v."),
    (r"^(tl|br)_cnvs\.(\d+)\.look_conv1\.", r"branches.\2.pool_\1.look_h."),
    (r"^(tl|br)_cnvs\.(\d+)\.P1_look_conv\.", r"branches.\2.pool_\1.cascade_v."),
    (r"^(tl|br)_cnvs\.(\d+)\.p2_conv1\.", r"branches.\2.pool_\1.conv_h."),
    (r"^(tl|br)_cnvs\.(\d+)\.look_conv2\.", r"branches.\2.pool_\1.look_v."),
    (r"^(tl|br)_cnvs\.(\d+)\.P2_look_conv\.", r"branches.\2.pool_\1.cascade_h."),
    (r"^ct_cnvs\.(\d+)\.p1_conv1\.", r"branches.\1.pool_ct.conv_col."),
    (r"^ct_cnvs\.(\d+)\.p2_conv1\.", r"branches.\1.pool_ct.conv_row."),
    (r"^(tl|br|ct)_cnvs\.(\d+)\.p_conv1\.", r"branches.\2.pool_\1.merge.pool_conv."),
    (r"^(tl|br|ct)_cnvs\.(\d+)\.p_bn1\.", r"branches.\2.pool_\1.merge.pool_bn."),
    (r"^(tl|br|ct)_cnvs\.(\d+)\.conv1\.", r"branches.\2.pool_\1.merge.skip_conv."),
    (r"^(tl|br|ct)_cnvs\.(\d+)\.bn1\.", r"branches.\2.pool_\1.merge.skip_bn."),
    (r"^(tl|br|ct)_cnvs\.(\d+)\.conv2\.conv\.", r"branches.\2.pool_\1.merge.out.0."),
    (r"^(tl|br|ct)_cnvs\.(\d+)\.conv2\.bn\.", r"branches.\2.pool_\1.merge.out.1."),
    (r"\.(conv_[vh]|look_[hv]|conv_col|conv_row)\.conv\.", r".\1.0."),
    (r"\.(conv_[vh]|look_[hv]|conv_col|conv_row)\.bn\.", r".\1.1."),
    (r"^(tl|br|ct)_heats\.(\d+)\.0\.conv\.", r"branches.\2.hm_\1.0."), (r"^(tl|br|ct)_heats\.(\d+)\.1\.", r"branches.\2.hm_\1.2."),
    (r"^(tl|br)_tags\.(\d+)\.0\.conv\.", r"branches.\2.emb_\1.0."), (r"^(tl|br)_tags\.(\d+)\.1\.", r"branches.\2.emb_\1.2."),
    (r"^(tl|br|ct)_regrs\.(\d+)\.0\.conv\.", r"branches.\2.off_\1.0."), (r"^(tl|br|ct)_regrs\.(\d+)\.1\.", r"branches.\2.off_\1.2."),
]


def without_module_prefix(official: str) -> str:
    """The name without the `module.` that the official DummyModule adds, nor one more of each DataParallel that
    wrapped the network again before saving."""
    return re.sub(r"^(module\.)+", "", official)


def our_name(official: str) -> str:
    name = without_module_prefix(official)
    for pattern, replacement in RULES:
        name = re.sub(pattern, replacement, name)
    return name


def detect_method(official: dict[str, torch.Tensor]) -> str:
    """cornernet for a state dict without a center branch (princeton-vl/CornerNet's), else centernet."""
    has_center = any(without_module_prefix(key).startswith(("ct_heats.", "ct_regrs.", "ct_cnvs."))
                     for key in official)
    return "centernet" if has_center else "cornernet"


def convert_state_dict(official: dict[str, torch.Tensor], arch: str, num_classes: int = 80,
                       method: str = "centernet", config: dict | None = None) -> dict[str, torch.Tensor]:
    """Official state dict -> ours for `arch` and `method` (or for the CenterNet constructor arguments `config`,
    a network outside the arch table); any key or shape that does not fit is an error naming it."""
    with torch.device("meta"):
        expected = CenterNet(**(config or model_config(arch, num_classes, **METHODS[method]))).state_dict()
    converted = {}
    for key, value in official.items():
        name = our_name(key)
        if name not in expected:
            raise KeyError(f"official key {key} -> {name}, which {arch} ({method}) does not have (wrong --arch or "
                           "--method?)")
        if name in converted:
            raise KeyError(f"official key {key} -> {name}, which another key already filled")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"official key {key}: shape {tuple(value.shape)}, {arch} expects "
                             f"{tuple(expected[name].shape)} at {name}")
        converted[name] = value
    for name, value in expected.items():
        if name not in converted and name.endswith("num_batches_tracked"):
            converted[name] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in converted]
    if missing:
        raise KeyError(f"the official state dict lacks {len(missing)} weights of {arch} ({method}), e.g. "
                       f"{missing[:3]}")
    return converted


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("convert an official CenterNet or CornerNet checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="official .pkl (CenterNet-52_480000.pkl, CenterNet-104_480000.pkl or "
                                                "CornerNet_500000.pkl)")
    p.add_argument("--arch", required=True, choices=OFFICIAL_ARCHS,
                   help="small_hourglass for CenterNet-52, large_hourglass for CenterNet-104 and CornerNet")
    p.add_argument("--method", default="auto", choices=["auto", *METHODS],
                   help="the network the .pkl holds: centernet (Duankaiwen/CenterNet) or cornernet "
                        "(princeton-vl/CornerNet); auto: cornernet when it has no center branch")
    p.add_argument("--out", required=True, help="checkpoint to write (an existing file is not replaced)")
    return p


def read_official(src: Path) -> dict[str, torch.Tensor]:
    """The state dict of an official .pkl (read weights-only); one of our own checkpoints, or anything else that
    is not a state dict, is a UserError saying what it is."""
    official = read_plain(src, what="official checkpoint")
    if isinstance(official, dict) and isinstance(official.get("model"), dict) and "class_names" in official:
        raise UserError(f"--src {src} is already a centernet47 checkpoint (it has 'model' and 'class_names' "
                        "entries), not an official CenterNet .pkl: use it as it is (test.py --ckpt, demo.py --ckpt), "
                        "no conversion needed")
    if not isinstance(official, dict) or not official or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in official.items()):
        raise CheckpointError(f"--src {src} is not an official CenterNet checkpoint: expected a state dict (names "
                              f"to tensors, as the official .pkl files hold), got {instead_of_state_dict(official)}")
    return official


def instead_of_state_dict(value) -> str:
    """What `value` is, for the error of a file that is not a state dict: a dict's first entries that are not
    tensors, with their types, show a training snapshot."""
    if not isinstance(value, dict):
        return type(value).__name__
    if not value:
        return "an empty dict"
    others = [f"{k!r} ({type(v).__name__})" for k, v in value.items() if not isinstance(v, torch.Tensor)]
    if not others:
        return "a dict with keys that are not strings"
    return (f"a dict with entries {', '.join(others[:SHOWN])}{' ...' if len(others) > SHOWN else ''}: a training "
            "snapshot, which the official code does not write (other code's, such as xingyizhou/CenterNet's, holds "
            "another network)")


def main(args: argparse.Namespace) -> None:
    out = file_to_write(args.out, "--out", "checkpoint.pt")
    if out.exists():
        raise UserError(f"--out {out} exists; choose another path")
    official = read_official(Path(args.src))
    method = detect_method(official) if args.method == "auto" else args.method
    try:
        state = converted_checkpoint(official, args.arch, method, str(args.src))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"--src {args.src}: {e.args[0]}; {what_it_fits(official)}") from None
    save_checkpoint(out, state)
    print(f"{args.src} -> {out} ({args.arch}, --method {method}, {len(state['model'])} tensors)")


def what_it_fits(official: dict[str, torch.Tensor]) -> str:
    """Which --arch and --method the state dict converts to exactly, for the error of a conversion that failed:
    a wrong guess among two archs and two methods needs no more trials."""
    fitted = []
    for arch in OFFICIAL_ARCHS:
        for method in METHODS:
            try:
                convert_state_dict(official, arch, len(COCO_CLASSES), method)
            except (KeyError, ValueError):
                continue
            fitted.append(f"--arch {arch} --method {method}")
    if fitted:
        return f"the file fits {' or '.join(fitted)}: pass that"
    return ("the file fits none of the official networks (CenterNet-52, CenterNet-104, CornerNet-104 with COCO's 80 "
            "classes): is it a .pkl of github Duankaiwen/CenterNet or princeton-vl/CornerNet?")


def converted_checkpoint(official: dict[str, torch.Tensor], arch: str, method: str, src: str,
                         config: dict | None = None) -> dict:
    """Our checkpoint of an official state dict (see `convert_state_dict` for `config`): the network's weights,
    its constructor arguments, the COCO classes and the flags of the network it is (arch, method and its parts)."""
    config = config or model_config(arch, len(COCO_CLASSES), **METHODS[method])
    weights = convert_state_dict(official, arch, len(COCO_CLASSES), method, config)  # errors before the build
    model = CenterNet(**config)
    model.load_state_dict(weights, strict=True)
    return {"model": model.state_dict(), "model_config": config, "epoch": 0, "best_ap": -1.0,
            "class_names": COCO_CLASSES, "category_ids": COCO_IDS,
            "args": {"arch": arch, "num_classes": len(COCO_CLASSES), "img_size": 511, "method": method,
                     **METHODS[method], "converted_from": src}}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
