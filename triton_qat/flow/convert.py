"""convert: a trained QAT model frozen into integer weights with the trained qparams
(QuantizedLinear, QuantizedEmbedding)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_qat.flow.convert_float8 import QuantizedFloat8Linear, is_float8_layer
from triton_qat.flow.convert_microscaling import (
    QuantizedMicroscalingLinear,
    is_microscaling_layer,
)
from triton_qat.flow.layout import (
    SavedLayout,
    input_layout_tensor,
    read_input_layout,
    read_weight_layout,
    weight_layout_tensor,
)
from triton_qat.flow.prepare import swap_modules
from triton_qat.nn.embedding import Embedding as QATEmbedding
from triton_qat.nn.linear import Linear as QATLinear
from triton_qat.numerics.observer_formulas import static_row_quant
from triton_qat.numerics.qparams import (
    IntWeight,
    PerTokenQParams,
    QParams,
    RowQuant,
    check_float_tensor,
    int_weight,
    normalize,
)
from triton_qat.numerics.reference import quantized_codes_ref
from triton_qat.ops.backend import use_triton
from triton_qat.ops.functional import fake_quantize
from triton_qat.ops.quantized_linear import (
    dequantize_int_weight,
    fake_quantize_per_token_inference,
    fake_quantize_per_token_shared,
)
from triton_qat.quantizers import (
    DynamicPerTokenFakeQuantize,
    FakeQuantizeBase,
    fake_quantize_per_token_spec,
)


def _pack_int4(q: Tensor, quant_min: int) -> Tensor:
    """Two 4-bit codes (q - quant_min in 0..15) per byte along the last dim, low nibble first."""
    u = (q - quant_min).to(torch.uint8)
    if u.shape[-1] % 2:
        u = F.pad(u, (0, 1))
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_int4(packed: Tensor, quant_min: int, k: int) -> Tensor:
    lo = packed & 0x0F
    hi = packed >> 4
    u = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :k]
    return u.to(torch.int32) + quant_min


def _stored_codes(codes: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """Codes as stored: 4-bit ranges packed two per byte, else int8, else int16."""
    codes = codes.to(torch.int32)
    if quant_max - quant_min <= 15:
        return _pack_int4(codes, quant_min)
    if quant_min < -128 or quant_max > 127:
        return codes.to(torch.int16)
    return codes.to(torch.int8)


def _dequantize(q: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
    """(q - zero_point) * scale in fp32, as the fake quant computed it (broadcast qparams)."""
    if zp.is_floating_point():
        # A float zero point dequantizes in float64 (NUMERICS: as torch's per-channel op).
        return ((q.double() - zp.double()) * scale.double()).float()
    return (q - zp.to(torch.float32)) * scale


class QuantizedLinear(SavedLayout):
    """Inference Linear with integer weights and the qparams trained by QAT.

    Weights are stored as int8 codes (4-bit ranges packed two to a byte) with their scale
    and zero point; the forward dequantizes them exactly as the QAT layer's fake quant did,
    so the eval output equals the QAT model's eval output. A static input quantizer is
    applied as fake quant (W8A8 numerics). No fake-quant modules are left.

    Where triton_qat.ops.backend.use_triton(device) holds, the forward runs the integer GEMMs
    of triton_qat.kernels.int_matmul instead: weight-only (float input times int8 / packed
    int4 codes) without an input quantizer, else the input quantized to int8 codes (per token
    or per tensor) and one int8 GEMM with int32 sums. Its output equals the eager forward's
    to matmul rounding. Layouts without a kernel (int16 codes, float zero points, per-channel
    qparams along in_features, input ranges over 256 values) take the eager path.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qweight: Tensor,
        weight_qparams: QParams,
        bias: Tensor | None,
        input_qparams: QParams | None = None,
        weight_dtype: torch.dtype = torch.float32,
        dynamic_input: PerTokenQParams | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        wq = weight_qparams
        self.weight_dtype = weight_dtype
        self.register_buffer("qweight", _stored_codes(qweight, wq.quant_min, wq.quant_max))
        self.register_buffer("weight_scale", torch.as_tensor(wq.scale, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.as_tensor(wq.zero_point))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if input_qparams is not None:
            self.register_buffer("input_scale", torch.as_tensor(input_qparams.scale))
            self.register_buffer("input_zero_point", torch.as_tensor(input_qparams.zero_point))
        iq = input_qparams
        self.register_buffer("weight_layout", weight_layout_tensor(wq))
        self.register_buffer(
            "input_layout",
            input_layout_tensor(
                None if iq is None else (iq.quant_min, iq.quant_max), dynamic_input
            ),
        )
        self._read_layout()

    def _read_layout(self) -> None:
        """The Python attributes the forward reads, from the weight_layout and input_layout
        buffers (read once here: reading a tensor per call would synchronize with a GPU)."""
        w = read_weight_layout(self.weight_layout)
        self.quant_min, self.quant_max, self.axis, self.group_size = w
        self.packed_int4 = self.quant_max - self.quant_min <= 15
        self.input_range, self._dynamic_input = read_input_layout(self.input_layout)

    @property
    def dynamic_input(self) -> PerTokenQParams | None:
        """The dynamic per-token input quantizer, or None (no input quant, or a static one)."""
        return self._dynamic_input

    @dynamic_input.setter
    def dynamic_input(self, spec: PerTokenQParams | None) -> None:
        if spec is not None and self.input_range is not None:
            raise ValueError("a layer with static input qparams cannot take a dynamic one")
        self.input_layout = input_layout_tensor(self.input_range, spec).to(self.input_layout.device)
        self._read_layout()

    def weight_codes(self) -> Tensor:
        """The integer codes q, shape (out_features, in_features), int32."""
        if self.packed_int4:
            return _unpack_int4(self.qweight, self.quant_min, self.in_features)
        return self.qweight.to(torch.int32)

    def dequantized_weight(self) -> Tensor:
        """(q - zero_point) * scale, as the QAT layer's fake quant computed it."""
        if not self.weight_zero_point.is_floating_point():
            w = dequantize_int_weight(
                self.qweight,
                self.weight_scale,
                self.weight_zero_point,
                self.quant_min,
                self.packed_int4,
                (self.out_features, self.in_features),
                self.axis,
                self.group_size,
            )
            return w.to(self.weight_dtype)
        q = self.weight_codes().to(torch.float32)
        scale, zp = self.weight_scale, self.weight_zero_point
        if self.group_size:
            g = self.group_size
            q = q.view(self.out_features, -1, g)
            scale, zp = scale.view(self.out_features, -1, 1), zp.view(self.out_features, -1, 1)
        elif self.axis is not None:
            shape = (-1, 1) if self.axis in (0, -2) else (1, -1)
            scale, zp = scale.view(shape), zp.view(shape)
        w = _dequantize(q, scale, zp)
        return w.reshape(self.out_features, self.in_features).to(self.weight_dtype)

    def int_weight(self) -> IntWeight | None:
        """The stored codes as the integer GEMMs take them, or None where they cannot
        (codes wider than int8, a float zero point, per-channel qparams along in_features)."""
        if self.qweight.dtype not in (torch.int8, torch.uint8):
            return None
        if self.weight_zero_point.is_floating_point():
            return None
        if self.axis is not None and self.axis not in (0, -2):
            return None
        return int_weight(
            self.qweight,
            self.weight_scale,
            self.weight_zero_point,
            self.quant_min,
            self.quant_max,
            self.in_features,
            self.group_size,
        )

    def _input_row_quant(self) -> RowQuant | None:
        """How the integer GEMM quantizes the input; None: the input stays float."""
        spec = self.dynamic_input
        if spec is not None:
            if spec.quant_max - spec.quant_min > 255:
                return None
            return RowQuant(
                spec.quant_min, spec.quant_max, spec.symmetric, spec.symmetric_zero_point, spec.eps
            )
        if self.input_range is not None:
            qmin, qmax = self.input_range
            if (
                self.input_scale.numel() != 1
                or self.input_zero_point.is_floating_point()
                or qmax - qmin > 255
            ):
                return None
            return static_row_quant(self.input_scale, self.input_zero_point, qmin, qmax)
        return None

    def _forward_triton(self, input: Tensor) -> Tensor | None:
        """The Triton integer GEMMs, or None where this layer's layout has no kernel."""
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels import int_matmul

        wt = self.int_weight()
        if wt is None:
            return None
        check_float_tensor(input, "input")
        bias = None if self.bias is None else self.bias.to(input.dtype)
        quantized_input = self.dynamic_input is not None or self.input_range is not None
        if not quantized_input:
            return int_matmul.weight_only_linear(input, wt, bias)
        rq = self._input_row_quant()
        if rq is None or not int_matmul.int8_linear_supports(wt, rq):
            return None
        x2d = input.reshape(-1, self.in_features)
        y = int_matmul.int8_linear(int_matmul.quantize_rows(x2d, rq), wt, bias, input.dtype)
        return y.reshape(*input.shape[:-1], self.out_features)

    def fake_quantized_input(self, input: Tensor) -> Tensor:
        """The input as the eager path multiplies it: fake-quantized per token (dynamic) or
        per tensor with the trained qparams, or unchanged when the layer keeps it float."""
        spec = self.dynamic_input
        if spec is not None:
            if torch.is_grad_enabled() and input.requires_grad:
                return fake_quantize_per_token_spec(input, spec)
            # Inference: the same values in fewer passes over the input (no mask, in place).
            rows = input.reshape(-1, self.in_features)
            return fake_quantize_per_token_inference(rows, spec).reshape(input.shape)
        if self.input_range is not None:
            qmin, qmax = self.input_range
            return fake_quantize(
                input, QParams(self.input_scale, self.input_zero_point, qmin, qmax)
            )
        return input

    def forward(self, input: Tensor) -> Tensor:
        # The integer GEMMs have no backward: a gradient through the input takes the eager path.
        needs_grad = torch.is_grad_enabled() and input.requires_grad
        if not needs_grad and use_triton(input.device):
            y = self._forward_triton(input)
            if y is not None:
                return y
        if self.dynamic_input is not None and not needs_grad:
            # Quantized once for all the layers that read this input (a block's q / k / v).
            input = fake_quantize_per_token_shared(input, self.dynamic_input)
        else:
            input = self.fake_quantized_input(input)
        w = self.dequantized_weight().to(input.dtype)
        b = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, w, b)

    @classmethod
    def from_qat(cls, mod: QATLinear) -> QuantizedLinear:
        """Freeze a trained tq.nn.Linear: its weight quantized with its current qparams."""
        codes, frozen = _frozen_weight(mod)
        iq = None
        ifq = getattr(mod, "input_fake_quant", None)
        dynamic = None
        if isinstance(ifq, DynamicPerTokenFakeQuantize) and ifq.fake_quant_enabled[0] == 1:
            dynamic = ifq.per_token_spec()
        elif ifq is not None and hasattr(ifq, "qparams") and not getattr(ifq, "is_dynamic", 0):
            iq = ifq.qparams()
            if iq is not None:
                iq = QParams(
                    iq.scale.detach().clone(),
                    iq.zero_point.detach().clone(),
                    iq.quant_min,
                    iq.quant_max,
                )
        layer = cls(
            mod.in_features,
            mod.out_features,
            codes,
            frozen,
            mod.bias,
            iq,
            weight_dtype=mod.weight.dtype,
            dynamic_input=dynamic,
        )
        return layer.to(mod.weight.device)


