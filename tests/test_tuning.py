"""kernels/autotune_cache.py: the on-disk autotune cache, its hook into Triton's Autotuner, and the
shape collection behind `python -m triton_qat autotune --model`. All on the CPU: the hook is
driven through a real triton Autotuner whose kernel and benchmark function are fakes."""

from __future__ import annotations

import json
import multiprocessing
import warnings

import pytest
import torch
import triton

import triton_qat as tq
from triton_qat.kernels import autotune_cache
from triton_qat.tools import tuning

GPU = "Fake GPU 80GB"
KEY = (8192, 4096, 4096, 1, 0, "torch.bfloat16", "torch.bfloat16")
CONFIG = {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 256}, "num_warps": 8, "num_stages": 3}


def _entries_in_file(cache: autotune_cache.AutotuneCache) -> list[dict]:
    data = json.loads(cache.path.read_text())
    assert data["schema"] == autotune_cache.SCHEMA_VERSION and data["triton"] == cache.triton
    return data["entries"]


# --- the cache file ---------------------------------------------------------------------------


def test_store_then_hit_in_a_new_instance_and_misses(tmp_path):
    cache = autotune_cache.AutotuneCache(tmp_path)  # reads nothing yet: the file comes later
    autotune_cache.AutotuneCache(tmp_path).store(GPU, "fwd", KEY, CONFIG, 1.5)
    entry = cache.lookup(GPU, "fwd", KEY)
    assert entry is not None and entry["config"] == CONFIG and entry["ms"] == 1.5
    assert entry["key"] == list(KEY)
    assert cache.lookup("Other GPU", "fwd", KEY) is None
    assert cache.lookup(GPU, "dx", KEY) is None
    assert cache.lookup(GPU, "fwd", (1024, *KEY[1:])) is None
    # Another Triton version reads the file as foreign: no hit across versions.
    with pytest.warns(RuntimeWarning, match="triton"):
        assert (
            autotune_cache.AutotuneCache(tmp_path, triton="0.0.1").lookup(GPU, "fwd", KEY) is None
        )
    assert len(cache) == 1


