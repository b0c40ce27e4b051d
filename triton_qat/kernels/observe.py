"""Observer statistics on the device: min / max reductions, running updates and qparams.

The input, made contiguous, is seen as (outer, channels, inner): per tensor one channel, per
channel along an axis a (outer = prod(shape[:a]), inner = prod(shape[a + 1:])), per group of g
consecutive elements (numel // g channels, inner = g). Two launches and no host sync:
`_minmax_partial_kernel` reduces slices of each channel to partial min / max (NaN flagged
apart, since comparisons drop it), `_observe_finish_kernel` combines the partials, updates the
running min / max buffers in place and computes scale and zero point.

The formulas mirror triton_qat.quantizers step for step (`_minmax_qparams`, torch.ao's
Python _calculate_qparams; `_fused_qparams`, torch's ChooseQuantizationParams), rounding in
fp32 or fp64 where they do; tests/test_observe.py compares the two bit for bit. Zeros of
opposite sign compare equal: a min or max of 0 may carry the other sign than torch.aminmax's
(which depends on element order), the qparams never do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels import INTERPRETED_KERNELS
from triton_qat.kernels.rounding import negate, round_half_even, round_half_even_f64, to_fp32

# Running-statistics updates (UPDATE), as the eager observers do them.
STORE = 0  # run = cur (first per-channel observation, per group)
RUNNING_MINMAX = 1  # run = min(run, cur), max(run, cur) (MinMaxObserver)
MOVING_AVERAGE_FIRST = 2  # both +-inf (never observed): cur, else run + c * (cur - run)
MOVING_AVERAGE = 3  # run + c * (cur - run) (per-channel moving average with statistics)
FUSED_MOVING_AVERAGE = 4  # elementwise isinf(run) ? cur : run + c * (cur - run)

# qparams (QPARAMS): none, torch.ao's Python formula, torch's fused-op formula.
NO_QPARAMS = 0
OBSERVER_QPARAMS = 1
FUSED_QPARAMS = 2
# The kernels' copies: compiled Triton reads only constexpr globals (the interpreter reads any).
_STORE: tl.constexpr = tl.constexpr(STORE)
_RUNNING_MINMAX: tl.constexpr = tl.constexpr(RUNNING_MINMAX)
_MOVING_AVERAGE_FIRST: tl.constexpr = tl.constexpr(MOVING_AVERAGE_FIRST)
_MOVING_AVERAGE: tl.constexpr = tl.constexpr(MOVING_AVERAGE)
_NO_QPARAMS: tl.constexpr = tl.constexpr(NO_QPARAMS)
_OBSERVER_QPARAMS: tl.constexpr = tl.constexpr(OBSERVER_QPARAMS)

INT32_MIN: tl.constexpr = tl.constexpr(-2147483648)
# torch's ChooseQuantizationParams (CPU) raises smaller scales to this.
SMALL_SCALE: tl.constexpr = tl.constexpr(6.1e-05)

_TILE = 4096 if not INTERPRETED_KERNELS else 16384
_MAX_SPLITS = 512
_MAX_BLOCK_C = 64
_FINISH_BLOCK = 256 if not INTERPRETED_KERNELS else 4096


@triton.jit
def nan_max(a, b):
    """torch.max(a, b) elementwise: NaN when either is NaN (tl.maximum may drop it)."""
    return tl.where(a != a, a, tl.where(b != b, b, tl.where(a < b, b, a)))


@triton.jit
def nan_min(a, b):
    """torch.min(a, b) elementwise: NaN when either is NaN."""
    return tl.where(a != a, a, tl.where(b != b, b, tl.where(b < a, b, a)))


@triton.jit
def to_int32_cpu(v):
    """fp32 / fp64 -> int32 as torch's CPU cast (x86 cvtt): truncation, and INT32_MIN for NaN
    and out-of-range values."""
    ok = (v > -2147483649.0) & (v < 2147483648.0)
    return tl.where(ok, tl.where(ok, v, 0.0).to(tl.int32), INT32_MIN)


@triton.jit
def observer_qparams(
    mn, mx, eps, qmin, qmax, zp_symmetric, SYMMETRIC: tl.constexpr, NOT_OBSERVED_DEFAULT
):
    """torch.ao's _calculate_qparams elementwise (fake_quantize._minmax_qparams): fp32 scale,
    int32 zero point; (1.0, 0) where min is +inf and max -inf if NOT_OBSERVED_DEFAULT."""
    min_neg = nan_min(mn, 0.0)
    max_pos = nan_max(mx, 0.0)
    if SYMMETRIC:
        max_pos = nan_max(negate(min_neg), max_pos)
        scale = tl.div_rn(max_pos, (qmax - qmin) * 0.5)
        scale = nan_max(scale, eps)
        zp = tl.zeros(mn.shape, tl.int32) + zp_symmetric
    else:
        scale = tl.div_rn(max_pos - min_neg, qmax - qmin)
        scale = nan_max(scale, eps)
        rounded = to_int32_cpu(round_half_even(tl.div_rn(min_neg, scale)))
        # int32 arithmetic wraps as torch's does; then clamp.
        zp = tl.cast(qmin, tl.int32) - rounded
        zp = tl.minimum(tl.maximum(zp, tl.cast(qmin, tl.int32)), tl.cast(qmax, tl.int32))
    if NOT_OBSERVED_DEFAULT:
        unobserved = (mn == float("inf")) & (mx == float("-inf"))
        scale = tl.where(unobserved, 1.0, scale)
        zp = tl.where(unobserved, 0, zp)
    return scale, zp


@triton.jit
def fused_qparams(mn, mx, qmin, qmax, SYMMETRIC: tl.constexpr):
    """torch's ChooseQuantizationParams elementwise (fake_quantize._fused_qparams): fp32 min /
    max in, fp32 scale and int32 zero point out; fp32 and fp64 steps where the eager code has
    them. qmin, qmax: fp32 scalars holding integers."""
    qrange = qmax - qmin
    if SYMMETRIC:
        # preserve_sparsity: widen [min, max] to the symmetric range around 0.
        sym_max = tl.floor(qrange * 0.5)
        sym_min = negate(sym_max + 1.0)
        straddles = (mn < 0) & (mx > 0)
        max_scale = nan_max(tl.abs(tl.div_rn(mn, sym_min)), tl.abs(tl.div_rn(mx, sym_max)))
        max_scale64 = max_scale.to(tl.float64)
        mn = tl.where(straddles, (max_scale64 * tl.cast(sym_min, tl.float64)).to(tl.float32), mn)
        mx = tl.where(straddles, (max_scale64 * tl.cast(sym_max, tl.float64)).to(tl.float32), mx)
    # torch.clamp keeps NaN.
    mn = tl.where(mn > 0.0, 0.0, mn)
    mx = tl.where(mx < 0.0, 0.0, mx)
    scale = ((mx.to(tl.float64) - mn.to(tl.float64)) / tl.cast(qrange, tl.float64)).to(tl.float32)
    recip = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    degenerate = (scale == 0.0) | (tl.abs(recip) == float("inf"))
    scale = tl.where(degenerate, 0.1, scale)
    small = scale < SMALL_SCALE
    amplifier = tl.div_rn(tl.full(scale.shape, SMALL_SCALE, tl.float32), scale)
    cut_max = tl.full(scale.shape, SMALL_SCALE, tl.float32) * qrange
    small_mn = tl.where(mx == 0.0, negate(cut_max), mn * amplifier)
    small_mx = tl.where(mx == 0.0, mx, mx * amplifier)
    small_mn = tl.where(mn == 0.0, mn, small_mn)
    small_mx = tl.where(mn == 0.0, cut_max, small_mx)
    mn = tl.where(small, small_mn, mn)
    mx = tl.where(small, small_mx, mx)
    scale = tl.where(small, SMALL_SCALE, scale)
    # Zero point from the min or the max, whichever adds the smaller terms.
    scale64 = scale.to(tl.float64)
    qmin64 = tl.cast(qmin, tl.float64)
    qmax64 = tl.cast(qmax, tl.float64)
    rmin = mn.to(tl.float64) / scale64
    rmax = mx.to(tl.float64) / scale64
    from_min_error = tl.abs(qmin64) + tl.abs(rmin)
    from_max_error = tl.abs(qmax64) + tl.abs(rmax)
    initial = tl.where(from_min_error < from_max_error, qmin64 - rmin, qmax64 - rmax)
    if SYMMETRIC:
        initial = tl.where((mn < 0) & (mx > 0), (qmin64 + qmax64) * 0.5, initial)
    nudged = round_half_even_f64(initial)
    nudged = tl.where(nudged < qmin64, qmin64, tl.where(nudged > qmax64, qmax64, nudged))
    return scale, to_int32_cpu(nudged)


@triton.jit
def _minmax_partial_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pnan_ptr,
    channels,
    inner,
    per_channel,
    chunk,
    n_split,
    HAS_OUTER: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Min / max of elements [s * chunk, (s + 1) * chunk) of each channel in a block of
    BLOCK_C channels; element j of channel c lives at ((j // inner) * channels + c) * inner +
    j % inner. A NaN is counted apart and the comparisons skip it."""
    pid_c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    lo = tl.full([BLOCK_J, BLOCK_C], float("inf"), tl.float32)
    hi = tl.full([BLOCK_J, BLOCK_C], float("-inf"), tl.float32)
    nan = tl.zeros([BLOCK_J, BLOCK_C], tl.int32)
    start = s * chunk
    end = tl.minimum(start + chunk, per_channel)
    for off in range(0, chunk, BLOCK_J):
        j = start + off + tl.arange(0, BLOCK_J)
        ok = (j < end)[:, None] & c_ok[None, :]
        if HAS_OUTER:
            o = j // inner
            i = j - o * inner
            ptrs = x_ptr + ((o[:, None] * channels + c[None, :]) * inner + i[:, None])
        else:  # outer == 1: j < inner, no division
            ptrs = x_ptr + (c[None, :] * inner + j[:, None])
        v = to_fp32(tl.load(ptrs, mask=ok, other=0.0))
        nan = tl.where(ok & (v != v), 1, nan)
        lo = tl.where(ok & (v < lo), v, lo)
        hi = tl.where(ok & (v > hi), v, hi)
    out = c * n_split + s
    tl.store(pmin_ptr + out, tl.min(lo, axis=0), mask=c_ok)
    tl.store(pmax_ptr + out, tl.max(hi, axis=0), mask=c_ok)
    tl.store(pnan_ptr + out, tl.max(nan, axis=0), mask=c_ok)