def _frozen_weight(mod: torch.nn.Module) -> tuple[Tensor, QParams]:
    """(integer codes, copies of the qparams) of a QAT layer's weight, quantized with its
    current weight qparams (as if fake quant were enabled)."""
    wfq = mod.weight_fake_quant
    if not isinstance(wfq, FakeQuantizeBase) or not hasattr(wfq, "qparams"):
        raise TypeError(
            f"convert: weight fake quant {type(wfq).__name__} is not one of triton_qat's; "
            "cannot read its qparams"
        )
    weight = mod.weight.detach()
    was_enabled = bool(wfq.fake_quant_enabled[0])
    wfq.enable_fake_quant()
    try:
        wq = wfq.qparams()
        if wq is None:
            raise NotImplementedError(
                f"convert: {type(wfq).__name__} has no integer qparams (a float format); "
                "float-format embeddings are not converted yet (float-format Linears are): "
                "keep them float, or give them an integer qconfig"
            )
        try:
            codes = quantize_codes(weight, wq)
        except ValueError:
            # Qparams not sized for the weight: its observer never ran (a model converted
            # right after prepare_qat, to load a saved state_dict into). It sees the weight
            # once, as the first forward would have.
            with torch.no_grad():
                wfq(weight)
            wq = wfq.qparams()
            assert wq is not None
            codes = quantize_codes(weight, wq)
    finally:
        wfq.enable_fake_quant(was_enabled)
    frozen = QParams(
        wq.scale.detach().clone() if isinstance(wq.scale, Tensor) else wq.scale,
        wq.zero_point.detach().clone() if isinstance(wq.zero_point, Tensor) else wq.zero_point,
        wq.quant_min,
        wq.quant_max,
        axis=wq.axis,
        group_size=wq.group_size,
    )
    return codes, frozen


