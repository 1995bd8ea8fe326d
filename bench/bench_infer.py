"""Inference speed per image: post-processing (decode + center check + soft-NMS), the model forward, and the
whole test-time pipeline.

    .venv/bin/python bench/bench_infer.py [--device cpu|cuda|cuda:N] [--threads N] [--forward_repeats 3] [--clock cpu]
                                          [--archs tiny_hourglass small_hourglass] [--skip_forward] [--no-onnx]
    python3 bench/bench_infer.py --device cuda --archs small_hourglass large_hourglass --forward_repeats 20

Post-processing runs on synthetic outputs shaped like a trained network's (80 classes, 128 x 128 maps, a dozen
objects in a few classes with near-duplicate corner peaks, a noisy background), K = 70, num_dets 1000,
soft-NMS with merging per class, for one input (single) and for an image and its flipped copy (flip). Decoding
runs on --device, soft-NMS on the CPU.

The forward is timed at 511 x 511, batch 1, in eval mode. On the CPU, side by side in one run (the variants take
turns, --forward_repeats rounds, median): the network as trained (fp32, unprepared), the network prepared for
inference (nets/inference.py: what Detector, test.py and demo.py run), onnxruntime on the same weights (CPU
provider, the same thread count, exported by tools/export_onnx.py to a temporary folder; --no-onnx skips it),
and the 16-bit path (`--amp`: the prepared network in bf16). Each row gives GFLOP/s (convolution FLOPs counted by
torch's FlopCounterMode) and its share of the machine's peak, measured in the same run as a 2048 x 2048 matrix
product in fp32 and in bf16 on the same threads. --clock cpu times every row with this process's CPU time instead
of the wall clock (CPU only): on a machine that other jobs load, a 1-thread run then counts only the time it ran
(with N threads it is their sum, up to N times the wall time). On the CPU the
process keeps freed memory for reuse (utils/cpu_memory.py), as Detector and test.py do; bench/profile_infer.py
measures what that changes.
On CUDA the rows are fp32 and fp16 / bf16 autocast, with cudnn.benchmark on for these fixed-size rows.
--compile adds the network under torch.compile: on CUDA each precision again with mode "reduce-overhead" (CUDA
graphs: the host enqueues the whole forward at once), on the CPU the unprepared network (the prepared one's oneDNN
weight packing does not trace) beside the others. The first calls, which compile, are not timed.

The whole pipeline is engine.inference.detect on one random 511 x 511 image (forward, decode, center check,
rescale, soft-NMS), single and with its flipped copy, with the network test.py runs (prepared on the CPU) and
cudnn.benchmark off (test.py's setting: image sizes vary). The networks are untrained and their flat heatmaps
would give no boxes, so each forward runs for its time but detect() gets the synthetic outputs above, and
decoding and soft-NMS see a trained network's kind of peaks.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from bench.device import DEVICE_HELP, bench_device
from datasets.transforms import eval_input
from engine.inference import InferenceConfig, detect, network_for, nms_per_class
from nets import ARCHS, build_model
from nets.inference import prepare_for_inference
from utils.cpu_memory import keep_freed_memory
from utils.decode import center_check, decode
from utils.checks import check_non_negative_int, check_positive_int
from utils.device import autocast, cudnn_benchmark
from utils.errors import run_cli

# Label columns as wide as the longest label: "forward large_hourglass 511 bf16 compiled" in the stage table (CUDA),
# "forward large_hourglass 511 bf16 prepared (--amp)" in the CPU forward table.
STAGE_WIDTH, FORWARD_WIDTH = 42, 50


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--archs", nargs="+", default=["tiny_hourglass", "small_hourglass"], choices=list(ARCHS))
    parser.add_argument("--post_repeats", type=int, default=10)
    parser.add_argument("--forward_repeats", type=int, default=3)
    parser.add_argument("--skip_forward", action="store_true")
    parser.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                        help="time the forward on onnxruntime too (CPU)")
    parser.add_argument("--compile", action="store_true", help="time the forward under torch.compile too")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall clock, or this process's CPU time (CPU only)")
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


def median_ms(fn, repeats: int, device: torch.device, warmup: int = 1, clock=time.perf_counter) -> float:
    return side_by_side({"": fn}, repeats, device, warmup, clock)[""]


def side_by_side(fns: dict, repeats: int, device: torch.device, warmup: int = 1, clock=time.perf_counter) -> dict:
    """{name: median ms} of the callables `fns`, which take turns, one call each per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def export_fixed(model: torch.nn.Module, side: int, folder: str) -> Path:
    """`model` exported by tools/export_onnx.py at `side` x `side` to `folder`/model.onnx, its classes numbered (the
    loader checks their count against the heatmaps)."""
    from tools.export_onnx import export

    classes = [f"class {i}" for i in range(model.branches[0].hm_tl[-1].out_channels)]
    metadata = {"arch": "", "class_names": classes, "img_size": side, "size_unit": model.size_unit,
                "dynamic": False, "max_size": side}
    export(model, Path(folder) / "model.onnx", side, metadata)
    return Path(folder) / "model.onnx"


def onnx_session(model: torch.nn.Module, side: int, folder: str):
    """onnxruntime's session (CPU provider, torch's thread count) for `model` exported at `side` x `side`."""
    from engine.onnx_backend import OnnxModel

    return OnnxModel(export_fixed(model, side, folder), torch.device("cpu"), threads=torch.get_num_threads())


