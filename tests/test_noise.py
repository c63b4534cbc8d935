"""The seeded Gumbel field: exact pruned argmax, independent uniform noise, and drafts coupled to it."""

import numpy as np
import pytest
import torch

from adaspec.speculators.base import Draft, SpeculatorBase
from adaspec.verify import SamplingParams, target_probs, verify
from adaspec.verify import noise
from adaspec.verify.noise import (EXCEED, G_HIGH, MARGIN, U_HIGH, coupled_choice, gumbel, gumbel_argmax, gumbel_keys,
                                  high_tokens, noise_key)


def _brute(scores: torch.Tensor, key: int, scale: float) -> int:
    """The definition: every token scored."""
    vocab = scores.shape[-1]
    total = scores.double().numpy() / scale + gumbel(key, np.arange(vocab), vocab)
    return int(np.argmax(total))


@pytest.mark.parametrize("shape", ["peaked", "flat", "ties", "filtered", "float64"])
@pytest.mark.parametrize("scale", [1.0, 0.3, 4.0])
def test_pruned_argmax_equals_scoring_every_token(shape, scale):
    g = torch.Generator().manual_seed(hash((shape, scale)) % 1000)
    vocab = 3000
    for i in range(60):
        if shape == "peaked":
            s = torch.randn(vocab, generator=g) * 4
        elif shape == "flat":
            s = torch.randn(vocab, generator=g) * 0.1
        elif shape == "ties":  # many equal scores: the lowest id must win a tie, as np.argmax does
            s = torch.randint(0, 3, (vocab,), generator=g).float()
        elif shape == "filtered":
            s = torch.randn(vocab, generator=g) * 2
            s[torch.rand(vocab, generator=g) < 0.9] = float("-inf")
        else:
            s = torch.randn(vocab, generator=g, dtype=torch.float64) * 3
        key = noise_key(i, 17)
        assert gumbel_argmax(s, key, scale) == _brute(s, key, scale)


@pytest.mark.parametrize("margin", [0.0, 1.0, 3.0])
def test_the_argmax_is_exact_when_the_candidates_are_not_enough(margin, monkeypatch):
    """With a narrow margin the bound often fails and every token is scored; either way the answer is the
    definition's."""
    monkeypatch.setattr(noise, "MARGIN", margin)
    vocab = 800
    g = torch.Generator().manual_seed(3)
    for i in range(100):
        s = torch.randn(vocab, generator=g)
        key = noise_key(99, i)
        assert gumbel_argmax(s, key) == _brute(s, key, 1.0)


def test_noise_is_uniform_and_independent_of_what_is_asked():
    vocab = 20000
    key = noise_key(5, 3)
    g = gumbel(key, np.arange(vocab), vocab)
    u = np.exp(-np.exp(-g))
    # uniform: the high share and the deciles
    assert abs((u > U_HIGH).mean() - EXCEED) < 0.003
    assert np.all(np.abs(np.histogram(u, bins=10, range=(0, 1))[0] / vocab - 0.1) < 0.01)
    assert (g[u <= U_HIGH] <= G_HIGH).all()
    ids, g_high = high_tokens(key, vocab)
    assert np.array_equal(ids, np.flatnonzero(u > U_HIGH)) and np.array_equal(g_high, g[ids])
    # a token's noise does not depend on which others are asked for, nor on their order
    pick = np.array([17, 4, 19999, 4, int(ids[0])])
    assert np.array_equal(gumbel(key, pick, vocab), g[pick])
    # several keys in one pass: each token's noise under its own key
    keys = [key, noise_key(5, 4), noise_key(6, 3)]
    which = np.array([0, 2, 1, 1, 0, 2])
    toks = np.array([17, 17, 4, int(ids[1]), 19999, int(high_tokens(keys[2], vocab)[0][0])])
    assert np.array_equal(gumbel_keys(keys, which, toks, vocab),
                          [gumbel(keys[w], np.array([t]), vocab)[0] for w, t in zip(which, toks)])
    # other keys: other noise, uncorrelated
    other = gumbel(noise_key(5, 4), np.arange(vocab), vocab)
    assert abs(np.corrcoef(g, other)[0, 1]) < 0.03


def test_seeded_samples_follow_the_target_distribution_with_top_k_and_top_p():
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0, 2.0, -3.0, 0.1]])
    for params in (SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.3, top_p=0.8)):
        p = target_probs(logits, params)[0].numpy()
        n = 4000
        counts = np.zeros(8)
        for s in range(n):
            counts[verify(logits, Draft.empty(), params, seed=s).emitted[0]] += 1
        assert 0.5 * np.abs(counts / n - p).sum() < 0.03
        assert counts[p == 0].sum() == 0


def test_a_coupled_guess_is_accepted_far_more_often_than_a_fixed_one():
    """With q = p the coupled guess is the sample; with q near p it mostly is; a fixed guess of the most likely
    token is right with probability max p only."""
    logits = torch.tensor([[1.0, 0.9, 0.8, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0)
    p = target_probs(logits, params)[0].numpy()
    noisy = np.log(p) + np.array([0.2, -0.2, 0.1, 0.0, -0.1, 0.3])  # a drafter's estimate of p
    tokens = np.arange(6)
    hits = {"exact": 0, "near": 0, "fixed": 0}
    n = 3000
    for s in range(n):
        out = verify(logits, Draft.empty(), params, position=40, seed=s).emitted[0]
        hits["exact"] += coupled_choice(tokens, np.log(p), s, 40, 6) == out
        hits["near"] += coupled_choice(tokens, noisy, s, 40, 6) == out
        hits["fixed"] += int(np.argmax(p)) == out
    assert hits["exact"] == n
    assert hits["near"] / n > 0.8
    assert abs(hits["fixed"] / n - p.max()) < 0.03 and p.max() < 0.3


class _SelfCoupled(SpeculatorBase):
    """Drafts with the target's own distribution, guessing each token with the sampler's noise."""

    name = "self"

    def __init__(self, model):
        super().__init__()
        self.model = model

    def propose(self, ctx, budget):
        drafted: list[int] = []
        for depth in range(1, budget + 1):
            cache = self.model.new_cache()
            row = self.model.prefill(cache, ctx.tokens + drafted).logits[-1]
            logq = row.double().numpy() / ctx.temperature
            drafted.append(int(ctx.guess(np.arange(len(logq)), logq, depth)))
        return Draft.chain(drafted, source=self.name)


@pytest.mark.parametrize("seeded", [True, False], ids=["user seed", "engine seed"])
def test_a_drafter_with_the_targets_distribution_is_always_accepted(seeded):
    """The coupling lines up with the verifier exactly (keys, positions, temperature): drafting with the target's
    own distribution and the request's noise is accepted at every node, seeded by the user or not; and the output
    is the one plain sampling gives with that seed."""
    from adaspec.control.base import FixedController
    from adaspec.engine import Engine
    from adaspec.model.llama import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_context=256)
    model = LlamaModel.random(cfg, seed=1)
    eng = Engine(model, speculators=[_SelfCoupled(model)], controller=FixedController(3))
    for i in range(3):
        # a high temperature flattens the random model's peaked logits: a fixed guess would mostly miss
        params = SamplingParams(max_tokens=20, temperature=15.0, seed=i if seeded else None)
        g = eng.generate([5 + i, 17, 33, 2], params)
        assert g.stats.drafted > 0 and g.stats.accepted == g.stats.drafted
        if seeded:
            assert g.tokens == Engine(model).generate([5 + i, 17, 33, 2], params).tokens
