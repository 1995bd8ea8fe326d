"""The pooling branches of CenterNet: cascade corner pooling (top-left, bottom-right) and center pooling, and the
modules of the ablation variants (`--corner_pool plain`, `--center_branch conv`).

Cascade top-left pooling, on the 256-channel map x (official module `pool` of CenterNet-104):
    p1 = Top(conv3x3(a + Left(b)))    with a, b = conv-BN-ReLU(x), 128 channels each
    p2 = Left(conv3x3(c + Top(d)))    with c, d likewise
    out = conv-BN-ReLU(ReLU(BN(conv3x3(p1 + p2)) + BN(conv1x1(x))))
Bottom-right is the same with Bottom and Right. Center pooling (official `pool_cross`) replaces p1 by
Bottom(Top(a)), the maximum of each column, and p2 by Right(Left(b)), the maximum of each row: one reduction per
direction instead of two scans. Its gradient is shared equally between tied maxima (torch.amax).

CornerNet's corner pooling (`CornerPool`, github princeton-vl/CornerNet models/CornerNet.py `pool`) has no
cross-direction look: p1 = Top(a), p2 = Left(c), with the same merge. `CenterConv` is the center branch of the
paper's "CRE without CTP" ablation, which says only that the center keypoints come from conventional
convolutions: the CenterPool module with its two maxima left out (pooled = a + b), so that the two variants
differ in the pooling alone.
"""
import torch
from torch import nn

from lib.cpool import bottom_pool, left_pool, right_pool, top_pool

from .layers import ConvBnRelu

POOLS = {"top": top_pool, "bottom": bottom_pool, "left": left_pool, "right": right_pool}


class PoolMerge(nn.Module):
    """The part shared by both branch kinds: out = conv-BN-ReLU(ReLU(BN(conv3x3(pooled)) + BN(conv1x1(x))))."""

    def __init__(self, dim: int, pool_dim: int):
        super().__init__()
        self.pool_conv = nn.Conv2d(pool_dim, dim, 3, padding=1, bias=False)
        self.pool_bn = nn.BatchNorm2d(dim)
        self.skip_conv = nn.Conv2d(dim, dim, 1, bias=False)
        self.skip_bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU(inplace=True)
        self.out = ConvBnRelu(3, dim, dim)

    def forward(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.pool_bn(self.pool_conv(pooled)) + self.skip_bn(self.skip_conv(x)))
        return self.out(y)


class CornerPool(nn.Module):
    """(N, dim, H, W) -> (N, dim, H, W): CornerNet's corner pooling, one scan per branch. `vertical`, `horizontal`
    as for CascadeCornerPool."""

    def __init__(self, dim: int, pool_dim: int, vertical: str, horizontal: str):
        super().__init__()
        self.vertical, self.horizontal = POOLS[vertical], POOLS[horizontal]
        self.conv_v = ConvBnRelu(3, dim, pool_dim)
        self.conv_h = ConvBnRelu(3, dim, pool_dim)
        self.merge = PoolMerge(dim, pool_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(x, self.vertical(self.conv_v(x)) + self.horizontal(self.conv_h(x)))


class CascadeCornerPool(nn.Module):
    """(N, dim, H, W) -> (N, dim, H, W). `vertical`, `horizontal` name the two scans: ("top", "left") for the
    top-left corner, ("bottom", "right") for the bottom-right."""

    def __init__(self, dim: int, pool_dim: int, vertical: str, horizontal: str):
        super().__init__()
        self.vertical, self.horizontal = POOLS[vertical], POOLS[horizontal]
        self.conv_v = ConvBnRelu(3, dim, pool_dim)       # a: pooled vertically at the end
        self.look_h = ConvBnRelu(3, dim, pool_dim)       # b: looked at horizontally first
        self.cascade_v = nn.Conv2d(pool_dim, pool_dim, 3, padding=1, bias=False)
        self.conv_h = ConvBnRelu(3, dim, pool_dim)       # c: pooled horizontally at the end
        self.look_v = ConvBnRelu(3, dim, pool_dim)       # d: looked at vertically first
        self.cascade_h = nn.Conv2d(pool_dim, pool_dim, 3, padding=1, bias=False)
        self.merge = PoolMerge(dim, pool_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = self.vertical(self.cascade_v(self.conv_v(x) + self.horizontal(self.look_h(x))))
        p2 = self.horizontal(self.cascade_h(self.conv_h(x) + self.vertical(self.look_v(x))))
        return self.merge(x, p1 + p2)


class CenterPool(nn.Module):
    """(N, dim, H, W) -> (N, dim, H, W): the column maximum of one projection plus the row maximum of another."""

    def __init__(self, dim: int, pool_dim: int):
        super().__init__()
        self.conv_col = ConvBnRelu(3, dim, pool_dim)
        self.conv_row = ConvBnRelu(3, dim, pool_dim)
        self.merge = PoolMerge(dim, pool_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv_col(x), self.conv_row(x)
        pooled = a.amax(dim=2, keepdim=True) + b.amax(dim=3, keepdim=True)  # broadcasts to (N, C, H, W)
        return self.merge(x, pooled)


class CenterConv(CenterPool):
    """(N, dim, H, W) -> (N, dim, H, W): CenterPool without the maxima, the sum of the two projections (the same
    layers, so the two variants differ in the pooling alone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(x, self.conv_col(x) + self.conv_row(x))
