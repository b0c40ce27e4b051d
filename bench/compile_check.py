"""Ahead-of-time compile check: every Triton kernel of triton_qat, compiled to a cubin for
sm_90 / sm_80 with the wheel's ptxas, without a GPU.

    python bench/compile_check.py [--arch 90 80] [--quick | --cover] [--kernels NAME ...] [--jobs N]
                                  [--budget-s S] [--json PATH] [--list]

Each kernel's variants are the constexpr flags, pointer dtypes and launch options its
launcher passes (KERNELS below, read off the launchers in triton_qat/kernels/), crossed with
its block configs: for the GEMMs the pinned config (TRITON_QAT_AUTOTUNE=0) and the largest
autotune tile whose pipelined operands fit the arch's shared memory. --quick takes one config
per kernel and a covering subset of the flags (every value of every axis at least once);
--cover the same subset with every config.
Integer arguments that the launchers pass as 1 (contiguous inner strides, the group size of
non-grouped weights in int8_matmul, one channel per tensor) are specialized to 1 as Triton's
JIT does.

Prints one line per variant (ok / FAIL, compile seconds, shared memory); a variant whose
shared memory exceeds the arch's limit compiles but would not launch and counts as a failure.
Exit status 1 on any failure. Compilation needs Triton's real JIT path: TRITON_INTERPRET is
removed from the environment before Triton is imported.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import argparse
import importlib
import itertools
import json
import multiprocessing
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton

from triton_qat.kernels import configs as gemm_cfg


def _launch_tile(module: str, *shape: int) -> tuple[int, int]:
    """The (rows, columns) tile that triton_qat.kernels.<module>'s launcher picks for a
    tensor of `shape` (its `_tile`), compiled kernels' sizes (TRITON_INTERPRET is unset)."""
    return importlib.import_module(f"triton_qat.kernels.{module}")._tile(*shape)


# Shared memory per block (opt-in maximum) of the targets, bytes.
SHARED_MEMORY = {90: 232448, 80: 166912}
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "i8": 1, "u8": 1, "fp8e4nv": 1, "fp8e5": 1}
FLOAT_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Kernel:
    """How a launcher calls one @triton.jit kernel.

    pointers: variant -> Triton dtype of every pointer argument. floats: scalar arguments
    passed as Python floats (fp32); every other non-constexpr scalar is an int (i32). ones:
    int arguments the launcher passes as 1. axes: the variant's values; an upper-case name is
    a constexpr, a lower-case one a pointer dtype choice, "_ones" more ints passed as 1,
    "_i64" ints of 2**31 or more (int64 arguments).
    configs: (name, block constexprs and launch options, elements sizes of the two staged
    operands or None); valid: which axis combinations the launcher produces.
    """

    module: str
    attr: str
    pointers: Callable[[dict], dict]
    floats: tuple[str, ...]
    axes: dict
    configs: Callable[[int, dict], list]
    ones: tuple[str, ...] = ()
    valid: Callable[[dict], bool] = lambda v: True
    fp_fusion: bool = False  # every launcher passes enable_fp_fusion=False


def _elementwise_configs(*blocks):
    """Configs of the fake-quant style launchers: (BLOCK_R, BLOCK_C) tiles, 8 warps from 4096
    elements (fake_quant.launch)."""

    def make(arch, *_):
        return [
            (f"{r}x{c}", {"BLOCK_R": r, "BLOCK_C": c, "num_warps": 8 if r * c >= 4096 else 4})
            for r, c in blocks
        ]

    return make


def _gemm_config(c: triton.Config) -> tuple[str, dict]:
    kw = c.kwargs
    name = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}/s{c.num_stages}/w{c.num_warps}"
    return name, {**kw, "num_warps": c.num_warps, "num_stages": c.num_stages}


# --every-config: a GEMM's whole autotune space (what its pruner keeps), not two configs.
EVERY_CONFIG = False