class QuantizedEmbedding(SavedLayout):
    """Inference embedding table with integer codes and the qparams trained by QAT.

    Codes are stored as QuantizedLinear stores them (4-bit ranges packed two per byte along
    embedding_dim, else int8, else int16), with the scale and zero point per tensor, per row,
    per column or per group along embedding_dim (a float zero point per row for torch.ao's
    float-qparams embedding qconfigs). The forward gathers the looked-up rows' codes and
    dequantizes only them, as the QAT layer's fake quant did: the output equals the QAT
    layer's eval output bit for bit (max_norm renormalizes the rows as it does there).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        qweight: Tensor,
        weight_qparams: QParams,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, max_norm, norm_type
        wq = weight_qparams
        self.weight_dtype = weight_dtype
        self.register_buffer("qweight", _stored_codes(qweight, wq.quant_min, wq.quant_max))
        self.register_buffer("weight_scale", torch.as_tensor(wq.scale, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.as_tensor(wq.zero_point))
        self.register_buffer("weight_layout", weight_layout_tensor(wq))
        self._read_layout()

    def _read_layout(self) -> None:
        """Range and granularity, from the weight_layout buffer (read once, not per call)."""
        self.quant_min, self.quant_max, self.axis, self.group_size = read_weight_layout(
            self.weight_layout
        )
        self.packed_int4 = self.quant_max - self.quant_min <= 15

    def _row_qparams(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point broadcastable against the looked-up codes (n, dim) (or
        (n, groups, group_size) per group)."""
        scale, zp = self.weight_scale, self.weight_zero_point
        if self.group_size:
            rows = (self.num_embeddings, -1)
            return scale.view(rows)[idx].unsqueeze(-1), zp.view(rows)[idx].unsqueeze(-1)
        if self.axis is None:
            return scale.reshape(()), zp.reshape(())
        if self.axis % 2 == 0:  # per row
            return scale[idx].unsqueeze(-1), zp[idx].unsqueeze(-1)
        return scale.view(1, -1), zp.view(1, -1)  # per column

    def _rows(self, idx: Tensor) -> Tensor:
        """The dequantized rows idx (1-D) of the table, (len(idx), embedding_dim)."""
        # F.embedding on the codes: its own index checks, the looked-up rows only.
        codes = F.embedding(idx, self.qweight)
        if self.packed_int4:
            q = _unpack_int4(codes, self.quant_min, self.embedding_dim)
        else:
            q = codes.to(torch.int32)
        scale, zp = self._row_qparams(idx)
        q = q.to(torch.float32)
        if self.group_size:
            q = q.view(q.shape[0], -1, self.group_size)
        return _dequantize(q, scale, zp).reshape(-1, self.embedding_dim).to(self.weight_dtype)

    def dequantized_weight(self) -> Tensor:
        """The whole table, (q - zero_point) * scale as the QAT layer's fake quant computed it."""
        return self._rows(torch.arange(self.num_embeddings, device=self.qweight.device))

    def forward(self, input: Tensor) -> Tensor:
        y = self._rows(input.reshape(-1))
        if self.max_norm is not None and y.numel():
            rows = torch.arange(y.shape[0], device=y.device)
            torch.embedding_renorm_(y, rows, self.max_norm, self.norm_type)
        return y.reshape(*input.shape, self.embedding_dim)

    @classmethod
    def from_qat(cls, mod: QATEmbedding) -> QuantizedEmbedding:
        """Freeze a trained tq.nn.Embedding: its table quantized with its current qparams."""
        codes, wq = _frozen_weight(mod)
        return cls(
            mod.num_embeddings,
            mod.embedding_dim,
            codes,
            wq,
            mod.padding_idx,
            mod.max_norm,
            mod.norm_type,
            weight_dtype=mod.weight.dtype,
        ).to(mod.weight.device)


