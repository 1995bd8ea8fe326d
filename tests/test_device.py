"""utils/device.py: autocast dtypes, when a GradScaler is on, the loss scaler across a resume that changes --amp,
the cuDNN autotuning switch, and which GPU a process binds to (here with a mocked device count)."""
import pytest
import torch

from utils import dist
from utils.device import (amp_dtype, autocast, check_scaler_state, cudnn_benchmark, grad_scaler, local_gpu_index,
                          resume_scaler, select_device)
from utils.errors import CheckpointError, DeviceError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device, amp, dtype", [
    (CUDA, False, None),
    (CUDA, True, torch.float16),  # --amp alone: fp16, as before --amp_dtype existed
    (CUDA, "fp16", torch.float16),
    (CUDA, "bf16", torch.bfloat16),
    (CPU, True, torch.bfloat16),
    (CPU, "fp16", torch.bfloat16),
    (CPU, False, None),
])
def test_amp_dtype(device, amp, dtype):
    assert amp_dtype(device, amp) == dtype


def test_no_grad_scaler_on_cpu():
    # (on CUDA tests/test_cuda.py checks: on for fp16, off for bf16)
    assert not any(grad_scaler(CPU, amp).is_enabled() for amp in (False, True, "fp16", "bf16"))


def test_bad_amp_value():
    with pytest.raises(ValueError, match="'fp8'"):
        amp_dtype(CUDA, "fp8")


def test_cpu_autocast_runs_in_bfloat16():
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast(CPU, "bf16"):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    with autocast(CPU, False):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast(CPU, False):  # the caller's own region: fp32 inside
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32


def test_cudnn_benchmark_restored():
    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark(not before):
        assert torch.backends.cudnn.benchmark == (not before)
    assert torch.backends.cudnn.benchmark == before


@pytest.mark.parametrize("local_rank, visible, index", [
    (0, 8, 0), (5, 8, 5),  # torchrun: every process sees the node's GPUs
    (0, 1, 0), (5, 1, 0),  # SLURM, one GPU bound per task: each sees its own as GPU 0
    (5, 2, 1),  # fewer GPUs than local ranks: they share
])
def test_local_gpu_index(local_rank, visible, index):
    assert local_gpu_index(local_rank, visible) == index


def test_no_gpu_visible():
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        local_gpu_index(0, 0)


@pytest.fixture
def one_bound_gpu(monkeypatch):
    """A process that sees one GPU, as under srun --gpus-per-task=1: the devices it was made to use."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_select_device_with_one_bound_gpu(one_bound_gpu):
    # before: set_device(3) on a process that sees one GPU, "invalid device ordinal"
    assert select_device("cuda", local_rank=3) == torch.device("cuda", 0)
    assert one_bound_gpu == [0]


def test_init_distributed_with_one_bound_gpu(one_bound_gpu, monkeypatch):
    groups = []
    monkeypatch.setattr(dist.dist, "init_process_group", lambda backend, **kw: groups.append(backend))
    monkeypatch.setattr(dist.dist, "rendezvous", lambda url: iter([(dist.dist.HashStore(), 11, 16)]))
    for name, value in {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu03",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert dist.init_distributed(True, device="cuda")
    assert one_bound_gpu == [0] and groups == ["nccl"]


def fp16_scaler(init_scale: float = 2.0**16) -> torch.amp.GradScaler:
    """An enabled scaler, as grad_scaler gives for --amp (fp16) on CUDA; here on the CPU, which needs no GPU."""
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


@pytest.mark.parametrize("saved_by", [(CUDA, False), (CUDA, "bf16"), (CPU, True)], ids=["no-amp", "bf16", "cpu"])
def test_resume_in_fp16_from_a_run_without_its_scaler(saved_by):
    saved = grad_scaler(*saved_by).state_dict()
    assert saved == {}
    scaler = fp16_scaler()
    with pytest.raises(RuntimeError, match="state dict is empty"):
        fp16_scaler().load_state_dict(saved)  # what `--resume --amp` did before: a crash
    note = resume_scaler(scaler, saved, "run/checkpoint.pt")
    assert note == ("run/checkpoint.pt holds no fp16 loss-scaler state (its run did not autocast to fp16 on CUDA): "
                    "starting a fresh GradScaler at scale 65536")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16


def test_resume_in_fp16_from_fp16_continues_its_scale():
    saved = fp16_scaler(init_scale=1024.0).state_dict()
    scaler = fp16_scaler()
    assert resume_scaler(scaler, saved, "ckpt") is None
    assert scaler.get_scale() == 1024.0


@pytest.mark.parametrize("amp", [False, "bf16"])
def test_resume_without_fp16_from_fp16_drops_its_scale(amp):
    scaler = grad_scaler(CUDA, amp)
    note = resume_scaler(scaler, fp16_scaler(init_scale=1024.0).state_dict(), "ckpt")
    assert note == "ckpt: its fp16 loss scale (1024) is not used, this run does not autocast to fp16"
    assert not scaler.is_enabled()
    assert resume_scaler(grad_scaler(CUDA, amp), {}, "ckpt") is None  # nothing to say between runs without it


@pytest.mark.parametrize("saved, message", [
    (None, "expected a 'scaler' entry"),
    ({"scale": float("nan"), "_growth_tracker": 0}, "loss scale in the checkpoint is nan"),
    ({"scale": 0.0, "_growth_tracker": 0}, "is 0.0, not a positive number"),
])
def test_scaler_state_no_run_can_continue(saved, message):
    with pytest.raises(CheckpointError, match=message):
        check_scaler_state(saved, "ckpt")
    check_scaler_state({}, "ckpt")
    check_scaler_state(fp16_scaler().state_dict(), "ckpt")
