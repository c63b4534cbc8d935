"""The sibling speculator drafts from the live outputs of the other requests of the same prompt."""

from __future__ import annotations

import numpy as np
import pytest

from adaspec.speculators.base import DecodeContext, Draft, StepOutcome
from adaspec.speculators.siblings import SiblingConfig, SiblingSpeculator

PROMPT = [1, 2, 3]


def _ctx(rid: str, out: list[int], ns: str = "g") -> DecodeContext:
    return DecodeContext(rid, ns, PROMPT + out, len(PROMPT))


def test_drafts_what_followed_the_longest_match_in_a_sibling():
    spec = SiblingSpeculator()
    a = _ctx("a", [10, 11, 12, 13, 14, 15, 16])
    b = _ctx("b", [20, 11, 12])  # ends with 11 12: a continued with 13 14 15 16
    for c in (a, b):
        spec.begin(c)
    d = spec.propose(b, 3)
    assert d.tokens.tolist() == [13, 14, 15] and d.match_len == 2 and d.is_chain
    assert 0 < d.probs[0] < 1
    # the prompt is not searched: it is every sibling's, and the request's own copy of it is the n-gram speculator's
    c = _ctx("c", [2, 3])
    spec.begin(c)
    assert len(spec.propose(c, 2)) == 0  # searching a's prompt + output would have drafted [10, 11]


def test_only_siblings_of_the_same_prompt_and_namespace_live_or_finished():
    spec = SiblingSpeculator()
    a = _ctx("a", [10, 11, 12, 13])
    other_ns = _ctx("x", [10, 11, 12, 99], ns="h")
    other_prompt = DecodeContext("y", "g", [4, 5, 10, 11, 12, 98], 2)
    b = _ctx("b", [10, 11, 12])
    for c in (a, other_ns, other_prompt, b):
        spec.begin(c)
    assert spec.propose(b, 4).tokens.tolist() == [13]
    spec.end(a, True)
    assert spec.propose(b, 4).tokens.tolist() == [13]  # a finished: its output stays for its prompt
    spec.end(other_ns, False)  # cancelled: not kept
    assert spec.stats() == {"groups": 2, "live": 2, "history_prompts": 1, "history_outputs": 1}


def test_finished_outputs_are_kept_per_prompt_newest_first_and_bounded():
    """The next step's samples of a prompt draft from its earlier samples; the oldest outputs and the least
    recently used prompts are evicted."""
    spec = SiblingSpeculator(SiblingConfig(history=2, max_prompts=2))
    for i, tail in enumerate(([20, 21], [30, 31], [40, 41])):  # three finished samples of PROMPT, one after another
        c = _ctx(f"old{i}", [5, 6, 7, *tail])
        spec.begin(c)
        spec.end(c, True)
    me = _ctx("me", [9, 6, 7])
    spec.begin(me)
    firsts = {int(spec.propose(me, 1).tokens[0])}
    assert firsts <= {30, 40}  # the first sample's output was evicted (history=2)
    assert spec.stats()["history_outputs"] == 2
    spec.end(me, False)
    for p in ([7, 7], [8, 8]):  # two other prompts finish: PROMPT is the least recently used and goes
        c = DecodeContext(f"p{p[0]}", "g", p + [5, 6, 7, 1], 2)
        spec.begin(c)
        spec.end(c, True)
    again = _ctx("again", [9, 6, 7])
    spec.begin(again)
    assert len(spec.propose(again, 2)) == 0 and spec.stats()["history_prompts"] == 2


def test_the_continuation_most_siblings_share_wins_a_tie():
    spec = SiblingSpeculator()
    sibs = [_ctx("s1", [5, 6, 7, 40]), _ctx("s2", [5, 6, 7, 50]), _ctx("s3", [8, 6, 7, 50, 51])]
    me = _ctx("me", [9, 6, 7])
    for c in sibs + [me]:
        spec.begin(c)
    assert spec.propose(me, 2).tokens.tolist() == [50, 51]


def test_confidence_follows_verified_drafts():
    spec = SiblingSpeculator(SiblingConfig(prior_strength=2.0))
    a, b = _ctx("a", [10, 11, 12, 13, 14]), _ctx("b", [11, 12])
    for c in (a, b):
        spec.begin(c)
    d = spec.propose(b, 2)
    before = d.probs[0]
    for _ in range(20):  # every draft rejected at its first token
        spec.observe(b, StepOutcome(d, [], [77]))
    assert spec.propose(b, 2).probs[0] < before / 2


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        SiblingSpeculator(SiblingConfig(min_ngram=3, max_ngram=2))
    with pytest.raises(ValueError):
        SiblingSpeculator(SiblingConfig(prior=(1.5,)))
    with pytest.raises(ValueError):
        SiblingSpeculator(SiblingConfig(max_prompts=0))


def test_a_sampled_request_guesses_among_the_siblings_continuations_with_its_noise():
    """The token after the match is the argmax of log(count) + the sampler's noise there, for the request's seed:
    each of the siblings' next tokens is drafted for some seeds, the more common one more often."""
    sibs = [_ctx(f"s{i}", [5, 6, 7, 40 if i < 3 else 50, 60 + i]) for i in range(4)]  # 40 three times, 50 once
    seen = {40: 0, 50: 0}
    for seed in range(200):
        spec = SiblingSpeculator()
        me = DecodeContext("me", "g", PROMPT + [9, 6, 7], len(PROMPT), seed=seed, temperature=1.0, vocab=100)
        for c in (*sibs, me):
            spec.begin(c)
        d = spec.propose(me, 2)
        tokens, counts = np.array([40, 50]), np.array([3, 1])
        assert d.tokens[0] == tokens[me.guess(tokens, np.log(counts), 1)]
        seen[int(d.tokens[0])] += 1
        if d.tokens[0] == 50:
            assert d.tokens.tolist() == [50, 63]  # then the one sibling that wrote 50
    assert seen[40] > seen[50] > 20
