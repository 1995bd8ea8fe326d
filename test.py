"""Evaluates a trained CenterNet on the val split of a COCO-format data set: COCO AP table, the paper's false
discovery rates (FD, Table 3), per-class AP and the results json, written beside the checkpoint.

    python test.py --log_name coco_hg_511_ddp --dataset coco --test_flip
    python test.py --log_name coco_hg_511_ddp --dataset coco --test_flip --test_scales 0.6,1,1.2,1.5,1.8
    torchrun --nproc_per_node 8 test.py ...   # the images are split over the processes; same AP

The first is the official single-scale test (which always adds the flipped image), the second the official
multi-scale test (box merging turns on with several scales, --merge auto). Post-processing follows the official
test code (engine/inference.py); --inplace_nms also reproduces its in-place soft-NMS, stale rows included.

The results json is named after what makes it differ: results_<split>_<checkpoint stem>_s<scales>[_flip].json
(results_val2017_checkpoint_s1_flip.json for the first command), plus `_onnx` for --onnx and a short hash of the
post-processing flags when they are not the official ones (e.g. another --topk), of --amp, and of --data_dir when it
is not the folder the checkpoint trained on. Beside it go the per-class table (`..._per_class.csv`),
precision-recall curves (`..._pr.png`) and every printed number in `..._metrics.json` (AP ... ARl as COCOeval's
fractions, FD ... FD_L in percent, null where undefined). Earlier results are never replaced without
--force. COCO test-dev (annotations/image_info_test-dev2017.json, images in test2017/) has no annotations: the
results go to detections_test-dev2017_<run>-checkpoint-s100-flip_results.json for the COCO evaluation server,
which gives the AP:
    python test.py --log_name coco_hg_511_ddp --val_split test-dev2017 --test_flip

The checkpoint is CKPT_DIR/LOG_NAME/checkpoint.pt unless --ckpt names one. Architecture, variant (--method),
classes and training input size come from it; --arch and --img_size, when given, must agree with it.
--center_check off evaluates a network with a center branch without the center check (the paper's "CRE at test
time" comparison); a network without one (--method cornernet) has none to turn off.

    python test.py --onnx model.onnx --dataset coco --data_dir data/shapes --val_split val

--onnx evaluates a file of tools/export_onnx.py (exported with --dynamic) on onnxruntime instead, with the same
decoding and soft-NMS; its metadata holds the classes and arch. Results json beside the .onnx file.
"""
import argparse
from pathlib import Path

import torch

from datasets import build_dataset
from datasets.coco_eval import BACKENDS, check_backend, check_results_free, results_path
from datasets.transforms import eval_sizes
from engine.inference import MAX_TOPK, InferenceConfig, build_eval_config, changed_settings, evaluate, parse_scales
from engine.onnx_backend import OnnxModel
from engine.run_folder import check_log_name
from nets import model_from_checkpoint, variant_name
from utils import dist
from utils.checkpoint import load_inference_checkpoint, refuse_onnx_as_checkpoint, saved_args
from utils.checks import check_non_negative_int
from utils.cpu_memory import keep_freed_memory
from utils.device import select_device
from utils.errors import ArgumentError, DataError, run_cli

