"""Autotune spaces for the fused fake-quant GEMMs, their pruner, and the interpreter's config.

Nothing here touches the GPU at import; device limits are read when a config is pruned.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import triton

from triton_qat.kernels import INTERPRETED_KERNELS
from triton_qat.kernels.autotune_cache import attach_cache
from triton_qat.numerics.qparams import PER_GROUP

# Qparam bytes staged per weight element: a number, or a function of the config.
Gathered = float | Callable[[triton.Config], float]

# Under the interpreter autotuning cannot run (no GPU driver): exactly one config, kept
# small so interpreted tiles stay cheap and the tests' odd shapes span several tiles.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def interpreter_config() -> dict:
    """The interpreter's one GEMM config: _INTERPRETER_CONFIG, or the tile named by
    TRITON_QAT_INTERPRETER_TILE="BMxBNxBK" (powers of two from 16, e.g. 128x128x64: far fewer
    interpreted programs on large shapes, each a few numpy operations wider; the stability
    run on a CPU uses it). Read when the kernels are first imported."""
    config = dict(_INTERPRETER_CONFIG)
    tile = os.environ.get("TRITON_QAT_INTERPRETER_TILE", "").strip()
    if not tile:
        return config
    parts = tile.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"TRITON_QAT_INTERPRETER_TILE={tile!r}: expected BMxBNxBK, e.g. 128x128x64"
        )
    sizes = [int(p) for p in parts]
    if any(n < 16 or n & (n - 1) for n in sizes):
        raise ValueError(
            f"TRITON_QAT_INTERPRETER_TILE={tile!r}: each size must be a power of two, at least 16"
        )
    config.update(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), sizes, strict=True))
    return config


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        num_stages=stages,
        num_warps=warps,
    )


def _cuda_configs() -> list[triton.Config]:
    # BLOCK_M / BLOCK_N / BLOCK_K name the tile of the kernel's own output rows / cols / loop.
    shapes = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 2),
        (32, 64, 64, 4, 4),
        (16, 64, 128, 4, 4),
    ]
    return [_cfg(*s) for s in shapes]


# TRITON_QAT_AUTOTUNE=0 pins the compiled kernels to this one config (tests on a GPU compile
# every variant once instead of benchmarking eleven configs for each new shape).
_UNTUNED_CUDA_CONFIG = (64, 64, 32, 4, 4)


def gemm_configs() -> list[triton.Config]:
    """The autotune space: one config under the interpreter, or with TRITON_QAT_AUTOTUNE=0;
    the CUDA list otherwise. Read when the kernels are first imported."""
    if INTERPRETED_KERNELS:
        return [triton.Config(interpreter_config(), num_stages=1, num_warps=4)]
    if os.environ.get("TRITON_QAT_AUTOTUNE", "1").strip() == "0":
        return [_cfg(*_UNTUNED_CUDA_CONFIG)]
    return _cuda_configs()


@functools.lru_cache(maxsize=8)
def _max_shared_memory(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # unknown driver: assume an A100-class limit
        return 166 * 1024


def fits_shared_memory(
    config: triton.Config, elem_a: int, elem_b: int, smem: int, gathered: Gathered = 0
) -> bool:
    """Whether `config`'s pipelined tiles fit in smem bytes: num_stages copies of a BLOCK_M x
    BLOCK_K tile of elem_a-byte and a BLOCK_N x BLOCK_K tile of elem_b-byte operands, and
    num_stages - 1 copies (the buffers Triton's software pipeline allocates per load; the
    operands' extra copy covers its scratch) of `gathered` bytes per weight element (a number,
    or a function of the config: gathered_param_bytes)."""
    return shared_memory_bytes(config, config.num_stages, elem_a, elem_b, gathered) <= smem


def shared_memory_bytes(
    config: triton.Config, stages: int, elem_a: int, elem_b: int, gathered: Gathered
) -> float:
    """fits_shared_memory's estimate for `config` run with `stages` stages."""
    kw = config.kwargs
    per_element = gathered(config) if callable(gathered) else gathered
    operands = kw["BLOCK_K"] * (kw["BLOCK_M"] * elem_a + kw["BLOCK_N"] * elem_b)
    return stages * operands + (stages - 1) * kw["BLOCK_K"] * kw["BLOCK_N"] * per_element


def gathered_param_bytes(
    param_bytes: int, flags: dict, group_block: str = "BLOCK_K"
) -> Callable[[triton.Config], float]:
    """Bytes per weight element of the qparams a GEMM loads with each weight tile, for a
    config: none unless W_GRAN == PER_GROUP (vectors per tensor / channel). Per group of
    GROUP_SIZE along K, with `group_block` the config's tile extent along K: a tile within one
    group loads `param_bytes` per tile row; a tile of whole groups `param_bytes` per group and
    row; any other tile `param_bytes` per element (gathered; e.g. a group size of 48). These
    loads are staged in shared memory by the software pipeline like the operands."""
    if flags.get("W_GRAN") != PER_GROUP:
        return lambda config: 0.0
    group = int(flags.get("GROUP_SIZE", 1))

    def per_element(config: triton.Config) -> float:
        cols = config.kwargs[group_block]
        if group % cols == 0:
            return param_bytes / cols
        if cols % group == 0:
            return param_bytes / group
        return float(param_bytes)

    return per_element


