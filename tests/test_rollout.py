"""RL rollouts and weight updates on tiny random targets, through the full adaptive system (suffix and prompt-lookup
speculators under the namespaced adaptive controller; the draft head needs the bundled target).

Rollouts: groups of seeded samples that do not depend on the batch size or the prompts' order, with
log-probabilities equal bit for bit to those of an independent token-by-token forward. Weight updates: the updated
model computes exactly what a model built from the new weights computes, and bad weights are refused.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from adaspec import kernels
from adaspec.control.base import FixedController
from adaspec.engine import PREFILL_CHUNK, Engine
from adaspec.model.llama import LlamaConfig, LlamaModel
from adaspec.model.quant import GGUFBlocks
from adaspec.rollout import Rollouts, merge_lora, prompt_seed
from adaspec.speculators.ngram import PromptLookupSpeculator
from adaspec.speculators.suffix import SuffixSpeculator
from adaspec.system import build_engine
from adaspec.verify import SamplingParams

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_context=512, qkv_bias=True, qk_norm=True, architecture="qwen3")
PROMPTS = [[(5 * i + 3 * j) % 96 for j in range(4 + 8 * i)] for i in range(3)] + [[(j * j) % 96 for j in range(300)]]
"""Prompts of 4, 12 and 20 tokens (the last prefilled in one many-row call) and one longer than ``PREFILL_CHUNK``
(two chunks)."""


def _engine(model, tokenizer=None) -> Engine:
    """The full adaptive system."""
    return build_engine(model, tokenizer, "adaptive")


def _eager_engine(model) -> Engine:
    """The speculators asked for 4 nodes every step: a tiny target's forward is too cheap for the adaptive
    controller to draft much."""
    return Engine(model, None, [SuffixSpeculator(), PromptLookupSpeculator()], FixedController(4))


def _weights(model: LlamaModel, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for ``model``'s architecture, by name; the small embedding (the tied head) gives next-token
    distributions from near one-hot to flat."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in model.weight_shapes().items():
        x = torch.randn(shape, generator=g)
        if name.endswith("norm.weight"):
            x = 1 + 0.2 * x
        elif name.endswith(".bias"):
            x = 0.5 * x
        elif name == "model.embed_tokens.weight":
            x = 0.4 * x
        else:
            x = x / math.sqrt(shape[-1])
        out[name] = x
    return out


def _reference_logprobs(model: LlamaModel, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log_softmax of the raw logits at each response token: the prompt prefilled in the engine's chunks, then one
    single-token forward per generated token."""
    cache = model.new_cache()
    for s in range(0, len(prompt), PREFILL_CHUNK):
        row = model.prefill(cache, prompt[s : s + PREFILL_CHUNK]).logits[-1]
    out = []
    for t in response:
        out.append(torch.log_softmax(row, dim=-1)[t])
        row = model.forward(cache, [t]).logits[0]
        cache.commit([0])
    return torch.stack(out)


def _same(a, b) -> bool:
    """Two rollouts' groups hold the same samples: tokens, ends and log-probabilities, bit for bit."""
    return len(a) == len(b) and all(
        len(ga) == len(gb) and all(x.tokens == y.tokens and x.finish_reason == y.finish_reason
                                   and x.stop_token == y.stop_token
                                   and torch.equal(x.response_logprobs, y.response_logprobs)
                                   for x, y in zip(ga, gb))
        for ga, gb in zip(a, b))


@pytest.fixture(scope="module")
def model():
    return LlamaModel(CFG, _weights(LlamaModel.random(CFG), seed=1))


@pytest.fixture(scope="module")
def reference(model):
    return Rollouts(_engine(model), max_batch=1).generate(PROMPTS, n=3, max_tokens=16, seed=11)


# -- rollouts ----------------------------------------------------------------------------------------------------


