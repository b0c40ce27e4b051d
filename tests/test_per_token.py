"""Dynamic per-token input fake quant: the per-row qparams pass (kernels/per_token.py) against
the eager formula, bit for bit, and tq.nn.Linear with the w8a8_dynamic / w4a8_dynamic presets,
whose input fake quant is fused into the GEMM (the fused GEMMs themselves: test_fq_linear.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_bitwise_equal

import triton_qat as tq
from triton_qat.numerics import reference
from triton_qat.numerics.qparams import PerTokenQParams
from triton_qat.quantizers import DynamicPerTokenFakeQuantize, fake_quantize_per_token

INF, NAN = float("inf"), float("nan")

# (qscheme, dtype, quant range): symmetric int8 (w8a8), affine int8 (8da4w), and the two
# uint8 forms (symmetric zero point 128, affine).
SCHEMES = [
    (torch.per_tensor_symmetric, torch.qint8, (-128, 127)),
    (torch.per_tensor_affine, torch.qint8, (-128, 127)),
    (torch.per_tensor_symmetric, torch.quint8, (0, 255)),
    (torch.per_tensor_affine, torch.quint8, (0, 255)),
]
SCHEME_IDS = ["sym-int8", "affine-int8", "sym-uint8", "affine-uint8"]


def _special_rows(k: int) -> torch.Tensor:
    """Rows that exercise every branch of the formula, then random rows of mixed spread."""
    special = [
        [0.0] * k,  # zero row: scale eps
        [-0.0] * k,
        [2.5] * k,  # constant positive row: min_neg 0
        [-3.0] * k,  # constant negative row: max_pos 0
        [1e-30] * k,  # tiny: scale eps
        [NAN] + [1.0] * (k - 1),
        [1.0] * (k - 1) + [NAN],
        [INF] + [1.0] * (k - 1),
        [-INF] + [1.0] * (k - 1),
        [-INF, INF] + [0.0] * (k - 2),
        [-3e38, 3e38] + [0.0] * (k - 2),  # max - min overflows to inf: scale inf, finite row
        [6e4, -6e4] + [0.5] * (k - 2),  # near fp16's limit
    ]
    g = torch.Generator().manual_seed(3)
    spread = torch.logspace(-3, 2, 21).unsqueeze(1)
    shift = torch.randn(21, 1, generator=g)
    rand = torch.randn(21, k, generator=g) * spread + shift
    return torch.cat([torch.tensor(special), rand])


def _row_qparams(x: torch.Tensor, spec: PerTokenQParams, backend: str):
    args = (spec.quant_min, spec.quant_max, spec.symmetric, spec.symmetric_zero_point, spec.eps)
    with tq.use_backend(backend):
        return torch.ops.triton_qat.per_token_qparams(x, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_row_qparams_kernel_is_bit_exact(device, scheme, dtype):
    """Scale, 1 / scale and zero point of every row, bit for bit against the eager formula
    (the eager module's own per_token_qparams), NaN / inf / constant / zero rows included."""
    qscheme, qdtype, (qmin, qmax) = scheme
    x = _special_rows(70).to(dtype).to(device)
    module = DynamicPerTokenFakeQuantize(qdtype, qscheme, qmin, qmax)
    spec = module.per_token_spec()
    scale, inv, zp = _row_qparams(x, spec, "triton")
    want_scale, want_zp = module.calculate_qparams(x)
    assert_bitwise_equal(scale, want_scale, "scale")
    assert_bitwise_equal(inv, reference.reciprocal(want_scale), "inv")
    assert_bitwise_equal(zp, want_zp, "zero point")
    # The op's eager path is the same function.
    for got, want in zip(_row_qparams(x, spec, "eager"), (scale, inv, zp), strict=True):
        assert_bitwise_equal(got, want, "eager op")


@pytest.mark.parametrize("shape", [(5, 1), (3, 0), (0, 7), (9, 300)], ids=str)
def test_row_qparams_kernel_edge_shapes_and_strides(device, shape):
    """One-column and empty rows, no rows, rows longer than one K step, and a transposed
    (non-contiguous) input."""
    spec = PerTokenQParams(-128, 127, symmetric=False)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape[::-1], generator=g) * 4).to(device).t()
    assert shape[0] < 2 or shape[1] < 2 or not x.is_contiguous()
    got, want = _row_qparams(x, spec, "triton"), _row_qparams(x, spec, "eager")
    for name, a, e in zip(("scale", "inv", "zero point"), got, want, strict=True):
        assert_bitwise_equal(a, e, f"{shape} {name}")


try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the GPU machine may lack hypothesis
    given = None


if given is not None:
    # Any fp32 value (NaN, +-inf, subnormals, +-0 included), rows of 1..40 values.
    _rows = st.integers(1, 40).flatmap(
        lambda k: st.lists(
            st.lists(st.floats(width=32), min_size=k, max_size=k), min_size=1, max_size=6
        )
    )

    @given(
        rows=_rows,
        scheme=st.sampled_from(SCHEMES),
        dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    )
    def test_property_row_qparams_kernel_equals_eager(device, rows, scheme, dtype):
        qscheme, qdtype, (qmin, qmax) = scheme
        x = torch.tensor(rows, dtype=torch.float32).to(dtype).to(device)
        spec = DynamicPerTokenFakeQuantize(qdtype, qscheme, qmin, qmax).per_token_spec()
        got = _row_qparams(x, spec, "triton")
        want = _row_qparams(x, spec, "eager")
        for name, a, e in zip(("scale", "inv", "zero point"), got, want, strict=True):
            assert_bitwise_equal(a, e, name)


