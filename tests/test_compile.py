"""torch.compile: corner pooling traces into one graph (both backends, both memory layouts), the network compiles
whole and computes what it computes eagerly (with and without gradient checkpointing), both on the CPU and, where
one is visible, on a GPU (`cuda` marker); and train.py --compile."""
import contextlib
import warnings

import pytest
import torch

import train
from lib.cpool import pool
from lib.cpool.pool import BOTTOM, LEFT, RIGHT, TOP
from nets.hourglass import CenterNet
from tests.test_cuda import training_batch
from utils.checkpoint import load_checkpoint
from utils.losses import centernet_loss

POOLS = {TOP: pool.top_pool, BOTTOM: pool.bottom_pool, LEFT: pool.left_pool, RIGHT: pool.right_pool}


def pooled_and_grad(fn, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(grad)
    return out.detach(), x.grad


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["extension", "cummax"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("direction", POOLS)
def test_pooling_traces_into_one_graph_and_equals_eager(device, backend, layout, direction):
    # fullgraph: a graph break (an untraceable lookup, an operator without shapes for fake tensors) raises. Max
    # only selects and each gradient goes to one position, so compiled and eager agree bit for bit.
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(direction)
    x = torch.randint(0, 4, (2, 3, 5, 7), generator=g).float().to(device).contiguous(memory_format=layout)  # ties
    grad = torch.randn(2, 3, 5, 7, generator=g).to(device)
    fn = POOLS[direction]
    with pool.forced_fallback() if backend == "cummax" else contextlib.nullcontext():
        expected = pooled_and_grad(fn, x, grad)
        compiled = pooled_and_grad(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, grad)
    assert torch.equal(compiled[0], expected[0]) and torch.equal(compiled[1], expected[1])
    assert compiled[0].stride() == expected[0].stride()  # channels_last stays so with the extension


def test_the_fallback_warning_is_given_once_under_compile(monkeypatch):
    monkeypatch.setattr(pool, "_HAVE_EXT", False)
    monkeypatch.setattr(pool, "_warned", set())
    torch._dynamo.reset()
    fn = torch.compile(pool.left_pool, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [fn(x), fn(x)]
    assert len(caught) == 1 and "not built" in str(caught[0].message)
    assert torch.equal(outs[1], pool.cummax_pool(x, LEFT))
    torch._dynamo.reset()  # the graph above holds the fallback: no later test may reuse it


def test_pooling_of_meta_tensors_gives_shapes():
    out = pool.top_pool(torch.empty(2, 3, 5, 7, device="meta").contiguous(memory_format=torch.channels_last))
    assert out.device.type == "meta" and out.shape == (2, 3, 5, 7)
    assert out.is_contiguous(memory_format=torch.channels_last)


def small_network(grad_checkpoint: bool) -> CenterNet:
    # Two stacks (the inter-stack path, intermediate supervision) and three hourglass levels: inputs 16k - 1.
    torch.manual_seed(0)
    return CenterNet(num_classes=3, num_stacks=2, dims=[8, 8, 12], blocks=[1, 1, 1], stem_dim=8, cnv_dim=8,
                     pool_dim=4, head_dim=8, grad_checkpoint=grad_checkpoint).train()


def one_step(model, forward, batch) -> tuple[float, dict, dict]:
    loss, _ = centernet_loss(forward(batch["image"]), batch)
    loss.backward()
    return (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("device", DEVICES)
def test_the_network_compiles_whole_and_equals_eager_with_and_without_checkpointing(device):
    # In float64, so that the comparison has room (and, on a GPU, no TF32): eager without checkpointing is the
    # reference, and the compiled network (inductor, one graph) sums in another order (fused kernels, other
    # convolution algorithms), which moves each result by a few roundings of its terms, amplified where they
    # cancel: at most 5e-14 of a tensor's scale, measured on the CPU (float32 would give 2e-5). 1e-9 of the scale
    # leaves a wide margin, while a wrong pooling or a missing term moves gradients by their own size.
    # Checkpointing recomputes the hourglasses in the compiled backward: a second update of BN's running
    # statistics would move them by momentum 0.1 of their change.
    torch._dynamo.reset()
    batch = training_batch(2, 63, 3, device)
    batch["image"] = batch["image"].double()
    eager = small_network(False).to(device, torch.float64)
    expected = one_step(eager, eager, batch)
    for grad_checkpoint in (False, True):
        model = small_network(grad_checkpoint).to(device, torch.float64)
        loss, grads, buffers = one_step(model, torch.compile(model, fullgraph=True), batch)
        assert loss == pytest.approx(expected[0], rel=1e-9)
        for name, grad in grads.items():
            scale = expected[1][name].abs().max().item()
            torch.testing.assert_close(grad, expected[1][name], rtol=0, atol=1e-9 * scale + 1e-300, msg=name)
        for name, buffer in buffers.items():
            scale = expected[2][name].double().abs().max().item()
            torch.testing.assert_close(buffer.double(), expected[2][name].double(), rtol=0,
                                       atol=1e-9 * scale + 1e-300, msg=name)


def test_train_with_compile(shapes_dir, tmp_path):
    # One optimizer step per epoch (batch 8 = the 8 training images), so the first epoch's logged loss is the loss
    # of the same weights on the same batch, eager and compiled. The checkpoint holds the network's own parameter names
    # (not those of torch.compile's wrapper), so test.py, --resume and --pretrained read it as any other.
    def run(folder: str, *extra: str) -> str:
        train.main(train.get_args_parser().parse_args([
            "--log_name", "run", "--ckpt_dir", str(tmp_path / folder), "--data_dir", str(shapes_dir),
            "--train_split", "train", "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127",
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--num_epochs", "1", *extra]))
        return (tmp_path / folder / "run" / "train.log").read_text()

    def epoch_loss(log: str) -> float:
        return float(log.split("epoch 1: loss ")[1].split()[0])

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_log = run("eager")
    # Two epochs with a validation between them (which switches the shared modules to eval mode and back): the
    # training steps compile once, to one graph, and are not compiled again.
    compiled_log = run("compiled", "--compile", "--num_epochs", "2", "--val_interval", "1")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert "--compile: the training steps run through torch.compile" in compiled_log
    assert epoch_loss(compiled_log) == pytest.approx(epoch_loss(eager_log), rel=1e-4)
    eager, compiled = (load_checkpoint(tmp_path / f / "run" / "checkpoint.pt") for f in ("eager", "compiled"))
    assert list(compiled["model"]) == list(eager["model"])
    run("compiled", "--compile", "--resume", "--num_epochs", "3")
    assert "epoch 3: loss" in (tmp_path / "compiled" / "run" / "train.log").read_text()
