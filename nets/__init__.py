"""`build_model(arch, num_classes, grad_checkpoint)`: the CenterNet variants by name."""
from .hourglass import CenterNet

HOURGLASS_DIMS = [256, 256, 384, 384, 384, 512]
HOURGLASS_BLOCKS = [2, 2, 2, 2, 2, 4]

ARCHS = {
    # CenterNet-104: two stacks (210,062,960 parameters with 80 classes, as the seed).
    "large_hourglass": dict(num_stacks=2, dims=HOURGLASS_DIMS, blocks=HOURGLASS_BLOCKS, stem_dim=128, cnv_dim=256,
                            pool_dim=128, head_dim=256),
    # CenterNet-52: one stack (104,844,152 parameters with 80 classes).
    "small_hourglass": dict(num_stacks=1, dims=HOURGLASS_DIMS, blocks=HOURGLASS_BLOCKS, stem_dim=128, cnv_dim=256,
                            pool_dim=128, head_dim=256),
    # CPU-sized: the same branches (cascade corner pooling, center pooling, all heads), narrower and with a
    # 3-level hourglass, for the built-in data set and the tests. One stack: a second doubles the cost of a
    # training step; the two-stack path is tested on a stripped copy of large_hourglass. At input 127 (the
    # "128" size: maps 32 x 32) it trains at 15-25 images/s on 2 CPU cores (bench/bench_model.py).
    "tiny_hourglass": dict(num_stacks=1, dims=[48, 64, 96, 128], blocks=[1, 1, 1, 2], stem_dim=32, cnv_dim=64,
                           pool_dim=32, head_dim=64),
}


def build_model(arch: str, num_classes: int, grad_checkpoint: bool = False) -> CenterNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return CenterNet(num_classes=num_classes, grad_checkpoint=grad_checkpoint, **ARCHS[arch])
