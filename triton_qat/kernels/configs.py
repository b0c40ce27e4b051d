"""Autotune spaces for the fused fake-quant GEMMs, their pruner, and the interpreter's config.

Nothing here touches the GPU at import; device limits are read when a config is pruned.
"""

from __future__ import annotations

import functools
import os

import triton

from triton_qat.kernels import INTERPRETED_KERNELS

# Under the interpreter autotuning cannot run (no GPU driver): exactly one config, kept
# small so interpreted tiles stay cheap.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


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
        return [triton.Config(dict(_INTERPRETER_CONFIG), num_stages=1, num_warps=4)]
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


def fits_shared_memory(config: triton.Config, elem_a: int, elem_b: int, smem: int) -> bool:
    """Whether `config`'s pipelined operand tiles (num_stages copies of a BLOCK_M x BLOCK_K
    tile of elem_a-byte and a BLOCK_N x BLOCK_K tile of elem_b-byte elements) fit in smem."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return config.num_stages * (bm * bk * elem_a + bn * bk * elem_b) <= smem


def prune_configs(
    configs, named_args, *, rows: str, cols: str, operands: tuple[str, str], **kwargs
):
    """Drop tiles that overflow shared memory, and tiles far larger than a tiny problem.

    rows / cols: the names of the kernel's extents along BLOCK_M / BLOCK_N; operands: the two
    pointers whose tiles are staged in shared memory.
    """
    if len(configs) <= 1:
        return configs
    import torch

    m, n = named_args[rows], named_args[cols]
    elem_a = named_args[operands[0]].element_size()
    elem_b = named_args[operands[1]].element_size()
    smem = _max_shared_memory(torch.cuda.current_device())
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if not fits_shared_memory(c, elem_a, elem_b, smem):
            continue
        # A tile more than twice the problem's extent along M or N only wastes work.
        if bm > 2 * max(m, 16) or bn > 2 * max(n, 16):
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


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
    rows: str, cols: str, loop: str, operands: tuple[str, str], extra_key=(), configs=None
):
    """triton.autotune over `configs` (default gemm_configs()), keyed on the problem's extents
    and `extra_key` (granularity flags); tensor dtypes are part of Triton's key already.

    Compiled, the tuner is backed by triton_qat's on-disk cache (triton_qat.tuning): a key
    tuned by an earlier process is not benchmarked again. The file is read on first use.
    """
    tune = triton.autotune(
        configs=gemm_configs() if configs is None else configs,
        key=[rows, cols, loop, *extra_key],
        prune_configs_by={
            "early_config_prune": functools.partial(
                prune_configs, rows=rows, cols=cols, operands=operands
            )
        },
    )

    def decorator(fn):
        tuner = tune(fn)
        if INTERPRETED_KERNELS:
            return tuner  # one config: Triton never consults its cache
        from triton_qat.tuning import attach_cache

        return attach_cache(tuner)

    return decorator
