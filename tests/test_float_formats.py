"""FP8 fake quant: the reference against torch's float8 casts and torchao's QAT fake quantizer,
the straight-through op, Float8FakeQuantize and the fp8 presets (eager path; the Triton
path: tests/test_float8_kernels.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import triton_qat as tq
from triton_qat.numerics.float_formats import (
    FLOAT8_EPS,
    FORMATS,
    choose_scale_float8_ref,
    fake_quantize_float8_dynamic_ref,
    fake_quantize_float8_ref,
    float8_format,
    round_to_float8_ref,
)
from triton_qat.ops import fake_quantize_float8, float8_scale
from triton_qat.quantizers import Float8FakeQuantize

FMTS = [FORMATS["float8_e4m3fn"], FORMATS["float8_e5m2"]]
IDS = ["e4m3fn", "e5m2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape, NaN positions, and the same bits everywhere else (sign of zero too)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    int_dtype = {4: torch.int32, 2: torch.int16}[a.element_size()]
    bad = (a.view(int_dtype) != b.view(int_dtype)) & ~nan
    assert not bad.any(), f"{int(bad.sum())} differ, first at {a[bad][:4]} vs {b[bad][:4]}"


def torch_cast_fq(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rules spelled with torch's own float8 cast."""
    fmax = torch.finfo(dtype).max
    q = (x.float() / scale).clamp(-fmax, fmax).to(dtype).float()
    return (q * scale).to(x.dtype)


