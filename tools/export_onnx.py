"""Exports a centernet47 checkpoint (ours or converted official weights) to ONNX: backbone and heads, the eval-mode
outputs. Decoding and soft-NMS stay in Python (`test.py --onnx`, `demo.py --onnx`).

    python tools/export_onnx.py --ckpt ckpt/NAME/checkpoint.pt --out model.onnx --dynamic
    python tools/export_onnx.py --ckpt ckpt/official_104/checkpoint.pt --out hg104_511.onnx   # fixed 511 x 511

The file has one input `image` (N, 3, H, W), normalised BGR as datasets/transforms.eval_input makes it, and the
outputs of the eval dict in this order: hm_tl hm_br hm_ct emb_tl emb_br off_tl off_br off_ct, each
(N, *, (H + 1) / 4, (W + 1) / 4); a network without a center branch (--method cornernet) has no hm_ct and off_ct.
The batch size is always free; with --dynamic so are H and W (any k * unit - 1 up to --max_size), otherwise the
input is fixed to --img_size (default: the checkpoint's) and --max_size is refused (--img_size with --dynamic
too). Corner pooling is the exact log-step shifted maximum of nets/export_pool.py: standard operators only, no
plugin. The file carries the checkpoint's arch, variant, class names and input size as metadata (key
`centernet47`), so test.py and demo.py need only it.

Exporter: torch.onnx.export with dynamo=False (the TorchScript exporter). It needs nothing beyond onnx and gives
one graph for every input size; torch 2.14 warns that it is deprecated. README ("ONNX export") says why not dynamo.
"""
import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from datasets.transforms import MIN_TEST_INPUT
from engine.onnx_backend import METADATA_KEY
from nets import model_from_checkpoint, variant_name
from nets.export_pool import rounds_for, use_export_pooling
from utils.checkpoint import (MAX_IMG_SIZE, is_torch_checkpoint, load_inference_checkpoint,
                              refuse_onnx_as_checkpoint, saved_args)
from utils.errors import ArgumentError, UserError, WriteError, run_cli
from utils.files import file_to_write, make_folder, same_file

