"""torch.compile of whole prepared models: one graph (fullgraph, zero graph breaks) for every
built-in preset, in training (observers on, then toggled with torch.ao's helpers) and in eval,
forward and backward equal to eager, and a bounded number of recompiles.

The flags (observer_enabled, fake_quant_enabled, LSQ's static_enabled) are read under compile
from Python mirrors the toggles keep: a guard each, so a new combination of flags compiles
once and a combination seen before reuses its graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import triton_qat as tq

ao = pytest.importorskip("torch.ao.quantization")

PRESETS = tq.list_qconfigs()

# (helper, train?) per step: the flags toggled between training steps, then eval.
SCHEDULE = [
    (None, True),
    (None, True),
    (ao.disable_observer, True),
    (ao.disable_fake_quant, True),
    (ao.enable_fake_quant, True),
    (ao.enable_observer, True),
    (None, False),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Compiled code is cached per code object (the same lambda for every test): start clean,
    # so each test counts its own graphs and none reaches the recompile limit.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mlp() -> torch.nn.Module:
    # K = 32: the per-group presets' group size.
    return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))


def _llama() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        num_hidden_layers=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def _mlp_out(model, x):
    return model(x)


def _llama_out(model, x):
    return model(input_ids=x).logits


def _check_equal(a: torch.Tensor | None, b: torch.Tensor | None, what: str, exact: bool) -> None:
    assert (a is None) == (b is None), what
    if a is None:
        return
    assert a.shape == b.shape, what
    if exact:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


def _run(eager, compiled, module, out, make_input, schedule, exact=True):
    """Step the eager and the compiled model side by side; compare outputs, gradients and the
    whole state_dict after every step."""
    for step, (toggle, train) in enumerate(schedule):
        if toggle is not None:
            eager.apply(toggle)
            module.apply(toggle)
        eager.train(train)
        module.train(train)
        x = make_input(step)
        with torch.set_grad_enabled(train):
            y_eager, y_compiled = out(eager, x), compiled(x)
        _check_equal(y_eager, y_compiled, f"step {step}: output", exact)
        if train:
            y_eager.float().square().mean().backward()
            y_compiled.float().square().mean().backward()
            for (name, p), q in zip(eager.named_parameters(), module.parameters(), strict=True):
                _check_equal(p.grad, q.grad, f"step {step}: grad of {name}", exact)
                p.grad = q.grad = None
        s_eager, s_compiled = eager.state_dict(), module.state_dict()
        assert list(s_eager) == list(s_compiled)
        for key, value in s_eager.items():
            _check_equal(value, s_compiled[key], f"step {step}: {key}", exact)


def _compiled(model, out):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: out(model, x), fullgraph=True, backend=counter)
    return compiled, counter


# Every preset: two training steps (the second after per-channel buffers are sized). Two
# presets (torch.ao's fused module; LSQ with its own flag) also go through every toggle,
# eval included, twice.
SHORT = [(None, True), (None, True)]
TOGGLED = ["x86", "int8_per_channel_lsq"]


# fbgemm and onednn build x86's modules with other ranges; LSQ runs in the toggle test:
# marked slow to keep the file near 90 s on two cores.
MLP_SLOW = ("fbgemm", "onednn", "int8_per_channel_lsq")


@pytest.mark.parametrize(
    "preset",
    [pytest.param(p, marks=pytest.mark.slow) if p in MLP_SLOW else p for p in PRESETS],
)
def test_mlp_fullgraph_equals_eager(preset):
    torch.manual_seed(0)
    eager = tq.prepare_qat(_mlp(), preset).train()
    module = copy.deepcopy(eager)
    compiled, counter = _compiled(module, _mlp_out)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 32, generator=g) for _ in SHORT]
    with tq.use_backend("eager"):
        # fullgraph=True raises on any graph break.
        _run(eager, compiled, module, _mlp_out, inputs.__getitem__, SHORT)
    assert 1 <= counter.frame_count <= 2


@pytest.mark.parametrize("preset", TOGGLED)
def test_mlp_toggles_reuse_graphs(preset):
    torch.manual_seed(0)
    eager = tq.prepare_qat(_mlp(), preset).train()
    module = copy.deepcopy(eager)
    compiled, counter = _compiled(module, _mlp_out)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 32, generator=g) for _ in range(2 * len(SCHEDULE))]
    with tq.use_backend("eager"):
        _run(eager, compiled, module, _mlp_out, inputs.__getitem__, SCHEDULE)
        # One graph per flag combination (plus one after the first step sizes per-channel
        # buffers), not one per step.
        frames = counter.frame_count
        assert 1 <= frames <= 5
        # The same toggles again, then steady training: every graph is reused.
        again = [(ao.enable_observer, True), (ao.enable_fake_quant, True), (None, True)]
        _run(eager, compiled, module, _mlp_out, lambda i: inputs[len(SCHEDULE) + i], SCHEDULE)
        _run(eager, compiled, module, _mlp_out, inputs.__getitem__, again)
        assert counter.frame_count == frames


# The tiny Llama: tracing takes 15 to 30 s a preset on two cores, and a compiled training step
# against eager about three minutes. By default x86 is traced (zero graph breaks); every
# other preset, and every run against eager, is marked slow (-m slow runs them).
LLAMA_DEFAULT = ["x86"]


def _llama_presets(default: list[str]) -> list:
    return [p if p in default else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS]


@pytest.mark.parametrize("preset", _llama_presets(LLAMA_DEFAULT))
def test_llama_explain_no_graph_break(preset):
    torch.manual_seed(0)
    model = tq.prepare_qat(_llama(), preset).train()
    ids = torch.randint(0, 128, (2, 8))
    with tq.use_backend("eager"):
        explained = torch._dynamo.explain(lambda x: model(input_ids=x).logits)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _llama_compiled_equals_eager(eager: torch.nn.Module) -> None:
    """Two training steps of a prepared Llama and of its compiled copy, compared (_run);
    one graph, recompiled at most once (per-channel buffers sized after the first step)."""
    module = copy.deepcopy(eager)
    compiled, counter = _compiled(module, _llama_out)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 128, (2, 8), generator=g) for _ in SHORT]
    with tq.use_backend("eager"):
        _run(eager, compiled, module, _llama_out, ids.__getitem__, SHORT, exact=False)
    assert 1 <= counter.frame_count <= 2


# The examples' recipe: lm_head float, a QAT embedding, the blocks w4a8_dynamic.
LLAMA_RECIPE = {"lm_head": None, "model.embed_tokens": "embedding_int8", "*": "w4a8_dynamic"}


def test_llama_recipe_with_qat_embedding_is_one_graph_equal_to_eager():
    """The QAT embedding's index check runs on the device under compile (no .item(): no
    graph break); outputs, gradients and state equal eager's."""
    torch.manual_seed(0)
    eager = tq.prepare_qat(_llama(), LLAMA_RECIPE).train()
    assert isinstance(eager.model.embed_tokens, tq.nn.Embedding)
    ids = torch.randint(0, 128, (2, 8))
    with tq.use_backend("eager"):
        explained = torch._dynamo.explain(lambda x: eager(input_ids=x).logits)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    _llama_compiled_equals_eager(eager)


