"""Saving a converted model and rebuilding it: its state_dict in safetensors (no pickle), the
float architecture supplying everything else.

    tq.save_converted(model, directory, *, overwrite=False)
    model = tq.load_converted(float_model, directory, *, inplace=False)

A QuantizedLinear's state_dict defines it whole (codes, scales, zero points, ranges,
granularity, input quantizer: flow/layout.py), so loading needs no qconfig: every Linear of
the float model whose name has a saved QuantizedLinear becomes one, then the whole state_dict
is loaded strictly (a QuantizedFloat8Linear likewise, found by its float8_layout, and a
QuantizedMicroscalingLinear by its microscaling_layout).
Directories are written next to their destination and renamed into place, so a failure
leaves nothing half written.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from triton_qat.flow.convert import QuantizedEmbedding, QuantizedLinear
from triton_qat.flow.convert_float8 import QuantizedFloat8Linear
from triton_qat.flow.convert_microscaling import QuantizedMicroscalingLinear
from triton_qat.numerics.qparams import QParams

WEIGHTS_NAME = "model.safetensors"
FORMAT = "triton_qat.converted"
FORMAT_VERSION = "1"


def write_directory(directory: str | os.PathLike, overwrite: bool, write: Callable) -> Path:
    """Call write(tmp) on a fresh folder beside `directory`, then rename it into place
    (replacing an existing `directory` only with overwrite). FileExistsError before any
    work when it exists and overwrite is False; on any error nothing is left behind."""
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        write(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)  # put the previous directory back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def quantized_linears(model: torch.nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every QuantizedLinear, QuantizedFloat8Linear, QuantizedMicroscalingLinear and
    QuantizedEmbedding of `model`, by name."""
    kinds = (
        QuantizedLinear,
        QuantizedFloat8Linear,
        QuantizedMicroscalingLinear,
        QuantizedEmbedding,
    )
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def plain_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, a tensor whose storage an earlier one shares cloned (tied
    weights): what safetensors stores."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_converted(
    model: torch.nn.Module, directory: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a converted model's state_dict to directory/model.safetensors.

    ValueError for a model without a quantized layer (never converted); FileExistsError when
    `directory` exists, unless overwrite. Returns the directory."""
    # safetensors is an optional dependency (the "serve" extra).
    from safetensors.torch import save_file

    if not quantized_layers(model):
        raise ValueError(
            "save_converted: the model has no quantized layer; convert it first "
            "(tq.convert(tq.prepare_qat(model, qconfig)) and training)"
        )
    state = plain_state_dict(model.state_dict())
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION}
    return write_directory(
        directory, overwrite, lambda tmp: save_file(state, tmp / WEIGHTS_NAME, metadata=metadata)
    )


def read_converted(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict saved by save_converted in `directory` (safetensors, no pickle)."""
    # safetensors is an optional dependency (the "serve" extra).
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a directory save_converted wrote")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} was not written by triton_qat's save_converted")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {metadata.get('format_version')!r}; this "
                f"triton_qat reads version {FORMAT_VERSION}"
            )
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)


def _shell(mod: torch.nn.Module, kind: str = "int") -> torch.nn.Module:
    """A QuantizedLinear ("int"; a QuantizedEmbedding for an nn.Embedding) /
    QuantizedFloat8Linear ("float8") / QuantizedMicroscalingLinear ("microscaling") of the
    float layer's shape, bias and dtype; load_state_dict fills it in (its layout included)."""
    w = mod.weight
    bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().to("cpu")
    if kind == "microscaling":
        layer = QuantizedMicroscalingLinear.placeholder(
            mod.in_features, mod.out_features, bias, w.dtype
        )
        return layer.to(w.device)
    if kind == "float8":
        n, k = mod.out_features, mod.in_features
        codes = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
        layer = QuantizedFloat8Linear(k, n, codes, torch.ones(n, 1), bias, weight_dtype=w.dtype)
        return layer.to(w.device)
    placeholder = QParams(1.0, 0, -128, 127)
    if isinstance(mod, torch.nn.Embedding):
        n, k = mod.num_embeddings, mod.embedding_dim
        layer = QuantizedEmbedding(
            n,
            k,
            torch.zeros(n, k, dtype=torch.int32),
            placeholder,
            mod.padding_idx,
            mod.max_norm,
            mod.norm_type,
            weight_dtype=w.dtype,
        )
        return layer.to(w.device)
    n, k = mod.out_features, mod.in_features
    layer = QuantizedLinear(
        k,
        n,
        torch.zeros(n, k, dtype=torch.int32),
        placeholder,
        bias,
        weight_dtype=w.dtype,
    )
    return layer.to(w.device)


def with_quantized_layers(
    model: torch.nn.Module,
    names: set[str],
    float8_names: frozenset[str] = frozenset(),
    microscaling_names: frozenset[str] = frozenset(),
) -> None:
    """Swap each nn.Linear / nn.Embedding named in `names` for a quantized shell, in place
    (a QuantizedFloat8Linear for those in `float8_names`, a QuantizedMicroscalingLinear for
    those in `microscaling_names`)."""
    modules = dict(model.named_modules())
    for name in sorted(names | float8_names | microscaling_names):
        mod = modules.get(name)
        if name in microscaling_names:
            shell, kind = "microscaling", QuantizedMicroscalingLinear
        elif name in float8_names:
            shell, kind = "float8", QuantizedFloat8Linear
        else:
            shell, kind = "int", (QuantizedLinear, QuantizedEmbedding)
        if isinstance(mod, kind):
            continue
        allowed = (torch.nn.Linear,) if shell != "int" else (torch.nn.Linear, torch.nn.Embedding)
        if type(mod) not in allowed:
            what = "no module" if mod is None else f"a {type(mod).__name__}"
            raise ValueError(
                f"load_converted: the checkpoint has a quantized layer at {name!r}; the model "
                f"has {what} there (a checkpoint of another architecture?)"
            )
        if not name:
            raise ValueError("load_converted: the model itself is one layer; convert it instead")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, _shell(mod, shell))


def load_converted(
    model: torch.nn.Module, directory: str | os.PathLike, *, inplace: bool = False
) -> torch.nn.Module:
    """Rebuild a converted model saved by save_converted: `model` is the float architecture
    (or a converted one); each Linear with a saved QuantizedLinear becomes one, then the
    saved state_dict is loaded strictly. A checkpoint that does not fit the model (another
    architecture, missing or extra keys, other shapes) is a ValueError; the model passed in
    is left as it was unless inplace. Outputs equal the saved model's bit for bit."""
    state = read_converted(directory)
    layouts = [key.rpartition(".") for key in state]
    names = {prefix for prefix, _, leaf in layouts if leaf == "weight_layout"}
    float8_names = frozenset(prefix for prefix, _, leaf in layouts if leaf == "float8_layout")
    microscaling = frozenset(p for p, _, leaf in layouts if leaf == "microscaling_layout")
    if not inplace:
        model = copy.deepcopy(model)
    with_quantized_layers(model, names, float8_names, microscaling)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"load_converted: the checkpoint in {directory} does not fit this model: {err}"
        ) from None
    return model
