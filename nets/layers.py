"""The two building blocks of the hourglass network: conv-BN-ReLU and the residual block."""
import torch
from torch import nn


class ConvBnRelu(nn.Sequential):
    """k x k convolution (no bias: BN follows), BN, ReLU."""

    def __init__(self, k: int, in_dim: int, out_dim: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_dim, out_dim, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
        )


class Residual(nn.Module):
    """Two 3x3 conv-BN (the first may have a stride) plus a shortcut, which is a strided 1x1 conv-BN when the
    shape changes."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_dim)
        self.skip = nn.Identity()
        if stride != 1 or in_dim != out_dim:
            self.skip = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False), nn.BatchNorm2d(out_dim))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.skip(x))
