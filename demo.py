"""Detects objects in your own images or videos with a trained checkpoint (or an exported .onnx file): draws the
boxes and writes all detections to json.

    python demo.py --ckpt ckpt/NAME/checkpoint.pt --images photo.jpg --out demo_out
    python demo.py --ckpt ckpt/NAME/checkpoint.pt --images my_folder/ --out demo_out --test_flip --score_thresh 0.4
    python demo.py --ckpt ckpt/NAME/checkpoint.pt --video in.mp4 --out out.mp4 --batch_size 8
    python demo.py --onnx model.onnx --images my_folder/ --out demo_out

Images: any format OpenCV reads (jpg, png, bmp, webp, tif, ...), of up to 2^27 pixels (larger files, by their
header, are skipped as unreadable, as are those whose test input at a --test_scales scale would exceed 4095 x 4095
pixels); a folder is read in name order, without its sub-folders, --batch_size images at a time (those of one
input size share a forward). Files that cannot be read are reported and skipped, and the other files of a folder
(names without an image suffix) counted. Each image is written to --out under its own name with its boxes, class
names and scores drawn (with .png added where its format cannot hold a colour drawing: scan.pgm.png, or
scan.pgm.2.png where the folder also holds an image scan.pgm.png);
`detections.json` lists every image read (`images`: its path as given, and its detections in original pixels, also
when there are none) and the files skipped (`skipped`). --out must be empty unless --force, and never holds
an input image.

Video (anything OpenCV reads): --out is the annotated video (.mp4 written with the mp4v codec, .avi with MJPG) and
the json beside it (out.json) lists the detections of each frame. Neither replaces an existing file without --force.
The json is written (atomically) as the run starts and every few seconds with "complete": false, so an interrupted
run keeps what it did (also when stopped by Ctrl-C or SIGTERM); the video appears under its name only when complete,
and the hidden temporary video of a run that was killed (SIGKILL, a power cut) is removed by the next run.

The detection itself is engine.Detector, which your own code can call too (README "Python API").
"""
import argparse
import contextlib
import itertools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from datasets.image_io import IMAGE_SUFFIXES, drawing_names, load_image, write_image
from engine.detector import Detections, Detector
from engine.inference import MAX_TOPK, InferenceConfig, non_finite_warning, official_config, parse_scales
from engine.visualize import draw
from utils.checkpoint import refuse_onnx_as_checkpoint
from utils.checks import check_number, check_positive_int
from utils.errors import ArgumentError, DataError, MissingFileError, UserError, WriteError, run_cli
from utils.files import make_folder, pid_temporary, remove_dead_temporaries, same_file, write_json

VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
JSON_EVERY_S = 5.0  # how often a long run saves the detections so far
DEFAULTS = InferenceConfig()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("centernet47 demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint written by train.py (or the official converter)")
    model.add_argument("--onnx", help="file written by tools/export_onnx.py, run on onnxruntime")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="an image file or a folder of images")
    source.add_argument("--video", help="a video file")
    p.add_argument("--out", required=True, help="output folder (--images) or video file (--video)")
    p.add_argument("--batch_size", type=int, default=4, help="images or frames per forward")
    p.add_argument("--score_thresh", type=float, default=0.3, help="draw and save detections scoring at least this")
    p.add_argument("--test_flip", action="store_true", help="also run the horizontally flipped image")
    p.add_argument("--test_scales", default="1", help="comma-separated scales, e.g. 0.75,1,1.25")
    p.add_argument("--max_per_image", type=int, default=DEFAULTS.max_per_image,
                   help="keep the best N detections of an image (raise it for crowded scenes)")
    p.add_argument("--topk", type=int, default=DEFAULTS.topk,
                   help=f"corners and centers kept per heatmap, over all classes (at most {MAX_TOPK}): boxes are "
                        "paired from them, so a scene with more objects needs more")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action="store_true",
                   help="16-bit: the bf16 network on the CPU, fp16 autocast on CUDA (README: CPU inference)")
    p.add_argument("--force", action="store_true", help="replace existing outputs (never an input file)")
    return p


