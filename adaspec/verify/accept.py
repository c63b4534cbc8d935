"""Lossless acceptance of a draft against the target's logits.

The target ran one forward over ``[pending] + draft.tokens``; row 0 of its
logits predicts the children of the pending token and row ``i + 1`` predicts the
children of draft node ``i``. A step walks down the draft tree from the pending
token and produces:

- **accepted** tokens: draft nodes the target agrees with, root first;
- one final token from the row of the last accepted node: the **bonus** token
  when that node's children were not rejected (e.g. a leaf), or the
  **recovered** token sampled from the residual distribution after rejections.

So a step always emits ``len(accepted) + 1`` tokens, and with an empty draft it
is exactly one step of plain decoding.

Greedy: a child is accepted iff it is the argmax of its parent's row.

Sampling, deterministic (one-hot) drafts — every speculator except a sampling
draft model: at a node, try its children in draft order; accept child ``x``
with probability ``r(x) / sum(r)`` where ``r`` is the target distribution with
the already-rejected children zeroed; on rejection zero ``r(x)``. If no child is
accepted, sample the final token from ``r`` normalised. For a single child this
is the standard rule min(1, p/q) with q one-hot: accept with p(x), else sample
from p with x removed. Output distribution: P(y) = q(y)p(y) + sum_{x != y}
q(x)(1 - p(x)) p(y) / (1 - p(x)) = p(y), for *any* way the draft chose x, so
one-hot verification is lossless for every draft. Several children apply the
same argument recursively (SpecInfer's multi-candidate rule with one-hot
proposals).

Sampling, chain drafts with a draft distribution ``q`` (``draft.dist``): the
classic rule — accept x with min(1, p(x)/q(x)), else sample from
normalise(max(0, p - q)).

Seeded sampling (a seed known: ``params.seed``, or the key an engine gives each
sampled request) uses the Gumbel-max coupling instead: the token at output
position t is argmax(log p(x) + G_t(x)), with Gumbel noise G_t that depends on
the seed and t only (:mod:`.noise`). That is an exact sample from the target
distribution, and it is a function of the seed, the position and the prefix
only; drafts merely guess it, and a node is accepted iff it equals the row's
sample. A drafter that guesses with the same noise and a distribution q close
to p is right far more often than p(x) (:func:`.noise.coupled_choice`); a
fixed guess x is right with probability p(x), as with one-hot speculative
sampling. Hence the same seed gives the same output with any speculator, any
learned state, or none: seeded runs are reproducible and equal to plain
sampling with that seed. A chain with a draft distribution and no seed of the
user's goes by the classic rule (it keeps min(1, p/q) of the drafts, more
than a coupling keeps); either rule is exact, so a request may switch between
them from step to step.

The zero-sum guard: a residual can only sum to zero through float rounding
(the last rejection removed all mass, which has probability zero); we then
sample from the unmodified target distribution instead of dividing by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..speculators.base import Draft
from .noise import gumbel_argmax, noise_key
from .sampling import SamplingParams, target_probs


@dataclass
class Verdict:
    accepted: list[int]  # draft node indices on the accepted path, root first
    emitted: list[int]  # accepted tokens, then the bonus/recovered token

    @property
    def last_row(self) -> int:
        """Forward row whose logits produced the final emitted token."""
        return self.accepted[-1] + 1 if self.accepted else 0


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams,
           generator: torch.Generator | None = None, position: int = 0, seed: int | None = None) -> Verdict:
    """Dispatch on the sampling mode. ``logits``: [1 + len(draft), vocab]; ``position``: the sequence position of
    the token row 0 predicts; ``seed``: the seeded sampler's seed when ``params.seed`` is None (an engine's
    per-request key; module docstring)."""
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"expected {len(draft) + 1} logit rows, got {logits.shape[0]}")
    if params.greedy:
        return verify_greedy(logits, draft)
    classic_dist = draft.dist is not None and draft.is_chain and len(draft) > 0
    if params.seed is not None or (seed is not None and not classic_dist):
        return verify_seeded(logits, draft, params, params.seed if params.seed is not None else seed, position)
    probs = target_probs(logits.cpu(), params)  # [1 + n, vocab]; sampled on the CPU with the request's generator
    if classic_dist:
        return verify_chain_with_dist(probs, draft, draft.dist.cpu(), generator)
    return verify_tree_sampled(probs, draft, generator)


def verify_greedy(logits: torch.Tensor, draft: Draft) -> Verdict:
    """Accept while the draft token is the target's argmax; the last argmax is the bonus token."""
    return _follow(logits.argmax(dim=-1).tolist(), draft)


