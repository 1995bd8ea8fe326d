"""The CenterNet hourglass network: stem, stacked hourglass modules, and per stack the three pooling branches
with their heads (heatmaps, embeddings, offsets). The variants of the paper's ablation: `corner_pool` cascade
(CenterNet) or plain (CornerNet's), `center_branch` pool (center pooling), conv (convolutions only) or none (no
center heatmap and offsets: CornerNet's network).

Shapes: image (N, 3, H, W) with H, W of the form k * size_unit - 1 (128k - 1; 32k - 1 for tiny_hourglass)
-> maps (N, *, (H + 1) / 4, (W + 1) / 4).
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .corner_pool import CascadeCornerPool, CenterConv, CenterPool, CornerPool
from .layers import ConvBnRelu, Residual

HEATMAP_BIAS = -2.19  # sigmoid(-2.19) ~ 0.1: the focal loss starts small on the mostly-negative heatmaps
HEATMAP_HEADS = ("hm_tl", "hm_br", "hm_ct")  # the heads with one output channel per class
OUTPUT_KEYS = ("hm_tl", "hm_br", "hm_ct", "emb_tl", "emb_br", "off_tl", "off_br", "off_ct")  # docs/FORMAT.md order
CORNER_POOLS = {"cascade": CascadeCornerPool, "plain": CornerPool}
CENTER_BRANCHES = {"pool": CenterPool, "conv": CenterConv, "none": None}


def output_keys(center_branch: str) -> tuple[str, ...]:
    """The eval dict's keys of a network with `center_branch`, in OUTPUT_KEYS order: no hm_ct, off_ct for none."""
    return tuple(k for k in OUTPUT_KEYS if center_branch != "none" or not k.endswith("_ct"))


def residuals(in_dim: int, out_dim: int, count: int, stride: int = 1) -> nn.Sequential:
    """`count` residual blocks; the first changes the width (and applies the stride)."""
    return nn.Sequential(Residual(in_dim, out_dim, stride), *(Residual(out_dim, out_dim) for _ in range(count - 1)))