DEFAULTS = InferenceConfig()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("centernet47 evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log_name", help="run folder under --ckpt_dir holding checkpoint.pt")
    p.add_argument("--ckpt_dir", default="ckpt", help="root of the run folders")
    p.add_argument("--ckpt", help="checkpoint file to evaluate (instead of CKPT_DIR/LOG_NAME/checkpoint.pt)")
    p.add_argument("--onnx", help="evaluate this file of tools/export_onnx.py on onnxruntime instead")
    p.add_argument("--dataset", default="coco", choices=["coco"], help="COCO-format data (COCO or your own)")
    p.add_argument("--data_dir", default="data/coco")
    p.add_argument("--val_split", default="val2017")
    p.add_argument("--arch", help="must match the checkpoint's (default: the checkpoint's)")
    p.add_argument("--img_size", type=int, help="must match the checkpoint's training size (default: the checkpoint's)")
    p.add_argument("--test_flip", action="store_true",
                   help="also run the horizontally flipped image (the official test always does)")
    p.add_argument("--test_scales", default="1", help="comma-separated scales, e.g. 0.5,0.75,1,1.25,1.5")
    p.add_argument("--topk", type=int, default=DEFAULTS.topk,
                   help=f"corners and centers kept per heatmap (at most {MAX_TOPK})")
    p.add_argument("--ae_threshold", type=float, default=DEFAULTS.ae_threshold, help="max embedding distance")
    p.add_argument("--nms_threshold", type=float, default=DEFAULTS.nms_threshold,
                   help="soft-NMS Nt, which only hard and linear soft-NMS use: the gaussian soft-NMS run here (the "
                        "official method) ignores it")
    p.add_argument("--weight_exp", "--w_exp", type=float, default=DEFAULTS.weight_exp,
                   help="soft-NMS box-merge weight exponent")
    p.add_argument("--merge", default="auto", choices=["auto", "on", "off"],
                   help="soft-NMS with box merging; auto: only with several --test_scales (the official configs)")
    p.add_argument("--inplace_nms", action="store_true",
                   help="the official in-place soft-NMS, stale rows included, for exact comparison with the "
                        "published numbers (README.md)")
    p.add_argument("--center_check", choices=["on", "off"],
                   help="keep only boxes with a center keypoint in their central region (default: on for a network "
                        "with a center branch); off evaluates a CenterNet network as CornerNet's test does")
    p.add_argument("--num_workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action="store_true",
                   help="16-bit: autocast to --amp_dtype on CUDA; on the CPU the bf16 network (README: CPU inference)")
    p.add_argument("--amp_dtype", default="fp16", choices=["fp16", "bf16"],
                   help="autocast dtype on CUDA with --amp: bf16 for a network trained with train.py --amp_dtype bf16, "
                        "whose activations may not fit fp16's range")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="replace the results of an earlier evaluation of the same "
                   "model with the same settings")
    p.add_argument("--eval_backend", default="pycocotools", choices=BACKENDS,
                   help="COCO scoring: pycocotools, or faster-coco-eval (the same numbers, faster)")
    return p


def checkpoint_path(args: argparse.Namespace) -> Path:
    if args.ckpt and args.log_name:  # one of them would be ignored without a word
        raise ArgumentError(f"--ckpt {args.ckpt} and --log_name {args.log_name} both name the checkpoint to evaluate: "
                            "give one")
    if args.ckpt:
        refuse_onnx_as_checkpoint(args.ckpt)
        return Path(args.ckpt)
    if not args.log_name:
        raise ArgumentError("give --log_name (evaluates CKPT_DIR/LOG_NAME/checkpoint.pt) or --ckpt PATH")
    check_log_name(args.log_name, "; --ckpt PATH evaluates a checkpoint file elsewhere")
    return Path(args.ckpt_dir) / args.log_name / "checkpoint.pt"


def settings_from_checkpoint(args: argparse.Namespace, state: dict, path: Path) -> None:
    """Takes arch, num_classes and img_size from the checkpoint (or the .onnx file's metadata) into `args`; flags
    that disagree are an error."""
    saved = saved_args(state)
    for name in ("arch", "img_size"):
        given = getattr(args, name)
        if given is not None and given != saved[name]:
            raise ArgumentError(f"--{name} {given} does not match the checkpoint {path}, trained with "
                                f"{name} {saved[name]}; drop the flag or pass --{name} {saved[name]}")
        setattr(args, name, saved[name])
    args.num_classes = len(state["class_names"])


def check_fits_export(model: OnnxModel, images: list[dict], scales: list[float], split: str) -> None:
    """Refuses, before any work, val images whose test input at the largest scale exceeds the export's --max_size
    (evaluation does not shrink them: the AP would not be the model's). Entries without width and height are
    checked as they are read."""
    sides = [(max(eval_sizes(im.get(k, 0), max(scales))[1] for k in ("width", "height")), im) for im in images]
    too_large = [(side, im) for side, im in sides if side > model.max_size]
    if too_large:
        side, largest = max(too_large, key=lambda pair: pair[0])
        raise ArgumentError(f"{model.path} takes inputs up to {model.max_size} pixels, but {len(too_large)} image(s) "
                            f"of {split} are larger at test scale {max(scales):g} ({largest['file_name']}: {side}); "
                            f"export again with --max_size {side}, or test at smaller --test_scales")


def autocast_setting(amp: bool, dtype: str, device: torch.device) -> bool | str:
    """The `amp` of engine.inference.evaluate for --amp and --amp_dtype: False, the dtype's name on CUDA, or True on
    the CPU (whose 16-bit path is always the bf16 network, so its results keep one name)."""
    if not amp:
        return False
    return dtype if device.type == "cuda" else True