def prune_configs(
    configs,
    named_args,
    *,
    rows: str,
    cols: str,
    operands: tuple[str, str],
    param_bytes: int = 0,
    group_block: str = "BLOCK_K",
    **kwargs,
):
    """Drop tiles that overflow shared memory, and tiles far larger than a tiny problem.

    rows / cols: the names of the kernel's extents along BLOCK_M / BLOCK_N; operands: the two
    pointers whose tiles are staged in shared memory; param_bytes / group_block: see
    gathered_param_bytes (kwargs: the launch's constexpr flags).
    """
    if len(configs) <= 1:
        return configs
    import torch

    m, n = named_args[rows], named_args[cols]
    elem_a = named_args[operands[0]].element_size()
    elem_b = named_args[operands[1]].element_size()
    gathered = gathered_param_bytes(param_bytes, kwargs, group_block)
    smem = _max_shared_memory(torch.cuda.current_device())
    return select_configs(configs, m, n, elem_a, elem_b, smem, gathered)


def select_configs(
    configs, m: int, n: int, elem_a: int, elem_b: int, smem: int, gathered: Gathered = 0
) -> list:
    """prune_configs' choice for an (m, n) output, operand element sizes elem_a / elem_b,
    `gathered` qparam bytes per weight element and `smem` bytes of shared memory: never empty."""
    fitting = [c for c in configs if fits_shared_memory(c, elem_a, elem_b, smem, gathered)]
    # A tile more than twice the problem's extent along M or N only wastes work.
    kept = [
        c
        for c in fitting
        if c.kwargs["BLOCK_M"] <= 2 * max(m, 16) and c.kwargs["BLOCK_N"] <= 2 * max(n, 16)
    ]
    if kept:
        return kept
    if fitting:
        return [min(fitting, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    # Nothing fits: the smallest tiles, their stages reduced (to 2 at least) until they do.
    smallest = min(configs, key=lambda c: shared_memory_bytes(c, 2, elem_a, elem_b, gathered))
    stages = smallest.num_stages
    while stages > 2 and shared_memory_bytes(smallest, stages, elem_a, elem_b, gathered) > smem:
        stages -= 1
    return [triton.Config(dict(smallest.kwargs), num_stages=stages, num_warps=smallest.num_warps)]


# Integer GEMMs: int8 operands take twice the K per byte of shared memory, and a short list
# keeps the first call's tuning short.
_INT_CUDA_CONFIGS = [
    (128, 256, 128, 3, 8),
    (128, 128, 128, 4, 8),
    (128, 128, 64, 4, 4),
    (64, 128, 128, 4, 4),
    (64, 64, 64, 4, 4),
]


def int_gemm_configs() -> list[triton.Config]:
    """gemm_configs() for the integer GEMMs: the same interpreter and pinned configs, a shorter
    CUDA list."""
    if INTERPRETED_KERNELS or os.environ.get("TRITON_QAT_AUTOTUNE", "1").strip() == "0":
        return gemm_configs()
    return [_cfg(*s) for s in _INT_CUDA_CONFIGS]


def autotune(
    rows: str,
    cols: str,
    loop: str,
    operands: tuple[str, str],
    extra_key=(),
    configs=None,
    param_bytes: int = 0,
    group_block: str = "BLOCK_K",
    loop_even: bool = False,
):
    """triton.autotune over `configs` (default gemm_configs()), keyed on the problem's extents
    and `extra_key` (granularity flags); tensor dtypes are part of Triton's key already.
    operands / param_bytes / group_block: what the pruner counts as staged in shared memory
    (prune_configs). loop_even: the kernel takes a LOOP_EVEN constexpr, set per launch to
    whether `loop` is a multiple of the config's BLOCK_K (no mask on the loop's loads).

    Compiled, the tuner is backed by triton_qat's on-disk cache (kernels/autotune_cache.py): a key
    tuned by an earlier process is not benchmarked again. The file is read on first use.
    """
    tune = triton.autotune(
        configs=gemm_configs() if configs is None else configs,
        key=[rows, cols, loop, *extra_key],
        prune_configs_by={
            "early_config_prune": functools.partial(
                prune_configs,
                rows=rows,
                cols=cols,
                operands=operands,
                param_bytes=param_bytes,
                group_block=group_block,
            )
        },
    )

    def decorator(fn):
        if loop_even:
            fn = triton.heuristics({"LOOP_EVEN": lambda a: a[loop] % a["BLOCK_K"] == 0})(fn)
        tuner = tune(fn)
        if INTERPRETED_KERNELS:
            return tuner  # one config: Triton never consults its cache
        return attach_cache(tuner)

    return decorator
