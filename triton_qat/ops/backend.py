"""Which path runs an op: the Triton kernels or the eager reference.

Nothing here touches CUDA at import time; Triton itself is imported lazily, on the first
call that needs to know whether it is installed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "eager")
_ENV_VAR = "TRITON_QAT_BACKEND"


def _checked(name: object) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.strip().lower()


def _initial_backend() -> str:
    value = os.environ.get(_ENV_VAR, "auto")
    try:
        return _checked(value)
    except ValueError as err:
        # Importing must work; a bad setting is reported, not fatal.
        warnings.warn(f"ignoring {_ENV_VAR}={value!r}: {err}; using 'auto'", stacklevel=2)
        return "auto"


_backend = _initial_backend()


def set_backend(name: str) -> None:
    """Select the path ops take: "auto" (default), "triton" or "eager"."""
    global _backend
    _backend = _checked(name)


def get_backend() -> str:
    """The backend now in force."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block under another backend, restoring the previous one afterwards."""
    global _backend
    new = _checked(name)
    old = _backend
    _backend = new
    try:
        yield
    finally:
        _backend = old


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton imports, else why it does not."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # an ImportError, or a broken install raising anything
        return f"triton is not importable ({type(err).__name__}: {err})"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of `device`, else the reason."""
    err = triton_import_error()
    if err is not None:
        return err
    if device.type == "cuda":
        return None
    # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
    from triton_qat.kernels import INTERPRETED_KERNELS, INTERPRETER_MISMATCH

    if INTERPRETER_MISMATCH:
        return INTERPRETER_MISMATCH
    if device.type == "cpu":
        if INTERPRETED_KERNELS:
            return None
        return (
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton "
            "and triton_qat's kernels are first imported"
        )
    return f"device type {device.type!r} is not supported by the Triton kernels"


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of `device` runs the Triton kernels.

    Backend "triton" raises a RuntimeError naming the reason when the kernels cannot run;
    it never falls back silently.
    """
    if _backend == "eager":
        return False
    reason = triton_unavailable_reason(device)
    if reason is None:
        return True
    if _backend == "triton":
        raise RuntimeError(f"triton_qat backend 'triton' cannot run on {device}: {reason}")
    return False


# Fake (meta) implementations shared by the fused linear custom ops (torch.compile traces
# them): each op is op(x, weight or its codes, ...) on a 2-D x, and its backward op
# backward_op(grad_y, x, weight, ..., need_dx, need_dw) returns (dx, dw), an unneeded one as
# an empty tensor.


def fake_linear_output(x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    """The (M, N) output of a fused linear op on x (M, K) and a weight (or codes) (N, ...)."""
    return x.new_empty((x.shape[0], weight.shape[0]))


def op_grads(
    x: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor | None, dw: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused linear backward op's return value: (dx, dw), an unneeded gradient (None) as an
    empty tensor (a custom op returns tensors, never None)."""
    return (x.new_empty(0) if dx is None else dx, weight.new_empty(0) if dw is None else dw)


def fake_linear_grads(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *args
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of a fused linear backward op whose last two arguments are need_dx, need_dw."""
    need_dx, need_dw = args[-2], args[-1]
    return (
        # The real ops return contiguous gradients whatever the operands' strides.
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        weight.new_empty(weight.shape) if need_dw else weight.new_empty(0),
    )
