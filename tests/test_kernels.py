"""The compiled CPU kernels (adaspec/kernels): agreement with the plain reference, row independence for every
number of rows, on every code path this CPU can run, and the model that uses them."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from adaspec import kernels
from adaspec.model.llama import LlamaConfig, LlamaModel
from adaspec.model.quant import GGUFBlocks, OneDnnLinear, QLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")

KINDS = list(kernels.FP32_KINDS)  # what qmm (fp32 activations) computes
Q8_KINDS = list(kernels.KINDS)  # what qmm8 (int8 activations) computes


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
    with pytest.raises(RuntimeError, match="unknown block kind"):
        kernels.qmm(torch.randn(2, 64), blocks.data, "Q6_K")


# ---------------------------------------------------------------------------------------------
# qmm8: int8 activations, every block type
# ---------------------------------------------------------------------------------------------


def _random_blocks(kind: str, out: int, n_in: int, seed: int) -> GGUFBlocks:
    """Blocks of random bytes (every code pattern a file can hold) with finite, varied fp16 scales."""
    from adaspec.model.quant import BLOCK_LAYOUT

    weights, size = BLOCK_LAYOUT[kind]
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (out, n_in // weights, size), dtype=torch.uint8, generator=g)
    halves = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(kind, (0,))
    for at in halves:
        scale = (torch.rand(out, n_in // weights, generator=g) * 0.02 + 1e-3).half()
        data[..., at : at + 2] = scale.view(torch.uint8).reshape(out, n_in // weights, 2)
    return GGUFBlocks(kind, data.reshape(out, -1))


@pytest.mark.parametrize("kind", Q8_KINDS)
@pytest.mark.parametrize("shape", [(1, 256), (13, 512), (130, 768)])  # output counts that are not multiples of 8
def test_qmm8_agrees_with_the_reference(isa: str, kind: str, shape: tuple[int, int]) -> None:
    """Row-quantised activations times the exact weights: integer sums are exact, the fp32 combination of block
    results differs from a float64 sum by rounding only."""
    blocks = _random_blocks(kind, *shape, seed=shape[0])
    for n in (1, 3, 4, 9):
        x = torch.randn(n, shape[1], generator=torch.Generator().manual_seed(n)) * 2
        out = kernels.qmm8(x, blocks.data, kind)
        ref = kernels.reference_qmm8(x, blocks)
        bound = 1e-6 * (kernels.quantise_rows(x, 256 if kind.endswith("_K") else 32).abs()
                        @ blocks.dequantize().abs().T) + 1e-30
        assert out.dtype == torch.float32 and out.shape == ref.shape == (n, shape[0])
        assert bool(((out - ref).abs() <= 8 * bound).all()), (kind, n, float((out - ref).abs().max()))


def test_qmm8_close_to_the_fp32_product_on_quantised_weights() -> None:
    """On llama.cpp's own quantisers' blocks, int8 activations stay within a percent of the fp32 product."""
    w = torch.randn(64, 512)
    x = torch.randn(5, 512)
    for kind in Q8_KINDS:
        blocks = GGUFBlocks.quantize(w, kind)
        exact = x @ blocks.dequantize().T
        err = (kernels.qmm8(x, blocks.data, kind) - exact).norm() / exact.norm()
        assert float(err) < 0.01, (kind, float(err))


@pytest.mark.parametrize("kind", Q8_KINDS)
def test_qmm8_rows_are_independent_for_every_k(isa: str, kind: str) -> None:
    """Row i of a k-row call equals the one-row call on x[i], bit for bit, for k = 1..64; and a row's result
    does not depend on what the other rows hold."""
    blocks = _random_blocks(kind, 37, 512, seed=3)
    packed, code, op = kernels.pack8(blocks.data, kind), kernels.KINDS[kind], torch.ops.adaspec_kernels.qmm8
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(4))
    single = torch.cat([op(x[i : i + 1], packed, code, 37) for i in range(64)])
    for k in range(1, 65):
        assert torch.equal(op(x[:k], packed, code, 37), single[:k]), f"k={k}"
    other = torch.randn(64, 512, generator=torch.Generator().manual_seed(5)) * 100
    other[17] = x[17]
    assert torch.equal(op(other, packed, code, 37)[17], single[17])


def test_qmm8_paths_agree_bit_for_bit() -> None:
    """The vector and scalar paths run one sequence of operations per output element."""
    if "avx2" not in _runnable_isas():
        pytest.skip("this CPU has no vector path")
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(6))
    try:
        for kind in Q8_KINDS:
            blocks = _random_blocks(kind, 21, 512, seed=7)
            kernels.force_isa("scalar")
            scalar = kernels.qmm8(x, blocks.data, kind)
            kernels.force_isa(None)
            assert torch.equal(kernels.qmm8(x, blocks.data, kind), scalar), kind
    finally:
        kernels.force_isa(None)


def test_qmm8_isa_follows_the_forced_path() -> None:
    """``qmm8_isa`` names the path qmm8 runs: AVX-512-VNNI only on the ``avx512`` path (and only where the CPU has
    VNNI), never when a narrower one is forced."""
    try:
        for name in _runnable_isas():
            kernels.force_isa(name)
            want = ("avx2", "avx512vnni") if name == "avx512" else (name,)
            assert kernels.qmm8_isa() in want, name
    finally:
        kernels.force_isa(None)


def _extreme_blocks(kind: str, out: int, n_in: int, seed: int) -> GGUFBlocks:
    """Random blocks whose rows 0 and 1 hold the largest codes (and K-quant scales) the format has, so the kernels
    form their largest integer partial sums: bytes of 0xFF, or -128 for Q8_0's codes and Q6_K's scales; the fp16
    scales stay as drawn."""
    from adaspec.model.quant import BLOCK_LAYOUT

    weights, size = BLOCK_LAYOUT[kind]
    data = _random_blocks(kind, out, n_in, seed).data.reshape(out, n_in // weights, size).clone()
    if kind == "Q6_K":  # 128 + 64 bytes of codes, 16 int8 scales, fp16 d
        data[:2, :, :192] = 0xFF
        data[:2, :, 192:208] = 0x80
    else:  # fp16 d (and m or dmin), then everything else
        data[:2, :, 4 if kind in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else 2 :] = 0x80 if kind == "Q8_0" else 0xFF
    return GGUFBlocks(kind, data.reshape(out, -1))


@pytest.mark.parametrize("kind", Q8_KINDS)
def test_qmm8_vnni_path_equals_the_avx2_and_scalar_paths(kind: str) -> None:
    """AVX-512-VNNI's vpdpbusd forms the same exact int32 sums as AVX2's vpmaddubsw/vpmaddwd and as the scalar
    loop, and the fp32 part is the same code, so qmm8 agrees bit for bit on all three: every tile height (1..17
    rows), output counts that are not multiples of 8, and the largest codes and activations."""
    if "avx512" not in _runnable_isas() or kernels.qmm8_isa() != "avx512vnni":
        pytest.skip(f"no AVX-512-VNNI (+VL) path here (qmm8 runs {kernels.qmm8_isa()}): the CPU lacks it or "
                    "ADASPEC_KERNELS_ISA forces a narrower path")
    K = 512
    g = torch.Generator().manual_seed(11)
    x = torch.randn(17, K, generator=g) * torch.rand(17, 1, generator=g) * 4
    x[0], x[1], x[2] = 3.0, -3.0, 3.0 * torch.sign(torch.randn(K, generator=g))  # every q = +-127
    try:
        for N in (37, 13, 8):
            blocks = _extreme_blocks(kind, N, K, seed=N)
            packed, code, op = kernels.pack8(blocks.data, kind), kernels.KINDS[kind], torch.ops.adaspec_kernels.qmm8
            outs = {}
            for name in ("avx512", "avx2", "scalar"):
                kernels.force_isa(name)
                outs[name] = [op(x[:n], packed, code, N) for n in range(1, 18)]
            for n in range(1, 18):
                vnni, avx2, scalar = (outs[name][n - 1] for name in ("avx512", "avx2", "scalar"))
                assert torch.equal(vnni, avx2) and torch.equal(vnni, scalar), (kind, N, n)
            assert bool(outs["avx512"][-1].isfinite().all())
    finally:
        kernels.force_isa(None)


def test_qmm8_does_not_depend_on_the_thread_count() -> None:
    blocks = _random_blocks("Q4_K", 2048, 512, seed=5)
    packed = kernels.pack8(blocks.data, "Q4_K")
    x = torch.randn(6, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.adaspec_kernels.qmm8(x, packed, kernels.KINDS["Q4_K"], 2048)
        torch.set_num_threads(max(2, before))
        assert torch.equal(torch.ops.adaspec_kernels.qmm8(x, packed, kernels.KINDS["Q4_K"], 2048), one)
    finally:
        torch.set_num_threads(before)


def test_qmm8_rejects_bad_input() -> None:
    blocks = _random_blocks("Q6_K", 8, 256, seed=0)
    packed = kernels.pack8(blocks.data, "Q6_K")
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.adaspec_kernels.qmm8(torch.randn(2, 512), packed, kernels.KINDS["Q6_K"], 8)
    with pytest.raises(RuntimeError, match="pack8"):
        torch.ops.adaspec_kernels.qmm8(torch.randn(2, 256), packed, kernels.KINDS["Q6_K"], 16)
    with pytest.raises(RuntimeError, match="unknown block kind"):
        torch.ops.adaspec_kernels.pack8(blocks.data, 9)
    with pytest.raises(RuntimeError, match="whole blocks"):
        torch.ops.adaspec_kernels.pack8(blocks.data[:, :100], kernels.KINDS["Q6_K"])
    with pytest.raises(ValueError, match="IQ4_XS"):
        kernels.qmm8(torch.randn(2, 256), blocks.data, "IQ4_XS")


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
QWEN2 = dataclasses.replace(CFG, qkv_bias=True, architecture="qwen2")
QWEN3 = dataclasses.replace(CFG, head_dim=32, qk_norm=True, architecture="qwen3")


def test_gguf_model_runs_its_layers_in_the_compiled_decoder() -> None:
    model = LlamaModel.random(CFG, seed=1, precision="gguf")
    assert model._decoder is not None and model._decoder.num_layers() == CFG.num_layers
    assert isinstance(model.lm_head, QLinear) and model.lm_head.kind == "Q8_0"
    assert all(isinstance(L.qkv, QLinear) and L.qkv.kind == "Q4_1" for L in model.layers)


def test_q8_model_runs_mixed_block_types_in_the_compiled_decoder() -> None:
    """A projection whose parts a file stores in different block types (q, k in Q5_0, v in Q8_0) runs as parts."""
    model = LlamaModel.random(CFG, seed=1, precision="q8")
    assert model._decoder is not None and model._decoder.num_layers() == CFG.num_layers
    assert isinstance(model.lm_head, QLinear) and model.lm_head.int8 and model.lm_head.kind == "Q8_0"
    assert all(isinstance(L.qkv, QLinear) and L.qkv.kind == "Q5_0+Q8_0" for L in model.layers)


@pytest.mark.parametrize("cfg", [CFG, QWEN2, QWEN3], ids=["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("precision", ["gguf", "q8"])
@pytest.mark.parametrize("parents", [None, [-1, 0, 1, 0, 3, -1, 5]])
def test_compiled_decoder_computes_the_op_by_op_forward(parents, precision: str, cfg: LlamaConfig) -> None:
    """The compiled layers and torch's op-by-op layers compute one function (up to summation order), with
    q/k/v biases (Qwen2), per-head q/k norms and a head width other than hidden / heads (Qwen3)."""
    model = LlamaModel.random(cfg, seed=2, precision=precision)
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


@pytest.mark.parametrize("precision", ["gguf", "q8"])
@pytest.mark.parametrize("isa_name", ["scalar", "avx2", "avx512"])
def test_model_rows_equal_one_token_decoding_on_every_path(isa_name: str, precision: str) -> None:
    """Verification rows equal one-token decoding bit for bit on each code path, for k up to 24."""
    if isa_name not in _runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa_name} path")
    kernels.force_isa(isa_name)
    try:
        model = LlamaModel.random(CFG, seed=3, precision=precision)
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
    assert loader.resolve_precision("auto", torch.device("cpu"), frozenset({"Q4_1", "Q8_0"})) == "q8"
    assert loader.resolve_precision("auto", torch.device("cpu"), frozenset({"Q5_0", "Q4_K", "Q6_K"})) == "q8"
    assert loader.resolve_precision("auto", torch.device("cpu"), frozenset()) == "fp32"


def test_gguf_precision_without_blocks_is_dense_fp32() -> None:
    from adaspec.model.quant import make_linear

    w, x = torch.randn(8, 64), torch.randn(3, 64)
    lin = make_linear("gguf", weight=w)
    assert isinstance(lin, OneDnnLinear)
    torch.testing.assert_close(lin(x), x @ w.T)
