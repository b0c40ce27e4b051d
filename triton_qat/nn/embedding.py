"""tq.nn.Embedding: a drop-in for torch.ao.nn.qat.Embedding that fake-quantizes only the rows
a batch looks up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_qat.ops.embedding import fq_embedding
from triton_qat.qconfig import resolve_qconfig
from triton_qat.quantizers import FakeQuantize


class Embedding(torch.nn.Embedding):
    """An embedding table with a fake-quantized weight for QAT.

    Same signature, attributes (`qconfig`, `weight_fake_quant`), `from_float` / `to_float`
    and state_dict keys as torch.ao.nn.qat.Embedding; the qconfig may be a registered name, a
    triton_qat.QConfig or a torch.ao QConfig. torch.ao accepts only per_channel_affine_float_
    qparams weights (float zero point per row); this layer also takes integer qparams per row
    ("int8_per_channel"), per group along embedding_dim ("int4_per_group") and per tensor.

    With triton_qat's FakeQuantize (any of the above) the observer reduces the whole table
    once (min / max per row or group), then the lookup gathers the indexed rows and
    fake-quantizes only them: the output is F.embedding(input, fake_quantize(weight)) bit for
    bit, without the fake-quantized copy of the table. Any other weight fake quant (an
    observer, as in torch.ao's float_qparams_weight_only_qconfig, a learnable or a foreign
    fake quant) is called on the weight as a module, then F.embedding runs, as torch.ao.
    max_norm, scale_grad_by_freq and sparse behave as in torch.ao's layer (max_norm
    renormalizes the fake-quantized rows, never the weight).
    """

    _FLOAT_MODULE = torch.nn.Embedding

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        device=None,
        dtype=None,
        qconfig=None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            device=device,
            dtype=dtype,
        )
        if not qconfig:
            raise ValueError("qconfig must be provided for QAT module")
        self.qconfig = qconfig
        self.weight_fake_quant = resolve_qconfig(qconfig).weight().to(self.weight.device)

    def forward(self, input: Tensor) -> Tensor:
        wfq = self.weight_fake_quant
        if isinstance(wfq, FakeQuantize):
            # One reduction pass over the table for the statistics, then the looked-up rows.
            wfq.observe(self.weight.detach())
            return fq_embedding(
                input,
                self.weight,
                wfq.qparams(),
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )
        return F.embedding(
            input,
            wfq(self.weight),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    @classmethod
    def from_float(
        cls, mod: torch.nn.Module, use_precomputed_fake_quant: bool = False
    ) -> Embedding:
        """The QAT layer of a float nn.Embedding with a `qconfig` attribute; shares its weight
        Parameter (the same object: a tied lm_head keeps seeing it)."""
        if type(mod) is not cls._FLOAT_MODULE:
            raise TypeError(
                f"{cls.__module__}.{cls.__name__}.from_float only works for "
                f"{cls._FLOAT_MODULE.__name__}, got {type(mod).__name__}"
            )
        if not getattr(mod, "qconfig", None):
            raise ValueError("Input float module must have a valid qconfig")
        qat = cls(
            mod.num_embeddings,
            mod.embedding_dim,
            mod.padding_idx,
            mod.max_norm,
            mod.norm_type,
            mod.scale_grad_by_freq,
            mod.sparse,
            mod.weight.detach(),  # no second table allocated; the Parameter is shared below
            qconfig=mod.qconfig,
        )
        qat.weight = mod.weight
        return qat

    def to_float(self) -> torch.nn.Embedding:
        """A plain nn.Embedding with this layer's (float, not fake-quantized) weight."""
        emb = torch.nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
            _weight=self.weight.detach(),
        )
        emb.weight = torch.nn.Parameter(self.weight.detach())
        emb.train(self.training)
        return emb
