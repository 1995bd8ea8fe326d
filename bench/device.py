"""The device of every benchmark, chosen as train.py and test.py choose theirs."""
import torch

from utils.device import select_device

DEVICE_HELP = "cpu, cuda, cuda:N or auto (the GPU when one is visible)"


def bench_device(name: str) -> torch.device:
    """`--device` through utils.device.select_device: one error for a device this process does not have (no GPU
    visible, cuda:N past its GPUs, a name that is no device), before any work. A GPU is made the current one, so
    that what runs on the current GPU (torch.cuda.synchronize(), cuDNN autotuning, CUDA graphs) is the one timed."""
    device = select_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
