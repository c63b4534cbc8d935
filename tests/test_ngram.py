"""Prompt-lookup speculator: matching rule, budget, confidence counting, per-request state."""

import numpy as np
import pytest

from adaspec.speculators.base import ContextBuffer, DecodeContext, Draft, StepOutcome
from adaspec.speculators.ngram import PromptLookupConfig, PromptLookupSpeculator, match_lengths
from adaspec.sim.speculator import replay


def ctx(tokens, rid="r", prompt_len=None):
    return DecodeContext(rid, "ns", list(tokens), len(tokens) - 1 if prompt_len is None else prompt_len)


def test_docstring_example():
    spec = PromptLookupSpeculator()
    d = spec.propose(ctx([1, 2, 3, 4, 2, 3]), 3)
    assert d.tokens.tolist() == [4, 2, 3] and d.is_chain and d.match_len == 2 and d.source == "ngram"


def test_prefers_longest_then_most_recent_match():
    spec = PromptLookupSpeculator()
    # [7, 8, 9] occurs once (followed by 1); [8, 9] occurs later followed by 2; the 3-gram wins
    d = spec.propose(ctx([7, 8, 9, 1, 5, 8, 9, 2, 6, 7, 8, 9]), 1)
    assert d.tokens.tolist() == [1] and d.match_len == 3
    # two occurrences of the same 2-gram: the most recent one is used
    d = spec.propose(ctx([4, 5, 1, 4, 5, 2, 3, 4, 5], rid="b"), 1)
    assert d.tokens.tolist() == [2] and d.match_len == 2


def test_budget_and_known_tokens_only():
    spec = PromptLookupSpeculator()
    toks = [1, 2, 3, 4, 5, 6, 1, 2]
    assert spec.propose(ctx(toks), 3).tokens.tolist() == [3, 4, 5]
    assert spec.propose(ctx(toks), 100).tokens.tolist() == [3, 4, 5, 6, 1, 2]  # stops at the context end
    assert len(spec.propose(ctx(toks), 0)) == 0


def test_no_match_and_min_ngram():
    spec = PromptLookupSpeculator()
    assert len(spec.propose(ctx([1, 2, 3, 4]), 4)) == 0
    assert len(spec.propose(ctx([5]), 4)) == 0
    strict = PromptLookupSpeculator(PromptLookupConfig(min_ngram=2))
    assert len(strict.propose(ctx([1, 9, 2, 1], rid="x"), 4)) == 0  # only a 1-gram match exists
    assert strict.propose(ctx([1, 2, 9, 1, 2], rid="y"), 4).tokens.tolist() == [9, 1, 2]


def test_confidence_starts_at_prior_and_follows_outcomes():
    cfg = PromptLookupConfig(prior=(0.2, 0.4, 0.6), prior_strength=10)
    spec = PromptLookupSpeculator(cfg)
    c = ctx([1, 2, 3, 4, 2, 3])
    d = spec.propose(c, 3)
    assert np.allclose(d.probs, 0.4)
    for _ in range(20):  # every draft fully accepted
        spec.observe(c, StepOutcome(d, [0, 1, 2], [4, 2, 3, 9]))
    high = spec.confidence(2)
    assert high > 0.9
    for _ in range(40):  # every draft rejected at the first token
        spec.observe(c, StepOutcome(d, [], [7]))
    assert spec.confidence(2) < 0.6 < high
    assert spec.confidence(1) == pytest.approx(0.2) and spec.confidence(3) == pytest.approx(0.6)  # untouched
    other = Draft.chain([4, 2], source="suffix", match_len=2)  # someone else's draft teaches nothing
    before = spec.confidence(2)
    spec.observe(c, StepOutcome(other, [0, 1], [4, 2, 3]))
    assert spec.confidence(2) == before


def test_per_request_state_and_end():
    spec = PromptLookupSpeculator()
    a = ctx([1, 2, 3, 1, 2], rid="a")
    spec.begin(a)
    assert spec.propose(a, 2).tokens.tolist() == [3, 1]
    a.tokens.extend([3, 8, 1, 2])  # the request grew: the newest occurrence of [1, 2] is followed by 3 then 8
    spec.observe(a, StepOutcome(Draft.empty(), [], [3]))
    assert spec.propose(a, 2).tokens.tolist() == [3, 8]
    spec.end(a, True)
    # the request's token array lives on its context; the speculator holds nothing per request
    assert a.array().tokens.tolist() == a.tokens
    assert not any(isinstance(v, dict) and "a" in v for v in vars(spec).values())


def test_context_array_follows_the_tokens_and_is_shared():
    a = ctx([1, 2, 3], rid="a")
    arr = a.array()
    a.tokens.extend([4, 5])
    assert a.array() is arr and arr.tokens.tolist() == [1, 2, 3, 4, 5]
    a.tokens[:] = [9, 8]  # not an extension (a rollback or a reused context): rebuilt
    assert a.array().tokens.tolist() == [9, 8] and (a.array().buf[2:] == -1).all()


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        PromptLookupSpeculator(PromptLookupConfig(min_ngram=3, max_ngram=2))
    with pytest.raises(ValueError):
        PromptLookupSpeculator().propose(ctx([1, -2, 3]), 2)


def test_match_lengths_and_buffer():
    buf = np.array([1, 2, 3, -1, 2, 3, 9, 2, 3], dtype=np.int32)
    m = match_lengths(buf, np.array([2, 5, 8]), np.array([1, 2, 3]), 8)
    assert m.tolist() == [3, 2, 2]  # position 5 stops at the separator; 8 matches [2, 3] and stops at 9
    b = ContextBuffer(4)
    b.sync(list(range(10)))
    b.sync(list(range(12)))
    assert b.tokens.tolist() == list(range(12))
    b.sync([5, 6])  # a different context rebuilds
    assert b.tokens.tolist() == [5, 6]


def test_replay_gains_on_repetitive_text():
    rng = np.random.default_rng(0)
    traces = []
    for _ in range(5):
        block = rng.integers(0, 1000, 40).tolist()
        traces.append((block, block * 3))  # the answer repeats the prompt
    r = replay(PromptLookupSpeculator(), traces, 8)
    assert r["mean_accepted"] > 3.0
    assert replay(PromptLookupSpeculator(), traces, 0)["mean_accepted"] == 1.0
