"""What every GPU benchmark script does before it measures: refuse to run without compiled
CUDA kernels (one line, exit code 2), find the checkout's triton_qat, and name the run and
its card's results folder."""

from __future__ import annotations

import datetime
import importlib.util
import os
import re
import sys
from pathlib import Path

import torch

EXIT_NO_CUDA = 2


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the bench/results/<card> folder)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def import_path_for_checkout() -> None:
    """Let `import triton_qat` find the checkout when the package is not installed."""
    if importlib.util.find_spec("triton_qat") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gpu_run_metadata(script: str) -> dict[str, str] | None:
    """{"gpu", "torch", "triton", "date"} of this run, or None (after one line on stderr)
    when there is no CUDA device or TRITON_INTERPRET would interpret the kernels."""
    if not torch.cuda.is_available():
        print(
            f"{script}: no CUDA device (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); this benchmark needs an NVIDIA GPU",
            file=sys.stderr,
        )
        return None
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        print(
            f"{script}: TRITON_INTERPRET is set; unset it to time compiled kernels", file=sys.stderr
        )
        return None
    import triton

    import_path_for_checkout()
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def missing_requirements(script: str, device: str, modules: tuple[str, ...] = ()) -> bool:
    """True, after one line on stderr, when a module the script needs is not installed or
    `device` is "cuda" and there is no CUDA device (the scripts that also run on a CPU)."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            print(f"{script}: {name} is not installed", file=sys.stderr)
            return True
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: no CUDA device", file=sys.stderr)
        return True
    return False


def synchronize(device: str) -> None:
    """Wait for the device's queued work before reading a clock (nothing to wait for on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
