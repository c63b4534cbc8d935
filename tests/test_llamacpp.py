"""The llama.cpp backend on the bundled model: forwards, commit/rollback, errors, and losslessness.

Lossless here means: speculative output equals plain decoding through the same backend, except at positions whose
top-2 logit gap is within the batch noise measured in the same test (a verified row against the same position
decoded alone). A divergence at a clear gap fails.
"""

from __future__ import annotations

import gc

import pytest
import torch

from adaspec.control.base import FixedController
from adaspec.engine import Engine
from adaspec.verify import SamplingParams

from lossless import ScriptedSpeculator, first_divergence

pytest.importorskip("llama_cpp")

N_PROMPTS = 30
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def target():
    from adaspec.model.loader import load_target

    model, tok = load_target(None, backend="llamacpp", threads=2)
    yield model, tok
    model.close()


def _plain_with_gaps(model, prompt: list[int], n: int) -> tuple[list[int], list[float], list[torch.Tensor]]:
    """Greedy decoding one token per forward: (tokens, top-2 gap at each step, logits rows)."""
    cache = model.new_cache()
    return _greedy_after(model, cache, model.prefill(cache, prompt).logits[-1], n)


@pytest.fixture(scope="module")
def prompts(target):
    from adaspec.bench import workloads

    _, tok = target
    items = workloads.drift(n_per_phase=N_PROMPTS // 3 + 1, seed=3, max_tokens=MAX_TOKENS)
    ids = []
    for it in items:
        p = tok.encode(it.prompt) if it.prompt is not None else tok.apply_chat_template(it.messages)
        if len(p) < 600:
            ids.append(p)
    assert len(ids) >= N_PROMPTS
    return ids[:N_PROMPTS]


class _PlainOutputs(dict):
    """Plain decoding of each prompt, computed on first use."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __missing__(self, key: tuple) -> tuple:
        self[key] = _plain_with_gaps(self.model, list(key), MAX_TOKENS)
        return self[key]


@pytest.fixture(scope="module")
def plain(target):
    return _PlainOutputs(target[0])


@pytest.fixture(scope="module")
def batch_noise(target, prompts, plain):
    """Largest |logit difference| between a verified chain row and the same position decoded alone."""
    model, _ = target
    worst = 0.0
    for p in prompts[:6]:
        toks, _, rows = plain[tuple(p)]
        cache = model.new_cache()
        model.prefill(cache, p)
        out = model.forward(cache, toks[:16])  # row i predicts the token after toks[i]
        worst = max(worst, max(float((out.logits[i] - rows[i + 1]).abs().max()) for i in range(15)))
    print(f"\nllama.cpp batch noise (max |verified row - one-token row|): {worst:.4f}")
    return worst


def _check_lossless(model, tok, prompts, plain, noise, engine) -> tuple[int, int]:
    """(diverged prompts, draft tokens accepted on the others); fails on a divergence at a top-2 gap above the
    noise. (After a near-tie divergence a scripted draft no longer follows the output, so those are not counted.)"""
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    diverged = accepted = 0
    for p in prompts:
        ref, gaps, _ = plain[tuple(p)]
        g = engine.generate(p, params)
        i = first_divergence(ref, g.tokens)
        if i is None:
            accepted += g.stats.accepted
            continue
        diverged += 1
        assert i < len(ref) and gaps[i] <= 2 * noise + 1e-4, \
            f"diverged at token {i} where the top-2 gap is {gaps[i]:.3f} (batch noise {noise:.3f})"
    return diverged, accepted


@pytest.mark.parametrize("mode", ["all", "none", ("mismatch", 2), "tree"], ids=str)
def test_scripted_drafts_equal_plain_decoding(target, prompts, plain, batch_noise, mode):
    model, tok = target
    refs = {tuple(p): plain[tuple(p)][0] for p in prompts[:6]}
    eng = Engine(model, tok, [ScriptedSpeculator(refs, mode, model.vocab_size)], FixedController(6))
    diverged, accepted = _check_lossless(model, tok, prompts[:6], plain, batch_noise, eng)
    print(f"\nscripted {mode}: {diverged}/6 prompts diverged (near ties only), {accepted} tokens accepted")
    assert (accepted == 0) if mode == "none" else (accepted > 6 or diverged > 3)


@pytest.mark.parametrize("n", [10, pytest.param(N_PROMPTS, marks=pytest.mark.slow)])
def test_adaptive_system_equals_plain_decoding(target, prompts, plain, batch_noise, n):
    from adaspec.system import build_engine

    model, tok = target
    eng = build_engine(model, tok, "adaptive")
    try:
        diverged, accepted = _check_lossless(model, tok, prompts[:n], plain, batch_noise, eng)
    finally:
        eng.close()
    print(f"\nadaptive: {diverged}/{n} prompts diverged from plain decoding (near ties only), "
          f"{accepted} draft tokens accepted")
    assert accepted > 0


@pytest.fixture(scope="module")
def short(target, prompts, plain):
    """A prompt of 120 tokens, its plain decoding, and the batch noise there (0 where llama.cpp's kernels give
    batched rows equal to one-token rows, as its CPU flash attention does below 256 cells)."""
    model, _ = target
    p = prompts[0][:120]
    toks, _, rows = plain[tuple(p)]
    cache = model.new_cache()
    model.prefill(cache, p)
    out = model.forward(cache, toks[:8])
    noise = max(float((out.logits[i] - rows[i + 1]).abs().max()) for i in range(7))
    print(f"\nbatch noise at 120 tokens of context: {noise:.4f}")
    return p, toks, rows, noise + 1e-3


def test_tree_verification_and_rollback_leave_no_trace(target, short):
    """Decoding after a tree with rejected branches continues as if the tree had never been drafted."""
    model, _ = target
    p, toks, rows, tol = short
    cache = model.new_cache()
    model.prefill(cache, p)
    wrong = (toks[1] + 7) % model.vocab_size
    # root, a wrong first child with a child of its own, then the right chain
    out = model.forward(cache, [toks[0], wrong, 11, toks[1], toks[2]], [-1, 0, 1, 0, 3])
    assert float((out.logits[3] - rows[2]).abs().max()) <= tol
    cache.commit([0, 3, 4])
    assert cache.length == len(p) + 3
    nxt = model.forward(cache, [toks[3]])
    cache.commit([0])
    assert float((nxt.logits[0] - rows[4]).abs().max()) <= tol
    # a rejected chain tail, then plain steps
    model.forward(cache, [toks[4], 5, 6, 7])
    cache.commit([0])
    nxt = model.forward(cache, [toks[5]])
    assert float((nxt.logits[0] - rows[6]).abs().max()) <= tol
    cache.commit([0])
    # truncate back and decode again
    cache.truncate(len(p) + 1)
    again = model.forward(cache, [toks[1]])
    assert float((again.logits[0] - rows[2]).abs().max()) <= tol


def test_uncommitted_forward_is_dropped_by_the_next_one(target, short):
    model, _ = target
    p, toks, rows, tol = short
    cache = model.new_cache()
    model.prefill(cache, p)
    model.forward(cache, [toks[0], 3, 4], [-1, 0, 0])  # never committed
    out = model.forward(cache, [toks[0]])
    assert float((out.logits[0] - rows[1]).abs().max()) <= tol


def _greedy_after(model, cache, row: torch.Tensor, n: int) -> tuple[list[int], list[float], list[torch.Tensor]]:
    """Plain greedy steps on a cache from the logits row that predicts its next token: (tokens, top-2 gaps, rows)."""
    out, gaps, rows = [], [], []
    for _ in range(n):
        top2 = torch.topk(row, 2).values
        gaps.append(float(top2[0] - top2[1]))
        rows.append(row)
        out.append(int(row.argmax()))
        row = model.forward(cache, [out[-1]]).logits[0]
        cache.commit([0])
    return out, gaps, rows


def test_batched_forward_equals_separate_forwards(target, prompts, batch_noise):
    """One forward_batch over four caches (chains and trees, prompts of different lengths) gives each cache what a
    forward of its own gives, up to llama.cpp's batch noise; after a per-cache commit (one cache left uncommitted and
    dropped by its next forward) plain greedy decoding goes on as after separate forwards."""
    model, _ = target
    tol = 2 * batch_noise + 1e-4
    ps = [prompts[1][:50], prompts[2][:90], prompts[3][:130], prompts[4][:70]]
    specs = []  # (prompt, tokens, parents, keep); keep None: never committed
    for k, p in enumerate(ps):
        t = _plain_with_gaps(model, p, 5)[0]
        wrong = [(x + 7) % model.vocab_size for x in t]
        specs.append([(p, t[:5], None, [0, 1, 2, 3, 4]),  # a chain, all right
                      (p, [t[0], t[1], wrong[2], t[3]], None, [0, 1]),  # a chain rejected at its third token
                      (p, [t[0], wrong[1], 11, t[1], t[2]], [-1, 0, 1, 0, 3], [0, 3, 4]),  # a tree, second branch
                      (p, [t[0], t[1], wrong[1], t[2]], [-1, 0, 0, 1], None)][k])  # a tree, dropped
    gc.collect()
    model._reclaim()
    sep = [model.new_cache() for _ in specs]
    bat = [model.new_cache() for _ in specs]
    for (p, *_), cs, cb in zip(specs, sep, bat):
        model.prefill(cs, p)
        model.prefill(cb, p)
    free = len(model._free)
    separate = [model.forward(c, toks, par) for c, (_, toks, par, _) in zip(sep, specs)]
    batched = model.forward_batch([(c, toks, par) for c, (_, toks, par, _) in zip(bat, specs)])
    assert len(batched) == len(specs)

    worst, agree, rows = 0.0, 0, 0
    for (_, toks, _, _), s, b in zip(specs, separate, batched):
        assert b.logits.shape == (len(toks), model.vocab_size)
        assert b.hidden is not None and b.hidden.shape == (len(toks), model.hidden_size)
        worst = max(worst, float((b.logits - s.logits).abs().max()))
        for i in range(len(toks)):
            top2 = torch.topk(s.logits[i], 2).values
            gap = float(top2[0] - top2[1])
            same = int(b.logits[i].argmax()) == int(s.logits[i].argmax())
            agree += same
            rows += 1
            assert same or gap <= tol, f"batched argmax differs at a top-2 gap of {gap:.3f} (noise {batch_noise:.3f})"
    print(f"\nforward_batch vs separate forwards ({rows} rows): max |logit difference| {worst:.4f}, "
          f"argmax agreement {agree}/{rows} = {agree / rows:.3f}")

    cont_worst, n_steps = 0.0, 8
    for (p, toks, _, keep), cs, cb, s, b in zip(specs, sep, bat, separate, batched):
        if keep is None:  # dropped by the next forward
            start_s, start_b = model.forward(cs, [toks[0]]), model.forward(cb, [toks[0]])
            cs.commit([0])
            cb.commit([0])
            row_s, row_b = start_s.logits[0], start_b.logits[0]
        else:
            cs.commit(keep)
            cb.commit(keep)
            row_s, row_b = s.logits[keep[-1]], b.logits[keep[-1]]
        assert cb.length == cs.length == len(p) + (len(keep) if keep else 1)
        ref, gaps, ref_rows = _greedy_after(model, cs, row_s, n_steps)
        got, _, got_rows = _greedy_after(model, cb, row_b, n_steps)
        i = first_divergence(ref, got)
        upto = n_steps if i is None else i
        cont_worst = max([cont_worst] + [float((x - y).abs().max()) for x, y in zip(ref_rows[:upto], got_rows[:upto])])
        assert i is None or gaps[i] <= tol, \
            f"decoding after the batched forward diverged at step {i}, top-2 gap {gaps[i]:.3f} " \
            f"(noise {batch_noise:.3f})"
    print(f"decoding after commit: max |logit difference| {cont_worst:.4f} over {n_steps} steps per cache")
    # every scratch sequence came back: the only sequences taken are the parking ones of tree commits
    assert len(model._free) + sum(len(c._ids) - 1 for c in sep + bat) == free


def test_batched_forward_errors_leave_every_cache_usable(target):
    """A cache twice is a ValueError and too many rows a LlamaCppError, before anything runs; a llama_decode that
    finds no free KV cells (a real one, on a model with few cells) and a tree that finds no free sequence both give
    back every sequence they took and leave every cache as committed."""
    from adaspec.model.llamacpp import MAX_SEQUENCES, LlamaCppError, LlamaCppModel
    from adaspec.model.loader import bundled_gguf_path

    model, _ = target
    a, b = model.new_cache(), model.new_cache()
    model.prefill(a, [1, 2, 3])
    model.prefill(b, [4, 5, 6])
    assert model.forward_batch([]) == []
    with pytest.raises(ValueError, match="twice"):
        model.forward_batch([(a, [7], None), (b, [8], None), (a, [9], None)])
    half = model._batch_size // 2 + 1
    with pytest.raises(LlamaCppError, match="exceeds llama.cpp's batch"):
        model.forward_batch([(a, [7] * half, None), (b, [8] * half, None)])
    with pytest.raises(LlamaCppError, match="exceeds llama.cpp's batch"):
        model.forward(a, [7] * (model._batch_size + 1))
    assert a.length == b.length == 3
    out = model.forward_batch([(a, [7, 8], None), (b, [9, 10, 11], [-1, 0, 0])])
    assert [o.logits.shape[0] for o in out] == [2, 3]

    with pytest.raises(LlamaCppError, match="batch"):
        LlamaCppModel(bundled_gguf_path(), threads=2, batch=MAX_SEQUENCES - 1)  # llama.cpp would abort the process
    small = LlamaCppModel(bundled_gguf_path(), threads=2, cells=256, batch=MAX_SEQUENCES)
    try:
        L, mem = small._L, small._mem

        def state_is_clean(caches):
            assert all(c._pending is None and L.llama_memory_seq_pos_max(mem, c.seq) == c.length - 1 for c in caches)
            assert all(L.llama_memory_seq_pos_max(mem, s) == -1 for s in small._free)

        with pytest.raises(ValueError, match="another model"):
            small.forward_batch([(a, [7], None)])
        caches = [small.new_cache() for _ in range(3)]
        for k, c in enumerate(caches):
            small.prefill(c, [(7 * k + j) % 1000 + 5 for j in range(60)])
        before = [small.forward(c, [42]).logits[0] for c in caches]  # left uncommitted: the batch drops them
        free = sorted(small._free)
        rows = 30  # 3 x 30 new cells do not fit in the 256 - 180 left
        tree = [-1] + [0] * (rows // 2) + list(range(1, rows // 2))  # many leaves: many scratch sequences
        items = [(caches[0], [9] * rows, None), (caches[1], [3] * rows, tree), (caches[2], [8] * rows, None)]
        with pytest.raises(LlamaCppError, match="no free KV cells"):
            small.forward_batch(items)
        assert sorted(small._free) == free and [c.length for c in caches] == [60] * 3
        state_is_clean(caches)
        after = [small.forward(c, [42]).logits[0] for c in caches]
        assert all(torch.allclose(x, y, atol=1e-3) for x, y in zip(before, after))

        # sequences run out in the middle of a batch: the first two trees get their scratch sequences, the third cannot
        spare = [small.new_cache() for _ in range(len(small._free) - 3)]
        assert len(small._free) == 3
        with pytest.raises(LlamaCppError, match="sequences"):
            small.forward_batch([(caches[0], [1, 2, 3, 4], [-1, 0, 0, 0]), (caches[1], [5, 6, 7], [-1, 0, 0]),
                                 (caches[2], [8, 9, 10], [-1, 0, 0])])
        assert len(small._free) == 3
        state_is_clean(caches)
        out = small.forward_batch([(caches[0], [1, 2, 3], [-1, 0, 0]), (caches[1], [4, 5], [-1, 0]),
                                   (caches[2], [6], None)])
        assert [o.logits.shape[0] for o in out] == [3, 2, 1] and len(small._free) == 2
        del spare
    finally:
        small.close()


def test_sequences_of_dropped_caches_are_reused(target):
    model, _ = target
    for _ in range(300):  # more than llama.cpp's 256 sequence ids; each cache is dropped when `c` is rebound
        c = model.new_cache()
        model.prefill(c, [1, 2, 3])
    del c
    gc.collect()
    model.new_cache()
    assert len(model._free) >= 250


def test_context_limit_is_a_clear_error(target):
    model, _ = target
    cache = model.new_cache()
    with pytest.raises(ValueError, match="exceed the context"):
        model.prefill(cache, [5] * (model.max_context + 1))


def test_hidden_states_and_capabilities(target, prompts):
    model, _ = target
    assert model.capabilities.trees and model.capabilities.hidden_states
    out = model.prefill(model.new_cache(), prompts[0])
    assert out.logits.shape == (1, model.vocab_size) and out.hidden.shape == (1, model.hidden_size)
    assert torch.isfinite(out.hidden).all()


def test_tokenizer_from_the_gguf(target):
    _, tok = target
    text = "Hello, world! Ünïcödé 😀 def f(x):\n    return x"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "hi" in chat and chat.startswith("<|im_start|>")
    assert tok.eos_token_ids and all(0 <= t < tok.vocab_size for t in tok.eos_token_ids)
    with pytest.raises(ValueError):
        tok.encode("\ud800")  # a lone surrogate is not encodable text


def test_seeded_sampling_equals_plain_sampling(target, prompts, plain, batch_noise):
    """Seeded speculative sampling gives the tokens plain sampling gives with the same seed, except where
    llama.cpp's verified rows differ from its one-token rows at a near-tie of the sampler's scores: where they
    part, the best and second-best ``logit / T + noise`` of the plain row lie within the batch noise."""
    from adaspec.verify.noise import gumbel, noise_key

    model, tok = target
    refs = {tuple(p): plain[tuple(p)][0] for p in prompts[:4]}
    base = Engine(model, tok)
    eng = Engine(model, tok, [ScriptedSpeculator(refs, "all", model.vocab_size)], FixedController(4))
    temp = 0.8
    kw = dict(max_tokens=16, temperature=temp, ignore_eos=True)
    same = 0
    for s, p in enumerate(prompts[:4]):
        a = base.generate(p, SamplingParams(seed=s, **kw)).tokens
        b = eng.generate(p, SamplingParams(seed=s, **kw)).tokens
        i = first_divergence(a, b)
        if i is None:
            same += 1
            continue
        cache = model.new_cache()
        row = model.prefill(cache, p).logits[-1]
        for t in a[:i]:  # plain decoding's row at the first difference
            row = model.forward(cache, [t]).logits[0]
            cache.commit([0])
        vocab = row.shape[-1]
        z = row.double().numpy() / temp + gumbel(noise_key(s, len(p) + i), torch.arange(vocab).numpy(), vocab)
        top2 = torch.topk(torch.from_numpy(z), 2).values
        assert float(top2[0] - top2[1]) <= 2 * batch_noise / temp + 1e-6, (s, i, float(top2[0] - top2[1]))
    assert same >= 2


def test_speculative_sampling_follows_the_target_distribution(target, prompts):
    """A token decided by verifying a draft is distributed as the target's softmax at that position.

    The first token comes from the prefill; the second is verified against a drafted chain. Given the first
    token, the second must follow softmax(logits after prompt + that token / T): counted in three buckets of that
    distribution (its top token, the next four, the rest), each within 4 standard errors of the expected count.
    """
    from adaspec.verify import target_probs

    model, tok = target
    p = prompts[2][-24:]
    greedy = _plain_with_gaps(model, p, 4)[0]
    eng = Engine(model, tok, [ScriptedSpeculator({tuple(p): greedy}, "all", model.vocab_size)], FixedController(3))
    temp = 0.8
    conditional: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # first token -> (bucket probs, bucket of id)

    def buckets_after(x0: int) -> tuple[torch.Tensor, torch.Tensor]:
        if x0 not in conditional:
            cache = model.new_cache()
            model.prefill(cache, p)
            probs = target_probs(model.forward(cache, [x0]).logits, SamplingParams(temperature=temp))[0].double()
            order = torch.argsort(probs, descending=True)
            bucket = torch.full((model.vocab_size,), 2, dtype=torch.long)
            bucket[order[:1]], bucket[order[1:5]] = 0, 1
            conditional[x0] = (torch.stack([probs[bucket == b].sum() for b in range(3)]), bucket)
        return conditional[x0]

    n = 300
    counts, expect, var = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), \
        torch.zeros(3, dtype=torch.float64)
    drafted = 0
    for s in range(n):
        g = eng.generate(p, SamplingParams(max_tokens=3, temperature=temp, seed=5000 + s, ignore_eos=True))
        probs, bucket = buckets_after(g.tokens[0])
        counts[bucket[g.tokens[1]]] += 1
        expect += probs
        var += probs * (1 - probs)
        drafted += g.stats.drafted > 0
    assert drafted == n  # every second token was decided by verification
    assert ((counts - expect).abs() <= 4 * var.sqrt() + 1e-9).all(), f"bucket counts {counts.tolist()} vs " \
        f"expected {expect.tolist()}"


def test_files_llama_cpp_cannot_run_get_clear_errors(tmp_path):
    from adaspec.model.loader import ModelLoadError, load_target

    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_target(text, backend="llamacpp")
    import gguf
    import numpy as np

    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "no-such-architecture")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="no-such-architecture"):
        load_target(odd, backend="llamacpp")
    with pytest.raises(ModelLoadError, match="no-such-architecture"):
        load_target(odd)  # auto sends unknown architectures to llama.cpp, which names what it rejected


def test_backend_choice_is_stated(tmp_path):
    import torch as _torch

    from adaspec import kernels
    from adaspec.model.loader import ModelLoadError, bundled_gguf_path, choose_backend

    cpu = _torch.device("cpu")
    backend, why = choose_backend(bundled_gguf_path(), cpu)
    assert (backend == "torch") == kernels.available() and why
    assert choose_backend(bundled_gguf_path(), cpu, backend="llamacpp") == ("llamacpp", "asked for")
    assert choose_backend(bundled_gguf_path(), cpu, precision="fp32")[0] == "torch"
    (tmp_path / "config.json").write_text("{}")
    assert choose_backend(tmp_path, cpu)[0] == "torch"
    with pytest.raises(ModelLoadError, match="needs a .gguf file"):
        choose_backend(tmp_path, cpu, backend="llamacpp")
    with pytest.raises(ModelLoadError, match="precision"):
        choose_backend(bundled_gguf_path(), cpu, precision="int4", backend="llamacpp")
    with pytest.raises(ModelLoadError, match="unknown backend"):
        choose_backend(bundled_gguf_path(), cpu, backend="vllm")
