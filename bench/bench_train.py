"""Training speed: images/s of full training steps (forward, loss, backward, Adam) and peak memory, per precision
mode, beside the same network run the old way.

    .venv/bin/python bench/bench_train.py                               # tiny_hourglass on the CPU, fp32
    python3 bench/bench_train.py --device cuda --archs small_hourglass large_hourglass --img_size 511 --batch_size 6

Modes (default: all four on CUDA, fp32 on the CPU), timed in the order given, 'old' first:
- old: fp32, torch.cummax pooling, cudnn.benchmark off, the for-each Adam (how pytorch_simple_CenterNet_47 trained);
- fp32: our pooling kernels, cudnn.benchmark on, the fused Adam on CUDA (what train.py does without --amp);
- fp16: as fp32 with fp16 autocast and a GradScaler (train.py --amp);
- bf16: as fp32 with bf16 autocast, no scaler (train.py --amp --amp_dtype bf16).
On the CPU both 16-bit modes autocast to bf16 (utils/device.py).
--layouts contiguous channels_last times each non-old mode in both memory formats of the network and its input
(train.py: contiguous, or channels_last with --channels_last). --compile times each non-old setting a second time
with the network under torch.compile (train.py --compile); "first s" is the first step, which holds the compilation.

Inputs are random images with random targets of the real shapes (four objects per image); the data loader is not
part of the measurement (bench/bench_data.py measures it). Peak memory: CUDA's max allocated per mode; on the CPU
the process's peak RSS so far.
"""
import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from bench.bench_model import random_batch
from bench.device import DEVICE_HELP, bench_device
from lib.cpool.pool import forced_fallback
from nets import ARCHS, build_model
from utils.checks import check_positive_int
from utils.device import autocast, cudnn_benchmark, grad_scaler
from utils.errors import run_cli
from utils.losses import centernet_loss

MODES = {  # name: (amp, our pooling kernels, cudnn.benchmark, fused Adam on CUDA)
    "old": (False, False, False, False),
    "fp32": (False, True, True, True),
    "fp16": ("fp16", True, True, True),
    "bf16": ("bf16", True, True, True),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--archs", nargs="+", default=["tiny_hourglass"], choices=list(ARCHS))
    p.add_argument("--modes", nargs="+", choices=list(MODES), help="default: all on CUDA, fp32 on the CPU")
    p.add_argument("--img_size", type=int, default=127)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=8, help="timed steps, after 2 warm-up steps")
    p.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"], default=["contiguous"],
                   help="memory formats of the network and input ('old' runs contiguous only)")
    p.add_argument("--compile", action="store_true", help="time each non-old setting compiled too")
    return p


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # process peak RSS (Linux: KiB)


def bench(arch: str, mode: str, layout: str, compiled: bool, args, device: torch.device
          ) -> tuple[float, float, float]:
    """(images/s, peak MiB, seconds of the first step) of `arch` trained in `mode` with the network and input in
    memory format `layout`, under torch.compile when `compiled`."""
    amp, our_pooling, benchmark, fused = MODES[mode]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(arch, args.num_classes).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused and device.type == "cuda")
    scaler = grad_scaler(device, amp)
    batch = random_batch(args.batch_size, args.img_size, args.num_classes, device)
    batch["image"] = batch["image"].contiguous(memory_format=memory_format)
    torch._dynamo.reset()  # each setting compiles anew: no graph of another setting is reused
    forward = torch.compile(model) if compiled else model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with cudnn_benchmark(benchmark), contextlib.nullcontext() if our_pooling else forced_fallback():
        for step in range(args.steps + 2):
            start = time.perf_counter()
            with autocast(device, amp):
                outputs = forward(batch["image"])
            loss, _ = centernet_loss([{k: v.float() for k, v in o.items()} for o in outputs], batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= 2:
                times.append(time.perf_counter() - start)
            elif step == 0:
                first = time.perf_counter() - start
            elif step == 1 and device.type == "cuda":  # the peak of training, not of cuDNN's autotuning
                torch.cuda.reset_peak_memory_stats(device)
    if not torch.isfinite(loss):
        raise SystemExit(f"bench/bench_train.py: {arch} {mode}: non-finite loss {loss.item()}")
    return args.batch_size / statistics.median(times), peak_memory_mib(device), first


def main(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "num_classes", "steps"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    device = bench_device(args.device)
    chosen = args.modes or (list(MODES) if device.type == "cuda" else ["fp32"])
    # 'old' first, as the "vs old" column divides by its rate; the others in the order given, so that a run cut
    # short (gpu_check's time limit) has timed the modes named first
    modes = sorted(dict.fromkeys(chosen), key=lambda mode: mode != "old")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}, input {args.img_size}, batch {args.batch_size}, {args.num_classes} classes, median of "
          f"{args.steps} steps; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"{'arch':<18}{'mode':<6}{'layout':<15}{'compiled':<10}{'images/s':>10}{'vs old':>8}{'peak MiB':>10}"
          f"{'first s':>9}")
    for arch in args.archs:
        old_rate = None
        for mode in modes:
            for layout in ["contiguous"] if mode == "old" else args.layouts:
                for compiled in [False, True] if args.compile and mode != "old" else [False]:
                    rate, memory, first = bench(arch, mode, layout, compiled, args, device)
                    old_rate = rate if mode == "old" else old_rate
                    ratio = f"{rate / old_rate:.2f}x" if old_rate else ""
                    print(f"{arch:<18}{mode:<6}{layout:<15}{'yes' if compiled else 'no':<10}{rate:>10.1f}{ratio:>8}"
                          f"{memory:>10.0f}{first:>9.1f}", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
