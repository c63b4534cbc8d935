"""The compiled CPU kernels (adaspec/kernels): agreement with the plain reference, row independence for every
number of rows, on every code path this CPU can run, and the model that uses them."""

from __future__ import annotations

import logging

import pytest
import torch

from adaspec import kernels
from adaspec.model.llama import LlamaConfig, LlamaModel
from adaspec.model.quant import GGUFBlocks, OneDnnLinear, QLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")

KINDS = list(kernels.KINDS)


def _runnable_isas() -> list[str]:
    best = kernels.isa()
    return list(kernels.ISAS[: kernels.ISAS.index(best) + 1])


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    if request.param not in _runnable_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path")
    assert kernels.force_isa(request.param) == request.param
    yield request.param
    kernels.force_isa(None)


def _blocks(kind: str, out: int, n_in: int, seed: int) -> GGUFBlocks:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.rand(out, 1, generator=g)  # rows of different scales
    return GGUFBlocks.quantize(w, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 96), (130, 576)])  # ragged output counts
def test_qmm_agrees_with_dequantise_then_matmul(isa: str, kind: str, shape: tuple[int, int]) -> None:
    blocks = _blocks(kind, *shape, seed=shape[0])
    for n in (1, 2, 3, 5, 8, 13):
        x = torch.randn(n, shape[1], generator=torch.Generator().manual_seed(n))
        out = kernels.qmm(x, blocks.data, kind)  # [n, out]
        ref = kernels.reference_qmm(x, blocks)
        # both sum the same exact products in fp32, in different orders: a few ulps of the sum of magnitudes
        bound = 1e-6 * (x.abs() @ blocks.dequantize().abs().T) + 1e-30
        assert out.dtype == torch.float32 and out.shape == ref.shape == (n, shape[0])
        assert bool(((out - ref).abs() <= 8 * bound).all()), (kind, n)


@pytest.mark.parametrize("kind", KINDS)
def test_qmm_rows_are_independent_for_every_k(isa: str, kind: str) -> None:
    """Row i of a k-row call equals the one-row call on x[i], bit for bit, for k = 1..64."""
    blocks = _blocks(kind, 37, 160, seed=3)
    x = torch.randn(64, 160, generator=torch.Generator().manual_seed(4))
    single = torch.cat([kernels.qmm(x[i : i + 1], blocks.data, kind) for i in range(64)])
    for k in range(1, 65):
        assert torch.equal(kernels.qmm(x[:k], blocks.data, kind), single[:k]), f"k={k}"


def test_qmm_does_not_depend_on_the_thread_count() -> None:
    blocks = _blocks("Q4_1", 2048, 256, seed=5)  # enough rows to split across threads
    x = torch.randn(6, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.qmm(x, blocks.data, "Q4_1")
        torch.set_num_threads(max(2, before))
        assert torch.equal(kernels.qmm(x, blocks.data, "Q4_1"), one)
    finally:
        torch.set_num_threads(before)


def test_qmm_rejects_bad_input() -> None:
    blocks = _blocks("Q8_0", 4, 64, seed=0)
    with pytest.raises(RuntimeError, match="columns"):
        kernels.qmm(torch.randn(2, 96), blocks.data, "Q8_0")
    with pytest.raises(RuntimeError, match="float32"):
        kernels.qmm(torch.randn(2, 64).double(), blocks.data, "Q8_0")
    with pytest.raises(RuntimeError, match="unknown block kind"):
        torch.ops.adaspec_kernels.qmm(torch.randn(2, 64), blocks.data, 7)
    with pytest.raises(KeyError):
        kernels.qmm(torch.randn(2, 64), blocks.data, "Q6_K")


def test_quantize_matches_the_gguf_layout() -> None:
    """``GGUFBlocks.quantize`` writes blocks that dequantise like the file's (round trip within a step)."""
    w = torch.randn(8, 64)
    for kind, step in (("Q8_0", 1 / 127), ("Q4_1", 1 / 15), ("Q4_0", 1 / 7)):
        b = GGUFBlocks.quantize(w, kind)
        assert b.shape == (8, 64)
        span = w.reshape(8, 2, 32).abs().amax(-1).repeat_interleave(32, dim=1) * 2  # per-block range bound
        assert bool(((b.dequantize() - w).abs() <= span * step).all()), kind


# ---------------------------------------------------------------------------------------------
# The model on the kernels
# ---------------------------------------------------------------------------------------------

CFG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  rope_theta=500.0, max_context=128, tie_word_embeddings=False)


