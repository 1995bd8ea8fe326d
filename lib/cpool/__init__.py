"""Corner pooling (CornerNet / CenterNet) on (N, C, H, W) tensors.

    top_pool(x)[..., y, :]    = max over y' >= y of x[..., y', :]
    bottom_pool(x)[..., y, :] = max over y' <= y of x[..., y', :]
    left_pool(x)[..., :, x0]  = max over x' >= x0 of x[..., :, x']
    right_pool(x)[..., :, x0] = max over x' <= x0 of x[..., :, x']

Tie rule (all implementations, tested): each output's gradient goes to ONE input position, the maximum nearest
to the output position. A single scan starting at the far end (top pooling scans y = H-1 .. 0) keeps a running
maximum and replaces it whenever the new value is >= the running one, so on ties the last position met wins; this
is also `torch.cummax`'s rule. (The official CornerNet / CenterNet kernels replace it only on a strictly greater
value, so there the farthest of tied maxima gets the gradient.) A NaN becomes the running maximum and stays
until the next NaN (as in cummax).

The compiled extension `lib.cpool._ext` (C++ CPU kernel, CUDA kernel when built for a GPU; `make setup`) is used
when present and it registered a kernel for the input's device; otherwise (not built, or built without its CUDA
kernel and given a CUDA tensor) a pure-PyTorch `torch.cummax` fallback runs, with one warning saying how to
rebuild. Both run in the input dtype (float32, float64, bfloat16, float16), also inside `torch.autocast`;
gradients of the 16-bit types are summed in float32 by the extension.

Memory: the extension's backward uses the saved input and output (position k is an argmax exactly where
x[k] == out[k]); the fallback saves an int64 index tensor instead. A backward with create_graph (double backward)
runs the fallback's differentiable scatter from the saved input, since the kernel has no derivative. As with any
saved tensor, modifying the pooled output in place (`out += y`) before backward is an autograd error; write
`out = out + y`.
"""
from .pool import (
    BottomPool,
    LeftPool,
    RightPool,
    TopPool,
    bottom_pool,
    extension_available,
    left_pool,
    right_pool,
    top_pool,
)

__all__ = [
    "top_pool", "bottom_pool", "left_pool", "right_pool",
    "TopPool", "BottomPool", "LeftPool", "RightPool",
    "extension_available",
]