@triton.jit
def _observe_finish_kernel(
    pmin_ptr,
    pmax_ptr,
    pnan_ptr,
    run_min_ptr,
    run_max_ptr,
    scale_ptr,
    zp_ptr,
    eps_ptr,
    observer_on_ptr,
    fake_quant_on_ptr,
    channels,
    n_split,
    averaging_constant,
    qmin,
    qmax,
    zp_symmetric,
    UPDATE: tl.constexpr,
    QPARAMS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    NOT_OBSERVED_DEFAULT: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Combine the partials of BLOCK channels, update the running min / max in place (when
    observer_on), write scale and zero point (when fake_quant_on). The flags are read here so
    that the caller never synchronises with the device."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid * BLOCK + tl.arange(0, BLOCK)
    ok = c < channels
    cur_min = tl.full([BLOCK], float("inf"), tl.float32)
    cur_max = tl.full([BLOCK], float("-inf"), tl.float32)
    nan = tl.zeros([BLOCK], tl.int32)
    for s in range(0, n_split):
        cur_min = tl.minimum(cur_min, tl.load(pmin_ptr + c * n_split + s, mask=ok, other=0.0))
        cur_max = tl.maximum(cur_max, tl.load(pmax_ptr + c * n_split + s, mask=ok, other=0.0))
        nan = tl.maximum(nan, tl.load(pnan_ptr + c * n_split + s, mask=ok, other=0))
    # aminmax propagates NaN to both results.
    cur_min = tl.where(nan > 0, float("nan"), cur_min)
    cur_max = tl.where(nan > 0, float("nan"), cur_max)
    if HAS_FLAGS:
        # Per-lane copies of the flags: a scalar mask is not accepted everywhere.
        observe = (tl.zeros([BLOCK], tl.int64) + tl.load(observer_on_ptr)) == 1
        quantize = (tl.zeros([BLOCK], tl.int64) + tl.load(fake_quant_on_ptr)) == 1
    else:
        observe = ok
        quantize = ok
    if UPDATE != _STORE:
        run_min = tl.load(run_min_ptr + c, mask=ok, other=0.0)
        run_max = tl.load(run_max_ptr + c, mask=ok, other=0.0)
        if UPDATE == _RUNNING_MINMAX:
            new_min = nan_min(cur_min, run_min)
            new_max = nan_max(cur_max, run_max)
        elif UPDATE == _MOVING_AVERAGE_FIRST:
            first = (run_min == float("inf")) & (run_max == float("-inf"))
            new_min = tl.where(first, cur_min, run_min + averaging_constant * (cur_min - run_min))
            new_max = tl.where(first, cur_max, run_max + averaging_constant * (cur_max - run_max))
        elif UPDATE == _MOVING_AVERAGE:
            new_min = run_min + averaging_constant * (cur_min - run_min)
            new_max = run_max + averaging_constant * (cur_max - run_max)
        else:
            min_inf = tl.abs(run_min) == float("inf")
            max_inf = tl.abs(run_max) == float("inf")
            new_min = tl.where(min_inf, cur_min, run_min + averaging_constant * (cur_min - run_min))
            new_max = tl.where(max_inf, cur_max, run_max + averaging_constant * (cur_max - run_max))
        new_min = tl.where(observe, new_min, run_min)
        new_max = tl.where(observe, new_max, run_max)
    else:
        new_min = cur_min
        new_max = cur_max
    tl.store(run_min_ptr + c, new_min, mask=ok)
    tl.store(run_max_ptr + c, new_max, mask=ok)
    if QPARAMS != _NO_QPARAMS:
        if QPARAMS == _OBSERVER_QPARAMS:
            eps = tl.load(eps_ptr)
            scale, zp = observer_qparams(
                new_min, new_max, eps, qmin, qmax, zp_symmetric, SYMMETRIC, NOT_OBSERVED_DEFAULT
            )
        else:
            scale, zp = fused_qparams(new_min, new_max, qmin, qmax, SYMMETRIC)
        tl.store(scale_ptr + c, scale, mask=ok & quantize)
        tl.store(zp_ptr + c, zp, mask=ok & quantize)


def channel_layout(x: Tensor, axis: int | None, group_size: int | None) -> tuple[int, int, int]:
    """(outer, channels, inner) of contiguous x: per tensor, per channel along `axis`, or per
    group of `group_size` along the last dim."""
    if group_size is not None:
        return 1, x.numel() // group_size, group_size
    if axis is None:
        return 1, 1, x.numel()
    axis %= x.dim()
    shape = x.shape
    outer = 1
    for n in shape[:axis]:
        outer *= n
    inner = 1
    for n in shape[axis + 1 :]:
        inner *= n
    return outer, shape[axis], inner


def _partial_minmax(x: Tensor, outer: int, channels: int, inner: int, splits: int | None):
    per_channel = outer * inner
    # Tiles of (BLOCK_J elements) x (BLOCK_C channels): short channels share one; with
    # channels innermost (inner == 1) a row of BLOCK_C channels is one coalesced load.
    if inner == 1:
        block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(channels))
        block_j = min(_TILE // block_c, triton.next_power_of_2(per_channel))
    else:
        block_j = min(_TILE, triton.next_power_of_2(per_channel))
        block_c = max(1, min(_TILE // block_j, triton.next_power_of_2(channels)))
    if splits is not None:  # a given number of slices per channel (tests)
        block_j = min(block_j, triton.next_power_of_2(triton.cdiv(per_channel, splits)))
    c_blocks = triton.cdiv(channels, block_c)
    want = triton.cdiv(per_channel, 4 * block_j)
    n_split = 1 if INTERPRETED_KERNELS else max(1, min(want, _MAX_SPLITS // c_blocks))
    if splits is not None:
        n_split = splits
    chunk = triton.cdiv(triton.cdiv(per_channel, n_split), block_j) * block_j
    n_split = triton.cdiv(per_channel, chunk)
    pmin = torch.empty((channels, n_split), dtype=torch.float32, device=x.device)
    pmax = torch.empty_like(pmin)
    pnan = torch.empty((channels, n_split), dtype=torch.int32, device=x.device)
    _minmax_partial_kernel[(c_blocks, n_split)](
        x,
        pmin,
        pmax,
        pnan,
        channels,
        inner,
        per_channel,
        chunk,
        n_split,
        HAS_OUTER=outer > 1,
        BLOCK_J=block_j,
        BLOCK_C=block_c,
        num_warps=8 if block_j * block_c >= 4096 else 4,
        enable_fp_fusion=False,  # no arithmetic to fuse; as every launch, explicit
    )
    return pmin, pmax, pnan, n_split


def observe(
    x: Tensor,
    run_min: Tensor,
    run_max: Tensor,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    update: int = STORE,
    averaging_constant: float = 0.0,
    qparams: int = NO_QPARAMS,
    scale: Tensor | None = None,
    zero_point: Tensor | None = None,
    quant_min: int = 0,
    quant_max: int = 0,
    symmetric: bool = False,
    zp_symmetric: int = 0,
    eps: Tensor | None = None,
    not_observed_default: bool = False,
    flags: tuple[Tensor, Tensor] | None = None,
    splits: int | None = None,
) -> None:
    """Reduce non-empty x (any float dtype) to per-channel min / max, update the contiguous fp32
    `run_min` / `run_max` (one element per channel) in place with `update`, and write fp32
    `scale` / int32 `zero_point` (one per channel) with the `qparams` formula.

    flags: (observer_enabled, fake_quant_enabled) int64 buffers gating the update and the
    qparams on the device, as torch's fused op. splits: slices per channel reduced by
    separate programs (chosen from the size by default; one under the interpreter)."""
    x = x.contiguous()
    outer, channels, inner = channel_layout(x, axis, group_size)
    pmin, pmax, pnan, n_split = _partial_minmax(x, outer, channels, inner, splits)
    dummy = pmin
    block = min(_FINISH_BLOCK, triton.next_power_of_2(channels))
    _observe_finish_kernel[(triton.cdiv(channels, block),)](
        pmin,
        pmax,
        pnan,
        run_min,
        run_max,
        dummy if scale is None else scale,
        pnan if zero_point is None else zero_point,
        dummy if eps is None else eps,
        pnan if flags is None else flags[0],
        pnan if flags is None else flags[1],
        channels,
        n_split,
        float(averaging_constant),
        float(quant_min),
        float(quant_max),
        int(zp_symmetric),
        UPDATE=update,
        QPARAMS=qparams,
        SYMMETRIC=symmetric,
        NOT_OBSERVED_DEFAULT=not_observed_default,
        HAS_FLAGS=flags is not None,
        BLOCK=block,
        # Each fp32 / fp64 step rounds on its own, as in the eager formulas.
        enable_fp_fusion=False,
    )
