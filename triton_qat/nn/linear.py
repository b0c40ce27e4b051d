"""tq.nn.Linear: a drop-in for torch.ao.nn.qat.Linear whose forward is one fused GEMM."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_qat.numerics.qparams import PerTokenQParams, QParams
from triton_qat.ops.float_formats import fp8_linear
from triton_qat.ops.functional import fake_quantize, fq_linear
from triton_qat.ops.microscaling import mx_linear
from triton_qat.qconfig import resolve_qconfig
from triton_qat.quantizers import (
    DynamicPerTokenFakeQuantize,
    FakeQuantize,
    Float8FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    LearnableFakeQuantize,
    MXFakeQuantize,
    NVFP4FakeQuantize,
)

# triton_qat's fake quants that the layer applies as modules, without a warning.
_APPLIED_AS_MODULES = (
    DynamicPerTokenFakeQuantize,
    LearnableFakeQuantize,
    Float8FakeQuantize,
    MXFakeQuantize,
    NVFP4FakeQuantize,
)
# Fake-quant types already warned about (once per type and process).
_WARNED_TYPES: set[type] = set()


def _fused_qparams(
    fq: torch.nn.Module | None, x: Tensor, *, weight: bool
) -> tuple[bool, QParams | PerTokenQParams | None]:
    """Run `fq`'s observer on x and return (handled, qparams) for the fused kernel.

    handled False: `fq` is not one of triton_qat's fake-quant modules (or its qparams do not
    fit the kernel); the caller applies it as a module. qparams None with handled True: fake
    quant is disabled. A dynamic per-token input quantizer gives its PerTokenQParams: the
    fused linear computes each row's qparams from the input it is given.
    """
    if isinstance(fq, DynamicPerTokenFakeQuantize) and not weight:
        return True, fq.per_token_spec()
    if not isinstance(fq, (FakeQuantize, FusedMovingAvgObsFakeQuantize)):
        return False, None
    fq.observe(x.detach())
    qp = fq.qparams()
    if qp is None:
        return True, None
    if weight:
        fits = qp.granularity != "per_channel" or qp.axis in (0, -2)
    else:
        fits = qp.granularity == "per_tensor"
    return (True, qp) if fits else (False, None)


def _float8_args(wfq: torch.nn.Module, ifq: torch.nn.Module | None) -> dict | None:
    """fp8_linear's keyword arguments when the weight's fake quant is an enabled
    Float8FakeQuantize and the input's is one too, disabled (weight-only) or absent, else
    None (the quantizers are applied as modules)."""
    if not isinstance(wfq, Float8FakeQuantize) or not wfq._flag("fake_quant_enabled"):
        return None
    args = {
        "weight_dtype": wfq.dtype,
        "weight_granularity": "per_tensor" if wfq.granularity == "per_tensor" else "per_row",
        "weight_eps": wfq.eps,
        "input_dtype": None,
    }
    if ifq is None or (isinstance(ifq, Float8FakeQuantize) and not ifq._flag("fake_quant_enabled")):
        return args  # no input fake quant, or a disabled one (no state): weight-only
    if not isinstance(ifq, Float8FakeQuantize):
        return None
    args.update(input_dtype=ifq.dtype, input_granularity=ifq.granularity, input_eps=ifq.eps)
    return args


def _microscaling_kwargs(fq: torch.nn.Module, role: str) -> dict:
    if isinstance(fq, NVFP4FakeQuantize):
        return {
            f"{role}_format": "nvfp4",
            f"{role}_block_size": fq.block_size,
            f"{role}_per_tensor_scale": fq.per_tensor_scale,
            f"{role}_eps": fq.eps,
        }
    return {f"{role}_format": fq.fmt, f"{role}_block_size": fq.block_size}


def _microscaling_args(
    wfq: torch.nn.Module, ifq: torch.nn.Module | None, in_features: int
) -> dict | None:
    """mx_linear's keyword arguments when the weight's (and the input's, if any) fake quant
    is an enabled MXFakeQuantize / NVFP4FakeQuantize whose blocks divide in_features, else
    None (the quantizers are applied as modules, which name a block size that does not fit)."""
    microscaling = (MXFakeQuantize, NVFP4FakeQuantize)

    def fused(fq) -> bool:
        return (
            isinstance(fq, microscaling)
            and fq._flag("fake_quant_enabled")
            and in_features % fq.block_size == 0
        )

    if not fused(wfq):
        return None
    args = {**_microscaling_kwargs(wfq, "weight"), "input_format": None}
    if ifq is None or (isinstance(ifq, microscaling) and not ifq._flag("fake_quant_enabled")):
        return args  # no input fake quant, or a disabled one (no state): weight-only
    if not fused(ifq):
        return None
    return {**args, **_microscaling_kwargs(ifq, "input")}


class Linear(torch.nn.Linear):
    """A linear layer with fake-quantized weight (and, per the qconfig, input) for QAT.

    Same signature, attributes (`qconfig`, `weight_fake_quant`), `from_float` / `to_float`
    and state_dict keys as torch.ao.nn.qat.Linear. The qconfig may be a registered name, a
    triton_qat.QConfig or a torch.ao QConfig. triton_qat's own fake-quant modules take the
    fused path: the observer updates the qparams, then one Triton GEMM fake-quantizes the
    operand tiles as it loads them (forward and backward). Any other fake-quant module is
    still honoured: called on the weight, then F.linear, with a one-time warning.

    Learnable qparams (LearnableFakeQuantize, e.g. the "int8_per_channel_lsq" qconfig or
    triton_qat.qconfig.learnable_qconfig(...)) need gradients of scale and zero point, which
    the fused GEMM does not produce: the learnable fake quant runs on the weight (and input)
    as a module, then F.linear. Its scale and zero point are Parameters of the layer.

    Input fake quant (a triton_qat.QConfig with an activation and quantize_input=True) is
    fused into the GEMM's prologue: the same numerics as torch.ao's activation_post_process
    on the previous layer's output, one fewer pass over memory. A dynamic per-token input
    quantizer (w8a8_dynamic, w4a8_dynamic) is fused too: a light pass computes each token's
    qparams, then the GEMM fake-quantizes the input rows as it loads them. A torch.ao QConfig
    keeps torch.ao's behaviour (no input fake quant here), so the layer is a drop-in.

    FP8 fake quant (Float8FakeQuantize: the "fp8_dynamic" / "fp8_weight_only" qconfigs) runs
    as one fused FP8 linear (triton_qat.ops.fp8_linear): the GEMMs read the operands' float8
    codes, and on GPUs with FP8 tensor cores the forward is an FP8 GEMM. With the input's
    fake quant disabled it is weight-only; with the weight's disabled, the input's is applied
    as a module, then F.linear. Microscaling fake
    quant (MXFakeQuantize, NVFP4FakeQuantize: "mxfp8_*", "mxfp4_*", "nvfp4_*") runs as one
    fused linear the same way (triton_qat.ops.mx_linear): the GEMMs read the operands' element
    codes and block scales.
    """

    _FLOAT_MODULE = torch.nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        qconfig=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if not qconfig:
            raise ValueError("qconfig must be provided for QAT module")
        self.qconfig = qconfig
        resolved = resolve_qconfig(qconfig)
        self.weight_fake_quant = resolved.weight().to(self.weight.device)
        wfq = self.weight_fake_quant
        if isinstance(wfq, LearnableFakeQuantize) and wfq.ch_axis in (0, -2):
            # Learnable per-channel qparams get their final shape now, not at the first
            # forward: a compiled forward cannot resize a Parameter.
            wfq._size_channels(out_features)
        if resolved.quantize_input and resolved.activation is not None:
            self.input_fake_quant = resolved.activation().to(self.weight.device)

    def _warn_unfused(self, fq: torch.nn.Module, role: str) -> None:
        if isinstance(fq, _APPLIED_AS_MODULES):
            # triton_qat's own, applied as a module by design: per-token qparams are made per
            # call; learnable qparams need gradients, which the fused GEMM does not produce;
            # FP8 or microscaling fake quant with the weight's disabled: the input's as a
            # module.
            return
        if type(fq) not in _WARNED_TYPES:
            _WARNED_TYPES.add(type(fq))
            warnings.warn(
                f"triton_qat.nn.Linear: {role} fake quant {type(fq).__name__} is not one of "
                "triton_qat's fake-quant modules (or its qparams do not fit the fused kernel); "
                "it is called as a module, then F.linear runs unfused",
                stacklevel=3,
            )

    def forward(self, input: Tensor) -> Tensor:
        wfq = self.weight_fake_quant
        ifq = getattr(self, "input_fake_quant", None)
        fp8 = _float8_args(wfq, ifq)
        if fp8 is not None:
            return fp8_linear(input, self.weight, self.bias, **fp8)
        mx = _microscaling_args(wfq, ifq, self.in_features)
        if mx is not None:
            return mx_linear(input, self.weight, self.bias, **mx)
        fused_w, w_qp = _fused_qparams(wfq, self.weight, weight=True)
        weight = self.weight
        if not fused_w:
            self._warn_unfused(wfq, "weight")
            weight = wfq(self.weight)

        x_qp = None
        if ifq is not None:
            fused_x, x_qp = _fused_qparams(ifq, input, weight=False)
            if not fused_x:
                self._warn_unfused(ifq, "input")
                input = ifq(input)

        if fused_w and w_qp is not None:
            return fq_linear(input, weight, self.bias, weight_qparams=w_qp, input_qparams=x_qp)
        if isinstance(x_qp, PerTokenQParams):
            input = ifq(input)  # the weight's fake quant is not fused: no fused GEMM to join
        elif x_qp is not None:
            input = fake_quantize(input, x_qp)
        return F.linear(input, weight, self.bias)

    @classmethod
    def from_float(cls, mod: torch.nn.Module, use_precomputed_fake_quant: bool = False) -> Linear:
        """The QAT layer of a float nn.Linear with a `qconfig` attribute; shares its
        Parameters (as torch.ao.nn.qat.Linear.from_float)."""
        if type(mod) is not cls._FLOAT_MODULE:
            raise TypeError(
                f"{cls.__module__}.{cls.__name__}.from_float only works for "
                f"{cls._FLOAT_MODULE.__name__}, got {type(mod).__name__}"
            )
        if not getattr(mod, "qconfig", None):
            raise ValueError("Input float module must have a valid qconfig")
        qat = cls(
            mod.in_features,
            mod.out_features,
            bias=mod.bias is not None,
            qconfig=mod.qconfig,
            device=mod.weight.device,
            dtype=mod.weight.dtype,
        )
        qat.weight = mod.weight
        qat.bias = mod.bias
        return qat

    def to_float(self) -> torch.nn.Linear:
        """A plain nn.Linear with this layer's (float, not fake-quantized) weights."""
        linear = torch.nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        linear.weight = torch.nn.Parameter(self.weight.detach())
        if self.bias is not None:
            linear.bias = torch.nn.Parameter(self.bias.detach())
        linear.train(self.training)
        return linear
