"""The GPU path (`pytest -m cuda`; skipped without a GPU): the CUDA corner-pooling kernel against the CPU kernel
(itself tested against a slow loop reference in tests/test_cpool.py), decoding on CUDA against the CPU, mixed
precision training steps, and a torchrun launch on nccl. `make gpu-check` runs them with the CUDA kernel built."""
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.shapes import ShapesConfig, write_split
from datasets.targets import make_targets
from lib.cpool import pool
from lib.cpool.pool import BOTTOM, LEFT, RIGHT, TOP, extension_pool
from nets import build_model
from utils.decode import decode
from utils.device import autocast, grad_scaler
from utils.losses import centernet_loss

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = {"top": TOP, "bottom": BOTTOM, "left": LEFT, "right": RIGHT}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def run(x: torch.Tensor, grad: torch.Tensor, direction: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extension forward and backward on x's device: (output, grad_input)."""
    x = x.detach().requires_grad_()
    out = extension_pool(x, direction)
    out.backward(grad)
    return out.detach(), x.grad


def cuda_and_cpu(x: torch.Tensor, grad: torch.Tensor, direction: int):
    """((out, grad_in) on CUDA moved to the CPU, (out, grad_in) of the CPU kernel); same layout on both."""
    gpu = run(x.cuda(), grad.cuda(), direction)
    return tuple(t.cpu() for t in gpu), run(x, grad, direction)


def inputs(shape, kind: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """random: continuous values; ties: values in {0, 1, 2}. Gradients are small integers, so every sum of them
    is exact in every dtype and both kernels must agree bit for bit whatever their summation order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) if kind == "random" else torch.randint(0, 3, shape, generator=g).float()
    return x.to(dtype), torch.randint(-4, 5, shape, generator=g).to(dtype)


def test_cuda_kernel_is_registered_and_chosen(monkeypatch):
    # every test below would otherwise compare the CPU kernel with itself through the fallback
    assert pool.kernel_registered("cuda"), "lib.cpool._ext has no CUDA kernel: rebuild with FORCE_CUDA=1"
    assert pool.choose_backend("cuda", pool.extension_available(), pool.kernel_registered("cuda"))[0] == "extension"
    monkeypatch.setattr(pool, "_warned", set())  # a fallback would warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pool.top_pool(torch.randn(1, 1, 3, 3, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_matches_cpu_kernel(dtype, direction, kind):
    # H = 37 and W = 75: several load batches of the column kernel and tiles of the row kernel, each with a
    # remainder; 2 * 5 * 37 = 370 rows: several warps of 32 rows and a partial one
    x, grad = inputs((2, 5, 37, 75), kind, dtype, seed=DTYPES.index(dtype))
    (out, grad_in), (ref_out, ref_grad) = cuda_and_cpu(x, grad, DIRECTIONS[direction])
    assert out.dtype == dtype and grad_in.dtype == dtype
    assert torch.equal(out, ref_out)
    assert torch.equal(grad_in, ref_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_random_gradients_up_to_summation_order(dtype, direction):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 40, 70, generator=g).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    (out, grad_in), (ref_out, ref_grad) = cuda_and_cpu(x, grad, DIRECTIONS[direction])
    assert torch.equal(out, ref_out)
    # each gradient is a sum of at most 70 terms |g| < 6 accumulated in float32 (float64 for float64), rounded once
    # to dtype: orders can differ by 70 * 6 * eps(acc) plus one rounding of dtype
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    torch.testing.assert_close(grad_in.double(), ref_grad.double(), rtol=torch.finfo(dtype).eps,
                               atol=70 * 6 * acc_eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_nan_rule(dtype):
    x, grad = inputs((1, 2, 40, 45), "random", dtype, seed=11)
    x[0, 0, 3, 4] = x[0, 0, 30, 4] = x[0, 1, 2, 40] = x[0, 1, 2, 7] = float("nan")
    for direction in DIRECTIONS.values():
        (out, grad_in), (ref_out, ref_grad) = cuda_and_cpu(x, grad, direction)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(grad_in, ref_grad)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 1025), (2, 3, 1025, 1), (1, 2, 3, 1025),
                                   (1, 2, 1025, 3)])
def test_size_one_and_1025(shape):
    x, grad = inputs(shape, "ties", torch.float32, seed=12)
    for direction in DIRECTIONS.values():
        (out, grad_in), (ref_out, ref_grad) = cuda_and_cpu(x, grad, direction)
        assert torch.equal(out, ref_out) and torch.equal(grad_in, ref_grad)


LAYOUTS = {"transposed": lambda t: t.transpose(2, 3), "sliced": lambda t: t[:, ::2, 1:, ::3],
           "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous(layout):
    base, _ = inputs((2, 8, 34, 40), "ties", torch.float32, seed=13)
    # made on each device from a dense tensor: .cuda() of a slice that is not dense would return a contiguous copy
    x, gx = LAYOUTS[layout](base), LAYOUTS[layout](base.cuda())
    grad = torch.randint(-4, 5, x.shape, generator=torch.Generator().manual_seed(14)).float()
    grad = grad.contiguous(memory_format=torch.channels_last)
    gg = grad.cuda()  # dense: .cuda() keeps its strides
    assert gx.stride() == x.stride() and gg.stride() == grad.stride()
    assert not gx.is_contiguous() and not gg.is_contiguous()
    for direction in DIRECTIONS.values():
        out, grad_in = run(gx, gg, direction)
        ref_out, ref_grad = run(x, grad, direction)
        assert torch.equal(out.cpu(), ref_out) and torch.equal(grad_in.cpu(), ref_grad)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck_float64(direction):
    x = torch.randn(2, 3, 9, 37, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: extension_pool(t, DIRECTIONS[direction]), (x,))


def test_more_than_2_31_elements():
    # (2, 65600, 128, 128) in float16: 2^31 + 2^21 elements (4 GiB) per tensor, so element offsets pass 2^31 (an
    # int32 index would wrap); 2^24 + 2^14 lines of 128 in either direction: 65600 blocks of 256 columns and
    # 131200 or more blocks of at most 128 rows, more than the 65535 that gridDim.y or z could hold (the kernels
    # use gridDim.x). The values are small integers made in float16 on the GPU (no int64 tensor of this size), so
    # there are ties, and the all-ones gradient sums to counts <= 128, exact. The reference is the same kernel on
    # 8 slices of about 2^28 elements: pooling is per line, and the lines of the (N * C, 1, H, W) view are those
    # of x; on small tensors the kernel is checked against the CPU above. At most 18 GiB of GPU memory.
    shape = (2, 65600, 128, 128)
    g = torch.Generator(device="cuda").manual_seed(15)
    x = torch.randint(0, 8, shape, generator=g, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    planes = x.view(-1, 1, *shape[2:])
    for direction in DIRECTIONS.values():
        xg = x.detach().requires_grad_()
        out = extension_pool(xg, direction)
        out.backward(torch.ones_like(out))
        out_planes, grad_planes = out.detach().view_as(planes), xg.grad.view_as(planes)
        step = planes.shape[0] // 8
        for k0, k1 in zip(range(0, planes.shape[0], step), range(step, planes.shape[0] + 1, step)):
            ref_out, ref_grad = run(planes[k0:k1], torch.ones_like(planes[k0:k1]), direction)
            assert torch.equal(out_planes[k0:k1], ref_out) and torch.equal(grad_planes[k0:k1], ref_grad)
        del out, xg, out_planes, grad_planes, ref_out, ref_grad


def synthetic_outputs(batch: int, classes: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """Eval-mode output dict (docs/FORMAT.md) with continuous random values, so that no two scores tie."""
    g = torch.Generator().manual_seed(seed)
    out = {f"hm_{k}": torch.randn(batch, classes, size, size, generator=g) * 3 for k in ("tl", "br", "ct")}
    out.update({f"off_{k}": torch.rand(batch, 2, size, size, generator=g) for k in ("tl", "br", "ct")})
    out.update({f"emb_{k}": torch.rand(batch, 1, size, size, generator=g) for k in ("tl", "br")})
    return out


def assert_same_rows(gpu: torch.Tensor, cpu: torch.Tensor, tol: float) -> None:
    """gpu (R, D) and cpu (R, D) hold the same rows, in any order, each value within `tol`: every CPU row has
    exactly one GPU row that close, and no two CPU rows share it."""
    assert gpu.shape == cpu.shape
    distance = (cpu[:, None, :] - gpu[None, :, :]).abs().amax(dim=2)  # (R cpu, R gpu)
    nearest = distance.min(dim=1)
    assert (nearest.values <= tol).all(), nearest.values.max()
    assert sorted(nearest.indices.tolist()) == list(range(len(gpu)))


def test_decode_on_cuda_equals_cpu():
    out = synthetic_outputs(batch=2, classes=5, size=48, seed=16)
    cpu_boxes, cpu_centers = decode(out, topk=40, ae_threshold=0.5, num_dets=500)
    gpu_boxes, gpu_centers = decode({k: v.cuda() for k, v in out.items()}, topk=40, ae_threshold=0.5, num_dets=500)
    gpu_boxes, gpu_centers = gpu_boxes.cpu(), gpu_centers.cpu()
    # Only the pairs that passed (score > -1, about 65 per image) are results; the other rows tie at -1, and their
    # order is top-k's tie breaking, which differs between CPU and GPU. Within the valid ones scores can differ by
    # ulps (sigmoid), so they are matched row to row instead of compared in order. Coordinates are at most 48,
    # scores at most 1: a few float32 ulps of 48 are under 1e-4.
    for image in range(2):
        valid_cpu, valid_gpu = cpu_boxes[image, :, 4] > -1, gpu_boxes[image, :, 4] > -1
        assert valid_cpu.sum() > 10  # enough boxes survive the pairing to compare
        assert valid_gpu.sum() == valid_cpu.sum()
        assert_same_rows(gpu_boxes[image][valid_gpu], cpu_boxes[image][valid_cpu], tol=1e-4)
        assert_same_rows(gpu_centers[image], cpu_centers[image], tol=1e-4)  # all K centers are results


def training_batch(batch_size: int, size: int, num_classes: int, device: str) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    items = []
    for _ in range(batch_size):
        xy = rng.uniform(0, size * 0.5, (3, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(size * 0.1, size * 0.4, (3, 2))], axis=1)
        items.append(make_targets(boxes, rng.integers(0, num_classes, 3), num_classes, size, size))
    batch = {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}
    batch["image"] = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {k: v.to(device) for k, v in batch.items()}


# The largest gradient of this first step, measured in float32 on the CPU, is 1.88 (a stem convolution's weight;
# the largest activation gradient is 0.19); with autocast the weight's gradient is computed in float16, scaled.
# GradScaler's default 65536 would overflow it (1.88 * 65536 > 65504, the float16 maximum): that step is skipped
# and the scale halved, leaving 6% of headroom at 32768. At 2^10 the scaled maximum is 1925, 34 times below the
# limit, far more than fp16 rounding and one Adam step at lr 1e-4 change it: no step may be skipped.
INIT_SCALE = 2.0**10


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_tiny_hourglass_training_step_autocast(amp, monkeypatch):
    device = torch.device("cuda")
    monkeypatch.setattr(pool, "_warned", set())  # a corner-pooling fallback would warn again
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 4).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    assert grad_scaler(device, amp).is_enabled() == (amp == "fp16")
    scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE, enabled=amp == "fp16")
    batch = training_batch(2, 127, 4, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no corner-pooling fallback
        for _ in range(2):
            before = [p.detach().clone() for p in model.parameters()]
            with autocast(device, amp):
                outputs = model(batch["image"])
            assert outputs[0]["hm_tl"].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
            loss, terms = centernet_loss([{k: v.float() for k, v in o.items()} for o in outputs], batch)
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # a skipped step (gradients not finite) would have halved the scale and left every parameter as it was
            assert scaler.get_scale() == (INIT_SCALE if amp == "fp16" else 1.0)
            after = list(model.parameters())
            assert all(torch.isfinite(p).all() for p in after)
            assert any(not torch.equal(a, b) for a, b in zip(after, before))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_one_process_uses_nccl(tmp_path):
    data = tmp_path / "shapes"
    cfg = ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40, max_objects=3)
    write_split(data, "train", 4, seed=1, cfg=cfg)
    write_split(data, "val", 2, seed=1, cfg=cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "train.py", "--dist", "--log_name", "ddp", "--ckpt_dir", str(tmp_path), "--data_dir", str(data),
           "--train_split", "train", "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127",
           "--batch_size", "4", "--num_epochs", "1", "--num_workers", "0", "--device", "cuda", "--amp"]
    env = {**os.environ, "NCCL_DEBUG": "INFO"}  # NCCL reports each communicator it creates
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NCCL INFO" in result.stdout + result.stderr
    assert "1 process(es) on cuda:0" in (tmp_path / "ddp" / "train.log").read_text()