def test_groups_hold_n_samples_of_the_requested_length(reference):
    assert len(reference) == len(PROMPTS) and all(len(g) == 3 for g in reference)
    seeds = set()
    for group in reference:
        for s in group:
            assert len(s.tokens) == 16 and s.finish_reason == "length" and s.stop_token is None
            assert s.logprobs.shape == (16,) and s.logprobs.dtype == torch.float32
            assert bool((s.logprobs <= 0).all()) and bool(torch.isfinite(s.logprobs).all())
            seeds.add(s.seed)
    assert len(seeds) == 3 * len(PROMPTS)
    assert any(len({tuple(s.tokens) for s in g}) > 1 for g in reference)  # a group's samples differ


def test_the_same_seed_gives_the_same_rollouts_whatever_the_batch_and_the_order(model, reference):
    engine = _engine(model)
    rollouts = Rollouts(engine, max_batch=8)
    assert _same(rollouts.generate(PROMPTS, n=3, max_tokens=16, seed=11), reference)
    # the same engine again, its speculators and controller having learned from the first run
    assert _same(rollouts.generate(PROMPTS, n=3, max_tokens=16, seed=11, max_batch=5), reference)
    eager = Rollouts(_eager_engine(model), max_batch=8).generate(PROMPTS, n=3, max_tokens=16, seed=11)
    assert _same(eager, reference)
    assert sum(s.stats.accepted for g in eager for s in g) > 0  # drafts were verified and accepted
    seeds = [prompt_seed(11, i) for i in range(len(PROMPTS))]
    backwards = rollouts.generate(PROMPTS[::-1], n=3, max_tokens=16, seed=seeds[::-1])
    assert _same(backwards[::-1], reference)
    other = rollouts.generate(PROMPTS, n=3, max_tokens=16, seed=12)
    assert [[s.tokens for s in g] for g in other] != [[s.tokens for s in g] for g in reference]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_logprobs_are_the_raw_logits_log_softmax_bit_for_bit(model, reference, temperature, top_p):
    groups = reference if temperature == 1.0 else Rollouts(_engine(model), max_batch=4).generate(
        PROMPTS, n=2, max_tokens=16, temperature=temperature, top_p=top_p, seed=3)
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            assert torch.equal(s.logprobs, _reference_logprobs(model, prompt, s.tokens))


@pytest.mark.skipif(not kernels.available(), reason="adaspec's CPU kernels are not built here")
def test_logprobs_are_bit_for_bit_on_the_compiled_kernels_too():
    model = LlamaModel.random(CFG, seed=1, precision="q8")
    model.update_weights(_weights(model, seed=1))
    assert model._decoder is not None
    groups = Rollouts(_eager_engine(model), max_batch=4).generate(PROMPTS, n=2, max_tokens=16, seed=3)
    for prompt, group in zip(PROMPTS, groups):
        for s in group:
            assert torch.equal(s.logprobs, _reference_logprobs(model, prompt, s.tokens))


def test_a_sample_that_samples_the_end_token_stops_there_with_its_logprob(model, reference):
    sample = reference[0][1]
    eos = sample.tokens[5]
    engine = _engine(model)
    engine.eos_ids = {eos}
    (group,) = Rollouts(engine).generate([PROMPTS[0]], n=3, max_tokens=16, seed=[prompt_seed(11, 0)])
    s = group[1]
    cut = sample.tokens.index(eos)
    assert s.finish_reason == "stop" and s.tokens == sample.tokens[:cut] and s.stop_token == eos
    assert torch.equal(s.logprobs, sample.logprobs[:cut]) and s.stop_logprob == float(sample.logprobs[cut])
    assert s.response_tokens == sample.tokens[: cut + 1]
    assert torch.equal(s.response_logprobs, _reference_logprobs(model, PROMPTS[0], s.response_tokens))