def test_gguf_model_runs_its_layers_in_the_compiled_decoder() -> None:
    model = LlamaModel.random(CFG, seed=1, precision="gguf")
    assert model._decoder is not None and model._decoder.num_layers() == CFG.num_layers
    assert isinstance(model.lm_head, QLinear) and model.lm_head.kind == "Q8_0"
    assert all(isinstance(L.qkv, QLinear) and L.qkv.kind == "Q4_1" for L in model.layers)


@pytest.mark.parametrize("parents", [None, [-1, 0, 1, 0, 3, -1, 5]])
def test_compiled_decoder_computes_the_op_by_op_forward(parents) -> None:
    """The compiled layers and torch's op-by-op layers compute one function (up to summation order)."""
    model = LlamaModel.random(CFG, seed=2, precision="gguf")
    tokens = [5, 6, 7, 8, 9, 10, 11]

    def run() -> torch.Tensor:
        cache = model.new_cache()
        model.prefill(cache, list(range(20, 40)))
        return model.forward(cache, tokens, parents).logits

    compiled = run()
    decoder, model._decoder = model._decoder, None
    try:
        op_by_op = run()
    finally:
        model._decoder = decoder
    torch.testing.assert_close(compiled, op_by_op, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa_name", ["scalar", "avx2", "avx512"])
def test_model_rows_equal_one_token_decoding_on_every_path(isa_name: str) -> None:
    """Verification rows equal one-token decoding bit for bit on each code path, for k up to 24."""
    if isa_name not in _runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa_name} path")
    kernels.force_isa(isa_name)
    try:
        model = LlamaModel.random(CFG, seed=3, precision="gguf")
        prefix, tokens = [3, 1, 4, 1, 5, 9, 2, 6], [int(t) for t in torch.randint(0, 97, (24,))]
        batch = model.new_cache()
        model.prefill(batch, prefix)
        out = model.forward(batch, tokens)
        one = model.new_cache()
        model.prefill(one, prefix)
        for i, t in enumerate(tokens):
            row = model.forward(one, [t])
            one.commit([0])
            assert torch.equal(row.logits[0], out.logits[i]) and torch.equal(row.hidden[0], out.hidden[i]), i
    finally:
        kernels.force_isa(None)


def test_without_kernels_auto_falls_back_with_a_log_line(monkeypatch, caplog) -> None:
    from adaspec.model import loader

    monkeypatch.setattr(kernels, "available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert loader.resolve_precision("auto", torch.device("cpu"), frozenset({"Q4_1"})) == "int4"
    assert "int4" in caplog.text
    assert loader.resolve_precision("auto", torch.device("cpu"), frozenset({"Q8_0"})) == "fp32"
    monkeypatch.undo()
    assert loader.resolve_precision("auto", torch.device("cpu"), frozenset({"Q4_1", "Q8_0"})) == "gguf"
    assert loader.resolve_precision("auto", torch.device("cpu"), frozenset()) == "fp32"


def test_gguf_precision_without_blocks_is_dense_fp32() -> None:
    from adaspec.model.quant import make_linear

    w, x = torch.randn(8, 64), torch.randn(3, 64)
    lin = make_linear("gguf", weight=w)
    assert isinstance(lin, OneDnnLinear)
    torch.testing.assert_close(lin(x), x @ w.T)