def conv_gflop(model: torch.nn.Module, image: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops() / 1e9


def matmul_peaks(clock, size: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of a size x size matrix product in fp32 and bf16: the machine's reachable peak on these threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a16, b16 = a.bfloat16(), b.bfloat16()
    ms = side_by_side({"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16}, repeats, torch.device("cpu"), clock=clock)
    return {k: 2 * size ** 3 / (v / 1e3) / 1e9 for k, v in ms.items()}


def cpu_forward_rows(arch: str, image: torch.Tensor, args, peaks: dict, clock) -> None:
    """One row per variant of `arch`'s CPU forward: ms, speed-up over the unprepared network, GFLOP/s, % of peak."""
    model = build_model(arch, 80).eval()
    gflop = conv_gflop(model, image)
    prepared, bf16 = prepare_for_inference(model), prepare_for_inference(model, torch.bfloat16)
    fns = {"fp32 unprepared": lambda: model(image), "fp32 prepared": lambda: prepared(image),
           "bf16 prepared (--amp)": lambda: bf16(image)}
    if args.compile:
        compiled = torch.compile(model)
        fns["fp32 compiled"] = lambda: compiled(image)
    with tempfile.TemporaryDirectory() as tmp:
        if args.onnx:
            session = onnx_session(model, image.shape[-1], tmp)
            fns["onnxruntime fp32"] = lambda: session(image)
        ms = side_by_side(fns, args.forward_repeats, torch.device("cpu"), clock=clock)
    for name, t in ms.items():
        rate = gflop / (t / 1e3)
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        label = f"forward {arch} 511 {name}"
        speed_up = ms["fp32 unprepared"] / t
        print(f"{label:<{FORWARD_WIDTH}}{t:>10.1f}{speed_up:>9.2f}x{rate:>9.1f}{100 * rate / peak:>7.0f}%", flush=True)


def main(args: argparse.Namespace) -> None:
    for flag in ("post_repeats", "forward_repeats"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    check_non_negative_int("--threads", args.threads)
    device = bench_device(args.device)
    if device.type == "cuda" and args.clock == "cpu":  # the host's CPU time leaves out the GPU's work
        raise SystemExit("bench/bench_infer.py: --clock cpu times CPU runs only; drop it with --device cuda")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_freed_memory()
    torch.set_grad_enabled(False)
    cfg = InferenceConfig()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {torch.get_num_threads()} CPU threads, {args.clock} clock")
    header = f"{'stage':<{STAGE_WIDTH}}{'ms / image':>12}{'boxes kept':>12}"
    print(header)
    for name, batch in (("post-processing single", 1), ("post-processing flip (2 inputs)", 2)):
        out = {k: v.to(device) for k, v in synthetic_outputs(batch).items()}
        kept = len(postprocess(out, cfg, device))
        ms = median_ms(lambda: postprocess(out, cfg, device), args.post_repeats, device, clock=clock)
        print(f"{name:<{STAGE_WIDTH}}{ms:>12.1f}{kept:>12}")
    if args.skip_forward:
        return
    image = torch.randn(1, 3, 511, 511, device=device)
    photo = np.random.default_rng(0).integers(0, 256, (511, 511, 3), dtype=np.uint8)
    inputs = {flip: [eval_input(photo, 1.0, flip)] for flip in (False, True)}
    if device.type == "cpu":
        peaks = matmul_peaks(clock)
        print(f"matrix product 2048: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s "
              f"({args.clock} clock)")
        print(f"{'forward':<{FORWARD_WIDTH}}{'ms':>10}{'speed-up':>10}{'GFLOP/s':>9}{'of peak':>8}")
        for arch in args.archs:
            cpu_forward_rows(arch, image, args, peaks, clock)
        print(header)  # the pipeline rows below are not in the forward table's columns
    for arch in args.archs:
        model = build_model(arch, 80).to(device).eval()
        if device.type == "cuda":
            # CUDA graphs are recorded on the second and later calls of a compiled shape: three untimed calls.
            runs = {"": (model, 1)} | ({" compiled": (torch.compile(model, mode="reduce-overhead"), 3)}
                                       if args.compile else {})
            for suffix, (network, warmup) in runs.items():
                for amp in (False, "fp16", "bf16"):
                    with cudnn_benchmark(True):
                        ms = median_ms(lambda: forward(network, image, device, amp), args.forward_repeats, device,
                                       warmup)
                    label = f"forward {arch} 511 {amp or 'fp32'}{suffix}"
                    print(f"{label:<{STAGE_WIDTH}}{ms:>12.1f}{'':>12}", flush=True)
        timed = TimedForward(network_for(model, device), {k: v.to(device) for k, v in synthetic_outputs(2).items()})
        for flip in (False, True):
            with cudnn_benchmark(False):
                kept = len(detect(timed, inputs[flip], cfg, device))
                ms = median_ms(lambda: detect(timed, inputs[flip], cfg, device), args.forward_repeats, device,
                               clock=clock)
            label = f"pipeline {arch} 511 {'flip' if flip else 'single'}"
            print(f"{label:<{STAGE_WIDTH}}{ms:>12.1f}{kept:>12}", flush=True)


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
    run_cli(main, get_args_parser().parse_args())
