"""fq_embedding: F.embedding of the fake-quantized table, computed on the looked-up rows only.

fq_embedding(input, weight, qparams, ...) == F.embedding(input, fake_quantize(weight,
qparams), ...) bit for bit, without the fake-quantized copy of the table: the rows are
gathered and fake-quantized with their own qparams (per tensor, per row = per channel along
axis 0, per column, or per group along embedding_dim). Backward (straight-through): the weight
gradient is F.embedding's, each looked-up row's times its mask, recomputed from the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_qat.numerics import reference
from triton_qat.numerics.qparams import NormQParams, QParams, check_float_tensor, normalize
from triton_qat.ops.backend import use_triton
from triton_qat.ops.functional import fake_quantize_with_mask_eager


def qparams_layout(nq: NormQParams, dim: int) -> tuple[int, int]:
    """(params_per_row, group_size) of a (num_embeddings, dim) table's normalized qparams: the
    qparam of element (row, col) is flat index row * params_per_row + col // group_size."""
    if nq.granularity == "per_tensor":
        return 0, max(dim, 1)
    if nq.granularity == "per_group":
        return dim // nq.cols, nq.cols
    if nq.params_on_cols:  # per channel along axis 1 (one qparam per column)
        return 0, 1
    return 1, max(dim, 1)


def _row_qparams(idx: Tensor, nq: NormQParams, layout: tuple[int, int], dim: int) -> QParams:
    """The qparams of the gathered rows weight[idx] (n, dim), for the eager path."""
    per_row, group = layout
    if per_row == 0:
        if group == 1:
            return QParams(nq.scale, nq.zero_point, nq.quant_min, nq.quant_max, axis=1)
        return QParams(nq.scale, nq.zero_point, nq.quant_min, nq.quant_max)
    if per_row == 1:
        return QParams(nq.scale[idx], nq.zero_point[idx], nq.quant_min, nq.quant_max, axis=0)
    scale = nq.scale.view(-1, per_row)[idx]
    zp = nq.zero_point.view(-1, per_row)[idx]
    return QParams(scale, zp, nq.quant_min, nq.quant_max, group_size=group)


def _eager_rows(idx: Tensor, weight: Tensor, nq: NormQParams, layout) -> tuple[Tensor, Tensor]:
    """(fq(weight)[idx], mask(weight)[idx]) from the gathered rows, in plain PyTorch."""
    rows = weight[idx]
    row_nq = normalize(rows, _row_qparams(idx, nq, layout, weight.shape[1]), check_zero_point=False)
    return fake_quantize_with_mask_eager(rows, row_nq)


def _kernels(weight: Tensor) -> bool:
    """The Triton kernels, or (a graph being compiled, or the eager backend) the torch
    composition, which a compiler traces and fuses: no data-dependent shapes, no host sync."""
    return use_triton(weight.device) and not torch.compiler.is_compiling()


def _forward(idx: Tensor, weight: Tensor, nq: NormQParams, inv: Tensor, layout, renorm) -> Tensor:
    if _kernels(weight):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.embedding import embedding_fq_forward

        out = embedding_fq_forward(
            idx, weight, nq.scale, inv, nq.zero_point, layout, nq.quant_min, nq.quant_max
        )
    else:
        out = _eager_rows(idx, weight, nq, layout)[0]
    if renorm is not None and out.numel():
        # Row by row, as F.embedding renormalizes each looked-up row of the (fake-quantized)
        # table it is given; not differentiated, as there.
        rows = torch.arange(out.shape[0], device=out.device)
        torch.embedding_renorm_(out, rows, *renorm)
    return out


def _masked_rows(rows: Tensor, weight: Tensor, grad_rows: Tensor, nq: NormQParams, inv, layout):
    """grad_rows * mask(weight[rows]): each row's straight-through mask, recomputed."""
    if _kernels(weight):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.embedding import embedding_fq_grad_rows

        return embedding_fq_grad_rows(
            rows, weight, grad_rows, inv, nq.zero_point, layout, nq.quant_min, nq.quant_max
        )
    # As reference.fake_quantize_backward_ref: grad * mask (torch's fused op makes the mask
    # where it equals the reference's).
    return grad_rows * _eager_rows(rows, weight, nq, layout)[1]


def _weight_grad(ctx, grad_out: Tensor, idx: Tensor, weight: Tensor, nq: NormQParams, inv):
    """F.embedding's weight gradient of grad_out (n, dim) times the straight-through mask."""
    num_embeddings = weight.shape[0]
    padding_idx = ctx.padding_idx
    grad_out = grad_out.to(weight.dtype).contiguous()
    if ctx.sparse:
        # Sparse rows: one per index, each times its row's mask (as torch.ao's sparse grad).
        grad_rows = _masked_rows(idx, weight, grad_out, nq, inv, ctx.layout)
        return torch.ops.aten.embedding_sparse_backward(
            grad_rows, idx, num_embeddings, padding_idx, ctx.scale_grad_by_freq
        )
    if _kernels(weight) and not ctx.scale_grad_by_freq:
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.embedding import embedding_fq_dense_grad

        keep = idx != padding_idx
        if padding_idx >= 0 and not bool(keep.all()):
            idx, grad_out = idx[keep], grad_out[keep]
        return embedding_fq_dense_grad(
            idx, weight, grad_out, inv, nq.zero_point, ctx.layout, nq.quant_min, nq.quant_max
        )
    # torch's own embedding backward (sequential on the CPU, sort-based on CUDA: no atomics),
    # then the looked-up rows times their masks: the autograd of the unfused composition.
    dw = torch.ops.aten.embedding_dense_backward(
        grad_out, idx, num_embeddings, padding_idx, ctx.scale_grad_by_freq
    )
    if torch.compiler.is_compiling():
        # A graph takes no data-dependent shapes: the whole table's mask, elementwise the
        # rows' own (rows not looked up have a zero gradient either way), fused by the compiler.
        return dw * fake_quantize_with_mask_eager(weight, nq)[1]
    rows = torch.unique(idx)
    dw[rows] = _masked_rows(rows, weight, dw[rows].contiguous(), nq, inv, ctx.layout)
    return dw


