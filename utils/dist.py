"""Distributed helpers: one place for rank, world size, process-group set-up, gathering, and the checks that the
processes of a run were given the same flags and read the same files.

Launch with `torchrun --nproc_per_node N script.py ...` (or the legacy `python -m torch.distributed.launch`,
which passes `--local_rank`/`--local-rank` to the script: give it to `init_distributed`), or with SLURM's
`srun`, whose variables are translated to torchrun's. Without a launcher every
helper acts as the single process of a world of one, so callers never branch on whether they are distributed.
"""
import os

import torch
import torch.distributed as dist

from utils.device import bind_local_gpu
from utils.errors import ArgumentError, DataError, UserError

_holders = 0  # init_distributed calls of this process not yet paired with a cleanup


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
    """Whether a launcher started several processes: torchrun / torch.distributed.launch (WORLD_SIZE > 1) or
    SLURM's srun (a job step of several tasks)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or _slurm_step_tasks() > 1


def _slurm_step_tasks() -> int:
    # SLURM_STEP_NUM_TASKS is set by srun for its job step; a plain `python` in an sbatch script (one process of a
    # many-task allocation) sees SLURM_NTASKS only, and must not wait for processes that never start.
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) if "SLURM_PROCID" in os.environ else 1


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: `gpu[03-05,9],cpu1` -> `gpu03`, `node7,node8` -> `node7`."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[:nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[")
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_to_torchrun_env() -> None:
    """Fills in the variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
    srun's, so that `srun python train.py ...` joins the same env:// rendezvous. The master is the first node of
    the srun step, where task 0 runs (the job's first node for a step on all its nodes); the port is MASTER_PORT
    when set, else one derived from the job id (two jobs sharing a node do not collide)."""
    env = os.environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("utils/dist.py: srun started several tasks but SLURM_JOB_NODELIST is not set")
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", str(_slurm_step_tasks()))
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_ADDR", first_host(nodelist))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(enabled: bool = True, local_rank: int | None = None, device: str = "auto") -> bool:
    """Joins the process group described by the launcher's environment (torchrun's or srun's); returns whether the
    run is distributed. Nothing happens when `enabled` is False or the launcher started one process. `device`
    picks the backend: nccl for CUDA (`auto` with a GPU visible), gloo for the CPU. A call that finds the group
    already joined holds it too: each call is paired with one `cleanup`."""
    global _holders
    if is_dist():
        _holders += 1
        return True
    # torchrun with one process sets RANK and WORLD_SIZE=1: with --dist that is a real (nccl / gloo) group of one.
    torchrun_env = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not enabled or not (launched() or torchrun_env):
        return False
    if not torchrun_env and _slurm_step_tasks() > 1:
        slurm_to_torchrun_env()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        # WORLD_SIZE set by hand, or left in the shell by another job: not a launcher's environment.
        raise UserError(f"the environment sets WORLD_SIZE={os.environ.get('WORLD_SIZE')} but not {', '.join(missing)}, "
                        "which a launcher sets with it: start the processes with torchrun (or srun), or unset "
                        "WORLD_SIZE to run one process")
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        bind_local_gpu(int(os.environ.get("LOCAL_RANK", 0)))  # the `local_rank` argument is in it by now
    # torchrun keeps its store from one attempt to the next (--max-restarts): a group made under the same keys
    # reads the addresses the failed attempt's processes left there and cannot connect, so each attempt has its own.
    store, group_rank, size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=group_rank, world_size=size)
    _holders = 1
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


def differences(values: dict) -> list[str]:
    """For each entry of `values` that is not the same on every process, `NAME v on ranks 0,2, w on rank 1` (each
    value in the order of the first rank that has it); [] when all agree, or not distributed."""
    if not is_dist():
        return []
    every = all_gather_object(values)
    differing = []
    for name in dict.fromkeys(k for process_values in every for k in process_values):
        ranks_of = {}
        for r, process_values in enumerate(every):
            ranks_of.setdefault(repr(process_values.get(name)), []).append(str(r))
        if len(ranks_of) > 1:
            differing.append(f"{name} " + ", ".join(f"{value} on rank{'s' if len(ranks) > 1 else ''} "
                                                    f"{','.join(ranks)}" for value, ranks in ranks_of.items()))
    return differing


def check_same_flags(flags: dict, paths: set[str], per_process: set[str]) -> None:
    """Refuses (ArgumentError, on every process) command-line flags that differ between the processes of a run. The
    values of `paths` may differ (each node may mount the files elsewhere), not whether they are given: --pretrained
    on some nodes only made them read it alone, in a collective the others never joined. `per_process` flags are
    not compared. A node started with another --batch_size trained on other images in other steps than the rest,
    silently, and then waited for ever in a collective that they never reached."""
    compared = {f"--{k}": ("given" if v is not None else "not given") if k in paths else v
                for k, v in flags.items() if k not in per_process}
    differing = differences(compared)
    if differing:
        raise ArgumentError(f"the processes of this run were given different flags: {'; '.join(differing)}. Start "
                            "every node with the same flags (only paths and --num_workers may differ)")


def check_same_input(values: dict) -> None:
    """Refuses (DataError, on every process) what the processes read that differs between them (`values`: the size
    of a data set, the step of a checkpoint): each node may read its own copy of the files, and one of another size
    or age made its processes take other steps than the rest, or score other images."""
    differing = differences(values)
    if differing:
        raise DataError(f"the processes of this run read different inputs: {'; '.join(differing)}. Every node must "
                        "read the same files (on a shared file system, or identical copies)")


def on_every_process(work):
    """Runs `work()` on every process (reading files, of which each node may hold its own copy); where it raised a
    user error on any, every process raises: one that failed its own error, the others the first failed process's,
    prefixed by its rank. One that failed alone left the others to go on, and to stop at their next collective with
    only its disconnect (`Connection closed by peer`), in train.log or as a traceback."""
    result, error = None, None
    try:
        result = work()
    except UserError as e:
        error = e
    failed = [(r, e) for r, e in enumerate(all_gather_object(error)) if e is not None]
    if error is not None:
        raise error
    if failed:
        r, first = failed[0]
        raise type(first)(f"rank {r}: {first}")
    return result


def broadcast_object(obj):
    """Rank 0's `obj` on every process."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch norm's running statistics) on every process. DDP sends them at the start of each
    training forward, which then updates each process's copy with its own images: after the last step the copies
    differ, and a validation split over the processes would score each share with other statistics than the
    checkpoint (rank 0's) holds."""
    if is_dist():
        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def any_true(*flags: bool) -> list[bool]:
    """For each flag, whether it is true on any process (one all-reduce), so that all processes take the same
    branch (stop, save) at the same step."""
    values = torch.tensor([float(f) for f in flags])
    if is_dist():
        if dist.get_backend() == "nccl":
            values = values.cuda()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def cleanup() -> None:
    """Leaves the process group when its last holder is done. A script that runs train.py's and test.py's main in
    turn in the same processes (tools/ablation.py) joins first and keeps one group for all of them: a group made
    again there reads the previous group's addresses from the launcher's store, and its processes fail to connect."""
    global _holders
    if is_dist():
        _holders -= 1
        if _holders <= 0:
            _holders = 0
            dist.destroy_process_group()
