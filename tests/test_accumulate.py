"""--accum_steps and --grad_checkpoint: the same gradients as one large batch / as the plain network."""
from pathlib import Path

import torch
from torch import nn

from datasets.sampling import epoch_order
from engine import trainer
from nets import ARCHS, build_model
from nets.hourglass import CenterNet
from tests.test_train import OneBoxImages, without_batchnorm
from utils.logger import RunLogger

CPU = torch.device("cpu")


def gradients_at_each_step(batch_size: int, accum_steps: int, images: int = 12) -> tuple[list[list[torch.Tensor]], int]:
    """The gradients the optimizer sees at each of its steps in one epoch (lr 0: the weights stay), and the step
    count train_one_epoch returns."""
    torch.manual_seed(0)
    model = without_batchnorm(build_model("tiny_hourglass", 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in model.parameters()]))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    step_batch = batch_size * accum_steps
    progress = trainer.EpochProgress(1, epoch_order(images, step_batch, seed=0, epoch=1), step_batch, 0)
    loader = trainer.make_train_loader(OneBoxImages(images), progress, 0, CPU, accum_steps)
    logger = RunLogger(Path("unused"), enabled=False)
    trainer.train_one_epoch(model, loader, optimizer, scaler, CPU, False, progress, logger, accum_steps=accum_steps)
    return seen, progress.step


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_two_batches_of_4_accumulated_equal_one_batch_of_8():
    # One box per image: every micro-batch normalises its loss by the same object count, as DDP's test needs.
    big, big_steps = gradients_at_each_step(8, 1)
    small, small_steps = gradients_at_each_step(4, 2)  # 12 images: one step of 8, the last 4 left out
    assert big_steps == small_steps == 1 and len(big) == len(small) == 1
    first_half, _ = gradients_at_each_step(4, 1)
    nonzero = 0
    for a, b, half in zip(small[0], big[0], first_half[0]):
        if b.norm() == 0:
            assert a.norm() == 0
            continue
        nonzero += 1
        # float32 sums in another order: relative differences of ~1e-6; a wrong scale or a lost batch is O(1).
        assert relative_error(a, b) < 1e-4
    assert nonzero > 0.9 * len(big[0])
    # The first 4 images alone give other gradients: the test sees the second micro-batch.
    flat = [torch.cat([g.flatten() for g in grads]) for grads in (first_half[0], big[0])]
    assert relative_error(*flat) > 1e-2


class RecordingLogger(RunLogger):
    def __init__(self):
        super().__init__(Path("unused"), enabled=False)
        self.logged = []

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        self.logged.append((prefix, step, dict(values)))


def test_each_step_logs_the_mean_of_its_micro_batches():
    """One optimizer step of 2 micro-batches of 4 different images: the step's logged loss terms are their mean,
    as the epoch's are (the last micro-batch's alone were logged)."""
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    progress = trainer.EpochProgress(1, epoch_order(8, 8, seed=0, epoch=1), 8, 0)
    loader = trainer.make_train_loader(OneBoxImages(8), progress, 0, CPU, accum_steps=2)
    logger = RecordingLogger()
    trainer.train_one_epoch(model, loader, optimizer, torch.amp.GradScaler("cuda", enabled=False), CPU, False,
                            progress, logger, accum_steps=2)
    steps = [values for prefix, step, values in logger.logged if prefix == "train/" and "loss" in values]
    assert len(steps) == 1 and set(steps[0]) == set(progress.sums)
    for k, total in progress.sums.items():  # the sums of both micro-batches' terms
        assert steps[0][k] == total / 2, k


def stripped_large(grad_checkpoint: bool) -> CenterNet:
    """large_hourglass's layers (2 stacks, 5 levels) at a few channels each, as in tests/test_nets.py."""
    torch.manual_seed(0)
    return CenterNet(num_classes=3, num_stacks=2, dims=[8, 8, 12, 12, 12, 16],
                     blocks=ARCHS["large_hourglass"]["blocks"], stem_dim=8, cnv_dim=8, pool_dim=4, head_dim=8,
                     grad_checkpoint=grad_checkpoint)


def saved_bytes(fn, *inputs) -> tuple[object, int]:
    """fn(*inputs) and the bytes autograd saved in it for backward."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return out, saved


def step_and_saved_bytes(model: nn.Module, image: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Gradients of a fixed random projection of every output of every stack, and the bytes autograd saved in
    the forward for backward."""
    model.train()
    outputs, saved = saved_bytes(model, image)
    g = torch.Generator().manual_seed(1)
    loss = sum((v * torch.randn(v.shape, generator=g)).sum() for stack in outputs for v in stack.values())
    loss.backward()
    return [p.grad for p in model.parameters()], saved


def test_grad_checkpoint_same_gradients_and_batchnorm_statistics_less_memory():
    image = torch.randn(2, 3, 127, 127, generator=torch.Generator().manual_seed(2))
    plain, checkpointed = stripped_large(False), stripped_large(True)
    grads_plain, bytes_plain = step_and_saved_bytes(plain, image)
    grads_ckpt, bytes_ckpt = step_and_saved_bytes(checkpointed, image)
    for a, b in zip(grads_ckpt, grads_plain):
        # The recomputation repeats the same float operations; allow for a kernel choosing another order.
        assert relative_error(a, b) < 1e-5
    # BN running statistics moved once, as without checkpointing (the recomputation's move is undone): the
    # checkpointed forward runs the same operations on the same input, so they are equal bit for bit (a second
    # move would change them by momentum 0.1 of the batch statistics), and so are the eval outputs below.
    buffers_plain, buffers_ckpt = dict(plain.named_buffers()), dict(checkpointed.named_buffers())
    for k, v in buffers_plain.items():
        assert torch.equal(buffers_ckpt[k], v), k
    assert int(buffers_ckpt["hourglasses.0.skip.0.bn1.num_batches_tracked"]) == 1
    # What the two hourglasses save on their own (input (2, 8, 32, 32)) is no longer kept, less their inputs.
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    in_hourglasses = sum(saved_bytes(h, x)[1] for h in stripped_large(False).train().hourglasses)
    assert bytes_plain - bytes_ckpt >= in_hourglasses - 2 * x.numel() * x.element_size() > 0
    # Eval mode and no-grad forwards are unchanged (and never checkpointed).
    plain.eval(), checkpointed.eval()
    with torch.no_grad():
        for k, v in plain(image).items():
            torch.testing.assert_close(checkpointed(image)[k], v, rtol=0, atol=0)


def test_the_memory_bench_counts_each_saved_storage_once_and_no_weight():
    """bench/bench_memory.py's "saved activations" column: a tensor saved by two ops is kept once, and a weight is
    kept whether or not activations are (it added up every saved tensor: 439 MB for tiny_hourglass at 127 x 16,
    whose saved storages are 248 MB)."""
    from bench.bench_memory import SavedActivations

    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)  # so that the product saves the weight too
    with SavedActivations(linear) as kept:
        y = linear(x)  # saves x (2 x 4) and the weight (3 x 4)
        (y * y).relu()  # saves y twice and the (2 x 3) result
        y[:, 1:].sigmoid()  # saves its (2 x 2) result
    assert kept.bytes == 4 * (2 * 4 + 2 * 3 + 2 * 3 + 2 * 2)
