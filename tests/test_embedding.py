"""tq.nn.Embedding, the fq_embedding op and its kernels, float-qparams observers, convert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_bitwise_equal

import triton_qat as tq
from triton_qat import quantizers as tqfq
from triton_qat.flow.convert import QuantizedEmbedding, QuantizedLinear
from triton_qat.ops.backend import triton_unavailable_reason
from triton_qat.ops.embedding import fq_embedding

ao = pytest.importorskip("torch.ao.quantization")
nnqat = pytest.importorskip("torch.ao.nn.qat")

BACKENDS = ["eager", "triton"]
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    if request.param == "triton" and triton_unavailable_reason(device) is not None:
        pytest.skip(triton_unavailable_reason(device))
    if request.param == "eager" and device.type != "cpu":
        pytest.skip("the eager path is compared on the CPU")
    return request.param


def _qparams(kind: str, num: int, dim: int, device) -> tq.QParams:
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(device)

    if kind == "int8_row":  # symmetric int8 per row
        return tq.QParams(
            rand(num) * 0.02 + 0.005,
            torch.zeros(num, dtype=torch.int32).to(device),
            -128,
            127,
            axis=0,
        )
    if kind == "int4_row":  # affine int4 per row, integer zero points
        zp = torch.randint(-3, 4, (num,), generator=g, dtype=torch.int32).to(device)
        return tq.QParams(rand(num) * 0.3 + 0.05, zp, -8, 7, axis=0)
    if kind == "float_row":  # torch.ao's float qparams: quint8, float zero point per row
        return tq.QParams(rand(num) * 0.02 + 0.005, (rand(num) * 255).to(device), 0, 255, axis=0)
    if kind == "int4_group":  # groups of 4 along embedding_dim
        shape = (num, dim // 4)
        zp = torch.randint(-2, 3, shape, generator=g, dtype=torch.int32).to(device)
        return tq.QParams(rand(*shape) * 0.3 + 0.05, zp, -8, 7, group_size=4)
    return tq.QParams(0.07, 3, -128, 127)  # per tensor


def _reference(idx, weight, qp, padding_idx, dy, fp32_sum: bool):
    """Output and weight gradient of F.embedding of the whole fake-quantized table (eager).
    fp32_sum: the gradient summed in fp32 per row (the Triton kernel's order and precision)."""
    w = weight.detach().clone().requires_grad_()
    with tq.use_backend("eager"):
        out = F.embedding(idx, tq.ops.fake_quantize(w, qp), padding_idx)
        out.backward(dy)
        if not fp32_sum:
            return out, w.grad
        flat = idx.reshape(-1)
        keep = flat != (-1 if padding_idx is None else padding_idx % weight.shape[0])
        rows = dy.reshape(-1, weight.shape[1])[keep].float()
        total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = total.index_add_(0, flat[keep], rows).to(weight.dtype)
        mask = tq.numerics.reference.fake_quantize_mask_ref(
            weight, tq.numerics.qparams.normalize(weight, qp)
        )
        return out, total * mask


CASES = [
    # (qparams kind, dtype, index shape or tensor, padding_idx)
    ("int8_row", torch.float32, (7,), None),
    ("int8_row", torch.bfloat16, (3, 5), 2),
    ("int4_row", torch.float32, (2, 3, 4), None),
    ("int4_row", torch.float16, (9,), -1),
    ("float_row", torch.float32, (4, 6), 0),
    ("float_row", torch.bfloat16, (2, 2, 3), None),
    ("int4_group", torch.float32, (12,), 5),
    ("int4_group", torch.bfloat16, (3, 4), None),
    ("int4_group", torch.float16, (2, 5), 1),
    ("tensor", torch.float32, (6,), None),
    ("int8_row", torch.float32, (0,), None),
    ("int4_group", torch.float32, (2, 0), None),
]


@pytest.mark.parametrize("kind,dtype,shape,padding_idx", CASES)
def test_fq_embedding_equals_whole_table_fake_quant(
    kind, dtype, shape, padding_idx, backend, device
):
    """Forward bit-exact with F.embedding(fake_quantize(table)); repeated indices included.
    The weight gradient: bit-exact with autograd of that composition on the eager path and
    in fp32 on the kernels; in fp16 / bf16 the kernel sums each row's gradients in fp32 (as
    torch's CUDA embedding backward), so it equals that fp32 sum rounded once."""
    num, dim = 11, 24
    g = torch.Generator().manual_seed(len(shape) + dim)
    weight = (torch.randn(num, dim, generator=g) * 2).to(dtype).to(device)
    weight[4] = 0.0  # a row of zeros: scale at eps or 1.0
    n = torch.Size(shape).numel()
    idx = torch.randint(0, num, (n,), generator=g)
    if n >= 4:
        idx[1] = idx[3] = idx[0]  # repeats
        if padding_idx is not None:
            idx[2] = padding_idx % num
    idx = idx.reshape(shape).to(device)
    qp = _qparams(kind, num, dim, device)
    dy = torch.randn(*shape, dim, generator=g).to(dtype).to(device)
    fp32_sum = backend == "triton" and dtype in HALF
    ref_out, ref_dw = _reference(idx, weight, qp, padding_idx, dy, fp32_sum)
    w = weight.clone().requires_grad_()
    with tq.use_backend(backend):
        out = fq_embedding(idx, w, qp, padding_idx)
        out.backward(dy)
    assert_bitwise_equal(out, ref_out, "output")
    assert_bitwise_equal(w.grad, ref_dw, "weight grad")


def test_dense_grad_is_deterministic(backend, device):
    num, dim = 6, 40
    weight = torch.randn(num, dim, device=device, requires_grad=True)
    idx = torch.randint(0, num, (64,), generator=torch.Generator().manual_seed(0)).to(device)
    dy = torch.randn(64, dim, device=device)
    qp = _qparams("int8_row", num, dim, device)
    grads = []
    for _ in range(2):
        weight.grad = None
        with tq.use_backend(backend):
            fq_embedding(idx, weight, qp).backward(dy)
        grads.append(weight.grad.clone())
    assert_bitwise_equal(grads[0], grads[1], "two runs")


def test_fq_embedding_bad_arguments(device):
    w = torch.randn(5, 8, device=device)
    qp = _qparams("int8_row", 5, 8, device)
    with pytest.raises(IndexError, match="out of range"):
        fq_embedding(torch.tensor([0, 5], device=device), w, qp)
    with pytest.raises(IndexError, match="out of range"):
        fq_embedding(torch.tensor([-1], device=device), w, qp)
    with pytest.raises(TypeError, match="input"):
        fq_embedding(torch.tensor([0.0], device=device), w, qp)
    with pytest.raises(ValueError, match="padding_idx"):
        fq_embedding(torch.tensor([0], device=device), w, qp, padding_idx=7)
    with pytest.raises(ValueError, match="scale must have shape"):
        fq_embedding(torch.tensor([0], device=device), w, _qparams("int8_row", 4, 8, device))
    with pytest.raises(TypeError, match="qparams"):
        fq_embedding(torch.tensor([0], device=device), w, "int8")


# --- float qparams observers (torch.ao's embedding qconfigs) ------------------------------------


def _ours_embedding_fake_quant(dtype):
    kwargs = {"quant_min": 0, "quant_max": 255} if dtype == torch.quint8 else {}
    return tqfq.FakeQuantize(
        observer=tqfq.MovingAveragePerChannelMinMaxObserver,
        qscheme=torch.per_channel_affine_float_qparams,
        dtype=dtype,
        ch_axis=0,
        averaging_constant=1,
        **kwargs,
    )


@pytest.mark.parametrize(
    "theirs_factory,dtype",
    [
        (ao.default_embedding_fake_quant, torch.quint8),
        (ao.default_embedding_fake_quant_4bit, torch.quint4x2),
    ],
)
def test_float_qparams_fake_quant_matches_torch_ao(theirs_factory, dtype, backend):
    theirs, ours = theirs_factory(), _ours_embedding_fake_quant(dtype)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        w = torch.randn(13, 24, generator=g) * (step + 1) + (step == 2)
        w[3] = 0.5  # constant row: scale below eps -> 1.0
        w[5, :] = torch.linspace(0.2, 0.9, 24)  # positive row: zero point below quant_min
        with tq.use_backend(backend):
            y = ours(w)
        assert_bitwise_equal(y, theirs(w), f"step {step}")
        for name in ("scale", "zero_point"):
            assert_bitwise_equal(getattr(ours, name), getattr(theirs, name), name)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


def test_float_qparams_observer_matches_torch_ao():
    theirs = ao.default_float_qparams_observer()
    ours = tqfq.PerChannelMinMaxObserver(
        dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams, ch_axis=0
    )
    w = torch.randn(9, 16)
    theirs(w)
    ours(w)
    for a, b in zip(ours.calculate_qparams(), theirs.calculate_qparams(), strict=True):
        assert_bitwise_equal(a, b)
    adapted = tq.qconfig.resolve_qconfig(ao.default_embedding_qat_qconfig)
    assert isinstance(adapted.weight(), tqfq.FakeQuantize)


# --- tq.nn.Embedding as torch.ao.nn.qat.Embedding -----------------------------------------------

AO_QCONFIGS = {
    "float_qparams_weight_only": ao.float_qparams_weight_only_qconfig,
    "embedding_qat": ao.default_embedding_qat_qconfig,
    "embedding_qat_4bit": ao.default_embedding_qat_qconfig_4bit,
}


@pytest.mark.parametrize("name", list(AO_QCONFIGS))
@pytest.mark.parametrize(
    "options",
    [{}, {"padding_idx": 1}, {"max_norm": 1.5}, {"scale_grad_by_freq": True}, {"sparse": True}],
    ids=["plain", "padding", "max_norm", "freq", "sparse"],
)
def test_training_steps_match_torch_ao(name, options, backend):
    """Outputs, gradients, fake-quant buffers bit-exact over SGD steps; state_dicts load both
    ways."""
    qconfig = AO_QCONFIGS[name]
    torch.manual_seed(0)
    theirs = nnqat.Embedding(10, 16, qconfig=qconfig, **options)
    ours = tq.nn.Embedding(10, 16, qconfig=qconfig, **options)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        idx = torch.randint(0, 10, (3, 5), generator=g)
        idx[0, :3] = 1
        dy = torch.randn(3, 5, 16, generator=g)
        with tq.use_backend(backend):
            y = ours(idx)
            y.backward(dy)
        y_ref = theirs(idx)
        y_ref.backward(dy)
        assert_bitwise_equal(y, y_ref, f"step {step} output")
        grads = [m.weight.grad for m in (ours, theirs)]
        if options.get("sparse"):
            assert grads[0].is_sparse
            grads = [gr.coalesce().to_dense() for gr in grads]
        assert_bitwise_equal(grads[0], grads[1], f"step {step} grad")
        for (key, a), (_, b) in zip(
            ours.state_dict().items(), theirs.state_dict().items(), strict=True
        ):
            assert_bitwise_equal(a, b, f"step {step} {key}")
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight -= 0.5 * grads[0]
                m.weight.grad = None
    theirs.load_state_dict(ours.state_dict())


def test_from_float_to_float_and_tied_weights():
    torch.manual_seed(0)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(12, 32)
            self.lm_head = torch.nn.Linear(32, 12, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, idx):
            return self.lm_head(self.embed(idx))

    model = TinyLM()
    for m in (model.embed, model.lm_head):
        m.qconfig = "int8_per_channel"
    model.embed = tq.nn.Embedding.from_float(model.embed)
    model.lm_head = tq.nn.Linear.from_float(model.lm_head)
    assert model.embed.weight is model.lm_head.weight
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.embed.weight.grad is not None
    back = model.embed.to_float()
    assert type(back) is torch.nn.Embedding and torch.equal(back.weight, model.embed.weight)
    assert back.weight is not model.embed.weight
    with pytest.raises(TypeError, match="only works for Embedding"):
        tq.nn.Embedding.from_float(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="qconfig"):
        tq.nn.Embedding(3, 4)

    converted = tq.convert(model)
    assert isinstance(converted.embed, QuantizedEmbedding)
    assert isinstance(converted.lm_head, QuantizedLinear)
    # Identical per-row int8 qparams: one integer table shared by both layers.
    assert converted.embed.qweight is converted.lm_head.qweight
    idx = torch.tensor([[4, 0, 4, 11]])
    model.eval()
    assert_bitwise_equal(converted.embed(idx), model.embed(idx), "converted embedding")
    # Different quantization: each keeps its own codes.
    model.lm_head.weight_fake_quant = tq.get_qconfig("int8_per_tensor").weight()
    model.lm_head(torch.zeros(1, 32))
    untied = tq.convert(model)
    assert untied.embed.qweight is not untied.lm_head.qweight


@pytest.mark.parametrize(
    "qconfig,dim",
    [
        ("int8_per_channel", 16),
        ("int4_per_group", 64),
        ("embedding_int8", 16),
        ("embedding_int4", 16),
    ],
)
def test_presets_and_convert(qconfig, dim, backend):
    """The weight-only presets on an embedding: output = F.embedding of the fake-quantized
    table; convert gives the same eval output bit for bit (int4 codes packed)."""
    torch.manual_seed(0)
    emb = tq.nn.Embedding(9, dim, padding_idx=0, qconfig=qconfig, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 3, 3, 8], [1, 2, 5, 3]])
    with tq.use_backend(backend):
        y = emb(idx)
        wfq = emb.weight_fake_quant
        with tq.use_backend("eager"):
            expected = F.embedding(idx, tq.ops.fake_quantize(emb.weight.detach(), wfq.qparams()))
        assert_bitwise_equal(y, expected, "QAT output")
        emb.eval()
        frozen = tq.convert(emb)
        assert not any(isinstance(m, tqfq.FakeQuantize) for m in frozen.modules())
        if qconfig in ("int4_per_group", "embedding_int4"):
            assert frozen.qweight.dtype == torch.uint8 and frozen.qweight.shape == (9, dim // 2)
        assert_bitwise_equal(frozen(idx), emb(idx), "converted output")
    fresh = tq.nn.Embedding(9, dim, padding_idx=0, qconfig=qconfig, dtype=torch.bfloat16)
    fresh(idx)  # qparams of the right shape
    reloaded = tq.convert(fresh)
    reloaded.load_state_dict(copy.deepcopy(frozen.state_dict()))
    assert_bitwise_equal(reloaded(idx), frozen(idx), "reloaded")