_SHARED_BUFFERS = ("qweight", "weight_scale", "weight_zero_point")


def _tie(new: torch.nn.Module, weight: Tensor, built: dict[int, list[torch.nn.Module]]) -> None:
    """Share the integer table between converted layers of one tied Parameter (an embedding
    and its lm_head) when both quantized it identically: same range and granularity, equal
    codes, scales and zero points. Otherwise each keeps its own codes (not tied any more)."""
    for other in built.setdefault(id(weight), []):
        same = (new.quant_min, new.quant_max, new.axis, new.group_size) == (
            other.quant_min,
            other.quant_max,
            other.axis,
            other.group_size,
        )
        mine = [getattr(new, n) for n in _SHARED_BUFFERS]
        theirs = [getattr(other, n) for n in _SHARED_BUFFERS]
        same = same and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            for a, b in zip(mine, theirs, strict=True)
        )
        if same:
            for name, tensor in zip(_SHARED_BUFFERS, theirs, strict=True):
                new.register_buffer(name, tensor)
            break
    built[id(weight)].append(new)


def quantize_codes(w: Tensor, qp: QParams) -> Tensor:
    """The integer codes q = clamp(rne(w / scale) + zp) of the fake quant with `qp` (int32)."""

    return quantized_codes_ref(w, normalize(w, qp))