def _gemm_configs(space: Callable[[], list]):
    """The pinned config and the largest tile of `space` that the kernel's pruner
    (configs.prune_configs, with the operands and param_bytes its autotune decorator gave)
    keeps on the arch (a config it drops is never compiled at run time); every kept config
    with EVERY_CONFIG."""

    def make(arch, pointers, variant, tuner):
        prune = tuner.early_config_prune.keywords
        elem_a, elem_b = (ELEMENT_SIZE[pointers[o]] for o in prune["operands"])
        gathered = gemm_cfg.gathered_param_bytes(
            prune["param_bytes"], variant, prune["group_block"]
        )
        big = 1 << 16  # a problem larger than every tile
        smem = SHARED_MEMORY[arch]
        kept = gemm_cfg.select_configs(space(), big, big, elem_a, elem_b, smem, gathered)
        if EVERY_CONFIG:
            return [_gemm_config(c) for c in kept]
        largest = max(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        pinned = gemm_cfg._cfg(*gemm_cfg._UNTUNED_CUDA_CONFIG)
        return [_gemm_config(pinned), _gemm_config(largest)]

    return make


def _float_gemm_space():
    return gemm_cfg._cuda_configs()


def _int_gemm_space():
    return [gemm_cfg._cfg(*s) for s in gemm_cfg._INT_CUDA_CONFIGS]


def _zp(float_zp: bool) -> str:
    return "fp32" if float_zp else "i32"


_X_QUANT = ((False, False), (True, False), (True, True))  # (X_FQ, X_PER_ROW)
# Triton's float8 pointer types by mantissa bits: e4m3fn, e5m2.
_FLOAT8 = {3: "fp8e4nv", 2: "fp8e5"}
# The codes a GEMM reads (W_CODES / X_CODES): int8, or an FP8 layer's float8.
_CODES = ("i8", *_FLOAT8.values())
_PRECISIONS = ("ieee", "tf32")


def _precision_ok(v: dict) -> bool:
    # input_precision(): "tf32" only for fp32 operands.
    return v["INPUT_PRECISION"] == "ieee" or v["dtype"] == "fp32"


def _weight_ok(v: dict) -> bool:
    # ops.py: the weight is in the input's dtype or fp32 (master weights).
    return v["w"] in (v["dtype"], "fp32")


def _group_ok(v: dict) -> bool:
    # Launchers pass GROUP_SIZE=max(group_size, 1): 1 unless the weight is per group.
    return (v["W_GRAN"] == 2) == (v["GROUP_SIZE"] != 1)


def _fq_gemm_valid(v: dict) -> bool:
    x_fq, x_per_row = v["X_QUANT"]
    return _precision_ok(v) and _weight_ok(v) and (x_fq or not x_per_row) and _group_ok(v)


def _codes_valid(v: dict) -> bool:
    # int_matmul.fused_input_codes: x's codes come with per-row qparams (X_PER_ROW)
    if v.get("X_CODES") and v["X_QUANT"] != (True, True):
        return False
    if not _float8_codes_valid(v):
        return False
    # int_matmul.fused_weight_codes (forward, dX): integer zero points; the float weight's
    # dtype no longer matters (one of them stands for all)
    if not v.get("W_CODES"):
        return _fq_gemm_valid(v)
    plain = not v["W_FLOAT_ZP"] and v["w"] == v["dtype"]
    return plain and _fq_gemm_valid(v)


def _float8_codes_valid(v: dict) -> bool:
    """float8.fp8_linear_forward / _backward: the codes of an FP8 weight (per tensor or per
    row, no zero point), an FP8 input's codes or no input fake quant; dW without the mask.
    microscaling.mx_linear_forward / _backward: e4m3 element codes of the weight per block
    (W_GRAN 2) and of the input per row and block (X_GROUP_SIZE), or a plain input."""
    codes = v.get("codes", "i8")
    x_group = v.get("X_GROUP_SIZE", 0)
    if x_group and (codes != "fp8e4nv" or not v.get("X_CODES")):
        return False  # per-block input scales: microscaling codes only
    if v.get("W_MASK") is False:
        # Only the FP8 / microscaling dW drops the mask; it reads no weight qparams (one
        # placeholder scale: W_GRAN 0), its weight in the input's dtype or fp32 (master
        # weights, _fq_gemm_valid), x as float8 codes or as is (then no codes pointer: "i8"
        # stands for it).
        if v["W_GRAN"] != 0 or v["W_FLOAT_ZP"]:
            return False
        if not v["X_CODES"]:
            return codes == "i8" and v["X_QUANT"] == (False, False)
        return codes != "i8"
    if codes == "i8":
        return True
    if "W_MASK" in v:
        return False  # float8 codes in dW come without the mask
    plain_w = not v["W_FLOAT_ZP"] and v["w"] == v["dtype"]
    fp8_weight = v["W_GRAN"] in (0, 1) and plain_w
    mx_weight = v["W_GRAN"] == 2 and codes == "fp8e4nv" and plain_w
    x_ok = v.get("X_CODES") or v["X_QUANT"] == (False, False)
    if v.get("X_CODES"):  # forward: an FP8 weight's input per row, a microscaling one's per block
        x_ok = (x_group > 0) == mx_weight
    return (fp8_weight or mx_weight) and v["W_CODES"] and x_ok


def _float8_arch(make):
    """Float8 pointers only where the runtime passes them: compute capability 8.9 and up
    (ops/float_formats._float8_triton); sm_80's Triton has no e4m3fn."""

    def configs(arch, pointers, *rest):
        if arch < 89 and any(p in _FLOAT8.values() for p in pointers.values()):
            return []
        return make(arch, pointers, *rest)

    return configs


def _fq_fwd_pointers(v):
    d = v["dtype"]
    x_zp = "i32" if v["X_QUANT"][0] else "fp32"  # x_tensors(): an fp32 placeholder
    codes = v.get("codes", "i8")  # int8 codes or an FP8 layer's float8 codes
    return {
        "x_ptr": codes if v.get("X_CODES") else d,
        "w_ptr": codes if v.get("W_CODES") else v["w"],
        "b_ptr": v["w"] if v.get("HAS_BIAS") else d,  # bias in x's or w's dtype; else y itself
        "y_ptr": d,
        "w_inv_ptr": "fp32",
        "w_scale_ptr": "fp32",
        "w_zp_ptr": _zp(v["W_FLOAT_ZP"]),
        "x_inv_ptr": "fp32",
        "x_scale_ptr": "fp32",
        "x_zp_ptr": x_zp,
    }


def _fq_dx_pointers(v):
    p = _fq_fwd_pointers(v)
    return {
        "dy_ptr": v["dtype"],
        "w_ptr": p["w_ptr"],
        "x_ptr": v["dtype"],
        "dx_ptr": v["dtype"],
        **{k: p[k] for k in ("w_inv_ptr", "w_scale_ptr", "w_zp_ptr", "x_inv_ptr", "x_zp_ptr")},
    }


def _fq_dw_pointers(v):
    p = _fq_fwd_pointers(v)
    return {
        "dy_ptr": v["dtype"],
        "x_ptr": p["x_ptr"],
        "w_ptr": v["w"],
        "dw_ptr": v["w"],
        **{k: p[k] for k in ("w_inv_ptr", "w_zp_ptr", "x_inv_ptr", "x_scale_ptr", "x_zp_ptr")},
    }


_QRANGE = ("w_qmin", "w_qmax", "x_qmin", "x_qmax")
# configs.autotune(loop_even=True): the loop's extent a multiple of BLOCK_K (4096) or not
_LOOP_EVEN = {"LOOP_EVEN": (True, False)}
_FQ_AXES = {
    "dtype": FLOAT_DTYPES,
    "w": FLOAT_DTYPES,
    "W_GRAN": (0, 1, 2),
    # per group: within a 32 / 64 / 128-wide tile (32, 128), whole groups in a tile (16),
    # gathered per element (48)
    "GROUP_SIZE": (1, 32, 128, 16, 48),
    "W_FLOAT_ZP": (False, True),
    "X_QUANT": _X_QUANT,
    "INPUT_PRECISION": _PRECISIONS,
}

# The one table: kernel name -> how its launcher calls it.
KERNELS: dict[str, Kernel] = {
    "fake_quant_fwd": Kernel(
        "triton_qat.kernels.fake_quant",
        "fake_quant_fwd_kernel",
        lambda v: {
            "x_ptr": v["dtype"],
            "y_ptr": v["dtype"],
            "inv_ptr": "fp32",
            "scale_ptr": "fp32",
            "zp_ptr": _zp(v["FLOAT_ZP"]),
        },
        ("qmin", "qmax"),
        {
            "dtype": FLOAT_DTYPES,
            "PARAMS_ON_COLS": (False, True),
            "FLOAT_ZP": (False, True),
            "_ones": ((), ("rows", "channels")),  # per tensor: one row, one channel
            "_i64": ((), ("cols",)),  # a per-tensor row of 2**31 elements or more
        },
        _elementwise_configs((2, 2048), (64, 64), (1, 16)),
    ),
    "fake_quant_bwd": Kernel(
        "triton_qat.kernels.fake_quant",
        "fake_quant_bwd_kernel",
        lambda v: {
            "x_ptr": v["dtype"],
            "dy_ptr": v["dtype"],
            "dx_ptr": v["dtype"],
            "inv_ptr": "fp32",
            "zp_ptr": _zp(v["FLOAT_ZP"]),
        },
        ("qmin", "qmax"),
        {
            "dtype": FLOAT_DTYPES,
            "PARAMS_ON_COLS": (False, True),
            "FLOAT_ZP": (False, True),
            "_ones": ((), ("rows", "channels")),
            "_i64": ((), ("cols",)),
        },
        _elementwise_configs((2, 2048), (64, 64), (1, 16)),
    ),
    "quantized_codes": Kernel(
        "triton_qat.kernels.fake_quant",
        "quantized_codes_kernel",
        lambda v: {
            "x_ptr": v["dtype"],
            "q_ptr": "i8",
            "inv_ptr": "fp32",
            "zp_ptr": _zp(v["FLOAT_ZP"]),
        },
        ("qmin", "qmax", "shift"),
        {
            "dtype": FLOAT_DTYPES,
            "PARAMS_ON_COLS": (False, True),
            "FLOAT_ZP": (False, True),
            "_ones": ((), ("rows", "channels")),
            "_i64": ((), ("cols",)),
        },
        # per channel (rows of K), per group of 32 (K / 32 rows per weight row), tiny
        _elementwise_configs((2, 2048), (128, 32), (1, 16)),
    ),
    "learnable_bwd": Kernel(
        "triton_qat.kernels.learnable",
        "learnable_fake_quant_bwd_kernel",
        lambda v: {
            "x_ptr": v["dtype"],
            "dy_ptr": v["dtype"],
            "dx_ptr": v["dtype"],
            **dict.fromkeys(
                ("dscale_part_ptr", "dzp_part_ptr", "scale_ptr", "inv_ptr", "zp_ptr"), "fp32"
            ),
        },
        ("qmin", "qmax", "grad_factor"),
        {
            "dtype": FLOAT_DTYPES,
            "PARAMS_ON_COLS": (False, True),
            "FLOAT_ZP": (True,),  # the launcher always passes a rounded fp32 zero point
            "_ones": ((), ("rows", "channels")),
            "_i64": ((), ("cols",)),
        },
        _elementwise_configs((2, 2048), (64, 64), (1, 16)),
    ),
    "per_token_qparams": Kernel(
        "triton_qat.kernels.per_token",
        "per_token_qparams_kernel",
        lambda v: {"x_ptr": v["dtype"], "scale_ptr": "fp32", "inv_ptr": "fp32", "zp_ptr": "i32"},
        ("quant_min", "quant_max", "divisor", "eps", "symmetric_zero_point"),
        {"dtype": FLOAT_DTYPES, "SYMMETRIC": (False, True)},
        lambda arch, *_: [
            ("4x1024", {"BLOCK_M": 4, "BLOCK_K": 1024}),
            ("4x16", {"BLOCK_M": 4, "BLOCK_K": 16}),
        ],
        ones=("stride_xk",),
    ),
    "embedding_gather": Kernel(
        "triton_qat.kernels.embedding",
        "embedding_fq_gather_kernel",
        lambda v: {
            "idx_ptr": "i64",
            "w_ptr": v["dtype"],
            "dy_ptr": v["dtype"],
            "out_ptr": v["dtype"],
            "inv_ptr": "fp32",
            "scale_ptr": "fp32",
            "zp_ptr": _zp(v["FLOAT_ZP"]),
        },
        ("qmin", "qmax"),
        {"dtype": FLOAT_DTYPES, "FLOAT_ZP": (False, True), "GRAD": (False, True)},
        # embedding._gather: 16 looked-up rows by up to 128 columns (32 x 256 at 4 warps
        # spilled 88-152 bytes, 255 registers; 16 x 128: 95, none)
        lambda arch, *_: [
            ("16x128", {"BLOCK_N": 16, "BLOCK_D": 128}),
            ("16x16", {"BLOCK_N": 16, "BLOCK_D": 16}),
        ],
    ),
    "embedding_dw": Kernel(
        "triton_qat.kernels.embedding",
        "embedding_fq_dw_kernel",
        lambda v: {
            "dy_ptr": v["dtype"],
            "order_ptr": "i64",
            "seg_start_ptr": "i64",
            "seg_row_ptr": "i64",
            "w_ptr": v["dtype"],
            "dw_ptr": v["dtype"],
            "inv_ptr": "fp32",
            "zp_ptr": _zp(v["FLOAT_ZP"]),
        },
        ("qmin", "qmax"),
        {"dtype": FLOAT_DTYPES, "FLOAT_ZP": (False, True)},
        lambda arch, *_: [("256", {"BLOCK_D": 256}), ("16", {"BLOCK_D": 16})],
    ),
    "minmax_partial": Kernel(
        "triton_qat.kernels.observe",
        "_minmax_partial_kernel",
        lambda v: {"x_ptr": v["dtype"], "pmin_ptr": "fp32", "pmax_ptr": "fp32", "pnan_ptr": "i32"},
        (),
        {
            "dtype": FLOAT_DTYPES,
            "HAS_OUTER": (False, True),
            "_i64": ((), ("inner", "per_channel", "chunk")),  # 2**31 elements or more
        },
        lambda arch, *_: [
            # channels innermost (inner == 1): 64 channels x 64 elements
            ("64x64", {"BLOCK_J": 64, "BLOCK_C": 64, "num_warps": 8, "_ones": ("inner",)}),
            ("4096x1", {"BLOCK_J": 4096, "BLOCK_C": 1, "num_warps": 8}),
            ("256x16", {"BLOCK_J": 256, "BLOCK_C": 16, "num_warps": 8}),
        ],
    ),
    "observe_finish": Kernel(
        "triton_qat.kernels.observe",
        "_observe_finish_kernel",
        lambda v: {
            **dict.fromkeys(("pmin_ptr", "pmax_ptr", "run_min_ptr", "run_max_ptr"), "fp32"),
            "pnan_ptr": "i32",
            "scale_ptr": "fp32",
            "zp_ptr": "i32",
            "eps_ptr": "fp32",
            # the flags are int64 buffers; without them the launcher passes pnan (int32)
            "observer_on_ptr": "i64" if v["HAS_FLAGS"] else "i32",
            "fake_quant_on_ptr": "i64" if v["HAS_FLAGS"] else "i32",
        },
        ("averaging_constant", "qmin", "qmax"),
        {
            "UPDATE": (0, 1, 2, 3, 4),
            "QPARAMS": (0, 1, 2),
            "SYMMETRIC": (False, True),
            "NOT_OBSERVED_DEFAULT": (False, True),
            "HAS_FLAGS": (False, True),
        },
        lambda arch, *_: [
            ("256", {"BLOCK": 256}),
            ("1", {"BLOCK": 1, "_ones": ("channels",)}),  # per tensor
        ],
        # fake_quantize.py: the fused module (flags, fused moving average and qparams), or an
        # observer (running min / max or moving averages, optionally torch.ao's qparams).
        valid=lambda v: (
            v["HAS_FLAGS"] == (v["UPDATE"] == 4) == (v["QPARAMS"] == 2)
            and (v["QPARAMS"] == 1 or not v["NOT_OBSERVED_DEFAULT"])
            and (v["QPARAMS"] != 0 or not v["SYMMETRIC"])
        ),
    ),
    "fq_linear_fwd": Kernel(
        "triton_qat.kernels.fq_matmul",
        "fq_linear_fwd_kernel",
        _fq_fwd_pointers,
        _QRANGE,
        {
            **_FQ_AXES,
            "W_CODES": (False, True),
            "X_CODES": (False, True),
            "codes": _CODES,
            "HAS_BIAS": (False, True),
            # microscaling inputs: blocks within a tile (32), two per tile (16), gathered (48)
            "X_GROUP_SIZE": (0, 32, 16, 48),
            **_LOOP_EVEN,
        },
        _float8_arch(_gemm_configs(_float_gemm_space)),
        ones=("stride_xk", "stride_wk", "stride_yn"),
        valid=_codes_valid,
    ),
    "fq_linear_dx": Kernel(
        "triton_qat.kernels.fq_matmul",
        "fq_linear_dx_kernel",
        _fq_dx_pointers,
        _QRANGE,
        {**_FQ_AXES, "W_CODES": (False, True), "codes": _CODES, **_LOOP_EVEN},
        _float8_arch(_gemm_configs(_float_gemm_space)),
        ones=("stride_dyn", "stride_wk", "stride_xk", "stride_dxk"),
        valid=_codes_valid,
    ),
    "fq_linear_dw": Kernel(
        "triton_qat.kernels.fq_matmul",
        "fq_linear_dw_kernel",
        _fq_dw_pointers,
        _QRANGE,
        {
            **_FQ_AXES,
            "X_CODES": (False, True),
            "codes": _CODES,
            "W_MASK": (True, False),
            "X_GROUP_SIZE": (0, 32, 16, 48),
            **_LOOP_EVEN,
        },
        _float8_arch(_gemm_configs(_float_gemm_space)),
        ones=("stride_dyn", "stride_xk", "stride_wk", "stride_dwk"),
        valid=_codes_valid,
    ),
    "quantize_rows": Kernel(
        "triton_qat.kernels.int_matmul",
        "quantize_rows_kernel",
        lambda v: {
            "x_ptr": v["dtype"],
            "q_ptr": "i8",
            "scale_ptr": "fp32",
            "zp_ptr": "i32",
            "sum_ptr": "i32",
            "static_scale_ptr": "fp32",
            "static_zp_ptr": "i32",
        },
        ("qmin", "qmax", "shift"),
        {"dtype": FLOAT_DTYPES, "_ones": (("param_stride",), ())},
        lambda arch, *_: [
            ("4x1024", {"BLOCK_R": 4, "BLOCK_K": 1024, "num_warps": 4}),
            ("4x16", {"BLOCK_R": 4, "BLOCK_K": 16, "num_warps": 4}),
        ],
        ones=("stride_xk",),
    ),
    "int_weight_matmul": Kernel(
        "triton_qat.kernels.int_matmul",
        "int_weight_matmul_kernel",
        lambda v: {
            "x_ptr": v["dtype"],
            "w_ptr": "u8" if v["PACKED"] else "i8",
            "b_ptr": v["dtype"],
            "y_ptr": v["dtype"],
            "scale_ptr": "fp32",
            "zp_ptr": "i32",
        },
        (),
        {
            "dtype": FLOAT_DTYPES,
            "W_GRAN": (0, 1, 2),
            "GROUP_SIZE": (1, 32, 128, 16, 48),
            "PACKED": (False, True),
            "HAS_BIAS": (False, True),
            "INPUT_PRECISION": _PRECISIONS,
        },
        _gemm_configs(_int_gemm_space),
        ones=("stride_xk", "stride_wk", "stride_yn"),
        # int4 codes come packed, per group (IntWeight)
        valid=lambda v: _precision_ok(v) and (not v["PACKED"] or v["W_GRAN"] == 2) and _group_ok(v),
    ),
    "int8_matmul": Kernel(
        "triton_qat.kernels.int_matmul",
        "int8_matmul_kernel",
        lambda v: {
            "x_ptr": "i8",
            "w_ptr": "u8" if v["PACKED"] else "i8",
            # the fused op's forward passes the bias as given: fp32 next to bf16 / fp16 input
            "b_ptr": "fp32" if v["bias"] == "fp32" else v["dtype"],
            "y_ptr": v["dtype"],
            "x_scale_ptr": "fp32",
            "x_zp_ptr": "i32",
            "x_sum_ptr": "i32",
            "w_scale_ptr": "fp32",
            "w_zp_ptr": "i32",
        },
        (),
        {
            "dtype": FLOAT_DTYPES,
            "W_GRAN": (0, 1, 2),
            "PACKED": (False, True),
            "X_ZP": (False, True),
            "HAS_BIAS": (False, True),
            "bias": ("x", "fp32"),
            # max(32, min(next_pow2(group_size), 128)): groups of 32, 48 / 64, 128 and more
            "GROUP_CHUNK": (32, 64, 128),
        },
        _gemm_configs(_int_gemm_space),
        ones=("stride_xk", "stride_wk", "stride_yn"),
        valid=lambda v: (
            (not v["PACKED"] or v["W_GRAN"] == 2)
            and (v["W_GRAN"] == 2 or v["GROUP_CHUNK"] == 32)
            and (v["HAS_BIAS"] or v["bias"] == "x")
            and (v["bias"] == "x" or v["dtype"] != "fp32")
        ),
    ),
    "float8_rows": Kernel(
        "triton_qat.kernels.float8",
        "float8_rows_kernel",
        lambda v: {
            "x_ptr": v["dtype"],
            "scale_ptr": "fp32",
            "codes_ptr": _FLOAT8[v["MBITS"]] if v["WRITE_CODES"] else "fp32",
            "y_ptr": v["dtype"] if v["WRITE_Y"] else "fp32",
        },
        ("eps",),
        {
            "dtype": FLOAT_DTYPES,
            # (mantissa bits, smallest normal exponent, max): e4m3fn, e5m2
            "MBITS": (3, 2),
            "EMIN": (-6, -14),
            "FMAX": (448.0, 57344.0),
            "SCALE_GIVEN": (False, True),
            "AMAX_ONLY": (False, True),
            "WRITE_CODES": (False, True),
            "WRITE_Y": (False, True),
        },
        # _launch's tiles (kernels.float8._tile): long rows, and rows of 16
        _float8_arch(
            lambda arch, *_: [
                (f"{bm}x{bk}", {"BLOCK_M": bm, "BLOCK_K": bk})
                for bm, bk in (_launch_tile("float8", 8192, 4096), _launch_tile("float8", 8192, 16))
            ]
        ),
        ones=("stride_xk", "stride_ck", "stride_yk"),
        valid=lambda v: (
            (v["MBITS"], v["EMIN"], v["FMAX"]) in ((3, -6, 448.0), (2, -14, 57344.0))
            # float8_scale (AMAX_ONLY: scales only), _quantize (codes or y, one at a time)
            and (
                (
                    v["AMAX_ONLY"]
                    and not v["SCALE_GIVEN"]
                    and not v["WRITE_CODES"]
                    and not v["WRITE_Y"]
                )
                or (not v["AMAX_ONLY"] and v["WRITE_CODES"] != v["WRITE_Y"])
            )
        ),
    ),
    "microscaling": Kernel(
        "triton_qat.kernels.microscaling",
        "microscaling_kernel",
        lambda v: {
            "x_ptr": v["dtype"],
            "codes_ptr": "fp8e4nv" if v["WRITE_CODES"] else "fp32",
            "scale_ptr": "fp32",
            "y_ptr": v["dtype"] if v["WRITE_Y"] else "fp32",
            "tensor_scale_ptr": "fp32",
        },
        (),
        {
            "dtype": FLOAT_DTYPES,
            # MX (e8m0 scales) or NVFP4 (e4m3 block scales under a tensor scale)
            "NVFP4_SCALES": (False, True),
            # element (emax, max, mantissa bits, smallest normal exponent): e4m3, e2m1
            "EMAX": (8, 2),
            "FMAX": (448.0, 6.0),
            "MBITS": (3, 1),
            "EMIN": (-6, 0),
            # blocks of 32, 16 and 48 (padded to 64)
            "BLOCK_SIZE": (32, 16, 48),
            "BLOCK_SIZE_P2": (32, 16, 64),
            "AMAX_ONLY": (False, True),
            "WRITE_CODES": (False, True),
            "WRITE_Y": (False, True),
        },
        # _launch's tiles (kernels.microscaling._tile): long rows (4 rows by as many blocks as
        # fit its elements per program), and rows of one block (as many rows as fit)
        _float8_arch(
            lambda arch, pointers, v, *_: [
                (f"{bm}x{bg}", {"BLOCK_M": bm, "BLOCK_G": bg})
                for bm, bg in (
                    _launch_tile("microscaling", 8192, 4096, v["BLOCK_SIZE_P2"]),
                    _launch_tile("microscaling", 8192, 1, v["BLOCK_SIZE_P2"]),
                )
            ]
        ),
        ones=("stride_xk", "stride_ck", "stride_yk"),
        valid=lambda v: (
            (v["EMAX"], v["FMAX"], v["MBITS"], v["EMIN"]) in ((8, 448.0, 3, -6), (2, 6.0, 1, 0))
            and (not v["NVFP4_SCALES"] or v["MBITS"] == 1)
            and v["BLOCK_SIZE_P2"] == triton.next_power_of_2(v["BLOCK_SIZE"])
            # nvfp4_tensor_scale (AMAX_ONLY: NVFP4 only), _quantize (codes or y, one at a time)
            and (
                (v["AMAX_ONLY"] and v["NVFP4_SCALES"] and not v["WRITE_CODES"] and not v["WRITE_Y"])
                or (not v["AMAX_ONLY"] and v["WRITE_CODES"] != v["WRITE_Y"])
            )
        ),
    ),
    "fp8_matmul": Kernel(
        "triton_qat.kernels.float8",
        "fp8_matmul_kernel",
        lambda v: {
            "x_ptr": _FLOAT8[v["mbits"]],
            "w_ptr": _FLOAT8[v["mbits"]],
            "b_ptr": v["dtype"],
            "y_ptr": v["dtype"],
            "x_scale_ptr": "fp32",
            "w_scale_ptr": "fp32",
        },
        (),
        {"dtype": FLOAT_DTYPES, "mbits": (3, 2), "HAS_BIAS": (False, True)},
        _float8_arch(_gemm_configs(_int_gemm_space)),
        ones=("stride_xk", "stride_wk", "stride_yn"),
    ),
}


def variants(name: str, quick: bool) -> list[dict]:
    """The valid axis combinations of kernel `name`; with `quick`, a subset that still holds
    every value of every axis."""
    spec = KERNELS[name]
    keys = list(spec.axes)
    full = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*spec.axes.values())]
    full = [v for v in full if spec.valid(v)]
    if not quick:
        return full
    covered: set = set()
    chosen = []
    for v in full:
        pairs = {(k, repr(x)) for k, x in v.items()}
        if not pairs <= covered:
            chosen.append(v)
            covered |= pairs
    return chosen


