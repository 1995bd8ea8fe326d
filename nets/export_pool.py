"""Corner pooling written with standard ONNX operators only, for export (tools/export_onnx.py).

ONNX has no cumulative maximum, and lib.cpool's kernels are not ONNX operators. A scan over a length L is written
as a log-step shifted maximum instead: round r (shift s = 2^r) replaces each position by the maximum of itself and
the position s further along the scan direction, so after r + 1 rounds every position holds the maximum of the
2^(r+1) positions ahead of it; ceil(log2 L) rounds cover the whole line. Each round is Pad + Slice + Max, which
every runtime has (onnxruntime, TensorRT without a plugin). Max only selects, so the result equals lib.cpool
exactly, ties included.

The shift pads with the edge value (ONNX Pad mode "edge"): top pooling at y takes x[min(y + s, L - 1)], a position
it covers anyway. So there are no -inf constants and no shape arithmetic, and a graph built with R rounds is exact
for every L <= 2^R: the rounds are fixed at export time (from the traced size, or from the largest size the
exported model accepts with dynamic height and width).
"""
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .corner_pool import POOLS, CascadeCornerPool, CornerPool

# direction -> (dim scanned, True when the maximum is taken over positions after the output's: top and left)
DIRECTIONS = {"top": (2, True), "bottom": (2, False), "left": (3, True), "right": (3, False)}


def rounds_for(length: int) -> int:
    """Rounds of shifted maximum that cover a line of `length` positions: ceil(log2 length)."""
    return math.ceil(math.log2(length)) if length > 1 else 0


def shifted_max_pool(x: torch.Tensor, direction: str, rounds: int | None = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W), equal to lib.cpool's pooling in `direction` (top, bottom, left, right) for
    lines of at most 2^rounds positions; `rounds` None: enough for x's own size."""
    dim, ahead = DIRECTIONS[direction]
    if rounds is None:
        rounds = rounds_for(x.shape[dim])
    for r in range(rounds):
        s = 2 ** r
        # F.pad lists (left, right, top, bottom): pad after the line when the pooling looks ahead, else before.
        pad = {(3, True): (0, s, 0, 0), (3, False): (s, 0, 0, 0),
               (2, True): (0, 0, 0, s), (2, False): (0, 0, s, 0)}[(dim, ahead)]
        padded = F.pad(x, pad, mode="replicate")
        # Slices with constant bounds (s: or :-s), not the traced length, so the graph holds for any length.
        window = [slice(None)] * 4
        window[dim] = slice(s, None) if ahead else slice(None, -s)
        x = torch.maximum(x, padded[tuple(window)])
    return x


def use_export_pooling(model: nn.Module, rounds: int | None = None) -> nn.Module:
    """Switches every corner pooling of `model` (cascade or plain, in place) to `shifted_max_pool` with `rounds`
    rounds (None: from the size met at run time); returns `model`. For export and inference only: lib.cpool's
    gradients are not kept."""
    names = {fn: name for name, fn in POOLS.items()}
    for module in model.modules():
        if isinstance(module, (CascadeCornerPool, CornerPool)):
            for attr in ("vertical", "horizontal"):
                pool = getattr(module, attr)
                if pool not in names:
                    raise TypeError(f"nets/export_pool.py: {type(module).__name__}.{attr} is {pool!r}, "
                                    f"not one of the poolings of nets/corner_pool.py POOLS")
                setattr(module, attr, partial(shifted_max_pool, direction=names[pool], rounds=rounds))
    return model
