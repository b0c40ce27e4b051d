"""Comparison helpers that say where and how many elements differ."""

from __future__ import annotations

import torch
from torch import Tensor


def _bits(t: Tensor) -> Tensor:
    view_dtype = {4: torch.int32, 2: torch.int16, 1: torch.int8, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view_dtype)


def assert_bitwise_equal(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """Equal bit for bit (signed zeros included); any NaN matches any NaN at the same place."""
    assert actual.shape == expected.shape, f"{what} shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what} dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    if a.dtype == torch.bool or not a.is_floating_point():
        diff = a != e
    else:
        a_nan, e_nan = torch.isnan(a), torch.isnan(e)
        diff = (a_nan != e_nan) | (~a_nan & ~e_nan & (_bits(a) != _bits(e)))
    n = int(diff.sum())
    if n:
        idx = diff.nonzero()[:8].tolist()
        rows = [
            f"  at {tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}"
            for i in idx
        ]
        raise AssertionError(
            f"{what}: {n} of {diff.numel()} elements differ bitwise\n" + "\n".join(rows)
        )


def fresh_view(t: Tensor | None, requires_grad: bool) -> Tensor | None:
    """A fresh leaf copy of t in t's memory layout. A view (transposed, sliced, expanded) is
    rebuilt on a copy of its (contiguous) base with the same strides; with requires_grad its
    gradient is the one flowing into the view (retain_grad), in the view's shape."""
    if t is None:
        return None
    base = t._base
    if base is None:
        return t.detach().clone().requires_grad_(requires_grad)
    assert base.is_contiguous() and base.storage_offset() == 0
    leaf = base.detach().clone().requires_grad_(requires_grad)
    view = leaf.as_strided(t.size(), t.stride(), t.storage_offset())
    if requires_grad:
        view.retain_grad()
    return view


def assert_within(actual: Tensor, expected: Tensor, bound: Tensor, what: str = "") -> None:
    """|actual - expected| <= bound elementwise (bound a justified error bound, e.g. an fp32
    accumulation's, computed in float64; a NaN difference is out of bound); says where and by
    how much it is exceeded."""
    assert actual.shape == expected.shape, f"{what} shape {actual.shape} != {expected.shape}"
    diff = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs()
    over = ~(diff <= bound.cpu().double())
    n = int(over.sum())
    if n:
        idx = over.nonzero()[:8].tolist()
        rows = [
            f"  at {tuple(i)}: |diff| {diff[tuple(i)].item():.3e} > bound "
            f"{bound[tuple(i)].item():.3e}"
            for i in idx
        ]
        raise AssertionError(
            f"{what}: {n} of {diff.numel()} elements out of bound\n" + "\n".join(rows)
        )
