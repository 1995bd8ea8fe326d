"""Autograd functions and nn.Module wrappers for the four corner poolings (semantics and tie rule: see __init__)."""
import contextlib
import functools
import warnings

import torch
from torch import Tensor, nn

try:
    from . import _ext  # noqa: F401  (registers torch.ops.cpool.*)
    _HAVE_EXT = True
except ImportError:
    _HAVE_EXT = False

# Direction codes shared with csrc/cpool.cpp: (code, dim scanned, scan starts at the far end).
TOP, BOTTOM, LEFT, RIGHT = 0, 1, 2, 3
_DIM = {TOP: 2, BOTTOM: 2, LEFT: 3, RIGHT: 3}
_REVERSE = {TOP: True, BOTTOM: False, LEFT: True, RIGHT: False}
# CUDA_HOME: the CUDA toolkit whose version matches torch.version.cuda (setup.py finds one from nvcc when unset)
REBUILD_CUDA = "make clean && FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda make setup"
_warned: set[str] = set()
_forced_fallback = False


def extension_available() -> bool:
    """True when the compiled kernels of lib/cpool/csrc are importable (`make setup`)."""
    return _HAVE_EXT


def kernel_registered(device_type: str) -> bool:
    """Whether the built extension has a kernel for `device_type` ('cpu', 'cuda', ...). An extension built on a
    machine without a GPU registers only its CPU kernel; calling it on a CUDA tensor would then fail inside
    the dispatcher, so the choice is made before the call."""
    return _HAVE_EXT and _has_kernel(device_type)


@functools.cache  # registrations happen at import; the dispatcher lookup costs microseconds a call
def _has_kernel(device_type: str) -> bool:
    key = torch._C._dispatch_key_for_device(device_type)  # 'cuda' -> 'CUDA', 'meta' -> 'Meta'
    return torch._C._dispatch_has_kernel_for_dispatch_key("cpool::pool_forward", key)


if _HAVE_EXT:
    # Shapes for torch.compile's tracing (fake tensors): both kernels return a new contiguous tensor of their
    # input's shape and dtype.
    @torch.library.register_fake("cpool::pool_forward")
    def _pool_forward_fake(input: Tensor, direction: int) -> Tensor:
        return torch.empty_like(input, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cpool::pool_backward")
    def _pool_backward_fake(input: Tensor, output: Tensor, grad_output: Tensor, direction: int) -> Tensor:
        return torch.empty_like(input, memory_format=torch.contiguous_format)


def choose_backend(device_type: str, have_ext: bool, registered: bool) -> tuple[str, str | None]:
    """('extension' or 'cummax', the reason for falling back or None) for an input on `device_type`, given
    whether the extension is built and whether it registered a kernel for that device type."""
    if not have_ext:
        return "cummax", "compiled extension lib.cpool._ext not built (run `make setup`)"
    if registered:
        return "extension", None
    if device_type == "cuda":
        return "cummax", f"lib.cpool._ext was built without its CUDA kernel (rebuild: `{REBUILD_CUDA}`)"
    return "cummax", f"lib.cpool._ext has no kernel for device type {device_type!r}"


def _warn_fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"lib/cpool: {reason}; using the slower torch.cummax fallback", RuntimeWarning, stacklevel=5)