def all_16bit(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def float8_grid(fmt) -> torch.Tensor:
    """Every finite float8 value (fp32), sorted, one zero."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.dtype).float()
    return torch.unique(codes[torch.isfinite(codes)])


def hard_fp32(fmt, n: int = 4096) -> torch.Tensor:
    """Ties between float8 values and their fp32 neighbours, subnormals, specials, huge, random."""
    grid = float8_grid(fmt)
    mid = (grid[1:] + grid[:-1]) / 2  # exact in fp32
    inf = torch.tensor(float("inf"))
    near = torch.cat([torch.nextafter(mid, inf), torch.nextafter(mid, -inf)])
    tiny = torch.tensor([1e-45, -1e-45, 1e-40, 1.1754942e-38, 2.0**-10, 2.0**-17, -(2.0**-17)])
    special = torch.tensor([0.0, -0.0, float("nan"), inf, -inf, 3e38, -3.4028235e38, 1e9])
    edge = torch.tensor([fmt.fmax, -fmt.fmax, fmt.fmax * 1.03, fmt.fmax * 1.07, -fmt.fmax * 1.1])
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 20, (n,), generator=gen))
    return torch.cat([grid, mid, near, tiny, special, edge, rand]).float()


# ---------------------------------------------------------------------------------------------
# The reference against torch's float8 casts


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_value_matches_torch_cast(fmt, dtype):
    x = all_16bit(dtype)
    for s in (1.0, 2.0**-7, 0.75, 1e-3, 37.0):
        scale = torch.tensor(s, dtype=torch.float32)
        assert_bits_equal(
            fake_quantize_float8_ref(x, scale, fmt), torch_cast_fq(x, scale, fmt.dtype)
        )
    v = x.float()
    assert_bits_equal(
        round_to_float8_ref(v, fmt), v.clamp(-fmt.fmax, fmt.fmax).to(fmt.dtype).float()
    )


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_fp32_ties_subnormals_specials_match_torch_cast(fmt):
    v = hard_fp32(fmt)
    expected = v.clamp(-fmt.fmax, fmt.fmax).to(fmt.dtype).float()
    assert_bits_equal(round_to_float8_ref(v, fmt), expected)
    for s in (1.0, 3.0517578e-05, 0.1, 7.0):
        scale = torch.tensor(s)
        assert_bits_equal(
            fake_quantize_float8_ref(v, scale, fmt), torch_cast_fq(v, scale, fmt.dtype)
        )


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_ties_round_to_even_and_saturation(fmt):
    grid = float8_grid(fmt)
    pos = grid[grid > 0]
    mid = (pos[1:] + pos[:-1]) / 2
    q = round_to_float8_ref(mid, fmt)
    # The even neighbour: its code's last mantissa bit is 0.
    codes = q.to(fmt.dtype).view(torch.uint8)
    assert torch.all(codes % 2 == 0)
    assert torch.all((q == pos[1:]) | (q == pos[:-1]))
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30])
    out = fake_quantize_float8_ref(specials, torch.tensor(2.0), fmt)
    assert out[0] == 2 * fmt.fmax and out[1] == -2 * fmt.fmax and out[2].isnan()
    assert out[3] == 2 * fmt.fmax


# ---------------------------------------------------------------------------------------------
# Dynamic scales; against torchao's QAT fake quantizer


def rows(dtype: torch.dtype, shape=(6, 40), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp2(
        torch.randint(-12, 12, (*shape[:-1], 1), generator=gen).float()
    )
    x[..., 1, :] = 0.0  # a zero row
    return x.to(dtype)


def torchao_fq(x, fmt, granularity, hp_value_lb=None):
    qat = pytest.importorskip("torchao.quantization.qat")
    from torchao.quantization.granularity import PerRow, PerTensor

    g = PerTensor() if granularity == "per_tensor" else PerRow()
    config = qat.Float8FakeQuantizeConfig(dtype=fmt.dtype, granularity=g, hp_value_lb=hp_value_lb)
    return qat.Float8FakeQuantizer(config)(x)


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
@pytest.mark.parametrize("shape", [(6, 40), (3, 4, 24)])
def test_fp32_matches_torchao_bit_for_bit(fmt, granularity, shape):
    x = rows(torch.float32, shape)
    ours = fake_quantize_float8(x, fmt.dtype, granularity)
    assert_bits_equal(ours, torchao_fq(x, fmt, granularity, hp_value_lb=FLOAT8_EPS))
    nonzero = x[..., 2:, :]  # no zero row: torchao without hp_value_lb agrees too
    assert_bits_equal(
        fake_quantize_float8(nonzero, fmt.dtype, granularity),
        torchao_fq(nonzero, fmt, granularity),
    )
    # torchao gives NaN for a zero row without hp_value_lb; here zeros (amax clamped to eps).
    if granularity == "per_row":
        assert torchao_fq(x, fmt, granularity)[..., 1, :].isnan().all()
        assert torch.all(ours[..., 1, :] == 0)


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_16bit_matches_torchao_given_its_scale(fmt, dtype, granularity):
    """torchao rounds its scale to the input dtype (here: fp32); the rest agrees exactly."""
    pytest.importorskip("torchao")
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import _choose_scale_float8
    from torchao.quantization.utils import get_block_size

    x = rows(torch.float32, (6, 40))[2:].to(dtype)  # no zero row (torchao: NaN)
    g = PerTensor() if granularity == "per_tensor" else PerRow()
    their_scale = _choose_scale_float8(x, get_block_size(x.shape, g), fmt.dtype)
    their_scale = their_scale.reshape(choose_scale_float8_ref(x, fmt, granularity).shape)
    assert_bits_equal(
        fake_quantize_float8_ref(x, their_scale, fmt), torchao_fq(x, fmt, granularity)
    )
    # Our scale is the fp32 quotient; torchao's is that quotient rounded to the input dtype.
    ours = choose_scale_float8_ref(x, fmt, granularity)
    assert_bits_equal(
        ours,
        x.float()
        .abs()
        .amax(-1 if granularity != "per_tensor" else None, keepdim=True)
        .reshape(ours.shape)
        / fmt.fmax,
    )
    assert_bits_equal(their_scale, ours.to(dtype).float())


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_nonfinite_groups_are_nan_like_torchao(fmt):
    x = torch.tensor([[1.0, float("inf"), 2.0], [1.0, float("nan"), -3.0], [0.0, -0.0, 0.0]])
    y = fake_quantize_float8(x, fmt.dtype, "per_row")
    assert y[:2].isnan().all()
    assert_bits_equal(y[2], x[2])  # zeros keep their sign
    assert_bits_equal(y[:2], torchao_fq(x, fmt, "per_row", FLOAT8_EPS)[:2])
    assert fake_quantize_float8(x, fmt.dtype, "per_tensor").isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_is_per_row_and_scale_shapes(dtype):
    x = rows(dtype, (2, 3, 16))
    assert_bits_equal(
        fake_quantize_float8(x, "e4m3fn", "per_token"), fake_quantize_float8(x, "e4m3fn", "per_row")
    )
    assert float8_scale(x, granularity="per_row").shape == (2, 3, 1)
    assert float8_scale(x).shape == (1, 1, 1)
    assert float8_scale(x).dtype == torch.float32
    fmt = FORMATS["float8_e4m3fn"]
    assert_bits_equal(
        fake_quantize_float8(x, torch.float8_e4m3fn, "per_tensor"),
        fake_quantize_float8_dynamic_ref(x, fmt, "per_tensor"),
    )
    assert fake_quantize_float8(x[:0], granularity="per_row").shape == (0, 3, 16)


# ---------------------------------------------------------------------------------------------
# The op: straight-through gradient, argument checks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_straight_through_gradient_is_dy(dtype, granularity):
    x = rows(dtype, (5, 24)).requires_grad_()
    dy = torch.randn(5, 24).to(dtype)
    fake_quantize_float8(x, "e5m2", granularity).backward(dy)
    assert_bits_equal(x.grad, dy)


def test_argument_errors_name_the_argument(monkeypatch):
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"^x must be float32"):
        fake_quantize_float8(x.double())
    with pytest.raises(TypeError, match=r"^x must be float32"):
        fake_quantize_float8(x.to(torch.int32))
    with pytest.raises(ValueError, match=r"^granularity must be one of"):
        fake_quantize_float8(x, granularity="per_group")
    with pytest.raises(ValueError, match=r"^dtype must be one of"):
        fake_quantize_float8(x, torch.float8_e4m3fnuz)
    with pytest.raises(ValueError, match=r"^dtype must be one of"):
        fake_quantize_float8(x, torch.int8)
    with pytest.raises(TypeError, match=r"^dtype must be a torch float8 dtype"):
        fake_quantize_float8(x, 8)
    with pytest.raises(ValueError, match=r"^eps must be positive"):
        fake_quantize_float8(x, eps=0.0)
    monkeypatch.delattr(torch, "float8_e5m2")
    with pytest.raises(
        ValueError, match=r"^dtype: the installed torch .* has no torch\.float8_e5m2"
    ):
        fake_quantize_float8(x, "e5m2")
    with pytest.raises(ValueError, match=r"^dtype: the installed torch"):
        Float8FakeQuantize(dtype="float8_e5m2")
    assert float8_format("e4m3fn") is FORMATS["float8_e4m3fn"]


# ---------------------------------------------------------------------------------------------
# Float8FakeQuantize and the presets


def test_module_state_dict_flags_and_scale():
    fq = Float8FakeQuantize(granularity="per_row")
    assert list(fq.state_dict()) == ["fake_quant_enabled", "observer_enabled"]
    w = rows(torch.float32)
    assert_bits_equal(fq(w), fake_quantize_float8(w, "e4m3fn", "per_row"))
    assert_bits_equal(fq.calculate_qparams(w), float8_scale(w, granularity="per_row"))
    fq.disable_fake_quant()
    assert fq(w) is w
    other = Float8FakeQuantize(granularity="per_row")
    other.load_state_dict(fq.state_dict())
    assert other(w) is w
    assert list(other.to(torch.bfloat16).state_dict()) == list(fq.state_dict())
    with pytest.raises(ValueError, match=r"^granularity must be one of"):
        Float8FakeQuantize(granularity="per_channel")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def test_fp8_dynamic_forward_and_gradients_are_fq8_then_linear():
    """On the eager backend the layer is the composition, bit for bit (the Triton path, whose
    GEMM sums in another order: tests/test_float8_kernels.py)."""
    tq.set_backend("eager")  # restored by conftest's fixture
    model = tq.prepare_qat(mlp(), "fp8_dynamic")
    layer = model[0]
    assert isinstance(layer.weight_fake_quant, Float8FakeQuantize)
    assert layer.input_fake_quant.granularity == "per_token"
    x = torch.randn(3, 5, 16).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised triton_qat module: no unfused warning
        y = layer(x)
    xq = fake_quantize_float8(x.detach(), "e4m3fn", "per_token").requires_grad_()
    wq = fake_quantize_float8(layer.weight.detach(), "e4m3fn", "per_row").requires_grad_()
    expected = F.linear(xq, wq, layer.bias)
    assert_bits_equal(y, expected)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    assert_bits_equal(x.grad, xq.grad)  # straight through: the gradients of the fq8 operands
    assert_bits_equal(layer.weight.grad, wq.grad)


def test_fp8_weight_only_preset():
    tq.set_backend("eager")  # the composition, bit for bit (restored by conftest's fixture)
    model = tq.prepare_qat(mlp(), "fp8_weight_only")
    layer = model[2]
    assert getattr(layer, "input_fake_quant", None) is None
    x = torch.randn(4, 32)
    expected = F.linear(x, fake_quantize_float8(layer.weight, "e4m3fn", "per_row"), layer.bias)
    assert_bits_equal(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_dynamic_trains(dtype):
    model = tq.prepare_qat(mlp(), "fp8_dynamic").to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen).to(dtype)
    target = (x.float() @ torch.randn(16, 8, generator=gen)).to(dtype)  # learnable
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(model(x).float(), target.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_convert_of_an_fp8_embedding_says_it_is_not_supported_yet():
    # FP8 Linears convert (tests/test_float8_convert.py); embedding tables do not yet.
    model = torch.nn.Sequential(tq.nn.Embedding(10, 32, qconfig="fp8_weight_only"))
    model(torch.arange(4))
    with pytest.raises(NotImplementedError, match="float-format embeddings are not converted"):
        tq.convert(model)
