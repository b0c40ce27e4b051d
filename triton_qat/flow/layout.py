"""A QuantizedLinear's (and QuantizedEmbedding's) layout as plain tensors of its state_dict,
so that the state_dict alone defines the layer (reload: flow/serialize.py) and safetensors
can store every value.

    weight_layout  int64 (5,): quant_min, quant_max, granularity (0 per tensor, 1 per
                   channel, 2 per group), axis (per channel, else 0), group_size (else 0)
    input_layout   int64 (6,): kind (0 none, 1 static per tensor, 2 dynamic per token),
                   quant_min, quant_max (0 for none), symmetric (0 / 1), symmetric_zero_point,
                   eps as the bits of an fp32 (dynamic; the per-token formula uses it as fp32)

Integers rather than floats: casting a converted model (model.half()) leaves them as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat.numerics.qparams import PerTokenQParams, QParams

PER_TENSOR, PER_CHANNEL, PER_GROUP = 0, 1, 2
INPUT_NONE, INPUT_STATIC, INPUT_DYNAMIC = 0, 1, 2
WEIGHT_LAYOUT_LEN, INPUT_LAYOUT_LEN = 5, 6


def weight_layout_tensor(wq: QParams) -> Tensor:
    if wq.group_size:
        kind, axis, group = PER_GROUP, 0, wq.group_size
    elif wq.axis is not None:
        kind, axis, group = PER_CHANNEL, wq.axis, 0
    else:
        kind, axis, group = PER_TENSOR, 0, 0
    return torch.tensor([wq.quant_min, wq.quant_max, kind, axis, group], dtype=torch.int64)


def read_weight_layout(t: Tensor) -> tuple[int, int, int | None, int | None]:
    """(quant_min, quant_max, axis, group_size) as QParams takes them."""
    qmin, qmax, kind, axis, group = (int(v) for v in t.tolist())
    return qmin, qmax, axis if kind == PER_CHANNEL else None, group if kind == PER_GROUP else None


def _fp32_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())


def _fp32_from_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def input_layout_tensor(
    static_range: tuple[int, int] | None, dynamic: PerTokenQParams | None
) -> Tensor:
    if dynamic is not None:
        d = dynamic
        row = [INPUT_DYNAMIC, d.quant_min, d.quant_max, int(d.symmetric)]
        row += [d.symmetric_zero_point, _fp32_bits(d.eps)]
    elif static_range is not None:
        row = [INPUT_STATIC, *static_range, 0, 0, 0]
    else:
        row = [INPUT_NONE, 0, 0, 0, 0, 0]
    return torch.tensor(row, dtype=torch.int64)


def read_input_layout(t: Tensor) -> tuple[tuple[int, int] | None, PerTokenQParams | None]:
    """(static input range or None, dynamic per-token quantizer or None)."""
    kind, qmin, qmax, symmetric, zp, eps_bits = (int(v) for v in t.tolist())
    if kind == INPUT_STATIC:
        return (qmin, qmax), None
    if kind == INPUT_DYNAMIC:
        return None, PerTokenQParams(qmin, qmax, bool(symmetric), zp, _fp32_from_bits(eps_bits))
    return None, None


def _check_layout(saved: Tensor, name: str, length: int) -> None:
    if saved.dtype != torch.int64 or tuple(saved.shape) != (length,):
        raise ValueError(
            f"{name} must be an int64 tensor of shape ({length},), got {saved.dtype} "
            f"{tuple(saved.shape)}"
        )


def adopt_saved_layout(layer: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """Give `layer` (a QuantizedLinear, or a QuantizedEmbedding: no input quantizer) the
    layout saved under `prefix` in `state_dict`: its buffers take the saved shapes and dtypes
    (load_state_dict then copies the values). ValueError when the saved codes or qparams do
    not fit the layer's shape. A state_dict without a layout (none saved under prefix)
    leaves the layer as it is."""
    w_key, i_key = prefix + "weight_layout", prefix + "input_layout"
    has_input = "input_layout" in layer._buffers
    if w_key not in state_dict or (has_input and i_key not in state_dict):
        return
    _check_layout(state_dict[w_key], "weight_layout", WEIGHT_LAYOUT_LEN)
    qmin, qmax, axis, group = read_weight_layout(state_dict[w_key])
    static_range = None
    if has_input:
        _check_layout(state_dict[i_key], "input_layout", INPUT_LAYOUT_LEN)
        static_range, _ = read_input_layout(state_dict[i_key])
    if isinstance(layer, torch.nn.Module) and hasattr(layer, "num_embeddings"):
        n, k = layer.num_embeddings, layer.embedding_dim
    else:
        n, k = layer.out_features, layer.in_features
    packed = qmax - qmin <= 15
    expected = (n, (k + 1) // 2) if packed else (n, k)
    shapes = {"qweight": expected}
    if group:
        if k % group:
            raise ValueError(f"saved group size {group} does not divide in_features {k}")
        shapes["weight_scale"] = shapes["weight_zero_point"] = (n * k // group,)
    elif axis is not None:
        shapes["weight_scale"] = shapes["weight_zero_point"] = (n if axis in (0, -2) else k,)
    else:
        shapes["weight_scale"] = shapes["weight_zero_point"] = (1,)
    for name, shape in shapes.items():
        saved = state_dict.get(prefix + name)
        if saved is None:
            continue  # load_state_dict reports the missing key
        count = saved.numel() if name != "qweight" else tuple(saved.shape)
        want = shape if name == "qweight" else shape[0]
        if count != want:
            what = "shape" if name == "qweight" else "number of elements"
            raise ValueError(
                f"saved {name} has {what} {count}, a {n} x {k} layer with codes in "
                f"[{qmin}, {qmax}] needs {want} (a state_dict of another architecture?)"
            )
    if static_range is not None:
        for name in ("input_scale", "input_zero_point"):
            if prefix + name not in state_dict:
                raise ValueError(f"a static input quantizer is saved without its {name}")
    device = layer.qweight.device
    names = ["qweight", "weight_scale", "weight_zero_point"]
    for name in ("input_scale", "input_zero_point"):
        if static_range is None:
            layer._buffers.pop(name, None)
        else:
            names.append(name)
    for name in names:
        saved = state_dict.get(prefix + name)
        if saved is not None:
            layer.register_buffer(name, torch.empty(saved.shape, dtype=saved.dtype, device=device))


class SavedLayout(torch.nn.Module):
    """A converted layer whose state_dict holds its layout (a tensor under _LAYOUT_KEY):
    loading adopts the saved range, granularity or format (and input quantizer), and with
    them the shapes and dtypes of the codes and qparams, checked against the layer's shape
    first (a state_dict of another architecture is an error naming the layer). Subclasses
    define _read_layout (the Python attributes the forward reads, from the layout buffer);
    _adopt_saved_layout (called only where the layout was saved) is adopt_saved_layout unless
    they keep another layout (FP8, MX)."""

    _LAYOUT_KEY = "weight_layout"

    def _read_layout(self) -> None:
        raise NotImplementedError

    def _adopt_saved_layout(self, state_dict: dict, prefix: str) -> None:
        adopt_saved_layout(self, state_dict, prefix)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        saved = prefix + self._LAYOUT_KEY in state_dict
        if saved:
            try:
                self._adopt_saved_layout(state_dict, prefix)
            except ValueError as err:
                error_msgs.append(f"{prefix.rstrip('.') or type(self).__name__}: {err}")
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if saved:
            self._read_layout()