def _check(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"lib/cpool: input must be (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"lib/cpool: input must be a floating-point tensor, got {x.dtype}")


def cummax_forward(x: Tensor, direction: int) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch pooling: (output, argmax index along the scanned dim), both (N, C, H, W)."""
    dim = _DIM[direction]
    if _REVERSE[direction]:
        out, idx = torch.cummax(x.flip(dim), dim)
        return out.flip(dim), (x.shape[dim] - 1) - idx.flip(dim)
    return torch.cummax(x, dim)


def cummax_backward(grad: Tensor, idx: Tensor, direction: int) -> Tensor:
    """Sends grad (N, C, H, W) to the argmax positions idx of the forward."""
    return torch.zeros_like(grad).scatter_add_(_DIM[direction], idx, grad)


def _is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _as_nchw_lines(x: Tensor, direction: int, channels_last: bool) -> tuple[Tensor, int]:
    """(a contiguous (N', C', H', W') tensor, its direction) whose pooling is x's pooling in `direction`, without
    a copy where x is channels_last: its memory is a contiguous (N, H, W, C) tensor, in which a vertical scan runs
    along H of the contiguous (N, 1, H, W * C) view, and a horizontal one along the W of (N * H, 1, W, C) (left:
    from the far end, as top; right: as bottom). Any other layout is copied to NCHW."""
    if not channels_last:
        return x.contiguous(), direction
    n, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    if direction in (TOP, BOTTOM):
        return nhwc.view(n, 1, h, w * c), direction
    return nhwc.view(n * h, 1, w, c), TOP if direction == LEFT else BOTTOM


def _from_nchw_lines(t: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """The inverse of `_as_nchw_lines`: a result on its view back to (N, C, H, W), channels_last where x was."""
    if not channels_last:
        return t
    n, c, h, w = shape
    return t.view(n, h, w, c).permute(0, 3, 1, 2)


class _ExtensionPool(torch.autograd.Function):
    """torch.ops.cpool kernels. The backward finds the argmax positions from the saved input and output
    (x == out where the scan took a new maximum), so it needs no index tensor and no second scan. A channels_last
    input is pooled in its own layout, without a copy, and its output and input gradient are channels_last too."""

    @staticmethod
    def forward(ctx, x: Tensor, direction: int) -> Tensor:
        channels_last = _is_channels_last(x)
        lines, line_direction = _as_nchw_lines(x, direction, channels_last)
        out = torch.ops.cpool.pool_forward(lines, line_direction)
        ctx.direction, ctx.line_direction, ctx.channels_last = direction, line_direction, channels_last
        ctx.save_for_backward(lines, out)
        return _from_nchw_lines(out, x.shape, channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor):
        lines, out = ctx.saved_tensors
        if ctx.channels_last:
            grad = grad.contiguous(memory_format=torch.channels_last)
        grad_lines, _ = _as_nchw_lines(grad, ctx.direction, ctx.channels_last)
        if torch.is_grad_enabled():
            # create_graph (double backward): the kernel has no derivative, autograd would silently treat it as
            # a constant; the fallback's scatter, with the same tie rule, is differentiable in `grad`
            _, idx = cummax_forward(lines, ctx.line_direction)
            grad_in = cummax_backward(grad_lines, idx, ctx.line_direction)
        else:
            grad_in = torch.ops.cpool.pool_backward(lines, out, grad_lines, ctx.line_direction)
        return _from_nchw_lines(grad_in, grad.shape, ctx.channels_last), None


class _CummaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, direction: int) -> Tensor:
        out, idx = cummax_forward(x, direction)
        ctx.direction = direction
        ctx.save_for_backward(idx)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        return cummax_backward(grad, idx, ctx.direction), None


def extension_pool(x: Tensor, direction: int) -> Tensor:
    """Pooling in direction TOP, BOTTOM, LEFT or RIGHT with the compiled kernels (raises if not built)."""
    _check(x)
    if not _HAVE_EXT:
        raise RuntimeError("lib/cpool: extension lib.cpool._ext is not built (run `make setup`)")
    return _ExtensionPool.apply(x, direction)


def cummax_pool(x: Tensor, direction: int) -> Tensor:
    """Pooling in direction TOP, BOTTOM, LEFT or RIGHT with the pure-PyTorch fallback."""
    _check(x)
    return _CummaxPool.apply(x, direction)


@contextlib.contextmanager
def forced_fallback():
    """Within this context every pooling runs the torch.cummax fallback, without a warning: for benchmarks of the
    networks the old way (bench/bench_train.py)."""
    global _forced_fallback
    previous, _forced_fallback = _forced_fallback, True
    try:
        yield
    finally:
        _forced_fallback = previous


# A constant to torch.compile, which runs it once while tracing (its warning included) instead of tracing the
# dispatcher lookup and the warning, neither of which it can.
@torch.compiler.assume_constant_result
def _backend(device_type: str) -> str:
    backend, reason = choose_backend(device_type, _HAVE_EXT, kernel_registered(device_type))
    if reason is not None:
        _warn_fallback(reason)
    return backend


def _pool(x: Tensor, direction: int) -> Tensor:
    if _forced_fallback or _backend(x.device.type) != "extension":
        return cummax_pool(x, direction)
    return extension_pool(x, direction)


def top_pool(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W): out[y] = max over y' >= y."""
    return _pool(x, TOP)


def bottom_pool(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W): out[y] = max over y' <= y."""
    return _pool(x, BOTTOM)


def left_pool(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W): out[x] = max over x' >= x."""
    return _pool(x, LEFT)


def right_pool(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W): out[x] = max over x' <= x."""
    return _pool(x, RIGHT)


class TopPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return top_pool(x)


class BottomPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return bottom_pool(x)


class LeftPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return left_pool(x)


class RightPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return right_pool(x)
