"""The eager forward of a converted linear (flow/convert.py's QuantizedLinear) in few passes:
its weight dequantized from the stored codes per call (no float copy is kept), and a dynamic
per-token input fake-quantized in place. Both equal the reference formulas bit for bit
(numerics/reference.py); the tests compare them on adversarial inputs.

On this path every elementwise op is a pass over memory, and on a small layer each costs
about as much in dispatch as in arithmetic, so the count of ops is what is optimized; the
one input-sized result is written into a reused per-thread buffer where nothing can keep it
(a fresh multi-MiB CPU tensor costs its page faults on every call).
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor

from triton_qat.numerics.qparams import PerTokenQParams
from triton_qat.numerics.reference import (
    divide_fp32,
    fake_quantize_rows_fp32,
    per_token_qparams_from_minmax,
    reciprocal,
)

_FP32_TINY = float(torch.finfo(torch.float32).tiny)  # 1 / tiny is finite in fp32
_PROMOTED = (torch.float32, torch.bfloat16, torch.float16)


def dequantize_int_weight(
    qweight: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    packed_int4: bool,
    shape: tuple[int, int],
    axis: int | None,
    group_size: int | None,
) -> Tensor:
    """(q - zero_point) * scale in fp32, shape (N, K), from codes as QuantizedLinear stores
    them (int8 / int16 codes, or two 4-bit codes q - quant_min per byte, low nibble first)
    with an integer zero point per tensor, per channel (axis 0 or 1) or per group along K.

    q - zero_point is an exact small integer in fp32 however it is formed, so the product
    (one rounding) is the reference's: the packed codes are read as u = q - quant_min and
    offset by zero_point - quant_min."""
    n, k = shape
    if packed_int4:
        # Both nibbles converted straight into one fp32 buffer (no stacked uint8 copy).
        u = torch.empty(*qweight.shape, 2, dtype=torch.float32, device=qweight.device)
        u[..., 0] = qweight & 0x0F
        u[..., 1] = qweight >> 4
        u = u.view(n, -1)
        if u.shape[1] != k:
            u = u[:, :k].contiguous()
        offset = zero_point - quant_min
    else:
        u, offset = qweight.to(torch.float32), zero_point
    offset = offset.to(torch.float32)
    if group_size:
        u = u.view(n, -1, group_size)
        scale, offset = scale.view(n, -1, 1), offset.view(n, -1, 1)
    elif axis is not None:
        view = (-1, 1) if axis in (0, -2) else (1, -1)
        scale, offset = scale.view(view), offset.view(view)
    return u.sub_(offset).mul_(scale).view(n, k)


def _finite_row_qparams(
    lo: Tensor, hi: Tensor, spec: PerTokenQParams
) -> tuple[Tensor, Tensor, Tensor, bool, bool]:
    """(scale, zero point as fp32, 1 / scale, fast, clamp) of rows with min lo and max hi,
    in a third of the small ops of per_token_qparams_ref. Where `fast` they equal its values:
    lo, hi and the scales are finite, 1 / eps is too (fp32), so no NaN arises and the signed
    zeros it may produce elsewhere all become eps. `clamp`: some row's extreme code leaves
    [quant_min, quant_max] (always False for a symmetric scheme, clamped anyway)."""
    qmin, qmax = spec.quant_min, spec.quant_max
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    if spec.symmetric:
        # max(-min(lo, 0), max(hi, 0)) / ((qmax - qmin) / 2), as minmax_qparams.
        top = torch.maximum(-lo, hi).clamp_(min=0)
        scale = divide_fp32(top, float(qmax - qmin) / 2).clamp_(min=spec.eps)
        zpf = torch.full_like(scale, float(spec.symmetric_zero_point))
        # |x| / scale <= (qmax - qmin) / 2 once lo and hi are finite: only those to check.
        ends = torch.stack((lo.amin(), hi.amax())).tolist()
        clamp = False
    else:
        lo_neg = lo.clamp(max=0)
        scale = divide_fp32(hi.clamp(min=0) - lo_neg, float(qmax - qmin)).clamp_(min=spec.eps)
        # qmin - round(lo_neg / scale), clamped: |lo_neg / scale| <= qmax - qmin, exact in fp32.
        zpf = (lo_neg / scale).round_().neg_().add_(qmin).clamp_(qmin, qmax)
    inv = reciprocal(scale)
    if not spec.symmetric:
        # The extremes' codes bound every code of the row: x * inv and rounding are monotonic.
        code_lo = (lo * inv).round_().add_(zpf).amin()
        code_hi = (hi * inv).round_().add_(zpf).amax()
        ends = torch.stack((code_lo, code_hi, scale.amax())).tolist()
        clamp = ends[0] < qmin or ends[1] > qmax
    fast = all(math.isfinite(e) for e in ends) and spec.eps >= _FP32_TINY
    return scale, zpf, inv, fast, clamp


def fake_quantize_per_token_inference(
    rows: Tensor, spec: PerTokenQParams, scratch: bool = False
) -> Tensor:
    """Each row of rows (M, K) fake-quantized with its own qparams (per_token_qparams_ref),
    as fake_quantize_per_token_spec computes it, in rows' dtype (fp32 arithmetic, cast once).
    Not differentiable (a converted model's eval). scratch: an fp32 result may live in this
    thread's scratch buffer (_scratch_rows), valid until the next such call: for a caller
    that consumes it at once.

    Where every row is finite and its scaled extremes lo / scale and hi / scale round to
    finite codes, the reference's `+ zp, clamp, nan_to_num, - zp` is the identity on the
    rounded values except where a code leaves [quant_min, quant_max]: a symmetric scheme's
    zero point is one integer for all rows, so its clamp is one scalar clamp; an affine row
    is checked from its extremes (x / scale rounds monotonically) and clamped per row only
    when one needs it. Three passes over the rows instead of seven; other rows (non-finite,
    zero or infinite scales) take the reference."""
    m, k = rows.shape
    if m == 0 or k == 0:
        return rows.clone()
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    scale, zpf, inv, fast, clamp_rows = _finite_row_qparams(lo, hi, spec)
    if not fast:
        args = (spec.quant_min, spec.quant_max, spec.symmetric, spec.symmetric_zero_point)
        scale, zp = per_token_qparams_from_minmax(lo, hi, *args, spec.eps)
        y = fake_quantize_rows_fp32(rows, scale, zp, spec.quant_min, spec.quant_max)
        return y.to(rows.dtype)
    # fp32 products: a half-precision row promotes against the fp32 inv, exactly.
    x = rows if rows.dtype in _PROMOTED else rows.to(torch.float32)
    out = _scratch_rows(m, k, x.device) if scratch else None
    q = torch.mul(x, inv.view(-1, 1), out=out).round_()
    if spec.symmetric:
        zp0 = spec.symmetric_zero_point
        q.clamp_(spec.quant_min - zp0, spec.quant_max - zp0)
    elif clamp_rows:
        zpf = zpf.view(-1, 1)
        q.clamp_(spec.quant_min - zpf, spec.quant_max - zpf)
    return q.mul_(scale.view(-1, 1)).to(rows.dtype)


# Largest fp32 scratch kept per thread for fake_quantize_per_token_inference (32 MiB): above
# it a fresh buffer's page faults are small beside the GEMM that reads it.
SCRATCH_MAX_ELEMENTS = 1 << 23


class _Scratch(threading.local):
    buffer: Tensor | None = None


_SCRATCH = _Scratch()


def _scratch_rows(m: int, k: int, device: torch.device) -> Tensor | None:
    """An fp32 (m, k) buffer reused by every call in this thread, or None (a fresh tensor).

    A fresh multi-MiB tensor per call comes back from the allocator as new pages on a CPU
    (glibc maps and unmaps blocks that large), and faulting them in cost as much as the
    fake quant's own passes on the example's model. The buffer is reused only where no
    result can outlive the next call: grad disabled (autograd saves nothing), not under
    torch.compile, on the CPU, and up to SCRATCH_MAX_ELEMENTS."""
    n = m * k
    if (
        torch.is_grad_enabled()
        or device.type != "cpu"
        or n > SCRATCH_MAX_ELEMENTS
        or torch.compiler.is_compiling()
    ):
        return None
    buf = _SCRATCH.buffer
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buffer = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(m, k)


class _LastInput(threading.local):
    """The last input fake-quantized per token by a converted layer in this thread, and the
    result: layers that read one tensor (a block's q / k / v projections, its gate and up
    projections) quantize it once. The input is held weakly; the result until the next call."""

    source: weakref.ref | None = None
    version: int = -1
    spec: PerTokenQParams | None = None
    result: Tensor | None = None


_LAST_INPUT = _LastInput()


def fake_quantize_per_token_shared(x: Tensor, spec: PerTokenQParams) -> Tensor:
    """fake_quantize_per_token_inference of x seen as rows (-1, x.shape[-1]), shaped as x,
    reused when the previous call in this thread had the same tensor, unmodified since (its
    version counter), and the same spec. The result is shared and, with grad disabled on the
    CPU, lives in this thread's scratch buffer: read it before the next call, never modify it.
    Inference-mode tensors (no version counter) and torch.compile traces are not memoized."""
    memo = not x.is_inference() and not torch.compiler.is_compiling()
    last = _LAST_INPUT
    if (
        memo
        and last.source is not None
        and last.source() is x
        and last.version == x._version
        and last.spec == spec
    ):
        return last.result
    rows = x.reshape(-1, x.shape[-1])
    y = fake_quantize_per_token_inference(rows, spec, scratch=True).reshape(x.shape)
    # Set or cleared: a memoized result may share the scratch buffer that y just reused.
    if memo:
        last.source, last.version, last.spec, last.result = weakref.ref(x), x._version, spec, y
    else:
        last.source = last.result = None
    return y
