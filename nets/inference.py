"""`prepare_for_inference(model)`: an eval-only copy of a CenterNet network that runs faster on the CPU and gives
the same outputs up to float rounding. Training never sees it: checkpoints hold the unprepared network.

It holds one copy of the weights besides `model`'s: each convolution's folded weight until its first call, then
only that weight in oneDNN's layout (README "CPU inference", "Weights held"). Preparing builds it from
`model`'s tensors without copying `model` first.

What it changes (each measured by bench/bench_infer.py, README "CPU inference"):
- batch norm folded into the convolution before it: w' = w * g / sqrt(v + eps), b' = beta + (b - m) * g / sqrt(v + eps);
- ReLU, and the residual sum before it, done inside the convolution by oneDNN (`mkldnn::_convolution_pointwise`):
  one pass over memory instead of three;
- activations in channels_last, oneDNN's native layout, so no convolution reorders its input (center pooling's
  broadcast sum included, which would come out NCHW);
- each head's last 1x1 convolution as one matrix product that writes the output map in NCHW, the layout decoding
  reads, instead of a channels_last map copied afterwards;
- optionally bf16 weights and activations (the CPU's AVX-512 BF16 / AMX instructions), outputs back in float32;
  on a CPU without AVX-512 the bf16 convolutions run as plain `F.conv2d` (oneDNN refuses them there).

The rewrite goes by module type (ConvBnRelu, Residual, PoolMerge, conv-BN and conv-ReLU pairs in an nn.Sequential),
so any branch built from these blocks is prepared; a block it does not know keeps its own forward, which stays
correct (a batch norm left unfolded only costs time). Without oneDNN (non-x86 builds) the folded convolutions run
as plain `F.conv2d` followed by ReLU.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .corner_pool import CenterPool, PoolMerge
from .hourglass import OUTPUT_KEYS, KeypointBranches
from .layers import Residual

ONEDNN = torch.backends.mkldnn.is_available()
# oneDNN's bf16 convolutions need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: on an x86 CPU with AVX2 only, torch
# refuses them ("bf16 path needs the cpu support ..."), and the bf16 path runs as plain F.conv2d there.
ONEDNN_BF16 = ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def foldable(conv: nn.Module) -> bool:
    """A convolution FusedConv can run: ungrouped, zero-padded by a number of pixels."""
    return isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros" and \
        not isinstance(conv.padding, str)


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of `conv` followed by `bn` in eval mode, computed in float64 so that folding adds no
    rounding beyond the final cast to float32."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=weight.dtype)
    if bn is not None:
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        weight = weight * scale[:, None, None, None]
        bias = bn.bias.detach().double() + (bias - bn.running_mean.double()) * scale
    return weight.float(), bias.float()


class FusedConv(nn.Module):
    """conv (+ folded BN) (+ `add`) (+ ReLU) as one call: forward(x, add=None) = [relu](conv(x) [+ add])."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, relu: bool = False):
        super().__init__()
        if not foldable(conv):
            raise ValueError("FusedConv: only zero-padded, ungrouped convolutions with numeric padding")
        weight, bias = folded(conv, bn)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.relu = relu
        self.packed = None  # the weight in oneDNN's blocked layout, made at the first call

    def onednn_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight reordered once for oneDNN (it then fits any input size; the shape only guides the choice of
        layout): unpacked, every call reorders it, which costs most on the deep 8 x 8 levels (2.4x there). A reorder
        rounds nothing, so the packed weight then holds the dense one's values and the dense copy is dropped (kept
        only when packing converted its dtype): holding both took a third of small_hourglass's memory."""
        if self.packed is None or self.packed.dtype != x.dtype:
            weight = self.dense_weight()
            self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to(x.dtype).to_mkldnn(), self.padding, self.stride, self.dilation, 1, list(x.shape))
            self.weight = None if weight.dtype == x.dtype else nn.Parameter(weight, requires_grad=False)
        return self.packed

    def dense_weight(self) -> torch.Tensor:
        """The folded weight as a plain tensor: the parameter, or once it is dropped, the packed weight unpacked."""
        return self.packed.to_dense() if self.weight is None else self.weight

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type == "cpu" and (ONEDNN_BF16 if x.dtype == torch.bfloat16 else ONEDNN):
            weight = self.onednn_weight(x)
            if add is None:
                return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, self.padding, self.stride,
                                                               self.dilation, 1, "relu" if self.relu else "none",
                                                               [], "")
            # oneDNN wants both operands in one layout; the sum is then a post-op of the convolution.
            add = add.contiguous(memory_format=suggested_format(x))
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, add, weight, self.bias, self.padding, self.stride, self.dilation, 1, "add", 1.0,
                "relu" if self.relu else None, [], "")
        y = F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)
        if add is not None:
            y = y + add
        return F.relu(y) if self.relu else y


def suggested_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


class PreparedResidual(nn.Module):
    """Residual: relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x)) as two fused convolutions (and the skip's)."""

    def __init__(self, block: Residual):
        super().__init__()
        self.conv1 = FusedConv(block.conv1, block.bn1, relu=True)
        self.conv2 = FusedConv(block.conv2, block.bn2, relu=True)
        self.skip = nn.Identity() if isinstance(block.skip, nn.Identity) else FusedConv(block.skip[0], block.skip[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x), add=self.skip(x))


