"""utils/device.py: autocast dtypes, when a GradScaler is on, and the cuDNN autotuning switch."""
import pytest
import torch

from utils.device import amp_dtype, autocast, cudnn_benchmark, grad_scaler

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


def test_cudnn_benchmark_restored():
    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark(not before):
        assert torch.backends.cudnn.benchmark == (not before)
    assert torch.backends.cudnn.benchmark == before