def list_images(source: Path) -> list[Path]:
    """The image file `source`, or the files of folder `source` whose names end in an image suffix, in name order;
    the folder's other files and its sub-folders are counted in notes on stderr, as they are not read."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        if source.exists():  # a named pipe, a device, a socket
            raise UserError(f"--images {source}: neither a regular file nor a folder")
        raise MissingFileError(f"--images {source}: no such file or folder")
    entries = sorted(source.iterdir())
    # Every entry but folders and named pipes (reading one waits for a writer): a device, a socket or a broken
    # link named as an image is refused by the reader and listed as skipped, not passed over in silence.
    files = [p for p in entries if not p.is_dir() and not p.is_fifo()]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    looked_for = f"looked for {' '.join(sorted(IMAGE_SUFFIXES))}"
    if not images:
        raise UserError(f"--images {source}: no image files in this folder (sub-folders are not read; {looked_for})")
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        print(f"note: {len(others)} files of {source} are not read, as their names end in no image suffix "
              f"({looked_for}): {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}", file=sys.stderr)
    # A data set's image folder often has sub-folders (file_name cam1/0001.jpg): say that their images were left out.
    folders = [p.name for p in entries if p.is_dir()]
    if folders:
        print(f"note: {len(folders)} sub-folders of {source} are not read (give each as --images): "
              f"{', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''}", file=sys.stderr)
    return images


def detect(detector: Detector, frames: list[np.ndarray]) -> list[Detections]:
    """The detector on a batch of frames, with one note the first time an image is too large for an ONNX export."""
    before = detector.scaled_down
    found = detector(frames)
    if detector.scaled_down and not before:
        tqdm.write(f"note: {detector.model.path} takes inputs up to {detector.model.max_size} px: larger images are "
                   "scaled down to fit (boxes are in original pixels); export with a larger --max_size to avoid it")
    return found


def as_records(found: Detections) -> list[dict]:
    ids = found.category_ids.tolist() if found.category_ids is not None else [None] * len(found)
    return [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 4), "class": name,
             "category_id": category_id}
            for box, score, name, category_id in zip(found.boxes, found.scores, found.names, ids)]


class JsonLog:
    """The detections json of a run, saved atomically when the `with` block starts, at most every JSON_EVERY_S
    seconds (`maybe_save`) and when it ends. The first save replaces a json of an earlier run (--force) at once: a
    run killed before a later save (SIGKILL, a power cut) would leave that complete json beside its own outputs."""

    def __init__(self, path: Path, content: dict):
        self.path, self.content, self.saved_at = path, {**content, "complete": False}, time.monotonic()

    def maybe_save(self) -> None:
        if time.monotonic() - self.saved_at >= JSON_EVERY_S:
            self.save()

    def save(self) -> None:
        write_json(self.path, self.content)
        self.saved_at = time.monotonic()

    def __enter__(self) -> "JsonLog":
        self.save()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Saves what was done: complete after a normal end, "complete": false after an error (whose message is
        the one to report, so a second failure while saving is not raised over it)."""
        if kind is None:
            self.content["complete"] = True
            self.save()
            return
        with contextlib.suppress(UserError):
            self.save()


def prepare_images(args) -> tuple[dict[Path, str], Path]:
    """The images to read, each with the file name of its drawing, and the output folder, checked before any work:
    no output may be an input image, and --out must be empty unless --force."""
    paths = list_images(Path(args.images))
    images = dict(zip(paths, drawing_names([path.name for path in paths])))
    out = Path(args.out)
    # A drawing named apart from its input (scan.pgm.png) would land among the inputs, and be read as one next time.
    out_holds_inputs = same_file(out, paths[0].parent)  # list_images: one file, or the files of one folder
    for path, drawing in images.items():
        if same_file(out / drawing, path):
            raise ArgumentError(f"--out {out} would write over the input image {path}; choose another folder")
        if out_holds_inputs:  # raised at the first image, after the more precise check above
            raise ArgumentError(f"--out {out} is the folder of the input image {path}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ArgumentError(f"--out {out} is not empty; choose another folder or pass --force to replace its files")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; --images writes a folder of annotated images and detections.json")
    return images, out