class PreparedPoolMerge(nn.Module):
    """PoolMerge: out(relu(bn(conv3x3(pooled)) + bn(conv1x1(x)))) with the sum and ReLU fused."""

    def __init__(self, merge: PoolMerge):
        super().__init__()
        self.pool_conv = FusedConv(merge.pool_conv, merge.pool_bn, relu=True)
        self.skip_conv = FusedConv(merge.skip_conv, merge.skip_bn)
        self.out = FusedConv(merge.out[0], merge.out[1], relu=True)

    def forward(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool_conv(pooled, add=self.skip_conv(x)))


class PreparedCenterPool(nn.Module):
    """CenterPool with its broadcast sum written in the layout of its inputs: left to broadcasting, the sum comes
    out NCHW, and the convolution reading it ran 3x slower than on channels_last (bench of the tiny forward)."""

    def __init__(self, pool: CenterPool):
        super().__init__()
        self.conv_col, self.conv_row = fused_sequence(pool.conv_col), fused_sequence(pool.conv_row)
        self.merge = PreparedPoolMerge(pool.merge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv_col(x), self.conv_row(x)
        pooled = torch.add(spatial_max(a, 2), spatial_max(b, 3), out=torch.empty_like(a))
        return self.merge(x, pooled)


def spatial_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x.amax(dim, keepdim=True) over height (2) or width (3), reduced in the order x is stored: on a
    channels_last tensor amax itself took 4.5 ms against 0.3 ms through the NHWC view, for the two of a
    tiny_hourglass forward at 511 (bench/profile_infer.py; README, "CPU inference")."""
    if suggested_format(x) is not torch.channels_last:
        return x.amax(dim=dim, keepdim=True)
    return x.permute(0, 2, 3, 1).amax(dim=dim - 1, keepdim=True).permute(0, 3, 1, 2)


class OutputConv(nn.Module):
    """A head's last 1x1 convolution (K x C, with bias) as one matrix product per image that writes the output map
    in NCHW: (N, C, H, W) channels_last -> (N, K, H, W) contiguous. As a convolution, its output came out
    channels_last and was copied to NCHW for decoding, and oneDNN ran the 1- and 2-channel ones at 2-4 GFLOP/s."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        weight, bias = folded(conv, None)
        self.weight = nn.Parameter(weight.flatten(1), requires_grad=False)  # (K, C)
        self.bias = nn.Parameter(bias[:, None], requires_grad=False)  # (K, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view when x is channels_last
        out = torch.baddbmm(self.bias, self.weight.expand(n, -1, -1), pixels.transpose(1, 2))  # (N, K, H * W)
        return out.view(n, -1, h, w)


def is_output_conv(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and \
        conv.padding == (0, 0) and conv.groups == 1


def prepared_branches(branches: KeypointBranches) -> KeypointBranches:
    """The pooling modules prepared, and each head with its last convolution as an OutputConv."""
    return with_children(branches, {
        name: nn.Sequential(*fused_sequence(child[:-1]), OutputConv(child[-1]))
        if name in OUTPUT_KEYS and is_output_conv(child[-1]) else prepared(child)
        for name, child in branches.named_children()})


def fused_sequence(seq: nn.Sequential) -> nn.Sequential:
    """The layers of `seq` with each Conv2d [BatchNorm2d] [ReLU] run as one FusedConv."""
    layers, items, i = [], list(seq), 0
    while i < len(items):
        layer = items[i]
        if foldable(layer):
            bn = items[i + 1] if i + 1 < len(items) and isinstance(items[i + 1], nn.BatchNorm2d) else None
            j = i + 1 + (bn is not None)
            relu = j < len(items) and isinstance(items[j], nn.ReLU)
            layers.append(FusedConv(layer, bn, relu))
            i = j + relu
        else:
            layers.append(prepared(layer))
            i += 1
    return nn.Sequential(*layers)


def prepared(module: nn.Module) -> nn.Module:
    """A new module for `module` with its known blocks in their prepared forms; `module` is untouched."""
    if isinstance(module, Residual):
        return PreparedResidual(module)
    if isinstance(module, PoolMerge):
        return PreparedPoolMerge(module)
    if type(module) is CenterPool:  # not CenterConv, whose sum of two convolutions keeps their layout
        return PreparedCenterPool(module)
    if isinstance(module, KeypointBranches):
        return prepared_branches(module)
    if isinstance(module, nn.Sequential):  # ConvBnRelu and the heads included
        return fused_sequence(module)
    if foldable(module):
        return FusedConv(module)
    return with_children(module, {name: prepared(child) for name, child in module.named_children()})


def with_children(module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A deep copy of `module` with `children` in place of its own (by name): the tensors of its own children
    are not copied, only those it holds itself. Copying the whole model first held every weight once more."""
    return copy.deepcopy(module, {id(child): children[name] for name, child in module.named_children()})


class PreparedNetwork(nn.Module):
    """The eval-mode network on channels_last (and `dtype`) inputs; returns the output dict in float32."""

    def __init__(self, network: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.network, self.dtype, self.channels_last = network, dtype, channels_last

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = image.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {k: v.float().contiguous() for k, v in self.network(x).items()}


@torch.no_grad()
def prepare_for_inference(model: nn.Module, dtype: torch.dtype = torch.float32,
                          channels_last: bool = True) -> PreparedNetwork:
    """An eval-mode copy of `model` prepared for CPU inference (see the module docstring); `model` is untouched.
    `dtype` bfloat16 gives the 16-bit path (`--amp` on the CPU)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"prepare_for_inference: dtype must be float32 or bfloat16, got {dtype}")
    network = prepared(model).to(dtype)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    return PreparedNetwork(network.eval(), dtype, channels_last)


__all__ = ["prepare_for_inference", "PreparedNetwork", "FusedConv"]