def read_model_and_data(args: argparse.Namespace, device: torch.device) -> tuple:
    """(checkpoint path, its state, the ONNX model or None, the val split) for `args`, which takes the checkpoint's
    settings; refuses a split of other classes or with images missing."""
    if args.onnx:
        if args.ckpt or args.log_name or args.amp:
            raise ArgumentError("--onnx evaluates the exported file alone: drop --ckpt, --log_name and --amp")
        model = OnnxModel(args.onnx, device)
        model.require_dynamic("the val images")
        path, state = model.path, {"args": {"arch": model.arch, "img_size": model.img_size},
                                   "class_names": model.class_names}
    else:
        path = checkpoint_path(args)
        state = load_inference_checkpoint(path)
        model = None
    settings_from_checkpoint(args, state, path)
    dataset = build_dataset(args, args.val_split, train=False, test_scales=args.test_scales)
    if list(dataset.class_names) != list(state["class_names"]):
        raise DataError(f"{path} was trained on classes {state['class_names']}, but {args.data_dir} "
                        f"{args.val_split} has {dataset.class_names}")
    dataset.check_images_there()  # before the detections of the images before it
    return path, state, model, dataset


def main(args: argparse.Namespace) -> dict:
    args = argparse.Namespace(**vars(args))  # completed below; the caller's flags stay as given, to run again
    check_non_negative_int("--num_workers", args.num_workers)
    args.test_scales = parse_scales(args.test_scales)
    cfg = build_eval_config(args)  # refuses settings that cannot work before anything is read or written
    check_backend(args.eval_backend)
    dist.init_distributed(dist.launched(), args.local_rank, args.device)
    dist.check_same_flags(vars(args), {"data_dir", "ckpt_dir", "ckpt", "onnx"}, {"local_rank", "num_workers"})
    device = select_device(args.device, dist.local_rank())
    # Each process reads its own copy of the files: an error on one node is raised on all (the others raised a
    # disconnect's traceback).
    path, state, model, dataset = dist.on_every_process(lambda: read_model_and_data(args, device))
    # Each process scores its share of its own copy: copies of other sizes would leave images out, silently.
    dist.check_same_input({"images": len(dataset), "classes": list(dataset.class_names),
                           "checkpoint steps": state.get("global_step")})
    if model is None:
        model = model_from_checkpoint(state, path).to(device).eval()
    else:
        check_fits_export(model, dataset.images, args.test_scales, args.val_split)
    has_center = "hm_ct" in model.output_keys
    if args.center_check and not has_center:
        raise ArgumentError(f"--center_check {args.center_check}: {path} is a network without a center branch "
                            f"({variant_name(model.corner_pool, model.center_branch)}), which has no center check; "
                            "drop the flag")

    amp = autocast_setting(args.amp, args.amp_dtype, device)
    settings = changed_settings(cfg, len(args.test_scales), amp)
    trained_on = saved_args(state).get("data_dir")
    if trained_on is not None and Path(trained_on).resolve() != Path(args.data_dir).resolve():
        settings["data_dir"] = str(Path(args.data_dir).resolve())  # another data set's split of the same name
    out_json = results_path(path, args.val_split, args.test_scales, args.test_flip, bool(args.onnx), settings,
                            not dataset.has_annotations)
    check_results_free(out_json, args.force)
    if dist.is_main():
        check = "" if not has_center else f", center check {'off' if args.center_check == 'off' else 'on'}"
        print(f"evaluating {path} ({args.arch}, {variant_name(model.corner_pool, model.center_branch)}{check}, "
              f"{args.num_classes} classes) on {len(dataset)} images of "
              f"{args.data_dir} {args.val_split}, scales {args.test_scales}, flip {args.test_flip}, "
              f"{dist.world_size()} process(es) on {device}", flush=True)
        for note in dataset.ground_truth_notes:
            print(f"warning: {note}", flush=True)
    if device.type == "cpu":
        keep_freed_memory()  # activations reused from one image to the next (utils/cpu_memory.py)
    stats = evaluate(model, dataset, cfg, device, num_workers=args.num_workers, amp=amp,
                     out_json=out_json, backend=args.eval_backend)
    if dist.is_main():
        print(f"results written to {out_json}")
    dist.cleanup()
    return stats


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
