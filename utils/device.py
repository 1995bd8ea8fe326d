"""Device and precision choices, taken from arguments so that nothing assumes CUDA."""
import contextlib
import functools
import math
import os
import re

import torch

from utils.errors import ArgumentError, CheckpointError, DeviceError

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def select_device(name: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` takes the GPU of this process (its local rank) when CUDA is available, else the CPU; `cuda` that
    GPU, `cuda:N` (or torch.device("cuda", N)) GPU N, each a DeviceError where it is not visible; `cpu` the CPU."""
    text = str(name) if isinstance(name, torch.device) else name
    if not isinstance(text, str) or not re.fullmatch(r"auto|cpu(:0)?|cuda(:\d+)?", text):  # torch.device("cpu", 0)
        raise ArgumentError(f"device: expected auto, cpu, cuda or cuda:N, as a string or a torch.device, got {name!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {text}: no CUDA device is visible to this process")
    if text.startswith("cpu") or not torch.cuda.is_available():
        return torch.device("cpu")
    if ":" in text:  # our CUDA kernels guard their tensors' device: no need to make it the current one
        index, count = int(text.split(":")[1]), torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"device {text}: this process sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    return torch.device("cuda", bind_local_gpu(local_rank or 0))


@functools.cache  # the hook once per process (forked children inherit it)
def one_thread_after_fork() -> None:
    """Makes every process forked from this one run torch on one thread (as DataLoader's workers do): GNU OpenMP's
    threads do not survive a fork, and a child's first parallel operation waited for them forever once the parent
    had run one (a multiprocessing Pool forked after a Detector's first image)."""
    os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


def local_gpu_index(local_rank: int, visible: int) -> int:
    """The GPU of the process with `local_rank` among the `visible` GPUs it sees. torchrun's processes each see
    every GPU of the node: GPU local_rank. Under SLURM with one GPU bound per task (--gpus-per-task=1, --gpu-bind)
    each sees only its own, as GPU 0; with fewer GPUs than local ranks in general, local_rank % visible."""
    if visible < 1:
        raise DeviceError("no CUDA device is visible to this process")
    return local_rank % visible


def bind_local_gpu(local_rank: int) -> int:
    """Makes this process's GPU (local_gpu_index) the current CUDA device, before any CUDA work; returns it."""
    index = local_gpu_index(local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return index


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype: None when `amp` is False; on CUDA float16 for True or 'fp16', bfloat16 for 'bf16';
    on the CPU always bfloat16 (its fast 16-bit type)."""
    if not amp:
        return None
    if amp is not True and amp not in AMP_DTYPES:
        raise ValueError(f"amp: expected False, True, 'fp16' or 'bf16', got {amp!r}")
    if device.type != "cuda":
        return torch.bfloat16
    return torch.float16 if amp is True else AMP_DTYPES[amp]


def autocast(device: torch.device, amp: bool | str):
    """Autocast to `amp_dtype(device, amp)`; autocast off when `amp` is False, also inside an autocast region of
    the caller's (a notebook running its own model in bf16 around Detector(amp=False) got other detections)."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: bool | str) -> torch.amp.GradScaler:
    """Loss scaling is needed only for float16 (its narrow exponent underflows small gradients); bfloat16 has
    float32's exponent range. A disabled scaler passes losses and steps through unchanged."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device, amp) == torch.float16)


def check_scaler_state(saved, path) -> None:
    """Refuses a checkpoint's `scaler` entry that no GradScaler could continue from: it must be a dict, empty
    (saved by a run without fp16 loss scaling) or holding a finite, positive loss scale."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: expected a 'scaler' entry (a dict) in the checkpoint")
    scale = saved.get("scale", 1.0)
    if saved and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{path}: the fp16 loss scale in the checkpoint is {scale!r}, not a positive number")


def resume_scaler(scaler: torch.amp.GradScaler, saved: dict, path) -> str | None:
    """Continues the checkpoint's fp16 loss scaling (`saved`, its scaler's state_dict) where this run scales fp16
    losses too. Otherwise `scaler` stays as built and the line returned (for the log) says what changed: a run
    saved without it (no --amp, --amp_dtype bf16, or the CPU) now in fp16 starts a fresh scaler, which finds
    its scale in the first steps as at the start of any run; a run leaving fp16 drops the saved scale."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
        return None
    if scaler.is_enabled():
        return (f"{path} holds no fp16 loss-scaler state (its run did not autocast to fp16 on CUDA): starting a "
                f"fresh GradScaler at scale {scaler.get_scale():g}")
    if saved:
        return f"{path}: its fp16 loss scale ({saved['scale']:g}) is not used, this run does not autocast to fp16"
    return None


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN autotuning pays off when every step has the same input size (training at --img_size); where sizes
    vary (evaluation: each image keeps its own size, times each test scale) it would re-tune for every new size."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