def test_compiled_qat_embedding_rejects_an_index_out_of_range():
    emb = tq.prepare_qat(torch.nn.Sequential(torch.nn.Embedding(10, 4)), {"*": "embedding_int8"})
    compiled = torch.compile(emb, fullgraph=True, backend="aot_eager")
    with tq.use_backend("eager"):
        compiled(torch.tensor([0, 9]))
        with pytest.raises(
            RuntimeError, match=r"index out of range: indices must lie in \[0, 10\)"
        ):
            compiled(torch.tensor([0, 10]))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_llama_fullgraph_equals_eager(preset):
    torch.manual_seed(0)
    _llama_compiled_equals_eager(tq.prepare_qat(_llama(), preset).train())


def test_flags_loaded_from_state_dict_reach_compiled_code():
    torch.manual_seed(0)
    source = tq.prepare_qat(_mlp(), "int8_per_tensor")
    source.apply(ao.disable_fake_quant)
    target = tq.prepare_qat(_mlp(), "int8_per_tensor")
    target.load_state_dict(source.state_dict())
    compiled = torch.compile(target, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 32)
    with tq.use_backend("eager"), torch.no_grad():
        # Fake quant off: the float model's output (observers still run).
        torch.testing.assert_close(compiled(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["x86", "nvfp4_dynamic"])
def test_triton_path_fullgraph_equals_eager(preset):
    """The fused linear's Triton kernels (interpreted on the CPU) under compile: the op is a
    custom op (fq_linear; mx_linear for the microscaling presets); the observers are traced
    as torch code (bit-exact with their kernels)."""
    pytest.importorskip("triton")
    from triton_qat.ops.backend import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    eager = tq.prepare_qat(_mlp(), preset).train()
    module = copy.deepcopy(eager)
    compiled, counter = _compiled(module, _mlp_out)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 32, generator=g) for _ in SHORT]
    with tq.use_backend("triton"):
        _run(eager, compiled, module, _mlp_out, inputs.__getitem__, SHORT)
    assert counter.frame_count <= 2
