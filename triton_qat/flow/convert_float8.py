"""convert for FP8 layers: a tq.nn.Linear trained with Float8FakeQuantize (the "fp8_dynamic"
/ "fp8_weight_only" qconfigs) frozen into float8 weight codes with their scales
(QuantizedFloat8Linear).

The layer's state_dict defines it whole, every value a plain tensor:

    qweight        float8_e4m3fn (or float8_e5m2) codes, (out_features, in_features)
    weight_scale   fp32, (out_features, 1) per row, (1, 1) per tensor
    bias           as the QAT layer's (absent without one)
    float8_layout  int64 (5,): weight format (0 float8_e4m3fn, 1 float8_e5m2), weight
                   granularity (0 per tensor, 1 per row), input kind (0 none, 1 dynamic per
                   tensor, 2 dynamic per token), input format, input eps as the bits of an fp32

Integers rather than floats, as flow/layout.py's: casting the model leaves them as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat.flow.layout import SavedLayout
from triton_qat.nn.linear import Linear as QATLinear
from triton_qat.numerics.float_formats import (
    FORMATS,
    Float8Format,
    choose_scale_float8_ref,
    round_to_float8_ref,
)
from triton_qat.ops.float_formats import fake_quantize_float8, quantized_fp8_linear
from triton_qat.quantizers import Float8FakeQuantize

_FORMAT_NAMES = tuple(FORMATS)  # the codes of float8_layout: index in this tuple
WEIGHT_PER_TENSOR, WEIGHT_PER_ROW = 0, 1
INPUT_NONE, INPUT_PER_TENSOR, INPUT_PER_TOKEN = 0, 1, 2
FLOAT8_LAYOUT_LEN = 5
# A function given to Module._apply casts when it changes the dtype of one of these.
_PROBE_DTYPES = (torch.float32, torch.float16)


def _fp32_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())


def _fp32_from_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _format_code(fmt: Float8Format) -> int:
    return _FORMAT_NAMES.index(fmt.name)


def _format_of(code: int, what: str) -> Float8Format:
    if not 0 <= code < len(_FORMAT_NAMES):
        raise ValueError(f"float8_layout: {what} format code {code} is not one of 0..1")
    return FORMATS[_FORMAT_NAMES[code]]


def float8_layout_tensor(
    weight_format: Float8Format,
    per_row: bool,
    input_granularity: str | None,
    input_format: Float8Format | None,
    input_eps: float,
) -> Tensor:
    if input_granularity is None:
        kind, fmt_code, eps_bits = INPUT_NONE, 0, 0
    else:
        assert input_format is not None
        kind = INPUT_PER_TENSOR if input_granularity == "per_tensor" else INPUT_PER_TOKEN
        fmt_code, eps_bits = _format_code(input_format), _fp32_bits(input_eps)
    row = [_format_code(weight_format), WEIGHT_PER_ROW if per_row else WEIGHT_PER_TENSOR]
    row += [kind, fmt_code, eps_bits]
    return torch.tensor(row, dtype=torch.int64)


def read_float8_layout(
    t: Tensor,
) -> tuple[Float8Format, bool, str | None, Float8Format | None, float]:
    """(weight format, per_row, input granularity or None, input format or None, input eps)."""
    if t.dtype != torch.int64 or tuple(t.shape) != (FLOAT8_LAYOUT_LEN,):
        raise ValueError(
            f"float8_layout must be an int64 tensor of shape ({FLOAT8_LAYOUT_LEN},), got "
            f"{t.dtype} {tuple(t.shape)}"
        )
    w_code, per_row, kind, i_code, eps_bits = (int(v) for v in t.tolist())
    weight_format = _format_of(w_code, "weight")
    if per_row not in (WEIGHT_PER_TENSOR, WEIGHT_PER_ROW):
        raise ValueError(f"float8_layout: weight granularity {per_row} is not 0 or 1")
    if kind == INPUT_NONE:
        return weight_format, bool(per_row), None, None, 0.0
    if kind not in (INPUT_PER_TENSOR, INPUT_PER_TOKEN):
        raise ValueError(f"float8_layout: input kind {kind} is not one of 0..2")
    granularity = "per_tensor" if kind == INPUT_PER_TENSOR else "per_token"
    return (
        weight_format,
        bool(per_row),
        granularity,
        _format_of(i_code, "input"),
        (_fp32_from_bits(eps_bits)),
    )


def apply_keeping_stored(
    module: torch.nn.Module, apply, fn, recurse: bool, names: tuple[str, ...]
) -> torch.dtype | None:
    """Module._apply (`apply`, the bound super()._apply) with the buffers `names` held out:
    they follow fn's device but keep their dtype (stored codes and scales). Returns the
    floating dtype fn casts to (the dequantized weight's new dtype), or None."""
    kept = {name: module._buffers.pop(name) for name in names if name in module._buffers}
    device = next(t.device for t in kept.values() if t is not None)
    try:
        apply(fn, recurse)
        probes = [fn(torch.empty(0, dtype=d, device=device)) for d in _PROBE_DTYPES]
    finally:
        module._buffers.update(kept)
    if not all(isinstance(p, Tensor) for p in probes):
        return None
    for name, t in kept.items():
        module._buffers[name] = None if t is None else t.to(probes[0].device)
    cast = [p.dtype for p, d in zip(probes, _PROBE_DTYPES, strict=True) if p.dtype != d]
    return cast[0] if cast and cast[0].is_floating_point else None


def is_float8_layer(mod: torch.nn.Module) -> bool:
    """Whether `mod` is a tq.nn.Linear with an FP8 weight or input fake quant."""
    if not isinstance(mod, QATLinear):
        return False
    ifq = getattr(mod, "input_fake_quant", None)
    return isinstance(mod.weight_fake_quant, Float8FakeQuantize) or isinstance(
        ifq, Float8FakeQuantize
    )


class QuantizedFloat8Linear(SavedLayout):
    """Inference Linear with FP8 weights: float8 codes and the fp32 scales the QAT layer's
    fake quant used (one per output row, or one per tensor).

    The forward fake-quantizes the input as the QAT layer did (dynamic, from each call's own
    input: per token or per tensor; or not at all for weight-only) and multiplies it with the
    stored weight: on the Triton path tq.fp8_linear's forward kernels reading these codes
    (the FP8 tensor-core GEMM where it runs), else F.linear of the dequantized weight (codes
    times scale in fp32, cast to the weight's dtype). Either way its output equals the QAT
    layer's eval output on the same path bit for bit.
    """

    _LAYOUT_KEY = "float8_layout"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        codes: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        per_row: bool = True,
        input_granularity: str | None = None,
        input_format: Float8Format | None = None,
        input_eps: float = 0.0,
        weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_dtype = weight_dtype
        if codes.dtype not in tuple(f.dtype for f in FORMATS.values()):
            raise TypeError(f"codes must be a float8 tensor, got {codes.dtype}")
        if tuple(codes.shape) != (out_features, in_features):
            raise ValueError(
                f"codes must have shape ({out_features}, {in_features}), got {tuple(codes.shape)}"
            )
        scale = weight_scale.detach().to(torch.float32).reshape(-1, 1).clone()
        if scale.shape[0] != (out_features if per_row else 1):
            what = f"{out_features} scales (per row)" if per_row else "1 scale (per tensor)"
            raise ValueError(f"weight_scale must hold {what}, got {scale.shape[0]}")
        fmt = next(f for f in FORMATS.values() if f.dtype == codes.dtype)
        self.register_buffer("qweight", codes.detach().clone())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer(
            "float8_layout",
            float8_layout_tensor(fmt, per_row, input_granularity, input_format, input_eps),
        )
        self._read_layout()

    def _read_layout(self) -> None:
        """The Python attributes the forward reads, from the float8_layout buffer (read once
        here: reading a tensor per call would synchronize with a GPU)."""
        layout = read_float8_layout(self.float8_layout)
        self.weight_format, self.per_row = layout[0], layout[1]
        self.input_granularity, self.input_format, self.input_eps = layout[2:]

    def _adopt_saved_layout(self, state_dict: dict, prefix: str) -> None:
        """Take the saved format and granularity (and with them the dtype of the codes and the
        number of scales), checked against the layer's shape."""
        weight_format, per_row, *_ = read_float8_layout(state_dict[prefix + self._LAYOUT_KEY])
        n, k = self.out_features, self.in_features
        codes = state_dict.get(prefix + "qweight")
        if codes is not None and (codes.dtype != weight_format.dtype or codes.shape != (n, k)):
            raise ValueError(
                f"saved qweight is {codes.dtype} {tuple(codes.shape)}, a {n} x {k} layer with "
                f"{weight_format.name} weights needs {weight_format.dtype} ({n}, {k}) (a "
                "state_dict of another architecture?)"
            )
        scale = state_dict.get(prefix + "weight_scale")
        want = (n if per_row else 1, 1)
        if scale is not None and tuple(scale.shape) != want:
            raise ValueError(f"saved weight_scale has shape {tuple(scale.shape)}, needs {want}")
        device = self.qweight.device
        self.register_buffer("qweight", torch.empty(n, k, dtype=weight_format.dtype, device=device))
        self.register_buffer("weight_scale", torch.empty(want, dtype=torch.float32, device=device))

    def _apply(self, fn, recurse=True):
        # A cast of the model (model.half(), .to(torch.bfloat16)) would turn the codes and
        # the fp32 scales into the new dtype (float8 is a floating dtype): they only follow the
        # device, and the dequantized weight takes the new dtype.
        cast = apply_keeping_stored(self, super()._apply, fn, recurse, ("qweight", "weight_scale"))
        if cast is not None:
            self.weight_dtype = cast
        return self

    def dequantized_weight(self) -> Tensor:
        """codes * scale in fp32, cast to the weight's dtype: the QAT layer's fake-quantized
        weight, bit for bit."""
        w = self.qweight.to(torch.float32) * self.weight_scale.to(torch.float32)
        return w.to(self.weight_dtype)

    def fake_quantized_input(self, input: Tensor) -> Tensor:
        """The input as the forward multiplies it: fake-quantized with a scale from its own
        amax (per token or per tensor), or unchanged for a weight-only layer."""
        if self.input_granularity is None:
            return input
        assert self.input_format is not None
        return fake_quantize_float8(
            input, self.input_format.dtype, self.input_granularity, self.input_eps
        )

    def forward(self, input: Tensor) -> Tensor:
        """The QAT layer's eval output, bit for bit: the same kernels (tq.fp8_linear's forward,
        the FP8 tensor-core GEMM where it runs) reading the stored codes, or on the eager
        path F.linear of the fake-quantized input and the dequantized weight."""
        input_dtype = None
        if self.input_granularity is not None:
            assert self.input_format is not None
            input_dtype = self.input_format.name
        return quantized_fp8_linear(
            input,
            self.qweight,
            self.weight_scale,
            self.bias,
            self.weight_dtype,
            input_dtype,
            self.input_granularity,
            self.input_eps,
        )

    def extra_repr(self) -> str:
        inputs = (
            "none"
            if self.input_granularity is None
            else f"{self.input_format.name} {self.input_granularity}"  # type: ignore[union-attr]
        )
        weight = f"{self.weight_format.name} {'per_row' if self.per_row else 'per_tensor'}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={weight}, input={inputs}"
        )

    @classmethod
    def from_qat(cls, mod: QATLinear) -> QuantizedFloat8Linear:
        """Freeze a trained tq.nn.Linear with FP8 fake quant: its weight's scale from the
        weight as it is now (exactly the scale its fake quant uses), the codes the rounded
        values round_to_float8(w / scale) (float8 values, so stored exactly)."""
        wfq = mod.weight_fake_quant
        if not isinstance(wfq, Float8FakeQuantize):
            raise NotImplementedError(
                f"convert: an FP8 input quantizer with a {type(wfq).__name__} weight fake "
                "quant is not supported; give the weight an FP8 fake quant as well"
            )
        fmt = FORMATS[str(wfq.dtype).removeprefix("torch.")]
        weight = mod.weight.detach()
        granularity = "per_tensor" if wfq.granularity == "per_tensor" else "per_row"
        scale = choose_scale_float8_ref(weight, fmt, granularity, wfq.eps)
        codes = round_to_float8_ref(weight.float() / scale, fmt).to(fmt.dtype)
        ifq = getattr(mod, "input_fake_quant", None)
        input_granularity, input_format, eps = None, None, 0.0
        if ifq is not None and bool(ifq.fake_quant_enabled[0]):
            if not isinstance(ifq, Float8FakeQuantize):
                raise NotImplementedError(
                    f"convert: an FP8 weight with a {type(ifq).__name__} input fake quant is "
                    "not supported; give the input an FP8 fake quant (fp8_dynamic) or none"
                )
            input_granularity = "per_tensor" if ifq.granularity == "per_tensor" else "per_token"
            input_format = FORMATS[str(ifq.dtype).removeprefix("torch.")]
            eps = ifq.eps
        layer = cls(
            mod.in_features,
            mod.out_features,
            codes,
            scale,
            mod.bias,
            granularity == "per_row",
            input_granularity,
            input_format,
            eps,
            weight_dtype=mod.weight.dtype,
        )
        return layer.to(mod.weight.device)
