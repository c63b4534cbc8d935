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


def test_only_siblings_of_the_same_prompt_and_namespace_and_only_while_live():
    spec = SiblingSpeculator()
    a = _ctx("a", [10, 11, 12, 13])
    other_ns = _ctx("x", [10, 11, 12, 99], ns="h")
    other_prompt = DecodeContext("y", "g", [4, 5, 10, 11, 12, 98], 2)
    b = _ctx("b", [10, 11, 12])
    for c in (a, other_ns, other_prompt, b):
        spec.begin(c)
    assert spec.propose(b, 4).tokens.tolist() == [13]
    spec.end(a, True)
    assert len(spec.propose(b, 4)) == 0  # a is gone; x and y are other groups
    assert spec.stats() == {"groups": 3, "live": 3}


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