def convert(model: torch.nn.Module, *, inplace: bool = False) -> torch.nn.Module:
    """Replace every tq.nn.Linear with a QuantizedLinear (QuantizedFloat8Linear for FP8 fake
    quant, QuantizedMicroscalingLinear for MX / NVFP4) and every tq.nn.Embedding with a
    QuantizedEmbedding (integer weights, trained qparams); no fake-quant module is left.
    Layers that shared one weight Parameter (a tied embedding and lm_head) share their integer
    table when both quantized it identically, else each keeps its own codes. With
    inplace=False the model is deep-copied first."""
    if not inplace:
        model = copy.deepcopy(model)
    if is_float8_layer(model):
        return QuantizedFloat8Linear.from_qat(model)
    if is_microscaling_layer(model):
        return QuantizedMicroscalingLinear.from_qat(model)
    if isinstance(model, QATLinear):
        return QuantizedLinear.from_qat(model)
    if isinstance(model, QATEmbedding):
        return QuantizedEmbedding.from_qat(model)
    built: dict[int, list[torch.nn.Module]] = {}

    def make(m: torch.nn.Module):
        if is_float8_layer(m):
            return QuantizedFloat8Linear.from_qat(m)  # not tied: its codes are float8
        if is_microscaling_layer(m):
            return QuantizedMicroscalingLinear.from_qat(m)  # not tied either
        if isinstance(m, QATLinear):
            new = QuantizedLinear.from_qat(m)
        elif isinstance(m, QATEmbedding):
            new = QuantizedEmbedding.from_qat(m)
        else:
            return None
        _tie(new, m.weight, built)
        return new

    swap_modules(model, make)
    return model
