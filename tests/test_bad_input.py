"""Hostile input: every bad or unusual argument tried, and what it gets.

Each case is one row of the README's "Bad input" table (the test checks that the table
lists every case with the same words). A case either raises a ValueError / TypeError /
KeyError whose message names the argument, or returns what torch (or the same call on a
plain contiguous copy) returns, bit for bit. Every case runs on both backends: the eager
reference and the Triton kernels (the interpreter on the CPU, compiled on a GPU).

    python tests/test_bad_input.py    # prints the markdown table for the README
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Raises:
    exc: type
    word: str  # a word the message must contain (the argument's name)

    def text(self) -> str:
        return f"`{self.exc.__name__}` naming `{self.word}`"


@dataclass(frozen=True)
class Same:
    """The call's result equals `expected(dev)` bit for bit; `how` is the README's words."""

    expected: Callable
    how: str

    def text(self) -> str:
        return self.how


@dataclass(frozen=True)
class Case:
    what: str
    call: Callable  # call(dev) -> Tensor (or raises)
    gets: Raises | Same


def _x(dev, *shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape or (4, 8), generator=g).to(dtype).to(dev)


def _w(dev, n=6, k=8):
    return _x(dev, n, k, seed=1) * 0.5


def _qp(dev=None, scale=0.1, zp=0, qmin=-128, qmax=127):
    return tq.QParams(scale, zp, qmin, qmax)


def _pc(dev, scale_vals, qmin=-128, qmax=127, axis=0, zp=None):
    s = torch.tensor(scale_vals, dtype=torch.float32, device=dev)
    z = torch.zeros(s.shape, dtype=torch.int32, device=dev) if zp is None else zp
    return s, z


def _fql(dev, x=None, w=None, b=None, wqp=None, xqp=None):
    x = _x(dev) if x is None else x
    w = _w(dev) if w is None else w
    return tq.fq_linear(x, w, b, weight_qparams=wqp or _qp(), input_qparams=xqp)


def _torch_pc(dev, scale_vals):
    s, z = _pc(dev, scale_vals)
    x = _x(dev)
    return torch.fake_quantize_per_channel_affine(x.cpu(), s.cpu(), z.cpu(), 0, -128, 127)


def _linear_layer(dev, qconfig="int8_per_channel", k=8):
    torch.manual_seed(0)
    return tq.nn.Linear(k, 6, qconfig=qconfig, device=dev)


def _channels_last(dev):
    x = _x(dev, 2, 3, 5, 8).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    return x


CASES: list[Case] = [
    # --- shapes ---------------------------------------------------------------------------
    Case(
        "fq_linear: weight not 2-D",
        lambda d: _fql(d, w=_w(d)[0]),
        Raises(ValueError, "weight"),
    ),
    Case(
        "fq_linear: input's last dim != weight.shape[1]",
        lambda d: _fql(d, x=_x(d, 4, 7)),
        Raises(ValueError, "input"),
    ),
    Case("fq_linear: 0-d input", lambda d: _fql(d, x=_x(d)[0, 0]), Raises(ValueError, "input")),
    Case(
        "fq_linear: bias of the wrong shape",
        lambda d: _fql(d, b=_x(d, 1, 6)),
        Raises(ValueError, "bias"),
    ),
    Case(
        "per channel: scale length != channels",
        lambda d: tq.fake_quantize_per_channel(_x(d), *_pc(d, [0.1] * 3), 0, -128, 127),
        Raises(ValueError, "scale"),
    ),
    Case(
        "per channel: axis out of range",
        lambda d: tq.fake_quantize_per_channel(_x(d), *_pc(d, [0.1] * 4), 2, -128, 127),
        Raises(ValueError, "axis"),
    ),
    Case(
        "per group: scale not (..., K // group_size)",
        lambda d: tq.fake_quantize_per_group(_x(d), *_pc(d, [0.1] * 4), 4, -8, 7),
        Raises(ValueError, "scale"),
    ),
    Case(
        "per group: group size not dividing K",
        lambda d: tq.fake_quantize_per_group(_x(d), *_pc(d, [[0.1] * 2] * 4), 3, -8, 7),
        Raises(ValueError, "group_size"),
    ),
    Case(
        "per group: group size 0",
        lambda d: tq.fake_quantize_per_group(_x(d), *_pc(d, [[0.1] * 2] * 4), 0, -8, 7),
        Raises(ValueError, "group_size"),
    ),
    Case(
        "fq_linear: per-group weight, group size not dividing K",
        lambda d: _fql(d, wqp=tq.QParams(*_pc(d, [[0.1] * 2] * 6), -8, 7, group_size=3)),
        Raises(ValueError, "group_size"),
    ),
    Case(
        "fq_linear: per-channel weight qparams on axis 1",
        lambda d: _fql(d, wqp=tq.QParams(*_pc(d, [0.1] * 8), -128, 127, axis=1)),
        Raises(ValueError, "weight_qparams"),
    ),
    Case(
        "fq_linear: per-channel input qparams",
        lambda d: _fql(d, xqp=tq.QParams(*_pc(d, [0.1] * 8), -128, 127, axis=1)),
        Raises(ValueError, "input_qparams"),
    ),
    Case(
        "QParams: both axis and group_size",
        lambda d: tq.QParams(*_pc(d, [0.1] * 4), -128, 127, axis=0, group_size=4),
        Raises(ValueError, "axis"),
    ),
    Case(
        "tq.nn.Linear int4_per_group: in_features not a multiple of 32",
        lambda d: _linear_layer(d, "int4_per_group", k=30)(_x(d, 2, 30)),
        Raises(ValueError, "group_size"),
    ),
    # --- dtypes ---------------------------------------------------------------------------
    Case(
        "float64 input",
        lambda d: tq.fake_quantize_per_tensor(_x(d, dtype=torch.float64), 0.1, 0, -128, 127),
        Raises(TypeError, "x"),
    ),
    Case(
        "integer input",
        lambda d: _fql(d, x=_x(d).long()),
        Raises(TypeError, "input"),
    ),
    Case(
        "fq_linear: weight dtype neither the input's nor float32",
        lambda d: _fql(d, x=_x(d).half(), w=_w(d).bfloat16()),
        Raises(TypeError, "weight"),
    ),
    Case(
        "fq_linear: float64 bias",
        lambda d: _fql(d, b=_x(d, 6, dtype=torch.float64)),
        Raises(TypeError, "bias"),
    ),
    Case(
        "float64 scale tensor",
        lambda d: tq.fake_quantize_per_tensor(
            _x(d), torch.tensor([0.1], dtype=torch.float64, device=d), 0, -128, 127
        ),
        Raises(TypeError, "scale"),
    ),
    Case(
        "float zero point per tensor",
        lambda d: tq.fake_quantize_per_tensor(_x(d), 0.1, 0.5, -128, 127),
        Raises(TypeError, "zero_point"),
    ),
    Case(
        "int16 / float16 zero point",
        lambda d: tq.fake_quantize_per_channel(
            _x(d), _pc(d, [0.1] * 4)[0], torch.zeros(4, dtype=torch.float16, device=d), 0, 0, 255
        ),
        Raises(TypeError, "zero_point"),
    ),
    Case(
        "non-integer quant_min",
        lambda d: tq.fake_quantize_per_tensor(_x(d), 0.1, 0, 0.0, 255),
        Raises(TypeError, "quant_min"),
    ),
    # --- devices --------------------------------------------------------------------------
    Case(
        "fq_linear: weight on another device",
        lambda d: _fql(d, w=torch.empty(6, 8, device="meta")),
        Raises(ValueError, "weight"),
    ),
    Case(
        "per channel: scale on another device",
        lambda d: tq.fake_quantize_per_channel(
            _x(d), torch.empty(4, device="meta"), _pc(d, [0.1] * 4)[1], 0, -128, 127
        ),
        Raises(ValueError, "scale"),
    ),
    # --- qparams --------------------------------------------------------------------------
    Case(
        "scale 0",
        lambda d: tq.fake_quantize_per_tensor(_x(d), 0.0, 0, -128, 127),
        Same(
            lambda d: torch.fake_quantize_per_tensor_affine(_x("cpu"), 0.0, 0, -128, 127),
            "as torch: signed zeros",
        ),
    ),
    Case(
        "negative scale (per channel)",
        lambda d: tq.fake_quantize_per_channel(
            _x(d), *_pc(d, [0.1, -0.1, 0.2, -1.0]), 0, -128, 127
        ),
        Same(lambda d: _torch_pc(d, [0.1, -0.1, 0.2, -1.0]), "as torch (the sign flips q)"),
    ),
    Case(
        "NaN scale",
        lambda d: tq.fake_quantize_per_channel(
            _x(d), *_pc(d, [0.1, float("nan"), 1, 1]), 0, -128, 127
        ),
        Same(lambda d: _torch_pc(d, [0.1, float("nan"), 1, 1]), "as torch: NaN in that channel"),
    ),
    Case(
        "inf scale",
        lambda d: tq.fake_quantize_per_tensor(_x(d), float("inf"), 0, -128, 127),
        Same(
            lambda d: torch.fake_quantize_per_tensor_affine(_x("cpu"), float("inf"), 0, -128, 127),
            "as torch: NaN",
        ),
    ),
    Case(
        "scale beyond any float (the int 10**400)",
        lambda d: tq.fake_quantize_per_tensor(_x(d), 10**400, 0, -128, 127),
        Raises(ValueError, "scale"),
    ),
    Case(
        "zero point outside [quant_min, quant_max]",
        lambda d: tq.fake_quantize_per_tensor(_x(d), 0.1, 300, -128, 127),
        Raises(ValueError, "zero_point"),
    ),
    Case(
        "zero point beyond int32 (per channel, int64)",
        lambda d: tq.fake_quantize_per_channel(
            _x(d), _pc(d, [0.1] * 4)[0], torch.full((4,), 2**32, device=d), 0, -128, 127
        ),
        Raises(ValueError, "zero_point"),
    ),
    Case(
        "quant_min > quant_max",
        lambda d: tq.fake_quantize_per_tensor(_x(d), 0.1, 0, 5, 3),
        Raises(ValueError, "quant_min"),
    ),
    Case(
        "quant range of 17..21 bits (e.g. [0, 2**17 - 1])",
        lambda d: tq.fake_quantize_per_tensor(_x(d) * 1e3, 0.01, 7, 0, 2**17 - 1),
        Same(
            lambda d: torch.fake_quantize_per_tensor_affine(_x("cpu") * 1e3, 0.01, 7, 0, 2**17 - 1),
            "as torch",
        ),
    ),
    Case(
        "quant range beyond +-2**20 (e.g. [0, 2**21 - 1])",
        lambda d: tq.fake_quantize_per_tensor(_x(d), 0.1, 0, 0, 2**21 - 1),
        Raises(ValueError, "quant_max"),
    ),
    Case(
        "NaN / inf in the input",
        lambda d: tq.fake_quantize_per_tensor(
            torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], device=d),
            0.1,
            3,
            -128,
            127,
        ),
        Same(
            lambda d: torch.fake_quantize_per_tensor_affine(
                torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]), 0.1, 3, -128, 127
            ),
            "as torch",
        ),
    ),
    # --- empty, strided and overlapping tensors --------------------------------------------
    Case(
        "empty input (0 rows)",
        lambda d: _fql(d, x=_x(d, 0, 8)),
        Same(lambda d: torch.empty(0, 6), "an empty result, as F.linear"),
    ),
    Case(
        "fq_linear: K = 0",
        lambda d: _fql(d, x=_x(d, 4, 0), w=_w(d, 6, 0), b=_x(d, 6, seed=3)),
        Same(lambda d: _x("cpu", 6, seed=3).expand(4, 6), "the bias broadcast, as F.linear"),
    ),
    Case(
        "fq_linear: N = 0 (no output features)",
        lambda d: _fql(d, w=_w(d, 0, 8)),
        Same(lambda d: torch.empty(4, 0), "an empty result, as F.linear"),
    ),
    Case(
        "transposed (non-contiguous) input",
        lambda d: tq.fake_quantize_per_channel(
            _x(d, 8, 4).t(), *_pc(d, [0.1, 0.2, 0.3, 0.4]), 0, -8, 7
        ),
        Same(
            lambda d: tq.fake_quantize_per_channel(
                _x(d, 8, 4).t().contiguous(), *_pc(d, [0.1, 0.2, 0.3, 0.4]), 0, -8, 7
            ),
            "as a contiguous copy",
        ),
    ),
    Case(
        "overlapping strides (expanded input)",
        lambda d: _fql(d, x=_x(d, 1, 8).expand(5, 8)),
        Same(lambda d: _fql(d, x=_x(d, 1, 8).expand(5, 8).contiguous()), "as a contiguous copy"),
    ),
    Case(
        "overlapping strides (expanded weight)",
        lambda d: _fql(d, w=_w(d, 1, 8).expand(6, 8)),
        Same(lambda d: _fql(d, w=_w(d, 1, 8).expand(6, 8).contiguous()), "as a contiguous copy"),
    ),
    Case(
        "channels-last 4-D input to tq.nn.Linear",
        lambda d: _linear_layer(d)(_channels_last(d)),
        Same(lambda d: _linear_layer(d)(_channels_last(d).contiguous()), "as a contiguous copy"),
    ),
    # --- modules and qconfigs ---------------------------------------------------------------
    Case(
        "tq.nn.Linear without a qconfig",
        lambda d: tq.nn.Linear(8, 6),
        Raises(ValueError, "qconfig must be provided"),
    ),
    Case(
        "a qconfig of another type (e.g. an int)",
        lambda d: tq.nn.Linear(8, 6, qconfig=3),
        Raises(TypeError, "qconfig"),
    ),
    Case(
        "an unknown qconfig name",
        lambda d: tq.get_qconfig("int9"),
        Raises(KeyError, "known names"),
    ),
    Case(
        "fq_linear: weight_qparams not a QParams",
        lambda d: tq.fq_linear(_x(d), _w(d), weight_qparams=(0.1, 0)),
        Raises(TypeError, "weight_qparams"),
    ),
]


def _id(case: Case) -> str:
    return re.sub(r"[^a-z0-9]+", "_", case.what.lower()).strip("_")[:60]


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_input(case: Case, backend: str, device):
    with tq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(case.gets, Raises):
            with pytest.raises(case.gets.exc, match=re.escape(case.gets.word)):
                case.call(device)
            return
        got = case.call(device)
        want = case.gets.expected(device)
    assert_bitwise_equal(got.detach().cpu(), want.detach().cpu(), case.what)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_gradients_through_empty_and_overlapping_inputs(backend, device):
    """Backward of the odd layouts: an empty batch gives zero weight gradients; an expanded
    (overlapping) input sums its rows' gradients, as autograd of a contiguous copy does."""
    qp = _qp()
    with tq.use_backend(backend):
        w = _w(device).requires_grad_()
        tq.fq_linear(_x(device, 0, 8), w, weight_qparams=qp).sum().backward()
        assert_bitwise_equal(w.grad.cpu(), torch.zeros(6, 8), "empty batch dW")
        grads = []
        for copy in (False, True):
            base = _x(device, 1, 8).requires_grad_()
            x = base.expand(5, 8)
            x = x.contiguous() if copy else x
            tq.fq_linear(x, _w(device), weight_qparams=qp).square().sum().backward()
            grads.append(base.grad.cpu())
        assert_bitwise_equal(grads[0], grads[1], "expanded input dX")


def markdown_table() -> str:
    rows = ["| input | what it gets |", "| --- | --- |"]
    rows += [f"| {c.what} | {c.gets.text()} |" for c in CASES]
    return "\n".join(rows)


def test_readme_lists_every_case():
    text = README.read_text()
    missing = [row for row in markdown_table().splitlines()[2:] if row not in text]
    assert not missing, "README's bad-input table lacks:\n" + "\n".join(missing)


if __name__ == "__main__":
    print(markdown_table())