def verify_seeded(logits: torch.Tensor, draft: Draft, params: SamplingParams, seed: int, position: int) -> Verdict:
    """Gumbel-max coupled sampling (module docstring). ``logits``: [1 + n, vocab]; only the rows on the path the
    samples take are sampled."""
    rows = logits.cpu()
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    filtered = params.top_p < 1.0 or 0 < params.top_k < rows.shape[-1]
    drawn: dict[int, int] = {}

    def sample(row: int, depth: int) -> int:
        if row not in drawn:
            key = noise_key(seed, position + depth)  # row 0 predicts ``position``, a node at depth d position + d
            if filtered:  # the log of the top-k / top-p distribution, -inf outside it
                drawn[row] = gumbel_argmax(target_probs(rows[row: row + 1], params)[0].log(), key)
            else:
                drawn[row] = gumbel_argmax(rows[row], key, params.temperature)
        return drawn[row]

    accepted = draft.follow(lambda node, depth: sample(node + 1, depth))
    tokens = draft.tokens.tolist()
    last = accepted[-1] if accepted else -1
    return Verdict(accepted, [tokens[a] for a in accepted] + [sample(last + 1, len(accepted))])


def _follow(best: list[int], draft: Draft) -> Verdict:
    """Walk the draft tree along the target's chosen token of every row ([1 + n]); the last choice is the bonus."""
    accepted = draft.follow(lambda node, depth: best[node + 1])
    bonus = best[accepted[-1] + 1 if accepted else 0]
    return Verdict(accepted, [int(draft.tokens[a]) for a in accepted] + [bonus])


def verify_tree_sampled(probs: torch.Tensor, draft: Draft, generator: torch.Generator | None) -> Verdict:
    """One-hot speculative sampling over a tree. ``probs``: [1 + n, vocab] target distribution."""
    kids = draft.children()
    tokens = draft.tokens.tolist()
    accepted: list[int] = []
    node = -1
    while True:
        p = probs[node + 1]  # [vocab]
        residual = p
        nxt = None
        for c in kids.get(node, ()):
            x = tokens[c]
            mass = float(residual.sum())
            if mass > 0 and _uniform(generator) * mass < float(residual[x]):
                nxt = c
                break
            if residual is p:
                residual = p.clone()
            residual[x] = 0.0
        if nxt is None:
            return Verdict(accepted, [tokens[a] for a in accepted] + [_sample(residual, p, generator)])
        accepted.append(nxt)
        node = nxt


def verify_chain_with_dist(probs: torch.Tensor, draft: Draft, dist: torch.Tensor,
                           generator: torch.Generator | None) -> Verdict:
    """Classic speculative sampling. ``probs``: [1 + n, vocab] target; ``dist``: [n, vocab] draft distributions."""
    tokens = draft.tokens.tolist()
    q_all = dist.to(probs.dtype)
    for i, x in enumerate(tokens):
        p, q = probs[i], q_all[i]
        qx = float(q[x])
        if qx <= 0 or _uniform(generator) * qx < float(p[x]):  # accept with min(1, p(x) / q(x))
            continue
        residual = (p - q).clamp_min(0.0)
        return Verdict(list(range(i)), tokens[:i] + [_sample(residual, p, generator)])
    n = len(tokens)
    return Verdict(list(range(n)), tokens + [_sample(probs[n], probs[n], generator)])


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _sample(residual: torch.Tensor, fallback: torch.Tensor, generator: torch.Generator | None) -> int:
    """Sample from ``residual`` normalised; from ``fallback`` if rounding left it without mass."""
    dist = residual if float(residual.sum()) > 0 else fallback
    return int(torch.multinomial(dist, 1, generator=generator))
