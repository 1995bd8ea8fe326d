"""Inference speed per image: post-processing (decode + center check + soft-NMS), the model forward, and the
whole test-time pipeline.

    .venv/bin/python bench/bench_infer.py [--device cpu|cuda] [--threads N] [--forward_repeats 2]
                                          [--archs tiny_hourglass small_hourglass] [--skip_forward] [--onnx]
    python3 bench/bench_infer.py --device cuda --archs small_hourglass large_hourglass --forward_repeats 20

Post-processing runs on synthetic outputs shaped like a trained network's (80 classes, 128 x 128 maps, a dozen
objects in a few classes with near-duplicate corner peaks, a noisy background), K = 70, num_dets 1000,
soft-NMS with merging per class, for one input (single) and for an image and its flipped copy (flip). Decoding
runs on --device, soft-NMS on the CPU. The forward is timed at 511 x 511, batch 1, in eval mode, in fp32 and
(on CUDA) with fp16 and bf16 autocast; cudnn.benchmark is on for these fixed-size rows. The whole pipeline is
engine.inference.detect on one random 511 x 511 image (forward, decode, center check, rescale, soft-NMS), single
and with its flipped copy, in fp32 with cudnn.benchmark off (test.py's setting: image sizes vary). The networks
are untrained and their flat heatmaps would give no boxes, so each forward runs for its time but detect() gets the
synthetic outputs above, and decoding and soft-NMS see a trained network's kind of peaks.
With --onnx, on the CPU, the fp32 forward is also timed on onnxruntime (CPU provider, the same thread count),
exported by tools/export_onnx.py to a temporary folder.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from datasets.transforms import eval_input
from engine.inference import InferenceConfig, detect, nms_per_class
from nets import build_model
from utils.decode import center_check, decode
from utils.device import autocast, cudnn_benchmark


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--archs", nargs="+", default=["tiny_hourglass", "small_hourglass"])
    parser.add_argument("--post_repeats", type=int, default=10)
    parser.add_argument("--forward_repeats", type=int, default=2)
    parser.add_argument("--skip_forward", action="store_true")
    parser.add_argument("--onnx", action="store_true", help="also time the forward on onnxruntime (CPU)")
    return parser


def synthetic_outputs(batch: int, classes: int = 80, size: int = 128, objects: int = 12, seed: int = 0) -> dict:
    """Eval-mode output dict (docs/FORMAT.md) with `objects` objects of 3 classes, each corner and center seen as
    a main peak and two weaker near-duplicates."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    out = {f"hm_{k}": torch.randn(batch, classes, size, size, generator=gen) - 7 for k in ("tl", "br", "ct")}
    out.update({f"off_{k}": rand(batch, 2, size, size) for k in ("tl", "br", "ct")})
    out.update({f"emb_{k}": rand(batch, 1, size, size) * 4 for k in ("tl", "br")})
    labels = torch.randint(0, classes, (3,), generator=gen)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(objects):
        label = int(labels[i % 3])
        x1, y1 = (rand(2) * size * 0.6).long().tolist()
        w, h = (4 + rand(2) * (size - 4 - max(x1, y1)) * 0.9).long().tolist()
        points = {"tl": (x1, y1), "br": (x1 + w, y1 + h), "ct": (x1 + w // 2, y1 + h // 2)}
        peak = 3 * rand(1).item() - 1
        for kind, (x, y) in points.items():
            for dx, dy, drop in ((0, 0, 0.0), (2, 1, 1.5), (-1, 2, 2.0)):
                px, py = min(max(x + dx, 0), size - 1), min(max(y + dy, 0), size - 1)
                bump = peak - drop - ((xs - px) ** 2 + (ys - py) ** 2) / 2.0
                out[f"hm_{kind}"][:, label] = torch.maximum(out[f"hm_{kind}"][:, label], bump)
                if kind != "ct":
                    out[f"emb_{kind}"][:, 0, py, px] = i + 0.1 * rand(1).item()
    return out


def postprocess(out: dict, cfg: InferenceConfig, device: torch.device):
    dets, centers = decode(out, topk=cfg.topk, ae_threshold=cfg.ae_threshold, num_dets=cfg.num_dets,
                           kernel=cfg.kernel)
    rows = np.concatenate([center_check(d, c) for d, c in zip(dets.cpu().numpy(), centers.cpu().numpy())])
    return nms_per_class(rows[rows[:, 4] > -1], cfg)


def median_ms(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def onnx_forward_ms(model: torch.nn.Module, image: torch.Tensor, repeats: int) -> float:
    """Median ms of onnxruntime's forward of `model` (CenterNet on the CPU) at the image's size, batch 1."""
    from engine.onnx_backend import OnnxModel
    from tools.export_onnx import export

    side = image.shape[-1]
    metadata = {"arch": "", "class_names": [], "img_size": side, "size_unit": model.size_unit, "dynamic": False,
                "max_size": side}
    with tempfile.TemporaryDirectory() as tmp:
        export(model, Path(tmp) / "model.onnx", side, metadata)
        session = OnnxModel(Path(tmp) / "model.onnx", torch.device("cpu"), threads=torch.get_num_threads())
        return median_ms(lambda: session(image), repeats, torch.device("cpu"))


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/bench_infer.py: --device cuda, but no GPU is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    cfg = InferenceConfig()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {torch.get_num_threads()} CPU threads")
    print(f"{'stage':<34}{'ms / image':>12}{'boxes kept':>12}")
    for name, batch in (("post-processing single", 1), ("post-processing flip (2 inputs)", 2)):
        out = {k: v.to(device) for k, v in synthetic_outputs(batch).items()}
        kept = len(postprocess(out, cfg, device))
        print(f"{name:<34}{median_ms(lambda: postprocess(out, cfg, device), args.post_repeats, device):>12.1f}"
              f"{kept:>12}")
    if args.skip_forward:
        return
    image = torch.randn(1, 3, 511, 511, device=device)
    photo = np.random.default_rng(0).integers(0, 256, (511, 511, 3), dtype=np.uint8)
    inputs = {flip: [eval_input(photo, 1.0, flip)] for flip in (False, True)}
    for arch in args.archs:
        model = build_model(arch, 80).to(device).eval()
        timed = TimedForward(model, {k: v.to(device) for k, v in synthetic_outputs(2).items()})
        for amp in (False, "fp16", "bf16") if device.type == "cuda" else (False,):  # CPU bf16 convolutions crawl
            with cudnn_benchmark(True):
                ms = median_ms(lambda: forward(model, image, device, amp), args.forward_repeats, device)
            label = f"forward {arch} 511 {amp or 'fp32'}"
            print(f"{label:<34}{ms:>12.1f}{'':>12}", flush=True)
        if args.onnx and device.type == "cpu":
            ms = onnx_forward_ms(model, image, args.forward_repeats)
            print(f"{'forward ' + arch + ' 511 onnxruntime':<34}{ms:>12.1f}{'':>12}", flush=True)
        for flip in (False, True):
            with cudnn_benchmark(False):
                kept = len(detect(timed, inputs[flip], cfg, device))
                ms = median_ms(lambda: detect(timed, inputs[flip], cfg, device), args.forward_repeats, device)
            label = f"pipeline {arch} 511 {'flip' if flip else 'single'}"
            print(f"{label:<34}{ms:>12.1f}{kept:>12}", flush=True)


class TimedForward(torch.nn.Module):
    """Runs `model` on the images (its time counts) and returns `outputs` cut to the batch size instead."""

    def __init__(self, model: torch.nn.Module, outputs: dict[str, torch.Tensor]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.model(images)
        return {k: v[: images.shape[0]] for k, v in self.outputs.items()}


def forward(model, image: torch.Tensor, device: torch.device, amp: bool):
    with autocast(device, amp):
        return model(image)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
