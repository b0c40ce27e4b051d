"""convert for microscaling layers: a tq.nn.Linear trained with MXFakeQuantize (the "mxfp8_*" /
"mxfp4_*" qconfigs) or NVFP4FakeQuantize ("nvfp4_*") frozen into the weight's codes as the
format stores them, with its block scales (QuantizedMicroscalingLinear).

The layer's state_dict defines it whole, every value a plain tensor:

    qweight              MXFP8: float8_e4m3fn codes (out_features, in_features); MXFP4 /
                         NVFP4: e2m1 codes packed two per uint8 along in_features, low nibble
                         first (out_features, ceil(in_features / 2)); an e2m1 code is the sign
                         (bit 3) and the index of |value| in 0, 0.5, 1, 1.5, 2, 3, 4, 6
    weight_scale         one per block of `block_size` along in_features, (out_features,
                         in_features // block_size): MX: e8m0 codes as uint8 (2**(code - 127),
                         255 NaN); NVFP4: float8_e4m3fn
    weight_tensor_scale  NVFP4 only: the fp32 tensor scale (1,) (1.0 without one)
    bias                 as the QAT layer's (absent without one)
    microscaling_layout  int64 (7,): weight format (0 mxfp8, 1 mxfp4, 2 nvfp4), weight block
                         size, weight tensor scale (0 / 1), input format (-1 none, else as the
                         weight's), input block size, input tensor scale (0 / 1), input eps as
                         the bits of an fp32

Integers rather than floats, as flow/layout.py's: casting the model leaves them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_qat.flow.convert_float8 import apply_keeping_stored
from triton_qat.flow.layout import SavedLayout
from triton_qat.nn.linear import Linear as QATLinear
from triton_qat.numerics.float_formats import FLOAT8_EPS
from triton_qat.numerics.microscaling import (
    MX_FORMATS,
    NVFP4,
    MicroscalingFormat,
    mx_decode_scale_ref,
    mx_dequantize_ref,
    mx_quantize_ref,
    nvfp4_dequantize_ref,
    nvfp4_quantize_ref,
)
from triton_qat.ops.microscaling import (
    fake_quantize_mx,
    fake_quantize_nvfp4,
    quantized_mx_linear,
)
from triton_qat.quantizers import MXFakeQuantize, NVFP4FakeQuantize

FORMAT_NAMES = ("mxfp8", "mxfp4", "nvfp4")  # the codes of microscaling_layout: the index
LAYOUT_LEN = 7
NO_INPUT = -1
_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# The e2m1 index of |value| * 2 (0, 1, 2, 3, 4, 6, 8, 12); other entries never occur.
_E2M1_INDEX_OF_TWICE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


def _format(name: str) -> MicroscalingFormat:
    return NVFP4 if name == "nvfp4" else MX_FORMATS[name]


def _fp32_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())


def _fp32_from_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def pack_e2m1(q: Tensor) -> Tensor:
    """e2m1 values q (fp32, on the grid; a NaN, only in a block whose scale is NaN, stores 0)
    as codes packed two per uint8 along the last dim, low nibble first."""
    twice = torch.nan_to_num(q.abs() * 2, nan=0.0).to(torch.int64)
    codes = _E2M1_INDEX_OF_TWICE.to(q.device)[twice] | (torch.signbit(q).to(torch.uint8) << 3)
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def e2m1_values(codes: Tensor) -> Tensor:
    """The fp32 values of e2m1 codes (uint8, 0..15: sign in bit 3, magnitude index below)."""
    magnitude = _E2M1_VALUES.to(codes.device)[(codes & 0x07).to(torch.int64)]
    return torch.where((codes & 0x08) != 0, -magnitude, magnitude)


def unpack_e2m1(packed: Tensor, k: int) -> Tensor:
    """The fp32 e2m1 values of codes packed by pack_e2m1, the last dim cut to k."""
    return e2m1_values(torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[..., :k])


def layout_tensor(
    weight: str, block_size: int, tensor_scale: bool, input_quant: tuple | None
) -> Tensor:
    """microscaling_layout of a weight format and an input quantizer (format name, block
    size, tensor scale, eps) or None."""
    row = [FORMAT_NAMES.index(weight), block_size, int(tensor_scale)]
    if input_quant is None:
        row += [NO_INPUT, 0, 0, 0]
    else:
        name, size, per_tensor, eps = input_quant
        row += [FORMAT_NAMES.index(name), size, int(per_tensor), _fp32_bits(eps)]
    return torch.tensor(row, dtype=torch.int64)


def read_layout(t: Tensor) -> tuple[str, int, bool, tuple | None]:
    """(weight format, block size, tensor scale, input quantizer or None)."""
    if t.dtype != torch.int64 or tuple(t.shape) != (LAYOUT_LEN,):
        raise ValueError(
            f"microscaling_layout must be an int64 tensor of shape ({LAYOUT_LEN},), got "
            f"{t.dtype} {tuple(t.shape)}"
        )
    w, size, per_tensor, i, i_size, i_per_tensor, eps_bits = (int(v) for v in t.tolist())
    for what, code in (("weight", w), ("input", i)):
        if not (NO_INPUT if what == "input" else 0) <= code < len(FORMAT_NAMES):
            raise ValueError(f"microscaling_layout: {what} format code {code} is not known")
    for what, value in (("weight", size), ("input", i_size if i != NO_INPUT else 1)):
        if value <= 0:
            raise ValueError(f"microscaling_layout: {what} block size {value} is not positive")
    inputs = None
    if i != NO_INPUT:
        inputs = (FORMAT_NAMES[i], i_size, bool(i_per_tensor), _fp32_from_bits(eps_bits))
    return FORMAT_NAMES[w], size, bool(per_tensor), inputs


def _quantizer_spec(fq: torch.nn.Module) -> tuple[str, int, bool, float]:
    """(format, block size, tensor scale, eps) of an MXFakeQuantize / NVFP4FakeQuantize."""
    if isinstance(fq, MXFakeQuantize):
        return fq.fmt, fq.block_size, False, FLOAT8_EPS
    assert isinstance(fq, NVFP4FakeQuantize)
    return "nvfp4", fq.block_size, fq.per_tensor_scale, fq.eps


def is_microscaling_layer(mod: torch.nn.Module) -> bool:
    """Whether `mod` is a tq.nn.Linear with an MX / NVFP4 weight or input fake quant."""
    if not isinstance(mod, QATLinear):
        return False
    kinds = (MXFakeQuantize, NVFP4FakeQuantize)
    return isinstance(mod.weight_fake_quant, kinds) or isinstance(
        getattr(mod, "input_fake_quant", None), kinds
    )


def _stored_shapes(fmt: str, n: int, k: int, block_size: int) -> dict[str, tuple]:
    """(shape, dtype) of qweight, weight_scale (and weight_tensor_scale) for a layout."""
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide in_features {k}")
    blocks = (n, k // block_size)
    if fmt == "mxfp8":
        return {"qweight": ((n, k), torch.float8_e4m3fn), "weight_scale": (blocks, torch.uint8)}
    codes = ((n, (k + 1) // 2), torch.uint8)
    if fmt == "mxfp4":
        return {"qweight": codes, "weight_scale": (blocks, torch.uint8)}
    return {
        "qweight": codes,
        "weight_scale": (blocks, torch.float8_e4m3fn),
        "weight_tensor_scale": ((1,), torch.float32),
    }


_STORED = ("qweight", "weight_scale", "weight_tensor_scale")


class QuantizedMicroscalingLinear(SavedLayout):
    """Inference Linear with MXFP8 / MXFP4 / NVFP4 weights: the codes and block scales (and
    NVFP4's fp32 tensor scale) that the QAT layer's weight fake quant made of its weight.

    The forward fake-quantizes the input as the QAT layer did (dynamic, from each call's own
    input, in its format and blocks; or not at all for weight-only), dequantizes the weight
    (codes times scales in fp32, as the fake quant multiplies them, cast to the weight's dtype)
    and runs F.linear: its output equals the QAT layer's eval output bit for bit (eager).
    """

    _LAYOUT_KEY = "microscaling_layout"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: str,
        block_size: int,
        qweight: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None,
        weight_tensor_scale: Tensor | None = None,
        input_quant: tuple | None = None,
        weight_dtype: torch.dtype = torch.float32,
        tensor_scale: bool = True,
    ) -> None:
        super().__init__()
        if weight_format not in FORMAT_NAMES:
            raise ValueError(f"weight_format must be one of {FORMAT_NAMES}, got {weight_format!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_dtype = weight_dtype
        tensors = {"qweight": qweight, "weight_scale": weight_scale}
        if weight_format == "nvfp4":
            if weight_tensor_scale is None:
                raise ValueError("an NVFP4 weight needs its weight_tensor_scale")
            tensors["weight_tensor_scale"] = weight_tensor_scale.reshape(1)
        for name, (shape, dtype) in _stored_shapes(
            weight_format, out_features, in_features, block_size
        ).items():
            t = tensors[name]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"{name} must be {dtype} of shape {shape} for {weight_format} blocks of "
                    f"{block_size}, got {t.dtype} {tuple(t.shape)}"
                )
            self.register_buffer(name, t.detach().clone())
        if weight_format != "nvfp4":
            self.register_buffer("weight_tensor_scale", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        per_tensor = weight_format == "nvfp4" and tensor_scale
        self.register_buffer(
            "microscaling_layout", layout_tensor(weight_format, block_size, per_tensor, input_quant)
        )
        self._read_layout()

    def _read_layout(self) -> None:
        """The Python attributes the forward reads, from the microscaling_layout buffer (read
        once here: reading a tensor per call would synchronize with a GPU)."""
        layout = read_layout(self.microscaling_layout)
        self.weight_format, self.block_size, self.tensor_scale, self.input_quant = layout

    def _adopt_saved_layout(self, state_dict: dict, prefix: str) -> None:
        """Take the saved format and block size (and with them the dtypes and shapes of the
        codes and scales), checked against the layer's shape."""
        fmt, block_size, _, _ = read_layout(state_dict[prefix + self._LAYOUT_KEY])
        n, k = self.out_features, self.in_features
        shapes = _stored_shapes(fmt, n, k, block_size)
        for name, (shape, dtype) in shapes.items():
            saved = state_dict.get(prefix + name)
            if saved is not None and (saved.dtype != dtype or tuple(saved.shape) != shape):
                raise ValueError(
                    f"saved {name} is {saved.dtype} {tuple(saved.shape)}, a {n} x {k} layer "
                    f"with {fmt} weights in blocks of {block_size} needs {dtype} {shape} (a "
                    "state_dict of another architecture?)"
                )
        device = self.qweight.device
        for name in _STORED:
            if name in shapes:
                shape, dtype = shapes[name]
                self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
            else:
                self.register_buffer(name, None)

    def _apply(self, fn, recurse=True):
        # A cast of the model (model.half(), .to(torch.bfloat16)) would turn the float8 codes
        # and scales and the fp32 tensor scale into the new dtype: they only follow the device,
        # and the dequantized weight takes the new dtype.
        cast = apply_keeping_stored(self, super()._apply, fn, recurse, _STORED)
        if cast is not None:
            self.weight_dtype = cast
        return self

    def weight_values(self) -> Tensor:
        """The element values q (fp32), (out_features, in_features // block_size, block_size)."""
        n, k = self.out_features, self.in_features
        if self.weight_format == "mxfp8":
            q = self.qweight.to(torch.float32)
        else:
            q = unpack_e2m1(self.qweight, k)
        return q.reshape(n, k // self.block_size, self.block_size)

    def dequantized_weight(self) -> Tensor:
        """codes times scales in fp32, cast to the weight's dtype: the QAT layer's
        fake-quantized weight, bit for bit."""
        q = self.weight_values()
        if self.weight_format == "nvfp4":
            s_b = self.weight_scale.to(torch.float32)
            s_t = self.weight_tensor_scale.reshape(())  # type: ignore[union-attr]
            return nvfp4_dequantize_ref(q, s_t, s_b, self.weight_dtype)
        s = torch.where(self.weight_scale == 255, 128, self.weight_scale.to(torch.int32) - 127)
        return mx_dequantize_ref(q, s, self.weight_dtype)

    def fake_quantized_input(self, input: Tensor) -> Tensor:
        """The input as the forward multiplies it: fake-quantized in the input quantizer's
        format with scales from its own blocks, or unchanged for a weight-only layer."""
        if self.input_quant is None:
            return input
        fmt, block_size, per_tensor, eps = self.input_quant
        if fmt == "nvfp4":
            return fake_quantize_nvfp4(input, block_size, per_tensor, eps)
        return fake_quantize_mx(input, fmt, block_size)

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """The weight as mx_linear's GEMMs read it: element values as float8_e4m3fn codes
        (out_features, in_features) (e2m1 and e4m3 values are e4m3 values) and one fp32
        decode scale per block (2**s, NaN for s = 128; NVFP4: s_t * s_b, one fp32 multiply)."""
        n, k = self.out_features, self.in_features
        if self.weight_format == "mxfp8":
            codes = self.qweight
        else:
            codes = unpack_e2m1(self.qweight, k).to(torch.float8_e4m3fn)
        if self.weight_format == "nvfp4":
            s_t = self.weight_tensor_scale.reshape(())  # type: ignore[union-attr]
            scale = s_t * self.weight_scale.to(torch.float32)
        else:
            s = torch.where(self.weight_scale == 255, 128, self.weight_scale.to(torch.int32) - 127)
            scale = mx_decode_scale_ref(s)
        return codes, scale.reshape(n, k // self.block_size)

    def forward(self, input: Tensor) -> Tensor:
        """The QAT layer's eval output, bit for bit: mx_linear's forward kernels reading the
        stored codes on the Triton path, else F.linear of the fake-quantized input and the
        dequantized weight."""
        codes, scale = self.weight_codes()
        return quantized_mx_linear(
            input, codes, scale, self.bias, self.weight_dtype, self.input_quant
        )

    def extra_repr(self) -> str:
        inputs = "none"
        if self.input_quant is not None:
            inputs = f"{self.input_quant[0]} blocks of {self.input_quant[1]}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={self.weight_format} blocks of {self.block_size}, input={inputs}"
        )

    @classmethod
    def placeholder(
        cls, in_features: int, out_features: int, bias: Tensor | None, weight_dtype: torch.dtype
    ) -> QuantizedMicroscalingLinear:
        """A zero MXFP8 layer with one block per row (any in_features), for load_state_dict to
        fill in (it adopts the saved format and block size)."""
        n, k = out_features, in_features
        codes = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
        scales = torch.full((n, 1), 127, dtype=torch.uint8)
        return cls(k, n, "mxfp8", max(k, 1), codes, scales, bias, weight_dtype=weight_dtype)

    @classmethod
    def from_qat(cls, mod: QATLinear) -> QuantizedMicroscalingLinear:
        """Freeze a trained tq.nn.Linear with MX / NVFP4 fake quant: the weight as it is now,
        quantized by its fake quant's rules (as if enabled): element codes, block scales and
        (NVFP4) the tensor scale of the weight's own amax."""
        wfq = mod.weight_fake_quant
        kinds = (MXFakeQuantize, NVFP4FakeQuantize)
        if not isinstance(wfq, kinds):
            raise NotImplementedError(
                f"convert: an MX / NVFP4 input quantizer with a {type(wfq).__name__} weight "
                "fake quant is not supported; give the weight a microscaling fake quant as well"
            )
        fmt, block_size, per_tensor, eps = _quantizer_spec(wfq)
        weight = mod.weight.detach()
        tensor_scale = None
        if fmt == "nvfp4":
            q, s_t, s_b = nvfp4_quantize_ref(weight, block_size, per_tensor, eps)
            scales = s_b.to(torch.float8_e4m3fn)
            tensor_scale = s_t.reshape(1)
        else:
            q, s = mx_quantize_ref(weight, _format(fmt), block_size)
            scales = torch.where(s > 127, 255, s + 127).to(torch.uint8)
        q = q.flatten(-2)
        codes = q.to(torch.float8_e4m3fn) if fmt == "mxfp8" else pack_e2m1(q)
        ifq = getattr(mod, "input_fake_quant", None)
        input_quant = None
        if ifq is not None and bool(ifq.fake_quant_enabled[0]):
            if not isinstance(ifq, kinds):
                raise NotImplementedError(
                    f"convert: an {fmt} weight with a {type(ifq).__name__} input fake quant is "
                    "not supported; give the input an MX / NVFP4 fake quant (the *_dynamic "
                    "qconfigs) or none"
                )
            input_quant = _quantizer_spec(ifq)
        layer = cls(
            mod.in_features,
            mod.out_features,
            fmt,
            block_size,
            codes,
            scales,
            mod.bias,
            tensor_scale,
            input_quant,
            weight_dtype=mod.weight.dtype,
            tensor_scale=per_tensor,
        )
        return layer.to(mod.weight.device)
