"""Corner pooling (lib/cpool): compiled extension and torch.cummax fallback against a slow loop reference."""
import warnings
import zlib
from pathlib import Path

import pytest
import torch

import lib.cpool as cpool
from lib.cpool import pool
from lib.cpool.pool import BOTTOM, LEFT, RIGHT, TOP, cummax_pool, extension_pool

DIRECTIONS = {"top": TOP, "bottom": BOTTOM, "left": LEFT, "right": RIGHT}
IMPLS = {"extension": extension_pool, "cummax": cummax_pool}


def reference(x: torch.Tensor, grad: torch.Tensor, direction: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow definition: output = max over the far side of each position, gradient to the argmax nearest to the
    output position (a NaN counts as the maximum). Returns (output, grad_input) in float64."""
    x, grad = x.double(), grad.double()
    out, grad_in = torch.empty_like(x), torch.zeros_like(x)
    vertical = direction in (TOP, BOTTOM)
    length = x.shape[2] if vertical else x.shape[3]
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for line in range(x.shape[3] if vertical else x.shape[2]):
                def at(k):
                    return (n, c, k, line) if vertical else (n, c, line, k)

                for p in range(length):
                    # candidates from nearest to farthest
                    far = range(p, length) if direction in (TOP, LEFT) else range(p, -1, -1)
                    values = [x[at(k)].item() for k in far]
                    nans = [i for i, v in enumerate(values) if v != v]
                    best = nans[0] if nans else values.index(max(values))
                    argmax = list(far)[best]
                    out[at(p)] = x[at(argmax)]
                    grad_in[at(argmax)] += grad[at(p)]
    return out, grad_in


def run(fn, x: torch.Tensor, grad: torch.Tensor, direction: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    out = fn(x, direction)
    out.backward(grad)
    return out.detach(), x.grad


def assert_matches_reference(fn, x: torch.Tensor, grad: torch.Tensor, direction: int) -> None:
    """Forward exactly equal to the loop reference, gradients equal up to float64 summation order."""
    out, grad_in = run(fn, x, grad, direction)
    ref_out, ref_grad = reference(x, grad, direction)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(grad_in, ref_grad, rtol=0, atol=1e-12)


def tie_heavy(shape, generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randint(0, 3, shape, generator=generator).to(dtype)


def test_extension_is_built():
    # `make test` builds it; every "extension" case below would otherwise test nothing
    assert cpool.extension_available(), "lib/cpool/_ext not built: run `make setup`"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_matches_reference(impl, direction, kind):
    # crc32, not hash(): Python salts str hashes per process, so each run drew other data and a failure could not
    # be reproduced
    g = torch.Generator().manual_seed(zlib.crc32(f"{impl} {direction} {kind}".encode()))
    shape = (2, 3, 5, 7)
    x = torch.randn(shape, generator=g, dtype=torch.float64) if kind == "random" else tie_heavy(shape, g)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    assert_matches_reference(IMPLS[impl], x, grad, DIRECTIONS[direction])


@pytest.mark.parametrize("impl", IMPLS)
def test_tie_rule_nearest_maximum(impl):
    # One column, scanned by top pooling from the bottom: values 1 3 3 2 3 0 (top to bottom).
    col = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    grad = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0], dtype=torch.float64)
    # out[y] = max over y' >= y, taken at the 3 nearest to y: y=0,1 -> 1; y=2 -> 2; y=3,4 -> 4; y=5 -> 5
    expected_out = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 0.0], dtype=torch.float64)
    expected_grad = torch.tensor([0.0, 11.0, 100.0, 0.0, 11000.0, 100000.0], dtype=torch.float64)
    for name, direction in DIRECTIONS.items():
        # lay the column out so that this direction scans it exactly as top pooling does
        flip = name in ("bottom", "right")
        def shape(t):
            t = t.flip(0) if flip else t
            return t.view(1, 1, -1, 1) if name in ("top", "bottom") else t.view(1, 1, 1, -1)

        out, grad_in = run(IMPLS[impl], shape(col), shape(grad), direction)
        assert torch.equal(out, shape(expected_out)), name
        assert torch.equal(grad_in, shape(expected_grad)), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 6), (2, 3, 6, 1), (1, 2, 1, 9), (1, 1, 3, 300)])
def test_size_one_and_wide(impl, shape):
    g = torch.Generator().manual_seed(1)
    x, grad = tie_heavy(shape, g), torch.randn(shape, generator=g, dtype=torch.float64)
    for direction in DIRECTIONS.values():
        assert_matches_reference(IMPLS[impl], x, grad, direction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5)])
def test_empty(impl, shape):
    x = torch.zeros(shape)
    for direction in DIRECTIONS.values():
        out, grad_in = run(IMPLS[impl], x, torch.zeros(shape), direction)
        assert out.shape == shape and grad_in.shape == shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous(impl, layout):
    g = torch.Generator().manual_seed(2)
    base = tie_heavy((2, 4, 6, 8), g)
    x = {"transposed": base.transpose(2, 3), "sliced": base[:, ::2, 1:, ::3],
         "channels_last": base.contiguous(memory_format=torch.channels_last)}[layout]
    assert not x.is_contiguous()
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    for direction in DIRECTIONS.values():
        assert_matches_reference(IMPLS[impl], x, grad, direction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_channels_last_without_copy(dtype, direction):
    # C = 5, H = 7, W = 9: the (N, 1, H, W * C) and (N * H, 1, W, C) views the kernel sees are unlike any NCHW
    # shape, so a wrong view could not pass by symmetry; integer gradients sum exactly in every dtype
    g = torch.Generator().manual_seed(4)
    base = tie_heavy((2, 5, 7, 9), g, dtype)
    grad = torch.randint(-4, 5, base.shape, generator=g).to(dtype)
    ref_out, ref_grad = run(extension_pool, base, grad, DIRECTIONS[direction])
    x = base.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = extension_pool(x, DIRECTIONS[direction])
    assert out.grad_fn.saved_tensors[0].data_ptr() == x.data_ptr()  # the kernel read x itself, not a copy
    for layout in (grad, grad.contiguous(memory_format=torch.channels_last)):  # any layout of the gradient
        x.grad = None
        out.backward(layout, retain_graph=True)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out.detach(), ref_out) and torch.equal(x.grad, ref_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck(impl, direction):
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: IMPLS[impl](t, DIRECTIONS[direction]), (x,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_double_backward(impl, layout):
    # The input gradient is linear in the output gradient g: grad_in[i] = sum of g[p] over the p whose argmax is i,
    # so d(sum(v * grad_in)) / dg[p] = v[argmax(p)]. With create_graph both backends must give that (the
    # extension's kernel alone has no derivative: autograd would treat it as a constant, d/dg = None).
    g = torch.Generator().manual_seed(7)
    shape = (1, 2, 3, 4)
    x = tie_heavy(shape, g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    for direction in DIRECTIONS.values():
        grad = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        xr = x.detach().requires_grad_()
        (grad_in,) = torch.autograd.grad(IMPLS[impl](xr, direction), xr, grad, create_graph=True)
        (second,) = torch.autograd.grad((grad_in * v).sum(), grad)
        want = torch.empty(shape, dtype=torch.float64)
        for p in range(second.numel()):
            one_hot = torch.zeros(second.numel(), dtype=torch.float64)
            one_hot[p] = 1
            want.view(-1)[p] = (reference(x, one_hot.view(shape), direction)[1] * v).sum()
        assert torch.equal(second, want)
    xr = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: IMPLS[impl](t, TOP), (xr,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_extension_equals_fallback(dtype, direction):
    # 8+ rows per (n, c) so the row kernels run full groups and a remainder; integer gradients sum exactly in
    # every dtype, so both must agree bit for bit
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 9, 21)
    for x in (torch.randn(shape, generator=g).to(dtype), tie_heavy(shape, g, dtype)):
        grad = torch.randint(-4, 5, shape, generator=g).to(dtype)
        ext_out, ext_grad = run(extension_pool, x, grad, DIRECTIONS[direction])
        ref_out, ref_grad = run(cummax_pool, x, grad, DIRECTIONS[direction])
        assert ext_out.dtype == dtype and ext_grad.dtype == dtype
        assert torch.equal(ext_out, ref_out)
        assert torch.equal(ext_grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_reference(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 9, 10, generator=g).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    for direction in DIRECTIONS.values():
        out, grad_in = run(extension_pool, x, grad, direction)
        ref_out, ref_grad = reference(x, grad, direction)
        assert torch.equal(out.double(), ref_out)
        # sums in float32, rounded once to dtype: within torch's default tolerance for dtype
        torch.testing.assert_close(grad_in, ref_grad.to(dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_rule(impl, dtype):
    # NaN is the maximum; it stays the running maximum until the next NaN. 8 rows of 11 per (n, c): full row groups,
    # some with a NaN and some without, and in float32 the register-tile gradient path
    shape = (1, 2, 8, 11)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x[0, 0, 3, 4] = x[0, 0, 6, 4] = x[0, 1, 2, 7] = float("nan")
    grad = torch.randint(-4, 5, shape, generator=g).to(dtype)
    for direction in DIRECTIONS.values():
        out, grad_in = run(IMPLS[impl], x, grad, direction)
        ref_out, ref_grad = reference(x, grad, direction)
        torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(grad_in.double(), ref_grad)


def test_autocast_cpu_bfloat16():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 9, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        outs = [f(y) for f in (cpool.top_pool, cpool.bottom_pool, cpool.left_pool, cpool.right_pool)]
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    for o, direction in zip(outs, (TOP, BOTTOM, LEFT, RIGHT)):
        assert torch.equal(o, pool.cummax_forward(y.detach(), direction)[0])


def test_modules_and_functions():
    x = torch.randn(2, 3, 5, 6)
    pairs = [(cpool.TopPool, cpool.top_pool, TOP), (cpool.BottomPool, cpool.bottom_pool, BOTTOM),
             (cpool.LeftPool, cpool.left_pool, LEFT), (cpool.RightPool, cpool.right_pool, RIGHT)]
    for module, fn, direction in pairs:
        expected = reference(x, torch.zeros_like(x), direction)[0].float()
        assert torch.equal(module()(x), expected) and torch.equal(fn(x), expected)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(pool, "_HAVE_EXT", False)
    monkeypatch.setattr(pool, "_warned", set())
    x = torch.randn(1, 2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [cpool.top_pool(x), cpool.left_pool(x), cpool.bottom_pool(x)]
    assert len(caught) == 1 and "torch.cummax fallback" in str(caught[0].message)
    assert torch.equal(out[0], reference(x, torch.zeros_like(x), TOP)[0].float())


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs(impl):
    with pytest.raises(ValueError, match="lib/cpool: input must be \\(N, C, H, W\\)"):
        IMPLS[impl](torch.zeros(2, 3, 4), TOP)
    with pytest.raises(TypeError, match="floating-point"):
        IMPLS[impl](torch.zeros(1, 1, 2, 2, dtype=torch.int64), TOP)


def test_kernel_registration_check():
    # The dispatcher lookup tells registered device types from others, and its CUDA answer agrees with what the
    # built library holds (the CUDA kernel's dispatch name is compiled in only when cpool_cuda.cu is).
    from lib.cpool import _ext

    assert pool.kernel_registered("cpu")
    assert not pool.kernel_registered("xpu")
    built_with_cuda = b"cpool_forward_cuda" in Path(_ext.__file__).read_bytes()
    assert pool.kernel_registered("cuda") == built_with_cuda


@pytest.mark.parametrize("device_type, have_ext, registered, backend, reason", [
    ("cpu", True, True, "extension", None),
    ("cuda", True, True, "extension", None),
    ("cuda", True, False, "cummax", "FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda make setup"),  # CPU-only build, GPU
    ("cuda", False, False, "cummax", "not built"),
    ("cpu", False, False, "cummax", "not built"),
    ("mps", True, False, "cummax", "no kernel for device type 'mps'"),
])
def test_backend_choice(device_type, have_ext, registered, backend, reason):
    chosen, why = pool.choose_backend(device_type, have_ext, registered)
    assert chosen == backend
    assert why is None if reason is None else reason in why


def test_unregistered_device_falls_back_with_one_warning(monkeypatch):
    # The path of a CUDA tensor through a CPU-only build, run here on CPU tensors: the registration lookup
    # answers "no kernel", so the extension is not called and the fallback runs with one warning.
    monkeypatch.setattr(pool, "kernel_registered", lambda device_type: False)
    monkeypatch.setattr(pool, "_warned", set())
    monkeypatch.setattr(pool, "extension_pool", None)  # calling the extension would raise TypeError
    x = torch.randn(1, 2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [cpool.top_pool(x), cpool.left_pool(x)]
    assert len(caught) == 1 and "no kernel for device type 'cpu'" in str(caught[0].message)
    assert torch.equal(out[0], reference(x, torch.zeros_like(x), TOP)[0].float())


def test_forced_fallback(monkeypatch):
    monkeypatch.setattr(pool, "extension_pool", None)  # calling the extension would raise TypeError
    monkeypatch.setattr(pool, "_warned", set())
    x = torch.randn(1, 2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pool.forced_fallback():
            out = cpool.right_pool(x)
    assert torch.equal(out, reference(x, torch.zeros_like(x), RIGHT)[0].float())
    assert not pool._forced_fallback
