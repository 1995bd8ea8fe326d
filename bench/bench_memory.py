"""Training memory and time with and without activation checkpointing of the hourglasses (--grad_checkpoint).

    .venv/bin/python bench/bench_memory.py                     # CPU: tiny at 127 batch 16, small at 255 batch 2
    .venv/bin/python bench/bench_memory.py --device cuda --configs large_hourglass:511:4 small_hourglass:511:8

Each configuration (arch:input:batch) runs in its own process, once plain and once checkpointed: a training step
(forward, loss, backward, Adam) on random images and targets (bench/bench_model.py), median time over the timed
steps after one warm-up. Memory: the bytes autograd keeps for backward during the forward (the storages of its
saved tensors, each once, the weights left out: `SavedActivations`), and the peak of the process (CPU: peak RSS,
which includes weights, gradients and Adam state; CUDA: max_memory_allocated).
"""
import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from bench.bench_model import random_batch, timed
from bench.child import child_stdout
from bench.device import DEVICE_HELP, bench_device
from nets import ARCHS, build_model
from utils.checks import check_positive_int
from utils.errors import ArgumentError, run_cli
from utils.losses import centernet_loss


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--configs", nargs="*", default=["tiny_hourglass:127:16", "small_hourglass:255:2"])
    p.add_argument("--num_classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)  # arch:input:batch:checkpoint, run in this process
    return p


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Inside it, `bytes` adds up the memory of the tensors autograd saves for backward, each storage once (a
    tensor saved by several ops, a view of one saved before, is kept once) and the parameters of `model` left out
    (a convolution saves its weight, which is kept whether or not the activations are)."""

    def __init__(self, model: torch.nn.Module):
        self.bytes = 0
        seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:  # a saved tensor stays alive, so no other storage reuses its address
                seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> "SavedActivations":
        super().__enter__()
        return self


def parse_config(config: str) -> tuple[str, int, int]:
    """'arch:input:batch' -> (arch, input, batch)."""
    parts = config.split(":")
    if len(parts) != 3 or parts[0] not in ARCHS or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise ArgumentError(f"--configs: expected arch:input:batch (arch one of {', '.join(ARCHS)}, input and batch "
                            f"whole numbers of at least 1), got {config!r}")
    return parts[0], int(parts[1]), int(parts[2])


def measure(arch: str, size: int, batch_size: int, grad_checkpoint: bool, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, args.num_classes, grad_checkpoint=grad_checkpoint).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = random_batch(batch_size, size, args.num_classes, device)
    saved = 0

    def step():
        nonlocal saved
        with SavedActivations(model) as kept:
            outputs = model(batch["image"])
        saved = kept.bytes
        loss, _ = centernet_loss(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(step, args.steps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"saved": saved, "peak": peak, "seconds": seconds}


def main(args: argparse.Namespace) -> None:
    device = bench_device(args.device)
    if args.one:
        arch, size, batch, ckpt = args.one.split(":")
        print(json.dumps(measure(arch, int(size), int(batch), ckpt == "1", args, device)))
        return
    configs = [parse_config(c) for c in args.configs]
    for flag in ("num_classes", "steps"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    peak_name = "peak RSS" if device.type == "cpu" else "max allocated"
    print(f"{device}, {torch.get_num_threads()} threads, {args.num_classes} classes, median of {args.steps} steps")
    print(f"| arch | input | batch | --grad_checkpoint | saved activations MiB | {peak_name} MiB | s / step |")
    print("|---|---|---|---|---|---|---|")
    for arch, size, batch in configs:
        rows = []
        for ckpt in (0, 1):
            cmd = [sys.executable, __file__, "--one", f"{arch}:{size}:{batch}:{ckpt}", "--device", str(device),
                   "--num_classes", str(args.num_classes), "--steps", str(args.steps)]
            rows.append(json.loads(child_stdout(cmd, f"the measuring process of {arch}:{size}:{batch}")))
        for ckpt, r in enumerate(rows):
            cells = [f"{r['saved'] / 2**20:.0f}", f"{r['peak'] / 2**20:.0f}", f"{r['seconds']:.2f}"]
            if ckpt:  # the change against the plain row
                cells = [f"{c} ({r[k] / rows[0][k] - 1:+.0%})" for c, k in zip(cells, ("saved", "peak", "seconds"))]
            print(f"| {arch} | {size} | {batch} | {'yes' if ckpt else 'no'} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