def test_corrupt_file_warns_once_then_is_replaced(tmp_path):
    (tmp_path / autotune_cache.CACHE_FILE).write_text('{"schema": 1, "entries": [tru')
    cache = autotune_cache.AutotuneCache(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.lookup(GPU, "fwd", KEY) is None
        cache.store(GPU, "fwd", KEY, CONFIG, 2.0)  # re-reads the corrupt file under the lock
        assert cache.lookup(GPU, "fwd", KEY)["ms"] == 2.0
    assert len(caught) == 1 and "corrupt" in str(caught[0].message)
    assert [e["config"] for e in _entries_in_file(cache)] == [CONFIG]


@pytest.mark.parametrize(
    "content",
    [
        {"schema": autotune_cache.SCHEMA_VERSION + 1, "triton": "3.9.0", "entries": []},
        {"schema": autotune_cache.SCHEMA_VERSION, "triton": "2.0.0", "entries": []},
        {"schema": autotune_cache.SCHEMA_VERSION, "triton": "3.9.0", "entries": [{"gpu": GPU}]},
        [1, 2, 3],
    ],
    ids=["schema", "triton", "entry", "not-an-object"],
)
def test_foreign_or_malformed_file_is_ignored(tmp_path, content):
    cache = autotune_cache.AutotuneCache(tmp_path, triton="3.9.0")
    if isinstance(content, dict) and content["entries"] == []:
        # A foreign file holding what would be a hit for this process: it must not be used.
        content["entries"] = [
            {"gpu": GPU, "triton": "3.9.0", "kernel": "fwd", "key": list(KEY), "config": CONFIG}
        ]
    cache.path.write_text(json.dumps(content))
    with pytest.warns(RuntimeWarning, match="ignoring") as caught:
        assert cache.lookup(GPU, "fwd", KEY) is None
        assert len(cache) == 0
    assert len(caught) == 1
    cache.store(GPU, "dx", KEY, CONFIG, 1.0)
    assert [e["kernel"] for e in _entries_in_file(cache)] == ["dx"]


def test_unwritable_dir_warns_once_and_keeps_entries_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = autotune_cache.AutotuneCache(blocker / "cache")  # mkdir fails: a file is in the way
    with pytest.warns(RuntimeWarning, match="cannot write") as caught:
        cache.store(GPU, "fwd", KEY, CONFIG, 1.0)
        cache.store(GPU, "dx", KEY, CONFIG, 1.0)
    assert len(caught) == 1
    assert cache.lookup(GPU, "fwd", KEY)["config"] == CONFIG
    assert cache.lookup(GPU, "dx", KEY) is not None


def _write_keys(directory: str, name: str, count: int, start) -> None:
    cache = autotune_cache.AutotuneCache(directory)
    start.wait(timeout=60)
    for i in range(count):
        config = {"kwargs": {"BLOCK_M": 64}, "num_warps": 4, "num_stages": 3}
        cache.store("gpu", f"kernel_{name}", (i, 64, 64), config, float(i))


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two processes (forked: no second import of torch) store 40 distinct keys each at once."""
    per_writer = 40
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_write_keys, args=(str(tmp_path), name, per_writer, start))
        for name in "ab"
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = _entries_in_file(autotune_cache.AutotuneCache(tmp_path))
    keys = {(e["kernel"], tuple(e["key"])) for e in entries}
    assert len(entries) == len(keys) == 2 * per_writer
    assert keys == {(f"kernel_{n}", (i, 64, 64)) for n in "ab" for i in range(per_writer)}
    assert not list(tmp_path.glob("*.tmp"))


def test_default_cache_follows_the_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_QAT_CACHE_DIR", str(tmp_path / "tuned"))
    cache = autotune_cache.default_cache()
    assert cache.path == tmp_path / "tuned" / autotune_cache.CACHE_FILE
    assert autotune_cache.default_cache() is cache
    monkeypatch.delenv("TRITON_QAT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune_cache.autotune_cache_dir() == tmp_path / "xdg" / "triton_qat"


# --- the Autotuner hook -----------------------------------------------------------------------


class _FakeKernel:
    """Stands in for a JITFunction: records the meta-parameters of every launch."""

    arg_names = ("x", "M", "N")

    def __init__(self):
        def fake_gemm_kernel(x, M, N):  # Autotuner walks .fn down to a plain function
            pass

        self.fn = fake_gemm_kernel
        self.launches: list[int] = []

    def run(self, *args, **kwargs):
        self.launches.append(kwargs["BLOCK_M"])


# Fake timings by BLOCK_M: 64 wins.
_MS = {32: 3.0, 64: 1.0, 128: 2.0}


def _tuner(cache: autotune_cache.AutotuneCache, blocks=(32, 64, 128), prune=None):
    """A real triton Autotuner over a fake kernel, its benchmarks counted, hooked to `cache`."""
    kernel = _FakeKernel()
    benched: list[int] = []

    def do_bench(kernel_call, quantiles):
        kernel_call()
        block = kernel.launches[-1]
        benched.append(block)
        return [_MS[block]] * len(quantiles)

    configs = [triton.Config({"BLOCK_M": b}, num_warps=4, num_stages=2) for b in blocks]
    prune_by = {"early_config_prune": prune} if prune else None
    tuner = triton.autotune(configs, key=["M", "N"], prune_configs_by=prune_by, do_bench=do_bench)(
        kernel
    )
    autotune_cache.attach_cache(tuner, "fake_gemm", cache)
    return tuner, kernel, benched


@pytest.fixture
def on_fake_gpu(monkeypatch):
    monkeypatch.setattr(autotune_cache, "_current_gpu_name", lambda: GPU)
    monkeypatch.delenv("TRITON_QAT_AUTOTUNE_CACHE", raising=False)


def test_hook_stores_the_winner_and_a_later_process_skips_the_benchmark(tmp_path, on_fake_gpu):
    x = torch.zeros(4, dtype=torch.bfloat16)
    tuner, kernel, benched = _tuner(autotune_cache.AutotuneCache(tmp_path))
    tuner.run(x, 256, 512)
    assert sorted(benched) == [32, 64, 128] and kernel.launches[-1] == 64
    key = (256, 512, "torch.bfloat16")
    assert tuner.cache.tuned == {key} and not tuner.cache.hits
    (entry,) = _entries_in_file(autotune_cache.AutotuneCache(tmp_path))
    assert entry["kernel"] == "fake_gemm" and entry["gpu"] == GPU
    assert entry["key"] == list(key) and entry["ms"] == 1.0
    stored = entry["config"]
    assert (stored["kwargs"], stored["num_warps"], stored["num_stages"]) == ({"BLOCK_M": 64}, 4, 2)

    # A fresh tuner and cache object (as in a new process): a hit launches 64, benches nothing.
    tuner2, kernel2, benched2 = _tuner(autotune_cache.AutotuneCache(tmp_path))
    tuner2.run(x, 256, 512)
    assert benched2 == [] and kernel2.launches == [64]
    assert tuner2.cache.hits == {key} and tuner2.best_config.kwargs == {"BLOCK_M": 64}
    # A key not in the file is tuned.
    tuner2.run(x, 128, 512)
    assert sorted(benched2) == [32, 64, 128]
    assert len(_entries_in_file(autotune_cache.AutotuneCache(tmp_path))) == 2


def test_hook_retunes_when_the_cached_config_left_the_space(tmp_path, on_fake_gpu):
    x = torch.zeros(4)
    tuner, _, _ = _tuner(autotune_cache.AutotuneCache(tmp_path))
    tuner.run(x, 16, 16)
    tuner2, kernel2, benched2 = _tuner(autotune_cache.AutotuneCache(tmp_path), blocks=(32, 128))
    tuner2.run(x, 16, 16)
    assert sorted(benched2) == [32, 128] and kernel2.launches[-1] == 128
    (entry,) = _entries_in_file(autotune_cache.AutotuneCache(tmp_path))
    assert entry["config"]["kwargs"] == {"BLOCK_M": 128}


def test_hook_disabled_by_env(tmp_path, on_fake_gpu, monkeypatch):
    x = torch.zeros(4)
    tuner, _, _ = _tuner(autotune_cache.AutotuneCache(tmp_path))
    tuner.run(x, 16, 16)
    monkeypatch.setenv("TRITON_QAT_AUTOTUNE_CACHE", "0")
    tuner2, _, benched2 = _tuner(autotune_cache.AutotuneCache(tmp_path))
    tuner2.run(x, 16, 16)
    tuner2.run(x, 32, 16)
    assert len(benched2) == 6
    assert len(_entries_in_file(autotune_cache.AutotuneCache(tmp_path))) == 1


def test_hook_does_not_store_an_untimed_choice(tmp_path, on_fake_gpu):
    """One config left after pruning: Triton picks it without a benchmark; nothing stored."""
    tuner, kernel, benched = _tuner(
        autotune_cache.AutotuneCache(tmp_path), prune=lambda configs, nargs, **kw: configs[:1]
    )
    tuner.run(torch.zeros(4), 16, 16)
    assert benched == [] and kernel.launches == [32]
    assert not (tmp_path / autotune_cache.CACHE_FILE).exists()


def test_gemm_autotune_decorator_attaches_the_cache_when_compiled(monkeypatch):
    from triton_qat.kernels import configs

    kernel = _FakeKernel()
    kernel.arg_names = ("x_ptr", "w_ptr", "M", "N", "K", "W_GRAN")
    monkeypatch.setattr(configs, "INTERPRETED_KERNELS", False)
    decorate = configs.autotune("M", "N", "K", ("x_ptr", "w_ptr"), extra_key=("W_GRAN",))
    tuner = decorate(kernel)
    assert isinstance(tuner.cache, autotune_cache.PersistentConfigs)
    assert tuner.cache.kernel == "fake_gemm_kernel" and len(tuner.configs) > 1


def test_gemm_tuners_are_plain_under_the_interpreter():
    from triton_qat.kernels import INTERPRETED_KERNELS, fq_matmul

    assert INTERPRETED_KERNELS
    for tuner in (fq_matmul.fq_linear_fwd_kernel, fq_matmul.fq_linear_dw_kernel):
        assert len(tuner.configs) == 1
        assert not isinstance(tuner.cache, autotune_cache.PersistentConfigs)


@pytest.mark.parametrize(
    ("tile", "expected"),
    [("", (32, 32, 32)), ("128x128x64", (128, 128, 64)), (" 64X16x32 ", (64, 16, 32))],
)
def test_interpreter_tile_from_the_env(monkeypatch, tile, expected):
    from triton_qat.kernels import configs

    monkeypatch.setenv("TRITON_QAT_INTERPRETER_TILE", tile)
    config = configs.interpreter_config()
    assert (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]) == expected
    assert config["GROUP_M"] == 4


@pytest.mark.parametrize("tile", ["128x128", "128x128x64x2", "axbxc", "48x32x32", "8x32x32"])
def test_bad_interpreter_tile_is_rejected(monkeypatch, tile):
    from triton_qat.kernels import configs

    monkeypatch.setenv("TRITON_QAT_INTERPRETER_TILE", tile)
    with pytest.raises(ValueError, match="TRITON_QAT_INTERPRETER_TILE"):
        configs.interpreter_config()


# --- shapes from a model ----------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = tq.nn.Linear(64, 96, qconfig="int8_per_channel")
        self.down = tq.nn.Linear(96, 64, qconfig="int4_per_group")
        self.again = tq.nn.Linear(64, 96, qconfig="int8_per_channel")
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.down(self.up(x)) + self.again(x).mean())


def build_block():
    """A `--model` factory: (model, sample batch)."""
    torch.manual_seed(0)
    return _Block(), torch.randn(2, 5, 64)


def test_collect_linear_shapes():
    model, sample = build_block()
    shapes = tuning.collect_linear_shapes(model, sample)
    group = model.down.weight_fake_quant.qparams().group_size
    assert shapes == [
        tuning.LinearShape(10, 96, 64, "per_channel", torch.float32),
        tuning.LinearShape(10, 64, 96, "per_group", torch.float32, group_size=group),
    ]
    assert shapes[1].weights == f"per_group({group})"
    assert [s.m for s in tuning.collect_linear_shapes(model, (sample,), batch_tokens=4096)] == [
        4096,
        4096,
    ]
    assert not model.up._forward_hooks  # the hooks are removed
    with pytest.raises(ValueError, match="batch_tokens"):
        tuning.collect_linear_shapes(model, sample, batch_tokens=0)
    with pytest.raises(ValueError, match=r"triton_qat\.nn\.Linear"):
        tuning.collect_linear_shapes(torch.nn.Linear(4, 4), torch.randn(1, 4))


def test_load_model():
    model, _ = tuning.load_model(f"{__name__}:build_block")
    assert isinstance(model, _Block)
    with pytest.raises(ValueError, match="--model"):
        tuning.load_model("no_colon")
    with pytest.raises(ValueError, match="--model"):
        tuning.load_model(f"{__name__}:missing")
    with pytest.raises(TypeError, match="--model"):
        tuning.load_model(f"{__name__}:_Block")


# --- config pruning (pure: no GPU) ---------------------------------------------------------

_H100_SMEM = 232448


def _tiles(configs) -> set[tuple[int, int, int, int]]:
    return {
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages)
        for c in configs
    }


def test_select_configs_counts_gathered_group_qparams():
    from triton_qat.kernels import configs as cfg

    space = cfg._cuda_configs()
    big = 1 << 16
    plain = cfg.select_configs(space, big, big, 2, 2, _H100_SMEM)
    # A group size that no tile width divides (48): fp32 scale / 1 / scale / zero point come
    # with every weight element.
    extra = cfg.gathered_param_bytes(12, {"W_GRAN": cfg.PER_GROUP, "GROUP_SIZE": 48})
    grouped = cfg.select_configs(space, big, big, 2, 2, _H100_SMEM, extra)
    assert cfg.gathered_param_bytes(12, {"W_GRAN": 1})(space[0]) == 0
    assert (128, 256, 64, 3) in _tiles(plain)
    # 3 * 64 * (128 + 256) * 2 + 2 * 64 * 256 * 12 B: over the limit with the qparams.
    assert (128, 256, 64, 3) not in _tiles(grouped)
    assert (128, 128, 32, 4) in _tiles(grouped)
    assert _tiles(grouped) < _tiles(plain)
    assert all(cfg.fits_shared_memory(c, 2, 2, _H100_SMEM, extra) for c in grouped)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_group_qparams_per_row_or_group_keep_the_large_tiles(group):
    from triton_qat.kernels import configs as cfg

    space = cfg._cuda_configs()
    big = 1 << 16
    # Groups of 32 and more are loaded one qparam per tile row (a tile within a group) or per
    # row and group (a tile of whole groups): 12 B per row next to BLOCK_K * 2 B of weights.
    per_group = cfg.gathered_param_bytes(12, {"W_GRAN": cfg.PER_GROUP, "GROUP_SIZE": group})
    tile = next(c for c in space if _tiles([c]) == {(128, 256, 64, 3)})
    assert per_group(tile) == 12 / min(group, 64)
    grouped = cfg.select_configs(space, big, big, 2, 2, _H100_SMEM, per_group)
    assert _tiles(grouped) == _tiles(cfg.select_configs(space, big, big, 2, 2, _H100_SMEM))
    # The dX GEMM's group axis is its output tile's columns (BLOCK_N).
    dx = cfg.gathered_param_bytes(12, {"W_GRAN": cfg.PER_GROUP, "GROUP_SIZE": group}, "BLOCK_N")
    assert dx(tile) == 12 / min(group, 256)


def test_select_configs_falls_back_to_a_tile_that_fits():
    from triton_qat.kernels import configs as cfg

    space = cfg._cuda_configs()
    # A tiny problem: the smallest tile that fits, not one far larger than the output.
    assert _tiles(cfg.select_configs(space, 8, 8, 2, 2, _H100_SMEM)) == {(16, 64, 128, 4)}
    # Nothing fits: the smallest tiles, with fewer stages. 64 x 64 x 32 at 3 stages:
    # 3 * 32 * (64 + 64) * 4 + 2 * 32 * 64 * 12 = 98304 B.
    (fallback,) = cfg.select_configs(space, 1 << 16, 1 << 16, 4, 4, 100_000, 12)
    assert _tiles([fallback]) == {(64, 64, 32, 3)}
    assert cfg.fits_shared_memory(fallback, 4, 4, 100_000, 12)
