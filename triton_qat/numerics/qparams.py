"""Quantization parameters and every argument check, in one place.

`QParams` is the public description of a quantizer (per tensor, per channel or per group).
`normalize` checks it against the tensor it will be applied to and returns `NormQParams`:
fp32 scale, int32 (or fp32) zero point, both contiguous on the tensor's device, plus the
2-D view the kernels and the reference both use.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Quantized values and zero points are carried in fp32 inside the kernels. Keeping them within
# +-2**20 keeps every integer exact and lets the kernels round with one add and one subtract
# (exact below 2**22, saturating correctly beyond: see kernels/rounding.py).
QUANT_LIMIT = 2**20


@dataclass(frozen=True)
class QParams:
    """Parameters of an affine fake quantizer.

    axis None and group_size None: per tensor; axis=a: per channel along dim a;
    group_size=g: per group of g consecutive elements along the last dim.
    scale: a Python float or a float32 tensor; zero_point: an int or an int32 tensor
    (a float tensor is allowed per channel and per group, added before rounding as in torch).
    """

    scale: float | Tensor
    zero_point: int | float | Tensor
    quant_min: int
    quant_max: int
    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_quant_range(self.quant_min, self.quant_max)
        if self.axis is not None and self.group_size is not None:
            raise ValueError("QParams: give axis (per channel) or group_size (per group), not both")
        if self.axis is not None and (
            isinstance(self.axis, bool) or not isinstance(self.axis, int)
        ):
            raise TypeError(f"axis must be an int, got {type(self.axis).__name__}")
        if self.group_size is not None:
            g = self.group_size
            if isinstance(g, bool) or not isinstance(g, int):
                raise TypeError(f"group_size must be an int, got {type(g).__name__}")
            if g <= 0:
                raise ValueError(f"group_size must be positive, got {g}")

    @property
    def granularity(self) -> str:
        """ "per_tensor", "per_channel" or "per_group"."""
        if self.axis is not None:
            return "per_channel"
        if self.group_size is not None:
            return "per_group"
        return "per_tensor"


@dataclass(frozen=True)
class PerTokenQParams:
    """A dynamic per-token input quantizer of the fused linear (tq.nn.Linear's w8a8_dynamic
    and w4a8_dynamic): each row of the input (a token) gets its own scale and zero point from
    its current min / max, per call, with torch.ao's Python observer formulas
    (reference.per_token_qparams_ref). Built by DynamicPerTokenFakeQuantize.per_token_spec.

    symmetric: max(-min, max) / ((quant_max - quant_min) / 2) with the fixed
    `symmetric_zero_point`; else affine. Scales are at least `eps`.
    """

    quant_min: int
    quant_max: int
    symmetric: bool = False
    symmetric_zero_point: int = 0
    eps: float = float(torch.finfo(torch.float32).eps)

    def __post_init__(self) -> None:
        check_quant_range(self.quant_min, self.quant_max)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(self.symmetric).__name__}")
        zp = self.symmetric_zero_point
        if isinstance(zp, bool) or not isinstance(zp, int):
            raise TypeError(f"symmetric_zero_point must be an int, got {type(zp).__name__}")
        if not self.quant_min <= zp <= self.quant_max:
            raise ValueError(
                f"symmetric_zero_point must be between quant_min and quant_max "
                f"({self.quant_min}, {self.quant_max}), got {zp}"
            )
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real):
            raise TypeError(f"eps must be a float, got {type(self.eps).__name__}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be finite and non-negative, got {self.eps}")


class NormQParams(NamedTuple):
    """Checked qparams in the layout shared by the kernels and the reference.

    The tensor, made contiguous, is viewed as (rows, cols). Parameter index of an element:
    `row % channels` when `params_on_cols` is False, else `col`.
    """

    scale: Tensor  # fp32, shape (channels,), on the tensor's device
    zero_point: Tensor  # int32 (or fp32 when float_zero_point), shape (channels,)
    quant_min: int
    quant_max: int
    float_zero_point: bool
    granularity: str
    rows: int
    cols: int
    channels: int
    params_on_cols: bool


def check_quant_range(quant_min: object, quant_max: object) -> None:
    """quant_min and quant_max: ints, quant_min <= quant_max, within +-2**20."""
    for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if abs(v) > QUANT_LIMIT:
            raise ValueError(
                f"{name}={v} is outside +-2**20, the widest quantization range supported "
                "(21-bit signed); quantized values are computed in float32"
            )
    if quant_min > quant_max:  # type: ignore[operator]
        raise ValueError(
            f"quant_min must be less than or equal to quant_max, got {quant_min} > {quant_max}"
        )


def check_float_tensor(x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    return x


def _as_scale(scale: object, device: torch.device, numel: int | None, shape_msg: str) -> Tensor:
    if isinstance(scale, Tensor):
        if scale.dtype != torch.float32:
            raise TypeError(f"scale must be a float32 tensor, got {scale.dtype}")
        if scale.device != device:
            raise ValueError(f"scale is on {scale.device} but the input is on {device}")
        if numel is not None and scale.numel() != numel:
            raise ValueError(f"scale must have {shape_msg}, got shape {tuple(scale.shape)}")
        # qparams are constants here (learnable ones have their own op): no gradient flows.
        return scale.detach().reshape(-1).contiguous()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"scale must be a Python float or a float32 tensor, got {type(scale).__name__}"
        )
    if numel not in (None, 1):
        raise ValueError(f"scale must be a tensor with {shape_msg}, got a Python number")
    try:
        value = float(scale)
    except OverflowError:
        raise ValueError(f"scale {scale} does not fit a float") from None
    return torch.tensor([value], dtype=torch.float32, device=device)


def _as_zero_point(
    zp: object,
    device: torch.device,
    numel: int,
    shape_msg: str,
    allow_float: bool,
    quant_range: tuple[int, int],
    check_tensor: bool,
) -> tuple[Tensor, bool]:
    """zero_point as a contiguous int32 (or fp32) tensor; the range is checked on the value
    given, before any narrowing. check_tensor False skips the check of a tensor's values
    (a host sync); a Python int is always checked."""
    if isinstance(zp, Tensor):
        if zp.device != device:
            raise ValueError(f"zero_point is on {zp.device} but the input is on {device}")
        if zp.numel() != numel:
            raise ValueError(f"zero_point must have {shape_msg}, got shape {tuple(zp.shape)}")
        if zp.dtype in (torch.int32, torch.int64):
            is_float = False
        elif zp.dtype == torch.float32:
            if not allow_float:
                raise TypeError("a float zero_point is supported per channel and per group only")
            is_float = True
        else:
            # torch itself rounds twice with a float16 zero point; float32 is the one float form.
            raise TypeError(f"zero_point must be an int32, int64 or float32 tensor, got {zp.dtype}")
        zp = zp.detach().reshape(-1)
        # torch checks integer zero points only: a float one (-min / scale) may lie outside.
        if check_tensor and not is_float:
            _check_zero_point_range(zp, *quant_range)
        return zp.to(torch.float32 if is_float else torch.int32).contiguous(), is_float
    if isinstance(zp, bool) or not isinstance(zp, numbers.Integral):
        raise TypeError(f"zero_point must be an int or an int32 tensor, got {type(zp).__name__}")
    if numel != 1:
        raise ValueError(f"zero_point must be a tensor with {shape_msg}, got a Python int")
    if not quant_range[0] <= zp <= quant_range[1]:
        raise ValueError(
            f"zero_point must be between quant_min and quant_max {quant_range}, got {zp}"
        )
    return torch.tensor([int(zp)], dtype=torch.int32, device=device), False


def _check_zero_point_range(zp: Tensor, quant_min: int, quant_max: int) -> None:
    if zp.numel() == 0:
        return
    lo, hi = torch.aminmax(zp)
    # One small host sync; torch's own per-channel op does the same check. NaN fails it.
    if not bool(((lo >= quant_min) & (hi <= quant_max)).item()):
        raise ValueError(
            f"zero_point must be between quant_min and quant_max ({quant_min}, {quant_max}), "
            f"got values in [{lo.item()}, {hi.item()}]"
        )


def normalize(x: Tensor, qp: QParams, *, check_zero_point: bool = True) -> NormQParams:
    """Check `qp` against `x` and return the kernels' normalized form."""
    check_float_tensor(x, "x")
    device = x.device
    shape = tuple(x.shape)
    numel = x.numel()
    gran = qp.granularity
    quant_range = (qp.quant_min, qp.quant_max)
    if gran == "per_tensor":
        scale = _as_scale(qp.scale, device, 1, "one element")
        zp, float_zp = _as_zero_point(
            qp.zero_point, device, 1, "one element", False, quant_range, check_zero_point
        )
        rows, cols, channels, on_cols = 1, numel, 1, False
    elif gran == "per_channel":
        if x.dim() == 0:
            raise ValueError("per-channel fake quant needs an input with at least one dim")
        axis = qp.axis
        assert axis is not None
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} is out of range for an input with {x.dim()} dims")
        axis %= x.dim()
        channels = shape[axis]
        msg = f"shape ({channels},) (x.shape[{axis}])"
        for name, t in (("scale", qp.scale), ("zero_point", qp.zero_point)):
            if isinstance(t, Tensor) and t.dim() != 1:
                raise ValueError(f"{name} must have {msg}, got shape {tuple(t.shape)}")
        scale = _as_scale(qp.scale, device, channels, msg)
        zp, float_zp = _as_zero_point(
            qp.zero_point, device, channels, msg, True, quant_range, check_zero_point
        )
        inner = math.prod(shape[axis + 1 :])
        if inner == 1:
            # Channels along the last dim: parameters indexed by column.
            rows, cols, on_cols = math.prod(shape[:axis]), channels, True
        else:
            rows, cols, on_cols = math.prod(shape[: axis + 1]), inner, False
    else:
        g = qp.group_size
        assert g is not None
        if x.dim() == 0:
            raise ValueError("per-group fake quant needs an input with at least one dim")
        k = shape[-1]
        if k % g != 0:
            raise ValueError(f"group_size {g} does not divide the last dim of the input ({k})")
        expected = (*shape[:-1], k // g)
        msg = f"shape {expected} (x.shape[:-1] + (x.shape[-1] // group_size,))"
        for name, t in (("scale", qp.scale), ("zero_point", qp.zero_point)):
            if not isinstance(t, Tensor):
                raise TypeError(f"per-group {name} must be a tensor of {msg}")
            if tuple(t.shape) != expected:
                raise ValueError(f"{name} must have {msg}, got shape {tuple(t.shape)}")
        channels = numel // g if g else 0
        scale = _as_scale(qp.scale, device, channels, msg)
        zp, float_zp = _as_zero_point(
            qp.zero_point, device, channels, msg, True, quant_range, check_zero_point
        )
        rows, cols, on_cols = channels, g, False
    return NormQParams(
        scale=scale,
        zero_point=zp,
        quant_min=qp.quant_min,
        quant_max=qp.quant_max,
        float_zero_point=float_zp,
        granularity=gran,
        rows=rows,
        cols=cols,
        channels=channels,
        params_on_cols=on_cols,
    )


PER_TENSOR, PER_CHANNEL, PER_GROUP = 0, 1, 2


class LinearQuant(NamedTuple):
    """Checked qparams of one fused linear call, as the kernels and the reference take them.

    Weight (N, K): w_scale / w_inv / w_zp of shape (1,), (N,) or (N * K // group_size,),
    contiguous fp32 (zp int32, or fp32 for a float zero point). Input: per tensor, x_* of
    shape (1,); per row of the (M, K) input (x_per_row, dynamic per token), x_* of shape (M,);
    or None when the input is not fake-quantized.
    """

    w_scale: Tensor
    w_inv: Tensor
    w_zp: Tensor
    w_qmin: int
    w_qmax: int
    group_size: int  # 0 unless per group
    x_scale: Tensor | None = None
    x_inv: Tensor | None = None
    x_zp: Tensor | None = None
    x_qmin: int = 0
    x_qmax: int = 0
    x_per_row: bool = False

    @property
    def w_gran(self) -> int:
        if self.group_size > 0:
            return PER_GROUP
        return PER_TENSOR if self.w_scale.numel() == 1 else PER_CHANNEL

    @property
    def w_float_zp(self) -> bool:
        return self.w_zp.is_floating_point()

    @property
    def x_fq(self) -> bool:
        return self.x_scale is not None

    def x_tensors(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(inv, scale, zp) of the input, or placeholders the kernels never read."""
        if self.x_scale is not None:
            return self.x_inv, self.x_scale, self.x_zp  # type: ignore[return-value]
        dummy = like.new_empty(1, dtype=torch.float32)
        return dummy, dummy, dummy

    def weight_norm(self, weight: Tensor) -> NormQParams:
        """The weight's NormQParams (for the reference path)."""
        n, k = weight.shape
        gran = self.w_gran
        if gran == PER_TENSOR:
            rows, cols, channels, name = 1, n * k, 1, "per_tensor"
        elif gran == PER_CHANNEL:
            rows, cols, channels, name = n, k, n, "per_channel"
        else:
            g = self.group_size
            rows, cols, channels, name = n * k // g, g, n * k // g, "per_group"
        return NormQParams(
            self.w_scale,
            self.w_zp,
            self.w_qmin,
            self.w_qmax,
            self.w_float_zp,
            name,
            rows,
            cols,
            channels,
            False,
        )

    def input_norm(self, x: Tensor) -> NormQParams:
        """The input's NormQParams (for the reference path): per tensor, or per row of the
        (M, K) input as M channels."""
        assert self.x_scale is not None and self.x_zp is not None
        if self.x_per_row:
            m, k = x.shape
            gran, rows, cols, channels = "per_channel", m, k, m
        else:
            gran, rows, cols, channels = "per_tensor", 1, x.numel(), 1
        return NormQParams(
            self.x_scale,
            self.x_zp,
            self.x_qmin,
            self.x_qmax,
            False,
            gran,
            rows,
            cols,
            channels,
            False,
        )


def check_learnable_qparams(x: Tensor, scale: object, zero_point: object) -> None:
    """Learnable qparams: float32 tensors (nn.Parameters, usually) of one shape, on x's
    device. Their shape against x is checked by `normalize`."""
    check_float_tensor(x, "x")
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, Tensor):
            raise TypeError(f"learnable {name} must be a float32 tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"learnable {name} must be a float32 tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if scale.shape != zero_point.shape:  # type: ignore[union-attr]
        raise ValueError(
            f"zero_point must have scale's shape {tuple(scale.shape)}, "  # type: ignore[union-attr]
            f"got {tuple(zero_point.shape)}"  # type: ignore[union-attr]
        )


# --- integer GEMM operands --------------------------------------------------------------------

INT8_RANGE = (-128, 127)


class IntWeight(NamedTuple):
    """Checked integer weight codes of a linear, as the integer GEMM kernels take them.

    codes: (N, K) int8, or (N, ceil(K / 2)) uint8 when `packed` (two 4-bit codes q - quant_min
    per byte, low nibble first). scale: fp32, zero_point: int32, both contiguous with 1
    (per tensor), N (per output channel) or N * K // group_size (per group) elements.
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    quant_min: int
    quant_max: int
    in_features: int
    group_size: int  # 0 unless per group
    packed: bool

    @property
    def gran(self) -> int:
        if self.group_size > 0:
            return PER_GROUP
        return PER_TENSOR if self.scale.numel() == 1 else PER_CHANNEL

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def int_weight(
    codes: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    in_features: int,
    group_size: int | None = None,
) -> IntWeight:
    """Check integer weight codes and their qparams; uint8 codes are read as packed 4-bit."""
    check_quant_range(quant_min, quant_max)
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    packed = codes.dtype == torch.uint8
    if codes.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"codes must be int8 (or uint8, 4-bit packed), got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (out_features, ...), got shape {tuple(codes.shape)}")
    k = in_features
    expected_cols = (k + 1) // 2 if packed else k
    if codes.shape[1] != expected_cols:
        raise ValueError(
            f"codes must have {expected_cols} columns for in_features={k}"
            f"{' (two 4-bit codes per byte)' if packed else ''}, got shape {tuple(codes.shape)}"
        )
    if packed and quant_max - quant_min > 15:
        raise ValueError(
            f"packed 4-bit codes need quant_max - quant_min <= 15, got [{quant_min}, {quant_max}]"
        )
    if not packed and (quant_min < INT8_RANGE[0] or quant_max > INT8_RANGE[1]):
        raise ValueError(
            f"int8 codes need a range within {INT8_RANGE}, got [{quant_min}, {quant_max}]"
        )
    n = codes.shape[0]
    g = group_size or 0
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if k % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features ({k})")
    count = n * k // g if g else None
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != codes.device:
            raise ValueError(f"{name} is on {t.device} but codes are on {codes.device}")
        allowed = (count,) if g else (1, n)
        if t.numel() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} elements, got {t.numel()}"
            )
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    if zero_point.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"zero_point must be an integer tensor for integer GEMMs, got {zero_point.dtype}"
        )
    if scale.numel() != zero_point.numel():
        raise ValueError(
            f"scale and zero_point must have as many elements, got {scale.numel()} and "
            f"{zero_point.numel()}"
        )
    return IntWeight(
        codes.contiguous(),
        scale.detach().reshape(-1).contiguous(),
        zero_point.detach().reshape(-1).to(torch.int32).contiguous(),
        quant_min,
        quant_max,
        k,
        g,
        packed,
    )


class RowQuant(NamedTuple):
    """How a GEMM's input rows become int8 codes: dynamically per row (token) from its min /
    max with torch.ao's observer formulas, or with one static per-tensor (scale, zero_point)."""

    quant_min: int
    quant_max: int
    symmetric: bool = True
    symmetric_zero_point: int = 0  # the zero point of a symmetric scheme
    eps: float = float(torch.finfo(torch.float32).eps)
    scale: Tensor | None = None  # static per-tensor qparams (shape (1,)) instead of dynamic
    zero_point: Tensor | None = None

    @property
    def dynamic(self) -> bool:
        return self.scale is None
