"""Distributed helpers: one place for rank, world size, process-group set-up and gathering.

Launch with `torchrun --nproc_per_node N script.py ...` (or the legacy `python -m torch.distributed.launch`,
which passes `--local_rank`/`--local-rank` to the script: give it to `init_distributed`). Without a launcher every
helper acts as the single process of a world of one, so callers never branch on whether they are distributed.
"""
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """This process's index on its machine (its GPU), from LOCAL_RANK set by the launcher."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether a launcher started several processes (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(enabled: bool = True, local_rank: int | None = None, device: str = "auto") -> bool:
    """Joins the process group described by the launcher's environment; returns whether the run is distributed.
    Nothing happens when `enabled` is False or the launcher started one process. `device` picks the backend:
    nccl for CUDA (`auto` with a GPU visible), gloo for the CPU."""
    if is_dist():
        return True
    if not enabled or not launched():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"utils/dist.py: WORLD_SIZE > 1 but the environment lacks {missing}; launch with torchrun")
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else 0)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return True


def all_gather_object(obj) -> list:
    """Every process's `obj` (any picklable object), in rank order; `[obj]` when not distributed."""
    if not is_dist():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean over processes of each scalar tensor, as Python floats (one all-reduce for all of them)."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if is_dist():
        dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(values, stacked.tolist()))


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
