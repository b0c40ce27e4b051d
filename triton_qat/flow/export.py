"""Export of a converted transformers model to the compressed-tensors checkpoint format, the
one Hugging Face transformers and vLLM load for integer-quantized models.

    tq.export_compressed_tensors(model, directory, *, overwrite=False)

Writes config.json (the model's config with a quantization_config: quant_method
"compressed-tensors", quantization_status "compressed", the format at the top and in each
config group) and model.safetensors. Each QuantizedLinear's codes are stored as the format
stores them, offset to its signed range [-2**(b-1), 2**(b-1) - 1] (a zero point moves with
them): 8-bit weights with quantized inputs as int8 "weight" ("int-quantized"), every other
weight packed little-endian along in_features into int32 words ("pack-quantized": b bits per
code, 32 / b codes per word, weight_shape beside them), with weight_scale (and
weight_zero_point for asymmetric weights). Each QuantizedFloat8Linear goes out
"float-quantized": its float8_e4m3fn codes as "weight", its fp32 weight_scale ((N, 1) per
channel, (1,) per tensor), a dynamic float input per token or per tensor. Each
QuantizedMicroscalingLinear goes out as flow/export_microscaling.py says ("mxfp8-quantized",
"mxfp4-pack-quantized", "nvfp4-pack-quantized"; weight-only). Linears left float go to the
ignore list.

Every layer is checked before anything is written: a layout the format cannot express (float
zero points, per-channel qparams along in_features, a range that is not b-bit, an unsigned
symmetric input whose zero point is off centre) is a ValueError naming the layer and why.
Only safetensors is needed to write; loading needs transformers and compressed-tensors.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from triton_qat.flow.convert import QuantizedEmbedding, QuantizedLinear
from triton_qat.flow.convert_float8 import QuantizedFloat8Linear
from triton_qat.flow.convert_microscaling import QuantizedMicroscalingLinear
from triton_qat.flow.export_microscaling import export_microscaling_layer
from triton_qat.flow.serialize import (
    WEIGHTS_NAME,
    plain_state_dict,
    write_directory,
)
from triton_qat.nn.embedding import Embedding as QATEmbedding
from triton_qat.nn.linear import Linear as QATLinear
from triton_qat.numerics.float_formats import FLOAT8_EPS

INT_QUANTIZED, PACK_QUANTIZED = "int-quantized", "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
# QuantizedLinear's own entries, replaced by the format's (bias is kept as it is).
_OWN_KEYS = (
    "qweight",
    "weight_scale",
    "weight_zero_point",
    "weight_layout",
    "input_layout",
    "input_scale",
    "input_zero_point",
    "float8_layout",
    "microscaling_layout",
    "weight_tensor_scale",
)


@dataclass
class ExportedLayer:
    """One QuantizedLinear in the format: its scheme (a JSON-able dict) and tensors."""

    scheme: dict
    tensors: dict[str, Tensor] = field(default_factory=dict)
    differing: int = 0  # weights the format decodes to other values than ours (NVFP4 ties)


def _bits(quant_min: int, quant_max: int, what: str) -> tuple[int, int]:
    """(num_bits, offset): codes q map to q - offset in [-2**(b-1), 2**(b-1) - 1]."""
    span = quant_max - quant_min + 1
    bits = span.bit_length() - 1
    if span != 1 << bits or not 1 <= bits <= 8:
        raise ValueError(
            f"{what} range [{quant_min}, {quant_max}] holds {span} values, not 2**b with "
            "b in 1..8 (the format's integer types)"
        )
    return bits, quant_min + (1 << (bits - 1))


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Signed b-bit codes (N, K) as the format packs them: q + 2**(b-1), 32 / b codes per
    int32 word, code j of a row in bits b*(j % (32/b)) of word j // (32/b) (little-endian
    along in_features; compressed_tensors' pack_to_int32 for b dividing 32)."""
    if 32 % bits:
        raise ValueError(f"{bits}-bit codes do not divide an int32 word")
    per_word = 32 // bits
    n, k = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1))).view(n, -1)
    pad = -k % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (u.view(n, -1, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _weight_args(layer: QuantizedLinear, name: str) -> tuple[dict, dict[str, Tensor], str]:
    if layer.weight_zero_point.is_floating_point():
        raise ValueError(f"layer {name!r}: float weight zero points have no place in the format")
    bits, offset = _bits(layer.quant_min, layer.quant_max, f"layer {name!r}: weight")
    codes = layer.weight_codes() - offset
    zp = layer.weight_zero_point.to(torch.int32) - offset
    n, k = layer.out_features, layer.in_features
    if layer.group_size:
        strategy, qshape = "group", (n, k // layer.group_size)
    elif layer.axis is not None:
        if layer.axis not in (0, -2):
            raise ValueError(
                f"layer {name!r}: per-channel weight qparams along in_features (axis "
                f"{layer.axis}); the format has them per output channel only"
            )
        strategy, qshape = "channel", (n, 1)
    else:
        strategy, qshape = "tensor", (1,)
    symmetric = bool((zp == 0).all())
    if not symmetric and strategy == "tensor":
        raise ValueError(f"layer {name!r}: an asymmetric per-tensor weight is not exported")
    args = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": layer.group_size if strategy == "group" else None,
        "strategy": strategy,
        "dynamic": False,
    }
    tensors = {"weight_scale": layer.weight_scale.float().reshape(qshape).clone()}
    quantized_input = layer.dynamic_input is not None or layer.input_range is not None
    fmt = INT_QUANTIZED if bits == 8 and quantized_input else PACK_QUANTIZED
    if fmt == INT_QUANTIZED:
        tensors["weight"] = codes.to(torch.int8)
        if not symmetric:
            tensors["weight_zero_point"] = zp.reshape(qshape).to(torch.int8)
    else:
        tensors["weight_packed"] = pack_int32(codes, bits)
        tensors["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not symmetric:
            # The format packs zero points along out_features (dim 0).
            tensors["weight_zero_point"] = pack_int32(zp.reshape(qshape).t(), bits).t()
    return args, tensors, fmt


def _input_args(layer: QuantizedLinear, name: str) -> tuple[dict | None, dict[str, Tensor]]:
    spec = layer.dynamic_input
    if spec is not None:
        bits, offset = _bits(spec.quant_min, spec.quant_max, f"layer {name!r}: input")
        if spec.symmetric and spec.symmetric_zero_point != offset:
            raise ValueError(
                f"layer {name!r}: symmetric per-token input with zero point "
                f"{spec.symmetric_zero_point} off the centre of [{spec.quant_min}, "
                f"{spec.quant_max}]"
            )
        args = {"num_bits": bits, "type": "int", "symmetric": spec.symmetric}
        args |= {"group_size": None, "strategy": "token", "dynamic": True}
        return args, {}
    if layer.input_range is None:
        return None, {}
    qmin, qmax = layer.input_range
    bits, offset = _bits(qmin, qmax, f"layer {name!r}: input")
    if layer.input_scale.numel() != 1 or layer.input_zero_point.is_floating_point():
        raise ValueError(f"layer {name!r}: static input qparams must be per tensor, integer")
    zp = layer.input_zero_point.to(torch.int32).reshape(1) - offset
    symmetric = bool((zp == 0).all())
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric}
    args |= {"group_size": None, "strategy": "tensor", "dynamic": False}
    tensors = {"input_scale": layer.input_scale.float().reshape(1).clone()}
    if not symmetric:
        tensors["input_zero_point"] = zp.to(torch.int8)
    return args, tensors


def export_float8_layer(layer: QuantizedFloat8Linear, name: str) -> ExportedLayer:
    """The format's scheme and tensors of one QuantizedFloat8Linear ("float-quantized": the
    float8_e4m3fn codes as "weight", the fp32 weight_scale); ValueError naming `name` where
    the format cannot express it (its only 8-bit float is float8_e4m3fn, its dynamic input
    scale has no eps of its own)."""
    formats = [("weight", layer.weight_format)]
    if layer.input_format is not None:
        formats.append(("input", layer.input_format))
    for what, fmt in formats:
        if fmt.dtype != torch.float8_e4m3fn:
            raise ValueError(
                f"layer {name!r}: {what} format {fmt.name}; the format's 8-bit float is "
                "float8_e4m3fn only"
            )
    float8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    strategy = "channel" if layer.per_row else "tensor"
    weights = float8 | {"strategy": strategy, "dynamic": False}
    scale = layer.weight_scale.float()
    tensors = {
        "weight": layer.qweight.clone(),
        "weight_scale": (scale.reshape(-1, 1) if layer.per_row else scale.reshape(1)).clone(),
    }
    inputs = None
    if layer.input_granularity is not None:
        if torch.tensor(layer.input_eps, dtype=torch.float32) != FLOAT8_EPS:
            raise ValueError(
                f"layer {name!r}: input eps {layer.input_eps}; the format's dynamic scale "
                f"matches only the default eps {FLOAT8_EPS}"
            )
        token = layer.input_granularity == "per_token"
        inputs = float8 | {"strategy": "token" if token else "tensor", "dynamic": True}
    scheme = {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": inputs,
        "output_activations": None,
        "format": FLOAT_QUANTIZED,
    }
    return ExportedLayer(scheme, tensors)


def export_layer(layer: torch.nn.Module, name: str) -> ExportedLayer:
    """The format's scheme and tensors of one QuantizedLinear (QuantizedFloat8Linear,
    QuantizedMicroscalingLinear); ValueError naming `name` and the reason where the format
    cannot express its layout."""
    if isinstance(layer, QuantizedFloat8Linear):
        return export_float8_layer(layer, name)
    if isinstance(layer, QuantizedMicroscalingLinear):
        return ExportedLayer(*export_microscaling_layer(layer, name))
    assert isinstance(layer, QuantizedLinear)
    weights, tensors, fmt = _weight_args(layer, name)
    inputs, input_tensors = _input_args(layer, name)
    scheme = {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": inputs,
        "output_activations": None,
        "format": fmt,
    }
    return ExportedLayer(scheme, tensors | input_tensors)


def quantization_config(layers: dict[str, ExportedLayer], ignore: list[str]) -> dict:
    """The config.json entry: one config group per distinct scheme (its targets the layer
    names when the model mixes schemes, else every Linear not ignored)."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, layer in layers.items():
        key = json.dumps(layer.scheme, sort_keys=True)
        groups.setdefault(key, (layer.scheme, []))[1].append(name)
    config_groups = {}
    for i, (scheme, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = scheme | (
            {"targets": ["Linear"]} if len(groups) == 1 else {"targets": names}
        )
    formats = {scheme["format"] for scheme, _ in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def export_compressed_tensors(
    model: torch.nn.Module, directory: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a converted transformers PreTrainedModel as a compressed-tensors checkpoint
    that transformers.AutoModelForCausalLM.from_pretrained(directory) (and vLLM) loads.

    Errors, raised before anything is written: TypeError for a model without a transformers
    config; ValueError for a model with no QuantizedLinear (never converted) or with a
    tq.nn.Linear left (converted only in part), and for a layer the format cannot express
    (naming it and why); FileExistsError when `directory` exists, unless overwrite."""
    # safetensors is an optional dependency (the "serve" extra).
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(
            "export_compressed_tensors: model must be a transformers PreTrainedModel (with a "
            f"config), got {type(model).__name__}"
        )
    kinds = (QuantizedLinear, QuantizedFloat8Linear, QuantizedMicroscalingLinear)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    if not quantized:
        raise ValueError(
            "export_compressed_tensors: the model has no QuantizedLinear; convert it first "
            "(tq.convert after tq.prepare_qat and training)"
        )
    qat_left = [n for n, m in model.named_modules() if isinstance(m, (QATLinear, QATEmbedding))]
    if qat_left:
        raise ValueError(
            f"export_compressed_tensors: layer {qat_left[0]!r} is still a QAT layer; "
            "convert the whole model (tq.convert)"
        )
    if Path(directory).exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    layers = {name: export_layer(layer, name) for name, layer in quantized.items()}
    differing = {name: layer.differing for name, layer in layers.items() if layer.differing}
    if differing:
        warnings.warn(
            f"export_compressed_tensors: the format decodes {sum(differing.values())} NVFP4 "
            f"weights of {len(differing)} layers (first {next(iter(differing))!r}) one bf16 "
            "step from triton_qat's: its global scale is the reciprocal of the tensor scale, "
            "and these weights sit at bf16 ties (flow/export_microscaling.py)",
            stacklevel=2,
        )
    ignore = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]

    # Embedding tables go out dequantized, as float weights: the format quantizes Linear
    # layers; the values are the converted table's, bit for bit.
    tables = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
    state = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if (prefix in layers and leaf in _OWN_KEYS) or prefix in tables:
            continue
        state[key] = value
    for name, table in tables.items():
        with torch.no_grad():
            state[f"{name}.weight"] = table.dequantized_weight()
    for name, layer in layers.items():
        state |= {f"{name}.{leaf}": t for leaf, t in layer.tensors.items()}
    state = plain_state_dict(state)
    config_dict = config.to_dict()
    config_dict["quantization_config"] = quantization_config(layers, ignore)

    def write(tmp: Path) -> None:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))

    return write_directory(directory, overwrite, write)