class _ChatTokenizer:
    """Characters are token ids (mod 96); the chat template wraps the user's text in two marker tokens."""

    eos_token_ids: set[int] = set()

    def apply_chat_template(self, messages):
        return [1] + [ord(c) % 96 for m in messages for c in m["content"]] + [2]

    def decode(self, ids):
        return "".join(chr(33 + i % 90) for i in ids)


def test_text_prompts_go_through_the_chat_template(model):
    tok = _ChatTokenizer()
    rollouts = Rollouts(_engine(model, tok), max_batch=4)
    (by_text,) = rollouts.generate(["hello"], n=2, max_tokens=8, seed=[5])
    (by_ids,) = rollouts.generate([tok.apply_chat_template([{"role": "user", "content": "hello"}])], n=2,
                                  max_tokens=8, seed=[5])
    assert [s.tokens for s in by_text] == [s.tokens for s in by_ids]
    assert all(s.text == tok.decode(s.tokens) for s in by_text)
    with pytest.raises(ValueError, match="tokenizer"):
        Rollouts(_engine(model)).generate(["hello"])
    with pytest.raises(ValueError, match="list of prompts"):
        Rollouts(_engine(model)).generate([1, 2, 3])
    with pytest.raises(ValueError, match="prompt 1"):
        Rollouts(_engine(model)).generate([[1, 2], [500]])


# -- weight updates ----------------------------------------------------------------------------------------------


def _forward_rows(model: LlamaModel, prompt: list[int], tokens: list[int]):
    cache = model.new_cache()
    model.prefill(cache, prompt)
    return model.forward(cache, tokens)


@pytest.mark.parametrize("tied", [True, False])
def test_update_weights_computes_what_a_model_built_from_them_computes(tied):
    cfg = LlamaConfig(**{**CFG.to_dict(), "tie_word_embeddings": tied})
    model = LlamaModel.random(cfg, seed=1)
    engine = _engine(model)
    rollouts = Rollouts(engine, max_batch=4)
    before = rollouts.generate(PROMPTS[:3], n=2, max_tokens=12, seed=4)  # the speculators learn the old target
    new = _weights(model, seed=5)
    engine.update_weights(new)
    fresh = LlamaModel(cfg, {k: v.clone() for k, v in new.items()}, precision="fp32")
    a, b = _forward_rows(model, PROMPTS[3], [3, 4, 5]), _forward_rows(fresh, PROMPTS[3], [3, 4, 5])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    after = rollouts.generate(PROMPTS[:3], n=2, max_tokens=12, seed=4)
    assert not _same(after, before)
    assert _same(after, Rollouts(Engine(fresh), max_batch=1).generate(PROMPTS[:3], n=2, max_tokens=12, seed=4))
    greedy = SamplingParams(max_tokens=20)
    assert engine.generate(PROMPTS[1], greedy).tokens == Engine(fresh).generate(PROMPTS[1], greedy).tokens
    for t in new.values():  # the model holds copies
        t.mul_(2)
    assert torch.equal(_forward_rows(model, PROMPTS[3], [3, 4, 5]).logits, a.logits)


@pytest.mark.skipif(not kernels.available(), reason="adaspec's CPU kernels are not built here")
def test_update_weights_requantises_into_the_models_gguf_blocks():
    model = LlamaModel.random(CFG, seed=1, precision="q8")
    new = _weights(model, seed=5)
    model.update_weights(new)
    assert model._decoder is not None  # still on the compiled kernels
    # LlamaModel.random's q8 layout: Q5_0 projections, Q8_0 v projection and (tied) embedding and head
    kinds = {n: "Q8_0" if n.endswith(("v_proj.weight", "embed_tokens.weight")) else "Q5_0"
             for n in new if n.endswith("proj.weight") or n == "model.embed_tokens.weight"}
    blocks = {n: GGUFBlocks.quantize(new[n], k) for n, k in kinds.items()}
    fresh = LlamaModel(CFG, {n: t for n, t in new.items() if n not in blocks}, precision="q8", blocks=blocks)
    a, b = _forward_rows(model, PROMPTS[3], [3, 4, 5]), _forward_rows(fresh, PROMPTS[3], [3, 4, 5])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    greedy = SamplingParams(max_tokens=20)
    assert _engine(model).generate(PROMPTS[2], greedy).tokens == Engine(fresh).generate(PROMPTS[2], greedy).tokens


