"""The verifier: greedy acceptance rules and the statistics of speculative sampling."""

import numpy as np
import pytest
import torch

from adaspec.speculators.base import Draft
from adaspec.verify import SamplingParams, target_probs, verify, verify_greedy

V = 6
# Target logits of three rows: row 0 predicts after the pending token, rows 1.. after draft nodes.
LOGITS = torch.tensor([
    [2.0, 0.5, 0.1, -1.0, 1.0, 0.0],
    [0.0, 1.5, 0.3, 0.2, -0.5, 1.0],
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    [0.5, -0.5, 2.0, 0.0, 0.0, 1.0],
])


def one_hot_logits(tokens):
    out = torch.full((len(tokens), V), -5.0)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return out


def test_greedy_all_none_and_partial():
    # the target's argmax chain is 3, 1, 4, 2
    logits = one_hot_logits([3, 1, 4, 2])
    assert verify_greedy(logits, Draft.chain([3, 1, 4])).emitted == [3, 1, 4, 2]  # all accepted + bonus
    v = verify_greedy(logits, Draft.chain([0, 1, 4]))
    assert v.accepted == [] and v.emitted == [3]  # none accepted: the target's own token
    v = verify_greedy(logits, Draft.chain([3, 1, 5]))
    assert v.accepted == [0, 1] and v.emitted == [3, 1, 4]  # first mismatch at position 2
    assert verify_greedy(logits[:1], Draft.empty()).emitted == [3]


def test_greedy_tree_takes_the_matching_branch():
    # pending -> {0: 5, 1: 3}; 1 -> {2: 0, 3: 1}; 3 -> {4: 4}
    d = Draft(np.array([5, 3, 0, 1, 4]), np.array([-1, -1, 1, 1, 3]), np.ones(5))
    # rows: pending, node0..node4; the target wants 3 after pending, 1 after node1, 4 after node3, 2 after node4
    logits = one_hot_logits([3, 0, 1, 0, 4, 2])
    v = verify_greedy(logits, d)
    assert v.accepted == [1, 3, 4] and v.emitted == [3, 1, 4, 2] and v.last_row == 5


def test_target_probs_top_k_top_p():
    p = target_probs(LOGITS[:1], SamplingParams(temperature=1.0, top_k=2))[0]
    assert (p > 0).sum() == 2 and torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    full = torch.softmax(LOGITS[0].double(), -1)
    p = target_probs(LOGITS[:1], SamplingParams(temperature=1.0, top_p=0.6))[0]
    # the top token alone has mass 0.52 < 0.6, so exactly the two most likely survive
    assert full.max() < 0.6 and set(torch.nonzero(p).flatten().tolist()) == {0, 4}
    assert torch.allclose(p[[0, 4]], full[[0, 4]] / full[[0, 4]].sum())
    with pytest.raises(ValueError):
        target_probs(LOGITS, SamplingParams())


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                                 dict(stop=("",))])
def test_sampling_params_reject_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def _empirical_first(draft: Draft, n: int, seed: int, params: SamplingParams) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(V)
    logits = LOGITS[: len(draft) + 1]
    for _ in range(n):
        counts[verify(logits, draft, params, g).emitted[0]] += 1
    return counts / n


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


DRAFTS = {
    # a draft token the target finds unlikely (p = 0.03)
    "one-hot chain": Draft.chain([3, 1]),
    # two alternatives under the pending token, both tried in order
    "one-hot tree": Draft(np.array([2, 3, 1]), np.array([-1, -1, 1]), np.ones(3)),
}


@pytest.mark.parametrize("name,params", [
    ("one-hot chain", SamplingParams(temperature=1.0)),
    ("one-hot tree", SamplingParams(temperature=1.0)),
    ("one-hot chain", SamplingParams(temperature=0.7, top_k=4)),
])
def test_speculative_sampling_preserves_target_distribution(name, params):
    draft = DRAFTS[name]
    p = target_probs(LOGITS[:1], params)[0].numpy()
    small = _tv(_empirical_first(draft, 300, 1, params), p)
    large = _tv(_empirical_first(draft, 6000, 2, params), p)
    # sampling noise of the TV distance shrinks like 1/sqrt(n): ~0.05 at 300 draws, ~0.012 at 6000
    assert large < 0.03, (name, large)
    assert large < small


def test_chain_with_draft_distribution_preserves_target():
    params = SamplingParams(temperature=1.0)
    p = target_probs(LOGITS[:3], params).numpy()
    q = torch.tensor([[0.05, 0.05, 0.05, 0.7, 0.1, 0.05], [0.1, 0.1, 0.1, 0.1, 0.1, 0.5]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    first, second_given_accept = np.zeros(V), np.zeros(V)
    n = 6000
    for _ in range(n):
        # the draft samples its tokens from q, as a sampling draft model does
        toks = [int(torch.multinomial(q[0], 1, generator=g)), int(torch.multinomial(q[1], 1, generator=g))]
        d = Draft(np.array(toks), np.array([-1, 0]), np.ones(2), dist=q)
        out = verify(LOGITS[:3], d, params, g).emitted
        first[out[0]] += 1
        if out[0] == toks[0] and len(out) > 1:
            second_given_accept[out[1]] += 1
    assert _tv(first / n, p[0]) < 0.03
    # the second token follows row 1 of the target whatever the draft did
    assert _tv(second_given_accept / second_given_accept.sum(), p[1]) < 0.05


def test_zero_mass_residual_falls_back_to_target():
    # the target puts all its mass on token 2; a draft of 2 is always accepted, and a draft of 0 always rejected
    logits = torch.full((2, V), -1e9)
    logits[:, 2] = 0.0
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    assert verify(logits, Draft.chain([2]), params, g).accepted == [0]
    assert verify(logits[:1].clone(), Draft.empty(), params, g).emitted == [2]
    v = verify(logits, Draft.chain([0]), params, g)
    assert v.accepted == [] and v.emitted == [2]


def test_seeded_verification_is_reproducible():
    params = SamplingParams(temperature=1.0)
    d = Draft.chain([1, 1])
    runs = [[verify(LOGITS[:3], d, params, torch.Generator().manual_seed(s)).emitted for s in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1
