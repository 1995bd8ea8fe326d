"""Device and precision choices, taken from arguments so that nothing assumes CUDA."""
import contextlib

import torch


def select_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` takes the GPU of this process (its local rank) when CUDA is available, else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to this process")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = local_rank or 0
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA (with a GradScaler), bf16 on CPU; a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)
