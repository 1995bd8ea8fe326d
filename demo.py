"""Detects objects in your own images with a trained checkpoint: draws the boxes and writes all detections to json.

    python demo.py --ckpt ckpt/NAME/checkpoint.pt --images photo.jpg --out demo_out
    python demo.py --ckpt ckpt/NAME/checkpoint.pt --images my_folder/ --out demo_out --test_flip --score_thresh 0.4

jpg / png images of any size; a folder is read in name order, without its sub-folders. Files that cannot be read
are reported and skipped. Each image is written to --out under its own name with its boxes, class names and
scores drawn; `detections.json` lists every detection in original pixels. --out must be empty unless --force.
"""
import argparse
import json
import sys
from pathlib import Path

import cv2
from tqdm import tqdm

from utils.files import write_json
from datasets.image_io import load_image
from datasets.transforms import eval_input
from nets import build_model
from utils.checkpoint import load_checkpoint
from utils.device import select_device
from utils.inference import detect, official_config
from utils.visualize import draw

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("centernet47 demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (or the official converter)")
    p.add_argument("--images", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score_thresh", type=float, default=0.3, help="draw and save detections above this score")
    p.add_argument("--test_flip", action="store_true", help="also run the horizontally flipped image")
    p.add_argument("--test_scales", default="1", help="comma-separated scales, e.g. 0.75,1,1.25")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing files there")
    return p


def list_images(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    raise SystemExit(f"--images {source}: no such file or folder")


def main(args: argparse.Namespace) -> list[dict]:
    scales = [float(s) for s in args.test_scales.split(",") if s.strip()]
    images = list_images(Path(args.images))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"--out {out} is not empty; choose another folder or pass --force to replace its files")
    state = load_checkpoint(args.ckpt)
    class_names = state["class_names"]
    device = select_device(args.device)
    model = build_model(state["args"]["arch"], len(class_names))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    cfg = official_config(len(scales))

    out.mkdir(parents=True, exist_ok=True)
    results, skipped = [], []
    for path in tqdm(images, desc="detect", disable=len(images) < 2):
        try:
            image = load_image(path)
        except (OSError, ValueError) as e:
            print(f"skipped: {e}", file=sys.stderr)
            skipped.append(str(path))
            continue
        inputs = [eval_input(image, s, args.test_flip) for s in scales]
        dets = detect(model, inputs, cfg, device)
        dets = dets[dets[:, 4] >= args.score_thresh]
        cv2.imwrite(str(out / path.name), draw(image, dets, class_names))
        results += [{"file": path.name, "box": [round(float(v), 2) for v in d[:4]], "score": round(float(d[4]), 4),
                     "class": class_names[int(d[5])]} for d in dets]
    write_json(out / "detections.json", {"detections": results, "skipped": skipped})
    print(f"{len(images) - len(skipped)} images, {len(results)} detections written to {out}"
          + (f"; {len(skipped)} unreadable files skipped" if skipped else ""))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
