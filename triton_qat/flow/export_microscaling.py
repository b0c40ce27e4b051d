"""Export of QuantizedMicroscalingLinear layers (MXFP8 / MXFP4 / NVFP4 weights) to the
compressed-tensors checkpoint format (flow/export.py writes the checkpoint).

What the format (compressed-tensors 0.20) holds, and how each layer goes out:

    MXFP8 weight, blocks of 32    "mxfp8-quantized": `weight` float8_e4m3fn codes, `weight_scale`
                                  e8m0 codes as uint8 (N, K / 32); args type "float", 8 bits,
                                  strategy "group", group_size 32, scale_dtype uint8
    MXFP4 weight, blocks of 32    "mxfp4-pack-quantized": `weight_packed` (e2m1 codes two per
                                  uint8, low nibble first, sign in bit 3: the layer's own
                                  packing), `weight_scale` as MXFP8's; 4 bits, "group", 32
    NVFP4 weight, blocks of 16    "nvfp4-pack-quantized": `weight_packed`, `weight_scale`
                                  float8_e4m3fn (N, K / 16), `weight_global_scale` fp32 (1,);
                                  4 bits, strategy "tensor_group", group_size 16, scale_dtype
                                  float8_e4m3fn. The format decodes bf16(q * (s_b / g)) in
                                  fp32: its global scale g is the reciprocal of triton_qat's
                                  tensor scale s_t (decode bf16(q * (s_t * s_b))). g is the
                                  fp32 value nearest 1 / s_t, or the neighbour of it that leaves
                                  the fewest weights different (none, mostly). Where the product
                                  of q, s_b and the exact s_t falls on a bf16 tie, the two fp32
                                  roundings may take it to either side: such weights decode one
                                  bf16 step from ours (export_compressed_tensors warns, with the
                                  count); all others decode to ours bit for bit.
The format decompresses these weights to bfloat16 (its e8m0 scales and e2m1 values decode to
bf16), so a model of another dtype would not run after loading: the layers must be bf16 (a
converted model cast with model.to(torch.bfloat16) keeps its codes and scales). Decoded, the
weights then equal the layer's dequantized_weight() bit for bit.

Where the format cannot express a layer: a ValueError naming it, raised before anything is
written. Dynamic inputs (mxfp8_dynamic, mxfp4_dynamic, nvfp4_dynamic): the format's dynamic MX
block scale rounds the block amax to the nearest power of two with one mantissa bit
(compressed_tensors round_to_power_2: amax with a mantissa from 1.75 up gets twice triton_qat's
scale, OCP MX's floor rule, which saturates such blocks instead), and its NVFP4 input global
scale is static (calibrated `input_global_scale`) where triton_qat's comes from each input's
amax. Other block sizes (the format's MX groups are 32, NVFP4's 16), a block whose scale is
NaN (an inf or a NaN in the weight; the format reads e8m0 code 255 as 2**128) and a non-finite
tensor scale are errors too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat.flow.convert_microscaling import QuantizedMicroscalingLinear, e2m1_values

MXFP8_QUANTIZED = "mxfp8-quantized"
MXFP4_PACK_QUANTIZED = "mxfp4-pack-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"
# The format's group size for each weight format (its compressors pick by group size).
FORMAT_GROUP_SIZE = {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}
# Neighbours of 1 / s_t tried as the NVFP4 global scale (fp32 steps either side).
_GLOBAL_SCALE_STEPS = 8


def _float_args(bits: int, strategy: str, group_size: int, scale_dtype: str) -> dict:
    return {
        "num_bits": bits,
        "type": "float",
        "symmetric": True,
        "group_size": group_size,
        "strategy": strategy,
        "dynamic": False,
        "scale_dtype": scale_dtype,
    }


def _format_decode(q: Tensor, s_b: Tensor, g: Tensor) -> Tensor:
    """The format's NVFP4 decode on CPU (compressed-tensors 0.20 NVFP4PackedCompressor
    .decompress): e2m1 values and block scales in bf16, scale = s_b / g in fp32 (bf16 / fp32
    promotes), q * scale in fp32, cast to bf16."""
    return (q * (s_b.bfloat16().float() / g)).bfloat16()


def nvfp4_global_scale(layer: QuantizedMicroscalingLinear) -> tuple[Tensor, int]:
    """(g, differing): the fp32 global scale (1,) the format divides the block scales by, and
    how many of the layer's weights its decode bf16(q * (s_b / g)) leaves other than ours,
    bf16(q * (s_t * s_b)). g is the fp32 value nearest 1 / s_t, or the first of its
    neighbours that leaves fewer weights different (counted on every (|q|, s_b) pair the layer
    holds, times how often it occurs). Differences sit at bf16 ties, one bf16 step each."""
    s_t = layer.weight_tensor_scale.reshape(1).float().cpu()  # type: ignore[union-attr]
    codes = layer.qweight.cpu()
    n, k, bs = layer.out_features, layer.in_features, layer.block_size
    magnitude = torch.stack((codes & 0x07, (codes >> 4) & 0x07), dim=-1).flatten(-2)[..., :k]
    scale_codes = layer.weight_scale.cpu().view(torch.uint8).to(torch.int64)
    pairs = scale_codes.reshape(n, k // bs, 1) * 8 + magnitude.reshape(n, k // bs, bs)
    counts = torch.bincount(pairs.flatten(), minlength=256 * 8)
    present = counts.nonzero().flatten()
    counts = counts[present]
    q = e2m1_values((present % 8).to(torch.uint8))
    s_b = (present // 8).to(torch.uint8).view(torch.float8_e4m3fn).float()
    ours = (q * (s_t * s_b)).bfloat16()
    bits = (1.0 / s_t).view(torch.int32)
    best, fewest = bits.view(torch.float32), None
    for step in sorted(range(-_GLOBAL_SCALE_STEPS, _GLOBAL_SCALE_STEPS + 1), key=abs):
        g = (bits + step).view(torch.float32)
        if not torch.isfinite(g).all():
            continue
        differing = int(counts[_format_decode(q, s_b, g) != ours].sum())
        if fewest is None or differing < fewest:
            best, fewest = g, differing
        if differing == 0:
            break
    return best.clone(), int(fewest or 0)


def export_microscaling_layer(
    layer: QuantizedMicroscalingLinear, name: str
) -> tuple[dict, dict, int]:
    """(scheme, tensors, differing) of one QuantizedMicroscalingLinear in the format, differing
    the number of weights the format decodes to other values than the layer's (NVFP4 at bf16
    ties; 0 otherwise); ValueError naming `name` and the reason where the format cannot
    express it (module docstring)."""
    fmt, block_size = layer.weight_format, layer.block_size
    if layer.input_quant is not None:
        in_fmt = layer.input_quant[0]
        reason = (
            "its dynamic MX block scale rounds the block amax up to the next power of two "
            "from a mantissa of 1.75 (compressed_tensors round_to_power_2), triton_qat's "
            "follows OCP MX (floor, saturating)"
            if in_fmt != "nvfp4"
            else "its NVFP4 input global scale is static (calibrated input_global_scale), "
            "triton_qat's comes from each input's amax"
        )
        raise ValueError(
            f"layer {name!r}: dynamic {in_fmt} inputs cannot be expressed in the format: "
            f"{reason}; export a weight-only model ({fmt}_weight_only)"
        )
    group = FORMAT_GROUP_SIZE[fmt]
    if block_size != group:
        raise ValueError(
            f"layer {name!r}: {fmt} blocks of {block_size}; the format's {fmt} groups are "
            f"{group} elements"
        )
    if layer.weight_dtype != torch.bfloat16:
        raise ValueError(
            f"layer {name!r}: {layer.weight_dtype} weights; the format decompresses {fmt} "
            "weights to bfloat16 (its e8m0 and e2m1 decoders), where a model of another dtype "
            "does not run: cast the converted model first (model.to(torch.bfloat16) keeps the "
            "codes and scales as stored)"
        )
    differing = 0
    if fmt == "nvfp4":
        s_t = layer.weight_tensor_scale
        assert s_t is not None
        if not torch.isfinite(s_t).all() or not bool(s_t.gt(0).all()):
            raise ValueError(f"layer {name!r}: NVFP4 tensor scale {s_t.item()} is not finite")
        if torch.isnan(layer.weight_scale.float()).any():
            raise ValueError(f"layer {name!r}: a NaN block scale (an inf or NaN in the weight)")
        g, differing = nvfp4_global_scale(layer)
        args = _float_args(4, "tensor_group", group, "torch.float8_e4m3fn")
        tensors = {
            "weight_packed": layer.qweight.clone(),
            "weight_scale": layer.weight_scale.clone(),
            "weight_global_scale": g.to(layer.qweight.device),
        }
        scheme_format = NVFP4_PACK_QUANTIZED
    else:
        if bool((layer.weight_scale == 255).any()):
            raise ValueError(
                f"layer {name!r}: a NaN block scale (e8m0 code 255: an inf or NaN in the "
                "weight), which the format reads as 2**128"
            )
        if fmt == "mxfp8":
            args = _float_args(8, "group", group, "torch.uint8")
            tensors = {"weight": layer.qweight.clone()}
            scheme_format = MXFP8_QUANTIZED
        else:
            args = _float_args(4, "group", group, "torch.uint8")
            tensors = {"weight_packed": layer.qweight.clone()}
            scheme_format = MXFP4_PACK_QUANTIZED
        tensors["weight_scale"] = layer.weight_scale.clone()
    scheme = {
        "targets": ["Linear"],
        "weights": args,
        "input_activations": None,
        "output_activations": None,
        "format": scheme_format,
    }
    return scheme, tensors, differing
