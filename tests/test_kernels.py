"""Every fake-quant kernel against the eager reference, bit for bit, forward and backward.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, see conftest);
with TRITON_QAT_TEST_DEVICE=cuda they are compiled.
"""

from __future__ import annotations

import pytest
import torch
from _compare import assert_bitwise_equal, fresh_view

import triton_qat as tq

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RANGES = [(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1), (0, 3), (-32768, 32767), (0, 65535)]
SHAPES = [(1,), (7,), (3, 5), (17, 33), (2, 3, 5, 7), (6, 42), (123, 70)]


def _make_x(shape, dtype, device, seed=0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * spread
    return x.to(dtype).to(device)


def _both(fn, x: torch.Tensor, grad: torch.Tensor | None = None):
    """fn(x) and d(fn)/dx under the triton and the eager backend: ((y_t, g_t), (y_e, g_e))."""
    out = []
    for backend in ("triton", "eager"):
        xi = fresh_view(x, grad is not None)
        with tq.use_backend(backend):
            y = fn(xi)
            if grad is not None:
                y.backward(grad)
        out.append((y.detach(), xi.grad))
    return out


def _check(fn, x, with_grad=True, what=""):
    grad = None
    if with_grad:
        g = torch.Generator().manual_seed(123)
        grad = torch.randn(x.shape, generator=g).to(x.dtype).to(x.device)
    (y_t, g_t), (y_e, g_e) = _both(fn, x, grad)
    assert_bitwise_equal(y_t, y_e, f"{what} forward")
    if with_grad:
        assert_bitwise_equal(g_t, g_e, f"{what} backward")


def _per_tensor(scale, zp, qmin, qmax):
    return lambda x: tq.fake_quantize_per_tensor(x, scale, zp, qmin, qmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qrange", RANGES)
def test_per_tensor(device, dtype, qrange):
    qmin, qmax = qrange
    x = _make_x((17, 33), dtype, device)
    for scale, zp in [(0.1, qmin), (0.037, (qmin + qmax) // 2), (0.01, qmax)]:
        _check(_per_tensor(scale, zp, qmin, qmax), x, what=f"scale={scale} zp={zp}")


@pytest.mark.parametrize("shape", SHAPES)
def test_per_tensor_shapes_and_tensor_qparams(device, shape):
    x = _make_x(shape, torch.float32, device)
    scale = torch.tensor([0.05], device=device)
    zp = torch.tensor([3], dtype=torch.int32, device=device)
    _check(_per_tensor(scale, zp, -128, 127), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,axis",
    [
        ((7,), 0),
        ((6, 42), 0),
        ((6, 42), 1),
        ((2, 3, 5, 7), 1),
        ((2, 3, 5, 7), -1),
        ((3, 1, 4), 1),
        ((5, 9, 1), 1),
        ((4, 6, 5), 2),
    ],
)
@pytest.mark.parametrize("float_zp", [False, True])
def test_per_channel(device, dtype, shape, axis, float_zp):
    x = _make_x(shape, dtype, device, seed=1)
    c = shape[axis]
    g = torch.Generator().manual_seed(2)
    scale = (torch.rand(c, generator=g) * 0.1 + 0.005).to(device)
    if float_zp:
        zp = (torch.rand(c, generator=g) * 20 - 10).to(device)
    else:
        zp = torch.randint(-10, 10, (c,), generator=g, dtype=torch.int32).to(device)
    _check(lambda t: tq.fake_quantize_per_channel(t, scale, zp, axis, -128, 127), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,group",
    [
        ((6, 64), 32),
        ((3, 96), 32),
        ((2, 3, 40), 8),
        ((5, 21), 7),
        ((4, 33), 1),
        ((4, 33), 33),
        ((3, 256), 128),
    ],
)
@pytest.mark.parametrize("qrange", [(0, 15), (-8, 7), (-128, 127)])
def test_per_group(device, dtype, shape, group, qrange):
    qmin, qmax = qrange
    x = _make_x(shape, dtype, device, seed=3)
    pshape = (*shape[:-1], shape[-1] // group)
    g = torch.Generator().manual_seed(4)
    scale = (torch.rand(pshape, generator=g) * 0.5 + 0.01).to(device)
    zp = torch.randint(qmin, qmax + 1, pshape, generator=g, dtype=torch.int32).to(device)
    _check(lambda t: tq.fake_quantize_per_group(t, scale, zp, group, qmin, qmax), x)
    zpf = (torch.rand(pshape, generator=g) * (qmax - qmin) + qmin).to(device)
    _check(
        lambda t: tq.fake_quantize_per_group(t, scale, zpf, group, qmin, qmax),
        x,
        what="float zero point",
    )


def _special_values(device, dtype):
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.5, -128.5, 126.5, 12.75, -12.85])
    inf = torch.full_like(ties, float("inf"))
    vals = torch.cat(
        [
            ties,
            torch.nextafter(ties, inf),
            torch.nextafter(ties, -inf),
            torch.tensor(
                [
                    0.0,
                    -0.0,
                    0.49999997,
                    -11.15,
                    1e-40,
                    1e30,
                    -1e30,
                    3e38,
                    -3e38,
                    float("inf"),
                    float("-inf"),
                    float("nan"),
                ]
            ),
        ]
    )
    return vals.to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.1, 0.01, 1.0, 0.0, 1e-30, 1e30])
def test_special_values_per_tensor(device, dtype, scale):
    x = _special_values(device, dtype)
    grad = torch.tensor([1.0, -2.0, float("nan"), float("inf")]).repeat(x.numel())[: x.numel()]
    (y_t, g_t), (y_e, g_e) = _both(_per_tensor(scale, 3, -128, 127), x, grad.to(dtype).to(device))
    assert_bitwise_equal(y_t, y_e, "forward")
    assert_bitwise_equal(g_t, g_e, "backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_per_channel_and_group(device, dtype):
    x = _special_values(device, dtype).repeat(4, 1)[:, :32]
    scale = torch.tensor([0.1, 0.0, 1e-30, 0.01], device=device)
    zp = torch.tensor([0, 5, -3, 127], dtype=torch.int32, device=device)
    _check(lambda t: tq.fake_quantize_per_channel(t, scale, zp, 0, -128, 127), x)
    _check(
        lambda t: tq.fake_quantize_per_group(
            t, scale.view(4, 1).repeat(1, 2), zp.view(4, 1).repeat(1, 2), 16, -128, 127
        ),
        x,
    )


@pytest.mark.parametrize("qrange", [(-(2**20), 2**20), (0, 2**20), (-(2**20), -(2**20) + 3)])
def test_widest_ranges_and_edges(device, qrange):
    """Ranges up to +-2**20 and values around their ends and far beyond (2**22, 2**24, 1e30)."""
    qmin, qmax = qrange
    edges = torch.tensor([qmin, qmax], dtype=torch.float64)
    offsets = torch.tensor([-1.5, -0.5, -0.25, 0.0, 0.25, 0.5, 1.5])
    vals = torch.cat(
        [
            (edges[:, None] + offsets[None, :]).flatten().float(),
            torch.tensor(
                [
                    2.0**22,
                    -(2.0**22),
                    2.0**24 + 2,
                    -(2.0**24) - 2,
                    1e30,
                    -1e30,
                    4194303.5,
                    -4194303.5,
                    0.3,
                    -0.3,
                ]
            ),
        ]
    )
    for dtype in DTYPES:
        x = vals.to(dtype).to(device)
        for zp in (qmin, qmax, (qmin + qmax) // 2):
            _check(_per_tensor(1.0, zp, qmin, qmax), x, what=f"{dtype} zp={zp}")


def test_strided_inputs(device):
    base = _make_x((24, 40), torch.float32, device, seed=5)
    scale = torch.rand(20, generator=torch.Generator().manual_seed(6)).to(device) * 0.1 + 0.01
    zp = torch.zeros(20, dtype=torch.int32, device=device)
    for x in (base.t(), base[::2, 1::2], base.t()[::2]):
        _check(_per_tensor(0.05, 1, -128, 127), x, what="per tensor strided")
    x = base[::2, ::2]  # (12, 20)
    _check(lambda t: tq.fake_quantize_per_channel(t, scale, zp, 1, -128, 127), x)
    xt = base.t()[:20]  # (20, 24), non-contiguous
    _check(lambda t: tq.fake_quantize_per_channel(t, scale, zp, 0, -128, 127), xt)


def test_expanded_overlapping_input(device):
    x = _make_x((5,), torch.float32, device).expand(4, 5)  # stride 0: overlapping
    _check(_per_tensor(0.05, 0, -128, 127), x, with_grad=False)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
def test_empty(device, shape):
    x = torch.empty(shape, device=device)
    for backend in ("triton", "eager"):
        with tq.use_backend(backend):
            y = tq.fake_quantize_per_tensor(x, 0.1, 0, -128, 127)
        assert y.shape == x.shape


def test_zero_dim(device):
    x = torch.tensor(1.37, device=device)
    _check(_per_tensor(0.1, 0, -128, 127), x)


def test_gradient_uses_forward_scale_after_in_place_update(device):
    """An observer may update the scale in place between forward and backward."""
    x = _make_x((8, 16), torch.float32, device).requires_grad_()
    scale = torch.full((8,), 0.5, device=device)
    zp = torch.zeros(8, dtype=torch.int32, device=device)
    for backend in ("triton", "eager"):
        x.grad = None
        with tq.use_backend(backend):
            y = tq.fake_quantize_per_channel(x, scale, zp, 0, -8, 7)
            q = (x.detach() * 2.0).round()
            expected_mask = (q >= -8) & (q <= 7)
            scale.fill_(0.001)
            y.sum().backward()
            scale.fill_(0.5)
        assert torch.equal(x.grad != 0, expected_mask.to(device)), backend


try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the GPU machine may lack hypothesis
    given = None


if given is not None:

    @st.composite
    def _cases(draw):
        bits = draw(st.integers(2, 16))
        signed = draw(st.booleans())
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        gran = draw(st.sampled_from(["tensor", "channel", "group"]))
        ndim = draw(st.integers(1, 3))
        shape = draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim))
        dtype = draw(st.sampled_from(DTYPES))
        float_zp = gran != "tensor" and draw(st.booleans())
        axis = draw(st.integers(-ndim, ndim - 1)) if gran == "channel" else None
        group = None
        if gran == "group":
            group = draw(st.integers(1, 6))
            shape[-1] = group * draw(st.integers(1, 5))
        seed = draw(st.integers(0, 2**31 - 1))
        log_scale = draw(st.floats(-4, 2))
        spread = draw(st.floats(0.1, 1000))
        layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
        specials = draw(st.booleans())  # NaN, +-inf, huge and tiny values in x
        return (
            qmin,
            qmax,
            gran,
            tuple(shape),
            dtype,
            float_zp,
            axis,
            group,
            seed,
            log_scale,
            spread,
            layout,
            specials,
        )

    def _layout(layout: str, shape: tuple) -> tuple[tuple, object]:
        """(base shape, view of a base) giving `shape` in `layout`: transposed (same shape,
        other strides), sliced (every other element of a longer last dim) or expanded (dim 0
        of stride 0: overlapping)."""
        if layout == "sliced":
            return (*shape[:-1], 2 * shape[-1]), lambda b: b[..., ::2]
        if layout == "expanded":
            return (1, *shape[1:]), lambda b: b.expand(shape)
        if layout == "transposed" and len(shape) >= 2:
            flipped = (shape[-1], *shape[1:-1], shape[0])
            return flipped, lambda b: b.transpose(0, -1)
        return tuple(shape), lambda b: b

    @given(_cases())
    def test_property_kernel_equals_reference(device, case):
        (
            qmin,
            qmax,
            gran,
            shape,
            dtype,
            float_zp,
            axis,
            group,
            seed,
            log_scale,
            spread,
            layout,
            specials,
        ) = case
        g = torch.Generator().manual_seed(seed)
        base_shape, view = _layout(layout, shape)
        base = torch.randn(base_shape, generator=g) * spread
        if specials:
            flat = base.view(-1)
            picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 8),), generator=g)
            values = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -1e-40, 0.0])
            flat[picks] = values[torch.arange(len(picks)) % len(values)]
        x = view(base.to(dtype).to(device))
        if gran == "tensor":
            pshape = (1,)
        elif gran == "channel":
            pshape = (shape[axis],)
        else:
            pshape = (*shape[:-1], shape[-1] // group)
        scale = (10**log_scale * (0.5 + torch.rand(pshape, generator=g))).to(device)
        if float_zp:
            zp = (torch.rand(pshape, generator=g) * (qmax - qmin) + qmin).to(device)
        else:
            zp = torch.randint(qmin, qmax + 1, pshape, generator=g, dtype=torch.int32).to(device)
        if gran == "tensor":
            fn = _per_tensor(scale, zp, qmin, qmax)
        elif gran == "channel":
            fn = lambda t: tq.fake_quantize_per_channel(t, scale, zp, axis, qmin, qmax)
        else:
            fn = lambda t: tq.fake_quantize_per_group(t, scale, zp, group, qmin, qmax)
        _check(fn, x)
