"""The whole test-time pipeline per image, as test.py runs it, and the share of each part: single scale, single
scale + flip, and the published multi-scale setting (0.5, 0.75, 1, 1.25, 1.5, each with flip).

    .venv/bin/python bench/bench_pipeline.py --archs tiny_hourglass
    python3 bench/bench_pipeline.py --device cuda --archs large_hourglass small_hourglass

One random 511 x 511 photo; `engine.inference.detect` on its inputs (made by `datasets.transforms.eval_input`, as
the data loader makes them, outside the timing), cudnn.benchmark off (test.py's setting: image sizes vary), with
the network test.py runs (`engine.inference.network_for`: on the CPU the prepared one, in bf16 with --amp). Parts,
each timed with the device synchronised before and after it, summed over the scales of one image:
- forward: the network on the batch of one scale (1 image, or 2 with the flip);
- decode: `utils.decode.decode` (top-k corners, pairing, centers) on --device;
- soft-NMS: `engine.inference.nms_per_class` on the CPU;
- rest: the pipeline's time less these: copies to and from the device, rescaling to original pixels, center check.
The networks are untrained and their flat heatmaps would give no boxes, so each forward runs for its time and
detect() then gets synthetic outputs of the same map size shaped like a trained network's
(`bench_infer.synthetic_outputs`), so that decoding and soft-NMS see a trained network's kind of peaks.
"""
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from bench.bench_infer import synthetic_outputs  # noqa: E402
from bench.device import DEVICE_HELP, bench_device  # noqa: E402
from datasets.transforms import eval_input  # noqa: E402
from engine import inference  # noqa: E402
from engine.inference import network_for  # noqa: E402
from nets import ARCHS, build_model  # noqa: E402
from nets.inference import PreparedNetwork  # noqa: E402
from utils.checks import check_positive_int  # noqa: E402
from utils.device import cudnn_benchmark  # noqa: E402
from utils.errors import run_cli  # noqa: E402

SETTINGS = {"single": ([1.0], False), "flip": ([1.0], True), "5 scales + flip": ([0.5, 0.75, 1.0, 1.25, 1.5], True)}
PARTS = ["forward", "decode", "soft-NMS"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--archs", nargs="+", default=["tiny_hourglass"], choices=list(ARCHS))
    parser.add_argument("--amp", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="the forward's precision: autocast on CUDA; on the CPU either 16-bit one runs the "
                        "prepared network in bf16, as test.py --amp does")
    parser.add_argument("--repeats", type=int, default=5, help="timed images, after one warm-up (odd: a median run)")
    return parser


class PartTimer:
    """Wall time of named parts, the device synchronised around each, summed until `reset`."""

    def __init__(self, device: torch.device):
        self.device, self.totals = device, defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, name: str, fn):
        def run(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.sync()
            self.totals[name] += time.perf_counter() - start
            return result
        return run

    def reset(self) -> None:
        self.totals.clear()


class SyntheticAfterForward(torch.nn.Module):
    """Runs `model` on the images (timed as 'forward') and returns synthetic outputs of the same map size."""

    def __init__(self, model: torch.nn.Module, timer: PartTimer, device: torch.device):
        super().__init__()
        self.model, self.timer, self.device = model, timer, device
        self.outputs: dict[tuple, dict] = {}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.timer.timed("forward", self.model)(images)
        key = (images.shape[0], (images.shape[-1] + 1) // 4)
        if key not in self.outputs:
            self.outputs[key] = {k: v.to(self.device) for k, v in synthetic_outputs(*key).items()}
        return self.outputs[key]


def time_setting(wrapped: SyntheticAfterForward, timer: PartTimer, inputs: list, amp, repeats: int,
                 device: torch.device) -> tuple[float, dict[str, float], int]:
    """(ms, {part: ms}, boxes kept) of the median image (by its whole time) of `detect` on `inputs`."""
    cfg = inference.official_config(len(inputs))
    runs = []
    with cudnn_benchmark(False), \
            mock.patch.object(inference, "decode", timer.timed("decode", inference.decode)), \
            mock.patch.object(inference, "nms_per_class", timer.timed("soft-NMS", inference.nms_per_class)):
        for i in range(repeats + 1):
            timer.reset()
            kept = len(timer.timed("pipeline", inference.detect)(wrapped, inputs, cfg, device, amp))
            if i > 0:
                runs.append({k: v * 1e3 for k, v in timer.totals.items()})
    median = sorted(runs, key=lambda r: r["pipeline"])[len(runs) // 2]
    parts = {p: median[p] for p in PARTS}
    parts["rest"] = median["pipeline"] - sum(parts.values())
    return median["pipeline"], parts, kept


def main(args: argparse.Namespace) -> None:
    check_positive_int("--repeats", args.repeats)
    device = bench_device(args.device)
    torch.set_grad_enabled(False)
    amp = False if args.amp == "fp32" else args.amp
    precision = "bf16" if amp and device.type == "cpu" else args.amp  # the CPU's 16-bit network is bf16 (network_for)
    photo = np.random.default_rng(0).integers(0, 256, (511, 511, 3), dtype=np.uint8)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}; a 511 x 511 image, forward {precision}, "
          f"median of {args.repeats}; ms per image and each part's share")
    print(f"{'pipeline':<40}{'ms':>10}" + "".join(f"{p:>17}" for p in PARTS + ["rest"]) + f"{'boxes':>7}")
    timer = PartTimer(device)
    for arch in args.archs:
        network = network_for(build_model(arch, 80).to(device).eval(), device, bool(amp))
        wrapped = SyntheticAfterForward(network, timer, device)
        autocast_amp = False if isinstance(network, PreparedNetwork) else amp  # as detect(): it has its own dtype
        for setting, (scales, flip) in SETTINGS.items():
            inputs = [eval_input(photo, s, flip) for s in scales]
            ms, parts, kept = time_setting(wrapped, timer, inputs, autocast_amp, args.repeats, device)
            shares = "".join(f"{parts[p]:>10.1f} ({parts[p] / ms:>4.0%})" for p in PARTS + ["rest"])
            print(f"{arch + ' ' + setting:<40}{ms:>10.1f}{shares}{kept:>7}", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