def test_lora_adapters_merge_into_the_base_and_update_the_engine():
    """PEFT-named LoRA pairs merge into their weights (W + scale * B @ A, the same from one step to the next), and
    the engine then computes what a model built from the merged weights computes; bad adapters are refused."""
    model = LlamaModel.random(CFG, seed=1)
    base = _weights(model, seed=5)
    g = torch.Generator().manual_seed(9)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    v_out = base[f"{v}.weight"].shape[0]  # grouped-query attention: fewer rows than q
    adapters = {  # as PEFT's get_peft_model_state_dict names them, plus a module the policy does not train
        f"base_model.model.{q}.lora_A.weight": torch.randn(4, 64, generator=g),
        f"base_model.model.{q}.lora_B.weight": torch.randn(64, 4, generator=g) * 0.1,
        f"{v}.lora_A.default.weight": torch.randn(4, 64, generator=g),
        f"{v}.lora_B.default.weight": torch.randn(v_out, 4, generator=g) * 0.1,
        "base_model.model.model.norm.weight": torch.ones(64),  # a PEFT model's base weight: not an adapter
    }
    merged = merge_lora(base, adapters, scale=2.0)
    want_q = base[f"{q}.weight"] + 2.0 * adapters[f"base_model.model.{q}.lora_B.weight"] @ \
        adapters[f"base_model.model.{q}.lora_A.weight"]
    assert torch.allclose(merged[f"{q}.weight"], want_q, atol=1e-5) and merged[f"{q}.weight"].dtype == torch.float32
    assert not torch.equal(merged[f"{v}.weight"], base[f"{v}.weight"])
    assert all(torch.equal(merged[n], t) for n, t in base.items() if n not in (f"{q}.weight", f"{v}.weight"))
    assert all(torch.equal(merge_lora(base, adapters, 2.0)[n], t) for n, t in merged.items())  # a function of its inputs
    engine = _engine(model)
    engine.update_weights(merged)
    fresh = LlamaModel(CFG, {k: t.clone() for k, t in merged.items()}, precision="fp32")
    assert torch.equal(_forward_rows(model, PROMPTS[2], [3, 4]).logits, _forward_rows(fresh, PROMPTS[2], [3, 4]).logits)
    with pytest.raises(ValueError) as e:
        merge_lora(base, {f"{q}.lora_A.weight": torch.zeros(4, 64), f"{v}.lora_A.weight": torch.zeros(4, 64),
                          f"{v}.lora_B.weight": torch.zeros(64, 5), "model.layers.7.mlp.up_proj.lora_A.weight":
                          torch.zeros(4, 64), "model.layers.7.mlp.up_proj.lora_B.weight": torch.zeros(128, 4)}, 1.0)
    msg = str(e.value)
    assert f"{q} has lora_A without its pair" in msg and f"{v}: lora_B (64, 5) @ lora_A (4, 64)" in msg
    assert "model.layers.7.mlp.up_proj.weight is not in the base" in msg
    with pytest.raises(ValueError, match="no LoRA pairs"):
        merge_lora(base, {"model.norm.weight": torch.ones(64)}, 1.0)


