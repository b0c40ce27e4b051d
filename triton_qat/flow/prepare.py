"""prepare_qat: the QAT modules take the place of a float model's layers, chosen per module.

Which qconfig a module gets, in this order: a `qconfig` attribute set on it or on its nearest
ancestor before prepare_qat (None keeps it float, as torch.ao's propagate_qconfig_ does);
else the argument: one qconfig for every nn.Linear, or a dict of fnmatch patterns over fully
qualified names whose first match (in dict order) decides (None, or no match: float). A
`filter_fn(module, fqn)` returning False keeps a module float. Every choice is checked
before the model is touched; `qat_summary(model)` tells afterwards what was done.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from triton_qat.nn.embedding import Embedding as QATEmbedding
from triton_qat.nn.linear import Linear as QATLinear
from triton_qat.qconfig import QConfig, resolve_qconfig

# Float module type -> its QAT module (exact types: subclasses are someone else's layers).
QAT_MODULES: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.Linear: QATLinear,
    torch.nn.Embedding: QATEmbedding,
}
# What the summary counts as kept float when it is not swapped.
ELIGIBLE: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear, torch.nn.Embedding)
# Types a plain (non-dict) qconfig applies to: today's call quantizes every nn.Linear.
DEFAULT_TYPES: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear,)

_UNSET = object()


def swap_modules(model: torch.nn.Module, make) -> None:
    """Replace, in place and recursively, every child m with make(m) when it returns one."""
    for name, child in list(model.named_children()):
        new = make(child)
        if new is not None:
            setattr(model, name, new)
        else:
            swap_modules(child, make)


def _qconfig_name(qconfig: object) -> str:
    if isinstance(qconfig, str):
        return qconfig
    return type(qconfig).__name__


def _group_size(fake_quant: torch.nn.Module) -> tuple[int, str] | None:
    """(size, attribute name) of the groups (integer per group) or blocks (microscaling
    formats) a fake quant cuts the last dim into; None when it does not."""
    for mod in (fake_quant, getattr(fake_quant, "activation_post_process", None)):
        for attr in ("group_size", "block_size"):
            size = getattr(mod, attr, None)
            if isinstance(size, int) and not isinstance(size, bool):
                return size, attr
    return None


def _quantizes_input(qconfig: object) -> bool:
    try:
        resolved = resolve_qconfig(qconfig)
    except (KeyError, TypeError):
        return False  # check_fits reports it, naming the module
    return resolved.quantize_input and resolved.activation is not None


def check_fits(module: torch.nn.Module, fqn: str, qconfig: object) -> QConfig:
    """The resolved QConfig for `module`, or a ValueError / KeyError / TypeError naming the
    module when the qconfig is unknown or does not fit it."""
    where = f"module {fqn or '<root>'!r} ({type(module).__name__})"
    try:
        resolved = resolve_qconfig(qconfig)
    except KeyError as e:
        raise KeyError(f"{where}: {e.args[0]}") from None
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None
    weight_fq = resolved.weight()
    group = _group_size(weight_fq)
    in_dim = module.weight.shape[-1]
    if group is not None and in_dim % group[0]:
        kind = "groups" if group[1] == "group_size" else "blocks"
        raise ValueError(
            f"{where}: qconfig {_qconfig_name(qconfig)!r} quantizes the weight in {kind} of "
            f"{group[0]} ({group[1]}), which do not divide its {in_dim} input features"
        )
    if not isinstance(module, torch.nn.Linear) and _quantizes_input(resolved):
        raise ValueError(
            f"{where}: qconfig {_qconfig_name(qconfig)!r} fake-quantizes the layer input; "
            f"an {type(module).__name__} takes indices: give it a weight-only qconfig"
        )
    return resolved


@dataclass
class QATSummary:
    """What prepare_qat did: the QAT modules with their qconfig, and the eligible modules
    (nn.Linear / nn.Embedding) left float. str() gives a table."""

    quantized: dict[str, str] = field(default_factory=dict)  # fqn -> qconfig (name or type)
    kept_float: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for name in self.quantized.values():
            counts[name] = counts.get(name, 0) + 1
        lines = [f"{len(self.quantized)} QAT modules, {len(self.kept_float)} kept float"]
        lines += [f"  {name}: {n}" for name, n in sorted(counts.items())]
        lines += [f"  {fqn}: {q}" for fqn, q in self.quantized.items()]
        lines += [f"  {fqn}: float" for fqn in self.kept_float]
        return "\n".join(lines)


def qat_summary(model: torch.nn.Module) -> QATSummary:
    """Which modules of a prepared model are QAT modules (with the qconfig each was given)
    and which eligible float modules were kept float."""
    summary = QATSummary()
    qat_types = tuple(QAT_MODULES.values())
    for fqn, mod in model.named_modules():
        if isinstance(mod, qat_types):
            summary.quantized[fqn] = _qconfig_name(mod.qconfig)
        elif type(mod) in ELIGIBLE:
            summary.kept_float.append(fqn)
    return summary


def _choose(
    model: torch.nn.Module,
    qconfig: object,
    filter_fn: Callable[[torch.nn.Module, str], bool] | None,
) -> dict[str, object]:
    """fqn -> qconfig for every module to swap; raises before anything is changed."""
    patterns: Mapping[str, object] | None = None
    if isinstance(qconfig, Mapping):
        patterns = qconfig
        for key in patterns:
            if not isinstance(key, str):
                raise TypeError(f"qconfig dict keys must be str patterns, got {key!r}")
        unused = set(patterns)
    inherited: dict[str, object] = {}  # fqn -> the qconfig attribute in force there
    chosen: dict[str, object] = {}
    for fqn, mod in model.named_modules():
        parent = fqn.rpartition(".")[0] if fqn else None
        own = mod.__dict__.get("qconfig", _UNSET)
        inherited[fqn] = own if own is not _UNSET else inherited.get(parent, _UNSET)
        if patterns is not None:
            match = next((k for k in patterns if fnmatch.fnmatchcase(fqn, k)), None)
            if match is not None:
                unused.discard(match)
        if type(mod) not in QAT_MODULES:
            continue
        if inherited[fqn] is not _UNSET:
            choice = inherited[fqn]
        elif patterns is not None:
            choice = patterns[match] if match is not None else None
        else:
            choice = qconfig if isinstance(mod, DEFAULT_TYPES) else None
        if choice is None or (filter_fn is not None and not filter_fn(mod, fqn)):
            continue
        named = inherited[fqn] is not _UNSET or (patterns is not None and match == fqn)
        if not named and not isinstance(mod, torch.nn.Linear) and _quantizes_input(choice):
            continue  # a wildcard's activation qconfig is for the Linears: the table stays float
        check_fits(mod, fqn, choice)
        chosen[fqn] = choice
    if patterns is not None and unused:
        key = next(k for k in patterns if k in unused)
        raise ValueError(
            f"qconfig pattern {key!r} matches no module of the model "
            "(fnmatch over model.named_modules() names)"
        )
    return chosen


def prepare_qat(
    model: torch.nn.Module,
    qconfig,
    *,
    inplace: bool = False,
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
) -> torch.nn.Module:
    """Swap the chosen nn.Linear (and nn.Embedding) modules of `model` for QAT modules sharing
    their Parameters.

    qconfig: a registered name, a triton_qat.QConfig or a torch.ao QConfig for every
    nn.Linear; or a dict {fnmatch pattern over fully qualified module names: qconfig or None}
    where the first matching key decides (None or no match: float; an nn.Embedding that a
    wildcard gives an input-quantizing qconfig stays float, named exactly it is an error). A
    `qconfig` attribute
    set on a module or an ancestor overrides both (None: float). filter_fn(module, fqn) False
    keeps a module float. A pattern matching nothing, an unknown qconfig or one that does not
    fit a module raises (naming it) before the model is touched. With inplace=False the
    model is deep-copied first (as torch.ao.quantization.prepare_qat). `qat_summary(model)`
    reports the result.
    """
    if type(model) in QAT_MODULES:
        raise TypeError(
            f"prepare_qat takes a model containing {type(model).__name__} layers, not a bare one"
        )
    if not isinstance(qconfig, Mapping):
        resolve_qconfig(qconfig)  # a bad qconfig fails here even if no module is chosen
    chosen = _choose(model, qconfig, filter_fn)
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for fqn, choice in chosen.items():
        float_mod = modules[fqn]
        float_mod.qconfig = choice
        qat = QAT_MODULES[type(float_mod)].from_float(float_mod)
        parent_name, _, child = fqn.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, qat)
    return model
