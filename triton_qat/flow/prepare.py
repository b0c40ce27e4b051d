"""prepare_qat: the QAT modules take the place of a float model's layers."""

from __future__ import annotations

import copy

import torch

from triton_qat.nn.linear import Linear as QATLinear
from triton_qat.qconfig import resolve_qconfig


def swap_modules(model: torch.nn.Module, make) -> None:
    """Replace, in place and recursively, every child m with make(m) when it returns one."""
    for name, child in list(model.named_children()):
        new = make(child)
        if new is not None:
            setattr(model, name, new)
        else:
            swap_modules(child, make)


def prepare_qat(model: torch.nn.Module, qconfig, *, inplace: bool = False) -> torch.nn.Module:
    """Every nn.Linear of `model` (exact type) becomes a tq.nn.Linear sharing its Parameters.

    qconfig: a registered name, a triton_qat.QConfig or a torch.ao QConfig. With
    inplace=False the model is deep-copied first (as torch.ao.quantization.prepare_qat).
    """
    resolve_qconfig(qconfig)  # a bad qconfig fails here, before any module is touched
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) is torch.nn.Linear:
        raise TypeError("prepare_qat takes a model containing nn.Linear layers, not a bare one")

    def make(m: torch.nn.Module):
        if type(m) is not torch.nn.Linear:
            return None
        m.qconfig = qconfig
        return QATLinear.from_float(m)

    swap_modules(model, make)
    return model