def test_bad_weights_are_refused_with_what_is_wrong_and_change_nothing():
    model = LlamaModel.random(CFG, seed=2)
    good = _weights(model, seed=6)
    q = "model.layers.0.self_attn.q_proj.weight"
    before = _forward_rows(model, PROMPTS[0], [7, 8]).logits

    def refused(weights, *fragments):
        with pytest.raises(ValueError) as e:
            model.update_weights(weights)
        for f in fragments:
            assert f in str(e.value)
        assert torch.equal(_forward_rows(model, PROMPTS[0], [7, 8]).logits, before)

    refused({k: v for k, v in good.items() if k != q}, "1 missing", q)
    refused({**good, "model.layers.9.mlp.up_proj.weight": good[q]}, "1 unexpected", "layers.9.mlp.up_proj")
    refused({**good, q: good[q][:, :32]}, f"{q} has shape (64, 32), expected (64, 64)")
    refused({**good, q: good[q].long()}, f"{q} is torch.int64, not a float tensor")
    refused({**good, q: good[q] * float("nan")}, f"{q} holds NaN or infinite values")
    refused({**good, "lm_head.weight": good["model.embed_tokens.weight"] + 1}, "model ties them")
    model.update_weights({**good, "lm_head.weight": good["model.embed_tokens.weight"]})  # a tied HF state dict
    assert not torch.equal(_forward_rows(model, PROMPTS[0], [7, 8]).logits, before)
    with pytest.raises(ValueError, match="takes no weight updates"):
        Engine(SimpleNamespace(backend="llamacpp")).update_weights(good)



@pytest.mark.parametrize("precision", ["fp32", "q8"])
def test_a_group_prefills_its_prompt_once_and_gets_the_same_samples(precision, monkeypatch):
    model = LlamaModel.random(CFG, seed=2, precision=precision)
    calls = []
    prefill = model.prefill
    def counted(cache, tokens, *a):
        calls.append(len(tokens))
        return prefill(cache, tokens, *a)

    monkeypatch.setattr(model, "prefill", counted)
    runs = {}
    for share in (False, True):
        calls.clear()
        runs[share] = Rollouts(_eager_engine(model), max_batch=3, share_prefill=share).generate(
            PROMPTS, n=4, max_tokens=12, seed=5)
        runs[share, "prefilled"] = sum(calls)
    for a, b in zip(runs[False], runs[True]):
        for x, y in zip(a, b):
            assert x.tokens == y.tokens and torch.equal(x.logprobs, y.logprobs)
    prompt_tokens = sum(len(p) for p in PROMPTS)
    assert runs[False, "prefilled"] == 4 * prompt_tokens and runs[True, "prefilled"] == prompt_tokens


# -- the GRPO benchmark's parts --------------------------------------------------------------------------------------


def test_arithmetic_questions_and_their_reward():
    from adaspec.bench.rollouts import arithmetic, reward

    qs = arithmetic(6, seed=2)
    assert qs == arithmetic(6, seed=2) and len(qs) == 6
    for q, ans in qs:
        a, op, b = q.split()[2:5]  # What is a + b? ...
        assert ans == (int(a) + int(b.rstrip("?")) if op == "+" else int(a) - int(b.rstrip("?")))
    assert reward(f"First 3 + 4 = 7, so the answer is {qs[0][1]}.", qs[0][1]) == 1.0
    assert reward(f"The answer is {qs[0][1]}, no, {qs[0][1] + 1}", qs[0][1]) == 0.1
    assert reward("no idea", qs[0][1]) == 0.0


@pytest.mark.slow
def test_grpo_benchmark_runs_real_updates_and_speculation_keeps_the_samples(tmp_path):
    """Two GRPO steps on the bundled model: the policy really changes, and the seeded samples with and without
    speculation are the same tokens at every step."""
    import json

    from adaspec.bench.rollouts import main

    out = tmp_path / "r.json"
    args = ["--steps", "2", "--prompts", "3", "--group", "6", "--max-tokens", "64", "--seed", "4"]
    assert main([*args, "--json", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert [s["identical_samples"] for s in steps] == [True, True]
    # each step some group's rewards differ (seed 4), so the policy moves and the target's logits with it
    assert all(s["update_l1"] > 0 and s["target_logit_change"] > 0 for s in steps)