def _flatten_variant(v: dict) -> dict:
    """X_QUANT -> X_FQ / X_PER_ROW."""
    out = dict(v)
    if "X_QUANT" in out:
        out["X_FQ"], out["X_PER_ROW"] = out.pop("X_QUANT")
    return out


def jobs_for(names, archs, quick, cover=False):
    """Every (kernel, arch, variant, config) to compile: with `quick` the covering variants
    and the first config, with `cover` the covering variants and every config."""
    out = []
    for name in names:
        for arch in archs:
            for v in variants(name, quick or cover):
                spec = KERNELS[name]
                tuner = getattr(importlib.import_module(spec.module), spec.attr)
                cfgs = spec.configs(arch, spec.pointers(v), v, tuner)
                for cfg_name, cfg in cfgs[:1] if quick else cfgs:
                    out.append((name, arch, v, cfg_name, cfg))
    return out


def _jit_function(obj):
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn  # Autotuner (and the cache hook) wrap the JITFunction
    return obj


def compile_one(job) -> dict:
    """Compile one variant; {"ok", "seconds", "shared", "error"}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, arch, v, cfg_name, cfg = job
    spec = KERNELS[name]
    fn = _jit_function(getattr(importlib.import_module(spec.module), spec.attr))
    pointers = spec.pointers(v)
    v = _flatten_variant(v)
    cfg = dict(cfg)
    options = {"enable_fp_fusion": spec.fp_fusion}
    for opt in ("num_warps", "num_stages"):
        if opt in cfg:
            options[opt] = cfg.pop(opt)
    aligned = cfg.pop("_aligned", False)
    ones = set(spec.ones) | set(cfg.pop("_ones", ())) | set(v.pop("_ones", ()))
    wide = set(v.pop("_i64", ()))  # Python ints of 2**31 or more are passed as int64
    if "group_size" in fn.arg_names and v.get("W_GRAN") != 2:
        ones.add("group_size")  # launchers pass max(group_size, 1)
    constexprs = {k: x for k, x in {**v, **cfg}.items() if k[0].isupper()}
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ones:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in pointers:
            signature[arg] = "*" + pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif arg in spec.floats:
            signature[arg] = "fp32"
        elif arg in wide:
            signature[arg] = "i64"
        else:
            signature[arg] = "i32"
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]  # as the JIT marks 4096, 14336, ...
    missing = set(constexprs) - set(fn.arg_names)
    if missing:
        raise KeyError(f"{name}: no arguments {sorted(missing)}")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        shared = int(compiled.metadata.shared)
        cubin = len(compiled.asm["cubin"])
        machine = machine_code_stats(compiled.asm["cubin"])
        error = None
        if shared > SHARED_MEMORY[arch]:
            error = f"shared memory {shared} B exceeds sm_{arch}'s {SHARED_MEMORY[arch]} B"
    except Exception as exc:  # a compile error of any stage
        shared = cubin = None
        machine = {}
        # A CompilationError reads "at L:C:", the kernel's source, then the cause.
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        if len(lines) > 4:
            lines = [lines[0], "...", *lines[-3:]]
        error = f"{type(exc).__name__}: " + " | ".join(lines)[:800]
    return {
        "kernel": name,
        "arch": arch,
        "variant": {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()},
        "config": cfg_name,
        "ones": sorted(ones),
        "i64": sorted(wide),
        "ok": error is None,
        "seconds": round(time.perf_counter() - start, 2),
        "shared": shared,
        "cubin_bytes": cubin,
        **machine,
        "error": error,
    }


def _nvidia_tool(name: str) -> str | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def machine_code_stats(cubin: bytes) -> dict:
    """What the cubin's SASS says about speed, without a GPU: registers per thread, spill
    bytes (stack and local memory), and the instructions of the hottest loop (the longest
    backward branch): how many, how many matrix-multiply (MMA), spill (LDL / STL) and
    int -> float conversion (I2F) ones. Empty where the wheel has no cuobjdump / nvdisasm."""
    import re
    import subprocess

    cuobjdump, nvdisasm = _nvidia_tool("cuobjdump"), _nvidia_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    out = {}
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m:
        out["registers"] = int(m.group(1))
        out["spill_bytes"] = int(m.group(2)) + int(m.group(3))
    labels = {
        lab: int(off, 16) for lab, off in re.findall(r"\.(L_x_\d+):\s*\n\s*/\*([0-9a-f]+)\*/", sass)
    }
    ops = []
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            target = re.search(r"`\(\.(L_x_\d+)\)", line)
            ops.append((int(m.group(1), 16), m.group(2), target.group(1) if target else None))
    loops = [
        (labels[t], off)
        for off, op, t in ops
        if op.startswith("BRA") and t in labels and labels[t] < off
    ]
    if loops:
        lo, hi = max(loops, key=lambda span: span[1] - span[0])
        body = [op for off, op, _ in ops if lo <= off <= hi]
        out["loop_instructions"] = len(body)
        out["loop_mma"] = sum("MMA" in op for op in body)
        out["loop_spills"] = sum(op.startswith(("LDL", "STL")) for op in body)
        # int -> float conversions (I2F: a quarter of the ALU's rate or less)
        out["loop_i2f"] = sum(op.startswith("I2F") for op in body)
    return out


def _describe(r: dict) -> str:
    flags = " ".join(f"{k}={x}" for k, x in r["variant"].items())
    flags += f" ones={','.join(r['ones'])}" if r["ones"] else ""
    flags += f" i64={','.join(r['i64'])}" if r["i64"] else ""
    status = "ok  " if r["ok"] else "FAIL"
    machine = ""
    if "registers" in r:
        machine = f" regs={r['registers']} spill={r['spill_bytes']}"
    if "loop_instructions" in r:
        machine += f" loop={r['loop_instructions']}/mma={r['loop_mma']}/i2f={r.get('loop_i2f', 0)}"
    line = (
        f"{status} {r['seconds']:7.1f}s sm_{r['arch']} {r['kernel']:<18} {r['config']:<18} "
        f"smem={r['shared']}{machine} {flags}"
    )
    return line if r["ok"] else f"{line}\n     {r['error']}"


def untabled_kernels() -> list[str]:
    """The @triton.jit kernels of triton_qat.kernels' modules that KERNELS does not list."""
    import pkgutil

    import triton_qat.kernels as package

    tabled = {(k.module, k.attr) for k in KERNELS.values()}
    missing = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for attr, obj in vars(module).items():
            if not attr.endswith("_kernel") or not hasattr(obj, "fn"):
                continue
            if getattr(_jit_function(obj), "__module__", None) != module.__name__:
                continue  # imported from another module
            if (module.__name__, attr) not in tabled:
                missing.append(f"{module.__name__}.{attr}")
    return missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[90, 80])
    parser.add_argument("--quick", action="store_true", help="one config per kernel, few flags")
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=sorted(KERNELS))
    parser.add_argument(
        "--cover", action="store_true", help="--quick's few flags with every config"
    )
    parser.add_argument("--jobs", type=int, default=1, help="compile processes")
    parser.add_argument("--budget-s", type=float, default=None, help="start no job after this")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--list", action="store_true", help="list the variants, compile none")
    parser.add_argument(
        "--where", nargs="+", default=[], metavar="AXIS=VALUE", help="only these axis values"
    )
    parser.add_argument("--limit", type=int, default=None, help="the first N variants only")
    parser.add_argument(
        "--aligned",
        action="store_true",
        help="integer arguments divisible by 16, as the JIT specializes them for shapes such "
        "as 4096 (the code the benchmarks run; without it: any size)",
    )
    parser.add_argument(
        "--every-config",
        action="store_true",
        help="the GEMMs' whole pruned autotune space (default: the pinned and the largest)",
    )
    args = parser.parse_args(argv)
    global EVERY_CONFIG
    EVERY_CONFIG = args.every_config
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    # `timeout` sends SIGTERM: exit through the pool's cleanup, which ends the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))

    untabled = untabled_kernels()
    for name in untabled:
        print(f"FAIL {name}: a kernel missing from KERNELS (bench/compile_check.py)")
    jobs = jobs_for(args.kernels, args.arch, args.quick, args.cover)
    for cond in args.where:
        axis, _, value = cond.partition("=")
        jobs = [j for j in jobs if axis not in j[2] or str(j[2][axis]) == value]
    jobs = jobs[: args.limit]
    if args.aligned:
        jobs = [(*j[:4], {**j[4], "_aligned": True}) for j in jobs]
    if args.list:
        for name, arch, v, cfg_name, _ in jobs:
            print(f"sm_{arch} {name} {cfg_name} {v}")
        print(f"{len(jobs)} variants")
        return 1 if untabled else 0
    # A private, empty cache: the times are real compiles, not cache hits.
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="tq_compile_check_"))
    print(f"triton {triton.__version__}: {len(jobs)} variants, {args.jobs} job(s)", flush=True)
    start = time.perf_counter()
    results: list[dict] = []
    skipped = 0

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    if args.jobs == 1:
        for job in jobs:
            if over_budget():
                skipped += 1
                continue
            results.append(compile_one(job))
            print(_describe(results[-1]), flush=True)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.jobs, maxtasksperchild=32) as pool:
            pending = iter(jobs)
            for r in pool.imap_unordered(compile_one, pending):
                results.append(r)
                print(_describe(r), flush=True)
                if over_budget():
                    pool.terminate()
                    break
        skipped = len(jobs) - len(results)

    failed = [r for r in results if not r["ok"]]
    total = time.perf_counter() - start
    print(
        f"{len(results) - len(failed)} ok, {len(failed)} failed, {skipped} not run; {total:.0f} s"
    )
    if results:
        slowest = max(results, key=lambda r: r["seconds"])
        print(f"slowest: {slowest['seconds']:.1f} s {slowest['kernel']} {slowest['config']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "not_run": skipped}, indent=1))
    return 1 if failed or untabled else 0


if __name__ == "__main__":
    sys.exit(main())