def run_images(images: dict[Path, str], out: Path, args, detector: Detector) -> dict:
    make_folder(out, "--out")
    log = JsonLog(out / "detections.json", {"images": [], "skipped": []})
    results, skipped = log.content["images"], log.content["skipped"]
    bar = tqdm(total=len(images), desc="detect", disable=len(images) < 2, unit="img")
    ordered = list(images)
    with log:
        for start in range(0, len(ordered), args.batch_size):
            chunk = ordered[start:start + args.batch_size]
            paths, frames = [], []
            for path in chunk:
                try:
                    image = load_image(path)
                    detector.check_size(image)
                    frames.append(image)
                    paths.append(path)
                except (OSError, ValueError) as e:  # the reader's errors name the file, check_size's the size
                    tqdm.write(f"skipped: {e}" if str(path) in str(e) else f"skipped: {path}: {e}", file=sys.stderr)
                    skipped.append(str(path))
            for path, image, found in zip(paths, frames, detect(detector, frames)):
                write_image(out / images[path], draw(image, found.rows(), detector.class_names))
                results.append({"file": str(path), "detections": as_records(found)})
            bar.update(len(chunk))
            log.maybe_save()
    bar.close()
    if len(skipped) == len(images):
        raise DataError(f"--images {args.images}: none of the {len(images)} files could be read as an image "
                        f"(listed in {out / 'detections.json'})")
    print(f"{len(results)} images, {sum(len(r['detections']) for r in results)} detections written to {out}"
          + (f"; {len(skipped)} unreadable files skipped" if skipped else ""))
    return log.content