def test_non_finite_rows_get_quant_min_and_fake_quantize_to_nan():
    """The zero point of an affine row with NaN or +-inf is defined (quant_min on every
    platform, not torch's platform-defined int of NaN), and the whole row fake-quantizes to
    NaN; finite rows are untouched by that rule."""
    x = torch.tensor(
        [[NAN, 1.0, 2.0], [-INF, 1.0, 2.0], [INF, -1.0, 2.0], [-1.0, 0.5, 2.0]],
    )
    scale, zp = reference.per_token_qparams_ref(x, -128, 127, False, 0, 1e-7)
    assert zp[:3].tolist() == [-128, -128, -128]
    assert zp[3].item() == round(-128 + 1.0 / scale[3].item())
    with tq.use_backend("eager"):
        y = fake_quantize_per_token(x, -128, 127, torch.per_tensor_affine)
    assert torch.isnan(y[:3]).all() and torch.isfinite(y[3]).all()


def test_per_token_spec_arguments_are_checked():
    with pytest.raises(ValueError, match="symmetric_zero_point"):
        PerTokenQParams(-128, 127, symmetric=True, symmetric_zero_point=200)
    with pytest.raises(TypeError, match="symmetric"):
        PerTokenQParams(-128, 127, symmetric=1)
    with pytest.raises(ValueError, match="eps"):
        PerTokenQParams(-128, 127, eps=-1.0)
    with pytest.raises(ValueError, match="quant_min"):
        PerTokenQParams(5, 1)


def test_opcheck_per_token_qparams(device):
    x = torch.randn(7, 33, generator=torch.Generator().manual_seed(6)).to(device)
    for backend in ("triton", "eager"):
        with tq.use_backend(backend):
            torch.library.opcheck(
                torch.ops.triton_qat.per_token_qparams.default, (x, -128, 127, False, 0, 1e-7)
            )


# --- tq.nn.Linear with the dynamic presets ----------------------------------------------------


def _run_layer(layer, x, dy, backend):
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    with tq.use_backend(backend):
        y = layer(xi)
        y.backward(dy)
    return y.detach(), xi.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("name", ["w8a8_dynamic", "w4a8_dynamic"])
def test_linear_with_dynamic_preset_is_fused_and_matches_the_eager_module(
    device, name, monkeypatch
):
    """The fused path (no separate input fake-quant pass) against the eager backend and the
    unfused module composition: input_fake_quant(x), then F.linear with the fake-quantized
    weight. fp32: rtol = atol = 1e-5, the fused-linear tolerance (test_fq_linear.py)."""
    torch.manual_seed(0)
    layer = tq.nn.Linear(64, 17, qconfig=name).to(device)
    assert isinstance(layer.input_fake_quant, DynamicPerTokenFakeQuantize)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, 64, generator=g) * 2).to(device)
    dy = torch.randn(2, 5, 17, generator=g).to(device)
    y_e, *grads_e = _run_layer(layer, x, dy, "eager")

    def unfused(*args):
        raise AssertionError("the dynamic input fake quant ran as a module")

    with monkeypatch.context() as m:
        m.setattr(DynamicPerTokenFakeQuantize, "forward", unfused)
        y_t, *grads_t = _run_layer(layer, x, dy, "triton")

    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    with tq.use_backend("eager"):
        wq = layer.weight_fake_quant(layer.weight)
        y_c = F.linear(layer.input_fake_quant(xi), wq, layer.bias)
        y_c.backward(dy)
    grads_c = (xi.grad, layer.weight.grad, layer.bias.grad)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for what, y, grads in (("triton", y_t, grads_t), ("eager", y_e, grads_e)):
        torch.testing.assert_close(y, y_c, **tol, msg=lambda s, w=what: f"{w} y: {s}")
        for gname, got, want in zip(("dx", "dw", "db"), grads, grads_c, strict=True):
            msg = lambda s, w=what, n=gname: f"{w} {n}: {s}"
            torch.testing.assert_close(got, want, **tol, msg=msg)
    if name == "w8a8_dynamic":
        # A symmetric row's largest positive element maps to 127.5 -> 128: clamped, dx = 0.
        assert (grads_c[0] == 0).any()


def test_linear_with_dynamic_input_fake_quant_disabled(device):
    torch.manual_seed(0)
    layer = tq.nn.Linear(32, 9, qconfig="w8a8_dynamic").to(device)
    layer.input_fake_quant.disable_fake_quant()
    x = torch.randn(4, 32).to(device)
    with tq.use_backend("triton"), torch.no_grad():
        y = layer(x)
    with tq.use_backend("eager"), torch.no_grad():
        want = F.linear(x, layer.weight_fake_quant(layer.weight), layer.bias)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