# The lowest opset that exports: 8 has no nearest-neighbour upsampling to a computed size (the hourglasses' up
# path); at 9 onnxruntime gives PyTorch's outputs (tests/test_export_onnx.py).
MIN_OPSET = 9


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("centernet47 ONNX export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py or tools/convert_official.py")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--dynamic", action="store_true", help="free input height and width (up to --max_size)")
    p.add_argument("--max_size", type=int, help="with --dynamic: the largest input height or width the file must "
                                                f"pool exactly (default {MAX_IMG_SIZE})")
    p.add_argument("--img_size", type=int, help="without --dynamic: the fixed input side (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


class _OrderedOutputs(torch.nn.Module):
    """The network with its eval dict as a tuple in `model.output_keys` order (the exporter's output names follow
    it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        return tuple(out[k] for k in self.model.output_keys)


@contextlib.contextmanager
def opset_named(opset: int):
    """An opset above what this torch's exporter knows is an ArgumentError naming --opset: torch says so only
    from deep inside the export, and its limit is not public API."""
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith("Unsupported onnx_opset_version"):
            raise
        raise ArgumentError(f"--opset {opset}: this torch {torch.__version__} cannot export it ({e}); pass a lower "
                            "--opset (default 17)") from None


def export(model: torch.nn.Module, path: Path, img_size: int, metadata: dict, opset: int = 17,
           dynamic: bool = False, max_size: int = MAX_IMG_SIZE) -> None:
    """Writes `model` (CenterNet, switched in place to eval mode and export pooling) to `path`, atomically, with
    `metadata` and the network's output names and variant stored as json under METADATA_KEY. Traced at img_size x
    img_size; the pooling rounds cover max_size when dynamic, else img_size."""
    unit = model.size_unit
    for name, size in (("img_size", img_size),) + ((("max_size", max_size),) if dynamic else ()):
        if size < unit - 1 or (size + 1) % unit:
            raise ArgumentError(f"--{name} {size}: this network takes sides of the form k * {unit} - 1 "
                                f"(e.g. {unit - 1}, {2 * unit - 1}, 511)")
    longest = max_size if dynamic else img_size
    use_export_pooling(model.eval(), rounds=rounds_for((longest + 1) // 4))
    outputs = list(model.output_keys)
    metadata = {**metadata, "outputs": outputs, "corner_pool": model.corner_pool, "center_branch": model.center_branch}
    axes = {"image": {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}}
    axes.update({k: {0: "batch", 2: "map_height", 3: "map_width"} if dynamic else {0: "batch"} for k in outputs})
    make_folder(path.parent, "--out")
    # A plain file (not mkstemp's 0600) so that the result gets the user's normal mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            open(tmp, "wb").close()  # a folder that refuses the file fails here, not after the export's minutes
        except OSError as e:
            raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
        with warnings.catch_warnings():
            # Shape checks and the per-size pooling rounds become constants; that is intended (see module doc).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            for message in (".*legacy TorchScript-based ONNX export", "The feature will be removed"):
                warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*Constant folding - Only steps=1.*")
            with torch.no_grad(), opset_named(opset):
                torch.onnx.export(_OrderedOutputs(model), (torch.zeros(1, 3, img_size, img_size),), tmp,
                                  dynamo=False, opset_version=opset, input_names=["image"], output_names=outputs,
                                  dynamic_axes=axes)
        proto = onnx.load(tmp)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_out(out: Path, ckpt: Path, force: bool) -> Path:
    """`out` (not a folder: `file_to_write`) if the export may write it: never the input or any other checkpoint
    (even with `force`, through symlinks and hard links too), an existing file only with `force`."""
    if same_file(out, ckpt):
        # A link to the checkpoint may already end in .onnx: then that name is no example to give.
        example = f", such as {out.with_suffix('.onnx')}" if out.suffix != ".onnx" else ""
        raise UserError(f"--out {out} is the input checkpoint {ckpt}; choose another name{example}")
    if is_torch_checkpoint(out):
        raise UserError(f"--out {out} is a checkpoint; an export never replaces one (not even with --force): choose "
                        "another name")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; choose another name or pass --force to replace it")
    return out


def main(args: argparse.Namespace) -> Path:
    if args.opset < MIN_OPSET:
        raise ArgumentError(f"--opset {args.opset}: the export needs opset {MIN_OPSET} or later (nearest-neighbour "
                            f"upsampling to a computed size); pass --opset {MIN_OPSET} or more (default 17)")
    if args.max_size is not None and not args.dynamic:  # it was ignored: the file came out fixed to --img_size
        raise ArgumentError(f"--max_size {args.max_size} sizes a --dynamic export; without --dynamic the input is "
                            "fixed to --img_size: add --dynamic or drop --max_size")
    if args.img_size is not None and args.dynamic:  # it was taken as the training size, which the metadata records
        raise ArgumentError(f"--img_size {args.img_size} fixes the input side, which --dynamic frees (up to "
                            "--max_size): drop one of them")
    max_size = MAX_IMG_SIZE if args.max_size is None else args.max_size
    if args.dynamic and 0 < max_size < MIN_TEST_INPUT:  # a file that test.py, demo.py and Detector then refuse
        raise ArgumentError(f"--max_size {max_size} is below the smallest test input, {MIN_TEST_INPUT} (test inputs "
                            f"are padded to the next 128k - 1): give {MIN_TEST_INPUT} or more")
    refuse_onnx_as_checkpoint(args.ckpt, "export again from the checkpoint it was made from (train.py's or "
                                         "tools/convert_official.py's .pt)")
    out = check_out(file_to_write(args.out, "--out", "model.onnx"), Path(args.ckpt), args.force)
    state = load_inference_checkpoint(args.ckpt)
    arch, class_names = saved_args(state)["arch"], list(state["class_names"])
    img_size = saved_args(state)["img_size"] if args.img_size is None else args.img_size
    model = model_from_checkpoint(state, args.ckpt)
    metadata = {"arch": arch, "class_names": class_names, "category_ids": state.get("category_ids"),
                "img_size": img_size, "size_unit": model.size_unit,
                "dynamic": args.dynamic, "max_size": max_size if args.dynamic else img_size,
                "checkpoint": str(args.ckpt)}
    start = time.perf_counter()
    export(model, out, img_size, metadata, args.opset, args.dynamic, max_size)
    shape = f"N x 3 x H x W (H, W up to {max_size})" if args.dynamic else f"N x 3 x {img_size} x {img_size}"
    print(f"{args.ckpt} -> {out} ({arch}, {variant_name(model.corner_pool, model.center_branch)}, "
          f"{len(class_names)} classes, input {shape}, opset {args.opset}, {out.stat().st_size / 2 ** 20:.1f} MiB, "
          f"{time.perf_counter() - start:.0f} s)")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