def prepare_video(args) -> tuple[cv2.VideoCapture, float, int, Path, Path]:
    """(capture, frames per second, declared frame count or 0, output video, output json), checked before any
    work: an unreadable video, an output that is the input, or existing outputs without --force end here."""
    source, out = Path(args.video), Path(args.out)
    if out.suffix.lower() not in VIDEO_CODECS:
        raise ArgumentError(f"--out {out}: expected a video file ending in {' or '.join(VIDEO_CODECS)}")
    out_json = out.with_suffix(".json")
    if same_file(out, source) or same_file(out_json, source):
        raise ArgumentError(f"--out {out} would write over the input video {source}; choose another name")
    existing = [str(p) for p in (out, out_json) if p.exists()]
    if existing and not args.force:
        verb, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
        raise ArgumentError(f"{' and '.join(existing)} {verb}; choose another --out or pass --force to replace {them}")
    if not source.is_file():
        if source.is_dir():
            raise UserError(f"--video {source} is a folder; give a video file (--images reads a folder of images)")
        if source.exists():  # a named pipe, a device, a socket
            raise UserError(f"--video {source}: not a regular file")
        raise MissingFileError(f"--video {source}: no such file")
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise DataError(f"--video {source}: cannot open it (not a video format OpenCV reads, or corrupt)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    return capture, fps if fps > 0 else 25.0, count, out, out_json


def frame_batches(capture: cv2.VideoCapture, batch_size: int):
    """Lists of up to batch_size BGR frames, in order, until the video ends."""
    while True:
        batch = []
        while len(batch) < batch_size:
            ok, frame = capture.read()
            if not ok:
                break
            batch.append(frame)
        if batch:
            yield batch
        if len(batch) < batch_size:
            return


def run_video(capture, fps: float, count: int, out: Path, out_json: Path, args, detector: Detector) -> dict:
    source = Path(args.video)
    tmp = pid_temporary(out)  # the suffix picks the container
    make_folder(out.parent, "--out's folder")
    for stale in remove_dead_temporaries(out):
        print(f"removed {stale}, left by a run that was killed")
    log = JsonLog(out_json, {"video": str(source), "fps": fps, "frames": []})
    frames_json = log.content["frames"]
    writer = None
    bar = tqdm(total=count or None, desc="detect", unit="frame")
    start = time.perf_counter()
    try:
        batches = frame_batches(capture, args.batch_size)
        first = next(batches, None)
        if first is None:  # before the json is started: a video without a frame leaves nothing behind
            raise DataError(f"--video {source}: no frame can be decoded (empty or corrupt video)")
        # --force replaces both outputs: the old video goes before the new json starts, so that an interrupted run
        # leaves its partial json alone, not beside another run's video.
        out.unlink(missing_ok=True)
        with log:
            for batch in itertools.chain([first], batches):
                if writer is None:
                    writer = open_writer(tmp, out, fps, batch[0].shape[1], batch[0].shape[0])
                for image, found in zip(batch, detect(detector, batch)):
                    writer.write(draw(image, found.rows(), detector.class_names))
                    index = len(frames_json)
                    frames_json.append({"frame": index, "time": round(index / fps, 3),
                                        "detections": as_records(found)})
                bar.update(len(batch))
                log.maybe_save()
            writer.release()
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise WriteError(f"cannot write the video {out}: OpenCV wrote nothing (is the disk full?)")
            os.replace(tmp, out)
            elapsed = time.perf_counter() - start
            log.content["frames_per_second"] = round(len(frames_json) / elapsed, 2)
    finally:
        if writer is not None:
            writer.release()
        tmp.unlink(missing_ok=True)
        bar.close()
        capture.release()
    if count and len(frames_json) < count:
        print(f"warning: {source} declares {count} frames, {len(frames_json)} could be decoded", file=sys.stderr)
    print(f"{len(frames_json)} frames in {elapsed:.1f} s ({len(frames_json) / elapsed:.2f} frames/s), "
          f"{sum(len(f['detections']) for f in frames_json)} detections: {out}, {out_json}")
    return log.content


def open_writer(tmp: Path, out: Path, fps: float, width: int, height: int) -> cv2.VideoWriter:
    codec = VIDEO_CODECS[out.suffix.lower()]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    if not writer.isOpened():
        raise WriteError(f"cannot write the video {out} (no {codec} writer in this OpenCV, or the folder is not "
                         f"writable)")
    return writer


def main(args: argparse.Namespace) -> dict:
    scales = parse_scales(args.test_scales)
    check_positive_int("--batch_size", args.batch_size)
    check_number("--score_thresh", args.score_thresh, 0, 1)
    if args.onnx and args.amp:
        raise UserError("--amp: an ONNX model runs in the precision it was exported in; drop --amp")
    config = replace(official_config(len(scales)), topk=args.topk, max_per_image=args.max_per_image)
    if args.ckpt:
        refuse_onnx_as_checkpoint(args.ckpt)
    source = prepare_video(args) if args.video else prepare_images(args)
    detector = Detector.from_checkpoint(args.onnx or args.ckpt, device=args.device, test_flip=args.test_flip,
                                        test_scales=scales, score_thresh=args.score_thresh,
                                        batch_size=args.batch_size, onnx=bool(args.onnx), config=config,
                                        amp=args.amp)
    # Stopped by Ctrl-C or SIGTERM (run_cli), a run keeps its json and leaves no temporary video.
    content = run_video(*source, args, detector) if args.video else run_images(*source, args, detector)
    if detector.non_finite:
        print(non_finite_warning(detector.non_finite, len(content["frames" if args.video else "images"])),
              file=sys.stderr)
    return content


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