class _FqEmbeddingFunction(torch.autograd.Function):
    """Saves the indices, the weight (the Parameter itself, no copy) and copies of the
    qparams; the masks are recomputed from the weight in backward."""

    @staticmethod
    def forward(ctx, idx, weight, nq, inv, layout, renorm, padding_idx, sparse, scale_grad_by_freq):  # type: ignore[override]
        ctx.save_for_backward(idx, weight, nq.scale.clone(), inv.clone(), nq.zero_point.clone())
        ctx.nq = nq._replace(scale=None, zero_point=None)
        ctx.layout = layout
        ctx.padding_idx = padding_idx
        ctx.sparse = sparse
        ctx.scale_grad_by_freq = scale_grad_by_freq
        return _forward(idx, weight, nq, inv, layout, renorm)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        idx, weight, scale, inv, zero_point = ctx.saved_tensors
        nq = ctx.nq._replace(scale=scale, zero_point=zero_point)
        dw = _weight_grad(ctx, grad_out, idx, weight, nq, inv)
        return None, dw, None, None, None, None, None, None, None


def _check_embedding_args(input: Tensor, weight: Tensor, padding_idx: int | None) -> int:
    """The checks F.embedding makes (as ValueError / TypeError / IndexError); padding_idx as
    torch.embedding takes it (-1 for none)."""
    check_float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (num_embeddings, embedding_dim), got {tuple(weight.shape)}"
        )
    if not isinstance(input, Tensor) or input.dtype not in (torch.int32, torch.int64):
        got = input.dtype if isinstance(input, Tensor) else type(input).__name__
        raise TypeError(f"input must be an int32 or int64 tensor of indices, got {got}")
    if input.device != weight.device:
        raise ValueError(f"input is on {input.device} but weight is on {weight.device}")
    num_embeddings = weight.shape[0]
    if input.numel():
        lo, hi = torch.aminmax(input)
        in_range = (lo >= 0) & (hi < num_embeddings)
        message = f"index out of range: indices must lie in [0, {num_embeddings})"
        # An index out of range would read outside the table in the kernel. Eager: one host
        # sync. In a compiled graph (no host sync, no graph break): the check runs on the
        # device, a RuntimeError on the CPU, a device-side assert on CUDA (as F.embedding's).
        if torch.compiler.is_compiling():
            torch._assert_async(in_range, message)
        elif not bool(in_range.item()):
            raise IndexError(f"{message}, got values in [{lo.item()}, {hi.item()}]")
    if padding_idx is None:
        return -1
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"padding_idx must be within num_embeddings ({num_embeddings}), got {padding_idx}"
        )
    return padding_idx % num_embeddings


def fq_embedding(
    input: Tensor,
    weight: Tensor,
    qparams: QParams | None,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """F.embedding(input, fake_quantize(weight, qparams), padding_idx, max_norm, norm_type,
    scale_grad_by_freq, sparse), bit for bit, computed on the looked-up rows only.

    qparams: per tensor, per channel (axis 0: one per row; axis 1: one per column), per group
    along embedding_dim, or None (plain F.embedding). max_norm renormalizes the looked-up
    fake-quantized rows (as F.embedding does to the fake-quantized table torch.ao passes it;
    the weight itself is never changed). Differentiable in weight (straight-through);
    sparse=True gives a sparse COO gradient.
    """
    if qparams is None:
        return F.embedding(
            input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
        )
    if not isinstance(qparams, QParams):
        raise TypeError(
            f"qparams must be a triton_qat.QParams or None, got {type(qparams).__name__}"
        )
    pad = _check_embedding_args(input, weight, padding_idx)
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    nq = normalize(weight_c, qparams)
    inv = reference.reciprocal(nq.scale)
    layout = qparams_layout(nq, weight.shape[1])
    idx = input.reshape(-1).to(torch.int64)
    renorm = None if max_norm is None else (float(max_norm), float(norm_type))
    if torch.is_grad_enabled() and weight.requires_grad:
        out = _FqEmbeddingFunction.apply(
            idx, weight_c, nq, inv, layout, renorm, pad, sparse, scale_grad_by_freq
        )
    else:
        out = _forward(idx, weight_c, nq, inv, layout, renorm)
    return out.reshape(*input.shape, weight.shape[1])
