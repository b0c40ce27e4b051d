"""Autotune runs and the on-disk config cache.

One JSON file, ``autotune.json`` in `autotune_cache_dir()`, maps (GPU name, Triton version,
kernel name, autotune key) to the winning config (kwargs, num_warps, num_stages) and its
time. The fused GEMMs' autotuners (kernels/configs.py) look a key up here before they
benchmark, and store the winner after a real tuning, so a later process (or another rank)
starts with the configs an earlier one found.

File layout::

    {"schema": 1, "triton": "3.9.0",
     "entries": [{"gpu": ..., "triton": ..., "kernel": ..., "key": [...],
                  "config": {"kwargs": {...}, "num_warps": 8, "num_stages": 3}, "ms": 1.23}]}

Writes read, merge and write the file under an advisory lock (fcntl.flock on
``autotune.json.lock`` where fcntl exists) into a temporary file in the same directory that
then replaces the old one, so several writers never lose each other's entries nor leave a
half-written file. A corrupt file, or one of another schema or Triton version, is ignored
(and replaced on the next write); an unwritable directory keeps the entries in memory. Each
of those warns once per process and never raises. TRITON_QAT_AUTOTUNE_CACHE=0 turns the
cache off. Nothing here touches CUDA at import.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: writes stay atomic, but concurrent merges may drop entries
    fcntl = None

SCHEMA_VERSION = 1
CACHE_FILE = "autotune.json"


def autotune_cache_dir() -> Path:
    """Where triton_qat keeps tuned configs: $TRITON_QAT_CACHE_DIR, else the user cache dir
    ($XDG_CACHE_HOME/triton_qat, or ~/.cache/triton_qat)."""
    explicit = os.environ.get("TRITON_QAT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "triton_qat"


def cache_enabled() -> bool:
    """False when TRITON_QAT_AUTOTUNE_CACHE=0 (read at each use, not at import)."""
    return os.environ.get("TRITON_QAT_AUTOTUNE_CACHE", "1").strip() != "0"


def triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _json_key(key: tuple) -> list:
    """An autotune key (extents, constexpr flags, dtype strings) as JSON values."""
    return [v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for v in key]


def _index(gpu: str, triton: str, kernel: str, key: list) -> tuple[str, str, str, str]:
    return gpu, triton, kernel, json.dumps(key)


class AutotuneCache:
    """The cache file in `directory` (default `autotune_cache_dir()`), loaded on first use."""

    def __init__(self, directory: str | os.PathLike | None = None, *, triton: str | None = None):
        self.directory = Path(directory) if directory is not None else autotune_cache_dir()
        self.path = self.directory / CACHE_FILE
        self.lock_path = self.directory / (CACHE_FILE + ".lock")
        self.triton = triton or triton_version()
        self._entries: dict[tuple[str, str, str, str], dict] | None = None
        self._warned: set[str] = set()
        self._mutex = threading.Lock()

    # --- reading ---------------------------------------------------------------------------

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"triton_qat autotune cache: {message}", RuntimeWarning, stacklevel=4)

    def _read_file(self) -> dict[tuple[str, str, str, str], dict]:
        """The file's entries; {} (with one warning) when it is corrupt or foreign."""
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as e:
            self._warn_once("read", f"cannot read {self.path} ({e}); tuning from scratch")
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("schema") != SCHEMA_VERSION or data.get("triton") != self.triton:
                self._warn_once(
                    "read",
                    f"ignoring {self.path}: schema {data.get('schema')!r}, triton "
                    f"{data.get('triton')!r} (this is schema {SCHEMA_VERSION}, triton "
                    f"{self.triton}); it is replaced on the next write",
                )
                return {}
            entries = {}
            for e in data["entries"]:
                config = e["config"]
                if not isinstance(config["kwargs"], dict):
                    raise ValueError("config kwargs is not an object")
                if not all(isinstance(config[f], int) for f in ("num_warps", "num_stages")):
                    raise ValueError("num_warps / num_stages are not ints")
                entries[_index(e["gpu"], e["triton"], e["kernel"], list(e["key"]))] = e
            return entries
        except (ValueError, KeyError, TypeError) as e:
            self._warn_once(
                "read",
                f"ignoring corrupt {self.path} ({type(e).__name__}: {e}); "
                "it is replaced on the next write",
            )
            return {}

    def _loaded(self) -> dict[tuple[str, str, str, str], dict]:
        if self._entries is None:
            self._entries = self._read_file()
        return self._entries

    def lookup(self, gpu: str, kernel: str, key: tuple) -> dict | None:
        """The stored entry for (gpu, this Triton, kernel, key), or None."""
        with self._mutex:
            return self._loaded().get(_index(gpu, self.triton, kernel, _json_key(key)))

    def entries(self) -> list[dict]:
        """Every entry of this Triton version (the file as loaded, plus what was stored)."""
        with self._mutex:
            return list(self._loaded().values())

    def __len__(self) -> int:
        return len(self.entries())

    # --- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, entries: dict) -> None:
        data = {"schema": SCHEMA_VERSION, "triton": self.triton, "entries": list(entries.values())}
        fd, tmp = tempfile.mkstemp(prefix=CACHE_FILE + ".", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def store(
        self, gpu: str, kernel: str, key: tuple, config: dict[str, Any], ms: float | None
    ) -> None:
        """Record a winner (`config`: kwargs, num_warps, num_stages[, num_ctas, maxnreg]) in
        memory and in the file (read, merge, atomic replace under the lock)."""
        entry = {
            "gpu": gpu,
            "triton": self.triton,
            "kernel": kernel,
            "key": _json_key(key),
            "config": config,
            "ms": ms if ms is not None and math.isfinite(ms) else None,
        }
        index = _index(gpu, self.triton, kernel, entry["key"])
        with self._mutex:
            self._loaded()[index] = entry
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                with self._locked():
                    merged = self._read_file()
                    merged[index] = entry
                    self._write(merged)
                # Keep what other writers added meanwhile.
                self._entries.update({k: v for k, v in merged.items() if k not in self._entries})
            except OSError as e:
                self._warn_once(
                    "write", f"cannot write {self.path} ({e}); tuned configs stay in memory"
                )


_CACHES: dict[Path, AutotuneCache] = {}
_CACHES_LOCK = threading.Lock()


def default_cache() -> AutotuneCache:
    """The process's cache for the current `autotune_cache_dir()` (one object per dir, so
    its warnings come once per process)."""
    directory = autotune_cache_dir()
    with _CACHES_LOCK:
        if directory not in _CACHES:
            _CACHES[directory] = AutotuneCache(directory)
        return _CACHES[directory]


# --- the autotuner hook --------------------------------------------------------------------


def config_record(config) -> dict[str, Any]:
    """A triton.Config as the JSON the cache stores."""
    record = {
        "kwargs": dict(config.kwargs),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    for name in ("num_ctas", "maxnreg"):
        value = getattr(config, name, None)
        if value is not None:
            record[name] = value
    return record


def find_config(configs, record: dict[str, Any]):
    """The config of `configs` that `record` describes, or None (the space changed since)."""
    for config in configs:
        if config_record(config) == record:
            return config
    return None


def _median_ms(timing) -> float | None:
    """do_bench's result: a float, or [median, p20, p80] with quantiles."""
    if isinstance(timing, (list, tuple)):
        timing = timing[0] if timing else None
    try:
        return float(timing)
    except (TypeError, ValueError):
        return None


def _current_gpu_name() -> str:

    return torch.cuda.get_device_name(torch.cuda.current_device())


class PersistentConfigs(dict):
    """A Triton Autotuner's in-process `cache` (autotune key -> Config) backed by the file.

    Every Triton release from 3.6 on asks `key not in tuner.cache` before tuning, stores the
    winner with `tuner.cache[key] = config`, and times each config with `tuner._bench`. So a
    miss here is looked up in the file (a hit skips the benchmark), and a store that follows
    timings recorded from `_bench` is written to the file. A store without timings (one
    config left after pruning, or Triton's own disk cache) is kept in memory only.
    `single_choice`: the tuner's last pruning left one config (which is then not timed).
    """

    def __init__(self, tuner, kernel: str, cache: AutotuneCache | None = None):
        super().__init__(getattr(tuner, "cache", None) or {})
        self.tuner = tuner
        self.kernel = kernel
        self._cache = cache
        self.timings: dict[int, tuple[Any, float | None]] = {}
        self.single_choice = False
        self.hits: set[tuple] = set()  # keys whose config came from the file
        self.tuned: set[tuple] = set()  # keys benchmarked in this process

    def file_cache(self) -> AutotuneCache | None:
        if not cache_enabled():
            return None
        return self._cache if self._cache is not None else default_cache()

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        cache = self.file_cache()
        if cache is None:
            return False
        entry = cache.lookup(_current_gpu_name(), self.kernel, key)
        config = None if entry is None else find_config(self.tuner.configs, entry["config"])
        if config is None:
            return False
        dict.__setitem__(self, key, config)
        self.hits.add(key)
        return True

    def __setitem__(self, key, config) -> None:
        dict.__setitem__(self, key, config)
        timed = self.timings.pop(id(config), None)
        self.timings.clear()
        if timed is None or timed[1] is None or not math.isfinite(timed[1]):
            return  # not benchmarked here, or every config failed
        self.tuned.add(key)
        self.hits.discard(key)
        cache = self.file_cache()
        if cache is not None:
            cache.store(_current_gpu_name(), self.kernel, key, config_record(config), timed[1])

    def record_timing(self, config, timing) -> None:
        self.timings[id(config)] = (config, _median_ms(timing))


@dataclass(frozen=True)
class _TimedBench:
    """Wraps an Autotuner's `_bench` to hand each config's timing to its PersistentConfigs."""

    bench: Any
    configs: PersistentConfigs

    def __call__(self, *args, config, **meta):
        if self.configs.single_choice:
            # Triton 3.6 times a lone config too (later releases pick it untimed); no timing
            # is recorded, so the choice is not stored, as on those releases.
            return [float("nan")] * 3
        timing = self.bench(*args, config=config, **meta)
        self.configs.record_timing(config, timing)
        return timing


@dataclass(frozen=True)
class _CountedPrune:
    """Wraps an Autotuner's `prune_configs` to tell its PersistentConfigs whether one is left."""

    prune: Any
    configs: PersistentConfigs

    def __call__(self, *args, **kwargs):
        pruned = self.prune(*args, **kwargs)
        self.configs.single_choice = len(pruned) == 1
        return pruned


def attach_cache(tuner, kernel: str | None = None, cache: AutotuneCache | None = None):
    """Back `tuner` (a triton Autotuner) with the on-disk cache; returns it, unchanged when
    it lacks the attributes the hook relies on (`cache` dict, `_bench`, `configs`)."""
    if not isinstance(getattr(tuner, "cache", None), dict):
        return tuner
    if not callable(getattr(tuner, "_bench", None)) or not hasattr(tuner, "configs"):
        return tuner
    if isinstance(tuner.cache, PersistentConfigs):
        return tuner
    if kernel is None:
        base = getattr(tuner, "base_fn", None) or getattr(tuner, "fn", None)
        kernel = getattr(base, "__name__", None) or type(tuner).__name__
    configs = PersistentConfigs(tuner, kernel, cache)
    tuner.cache = configs
    tuner._bench = _TimedBench(tuner._bench, configs)
    if callable(getattr(tuner, "prune_configs", None)):
        tuner.prune_configs = _CountedPrune(tuner.prune_configs, configs)
    return tuner