class Hourglass(nn.Module):
    """Recursive hourglass of depth len(dims) - 1: skip branch at dims[0], a stride-2 residual down to dims[1],
    the inner hourglass, residuals back to dims[0], nearest x2 up-sampling, sum."""

    def __init__(self, dims: list[int], blocks: list[int]):
        super().__init__()
        self.skip = residuals(dims[0], dims[0], blocks[0])
        self.down = residuals(dims[0], dims[1], blocks[0], stride=2)
        self.inner = Hourglass(dims[1:], blocks[1:]) if len(dims) > 2 else residuals(dims[1], dims[1], blocks[1])
        self.up = nn.Sequential(*(Residual(dims[1], dims[1]) for _ in range(blocks[0] - 1)),
                                Residual(dims[1], dims[0]))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.upsample(self.up(self.inner(self.down(x))))


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) without keeping its activations for backward, which runs the forward a second time to recompute
    them. That second run sees the same batch, so BN normalises the same way, but it would move the running
    statistics a second time: they are put back after it, and evaluation gets the statistics of one forward.
    Under torch.compile the recomputation is part of the compiled backward, which does not repeat the forward's
    buffer updates (tests/test_compile.py), and the put-back, a side effect, could not be traced."""
    if torch.compiler.is_compiling():
        return checkpoint(module, x, use_reentrant=False)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return module(inp)
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        try:  # torch may stop the recomputation early, with an exception, once it has what backward needs
            return module(inp)
        finally:
            with torch.no_grad():
                for m, (mean, var, count) in zip(norms, saved):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)

    return checkpoint(run, x, use_reentrant=False)


def head(in_dim: int, mid_dim: int, out_dim: int, bias: float | None = None) -> nn.Sequential:
    """conv3x3 (with bias) - ReLU - conv1x1."""
    layers = nn.Sequential(nn.Conv2d(in_dim, mid_dim, 3, padding=1), nn.ReLU(inplace=True),
                           nn.Conv2d(mid_dim, out_dim, 1))
    if bias is not None:
        nn.init.constant_(layers[-1].bias, bias)
    return layers


def check_variant(corner_pool: str, center_branch: str) -> None:
    if corner_pool not in CORNER_POOLS:
        raise ValueError(f"unknown corner_pool {corner_pool!r}; expected one of {', '.join(CORNER_POOLS)}")
    if center_branch not in CENTER_BRANCHES:
        raise ValueError(f"unknown center_branch {center_branch!r}; expected one of {', '.join(CENTER_BRANCHES)}")


class KeypointBranches(nn.Module):
    """Per stack: top-left, bottom-right and (unless center_branch is none) center pooling, each followed by its
    heads. (N, cnv_dim, h, w) -> dict of docs/FORMAT.md: hm_* (N, C, h, w), emb_* (N, 1, h, w), off_* (N, 2, h, w),
    without hm_ct and off_ct when there is no center branch. The modules are registered in the same order for every
    variant (a checkpoint's optimizer state follows the parameter order)."""

    def __init__(self, cnv_dim: int, head_dim: int, pool_dim: int, num_classes: int, corner_pool: str = "cascade",
                 center_branch: str = "pool"):
        super().__init__()
        check_variant(corner_pool, center_branch)
        self.has_center = center_branch != "none"
        self.pool_tl = CORNER_POOLS[corner_pool](cnv_dim, pool_dim, "top", "left")
        self.pool_br = CORNER_POOLS[corner_pool](cnv_dim, pool_dim, "bottom", "right")
        if self.has_center:
            self.pool_ct = CENTER_BRANCHES[center_branch](cnv_dim, pool_dim)
        self.hm_tl = head(cnv_dim, head_dim, num_classes, HEATMAP_BIAS)
        self.hm_br = head(cnv_dim, head_dim, num_classes, HEATMAP_BIAS)
        if self.has_center:
            self.hm_ct = head(cnv_dim, head_dim, num_classes, HEATMAP_BIAS)
        self.emb_tl = head(cnv_dim, head_dim, 1)
        self.emb_br = head(cnv_dim, head_dim, 1)
        self.off_tl = head(cnv_dim, head_dim, 2)
        self.off_br = head(cnv_dim, head_dim, 2)
        if self.has_center:
            self.off_ct = head(cnv_dim, head_dim, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tl, br = self.pool_tl(x), self.pool_br(x)
        out = {"hm_tl": self.hm_tl(tl), "hm_br": self.hm_br(br), "emb_tl": self.emb_tl(tl), "emb_br": self.emb_br(br),
               "off_tl": self.off_tl(tl), "off_br": self.off_br(br)}
        if self.has_center:
            ct = self.pool_ct(x)
            out.update(hm_ct=self.hm_ct(ct), off_ct=self.off_ct(ct))
        return {k: out[k] for k in OUTPUT_KEYS if k in out}  # in the order of docs/FORMAT.md


class CenterNet(nn.Module):
    """Stem (7x7 conv stride 2, residual stride 2), `num_stacks` hourglasses with intermediate supervision.

    Training mode returns a list with one output dict per stack; eval mode returns the last stack's dict.
    `corner_pool`, `center_branch`: the variant (KeypointBranches), CenterNet's by default.
    `grad_checkpoint`: in training, keep only each hourglass's input for backward and recompute the rest there
    (less memory, one more hourglass forward per step; see bench/bench_memory.py)."""

    def __init__(self, num_classes: int, num_stacks: int, dims: list[int], blocks: list[int], stem_dim: int,
                 cnv_dim: int, pool_dim: int, head_dim: int, corner_pool: str = "cascade",
                 center_branch: str = "pool", grad_checkpoint: bool = False):
        super().__init__()
        check_variant(corner_pool, center_branch)
        width = dims[0]
        self.num_stacks = num_stacks
        self.corner_pool, self.center_branch = corner_pool, center_branch
        self.output_keys = output_keys(center_branch)
        self.grad_checkpoint = grad_checkpoint
        # Each of the len(dims) - 1 hourglass levels halves the stride-4 map: (H + 1) / 4 must divide evenly.
        self.size_unit = 4 * 2 ** (len(dims) - 1)
        self.stem = nn.Sequential(ConvBnRelu(7, 3, stem_dim, stride=2), Residual(stem_dim, width, stride=2))
        self.hourglasses = nn.ModuleList(Hourglass(dims, blocks) for _ in range(num_stacks))
        self.cnvs = nn.ModuleList(ConvBnRelu(3, width, cnv_dim) for _ in range(num_stacks))
        self.branches = nn.ModuleList(KeypointBranches(cnv_dim, head_dim, pool_dim, num_classes, corner_pool,
                                                       center_branch) for _ in range(num_stacks))
        # Between stacks: ReLU(BN(conv1x1(features)) + BN(conv1x1(cnv))), then a residual.
        self.inter_feats = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
                                         for _ in range(num_stacks - 1))
        self.inter_cnvs = nn.ModuleList(nn.Sequential(nn.Conv2d(cnv_dim, width, 1, bias=False), nn.BatchNorm2d(width))
                                        for _ in range(num_stacks - 1))
        self.inters = nn.ModuleList(Residual(width, width) for _ in range(num_stacks - 1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, image: torch.Tensor) -> list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]:
        """(N, 3, H, W), H and W of the form k * size_unit - 1 (128k - 1 for the full networks)."""
        height, width = image.shape[-2:]
        if (height + 1) % self.size_unit or (width + 1) % self.size_unit:
            raise ValueError(f"nets/hourglass.py CenterNet: input height and width must be of the form "
                             f"k * {self.size_unit} - 1 for this network, got {height} x {width}")
        x = self.stem(image)
        outputs = []
        for i in range(self.num_stacks):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                features = checkpointed(self.hourglasses[i], x)
            else:
                features = self.hourglasses[i](x)
            cnv = self.cnvs[i](features)
            last = i == self.num_stacks - 1
            if self.training or last:
                outputs.append(self.branches[i](cnv))
            if not last:
                x = self.inters[i](self.relu(self.inter_feats[i](x) + self.inter_cnvs[i](cnv)))
        return outputs if self.training else outputs[-1]
