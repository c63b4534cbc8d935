"""Drafts from sibling requests in flight: other samples of the same prompt, decoding at the same time.

Group sampling (RL rollouts: G samples of one prompt) runs the siblings side by side, and their outputs share
much of their text (the same reasoning steps, the same code, the same answer format) without being equal. This
speculator looks up the request's last n-gram in every live sibling's output so far and drafts what followed it
there, preferring the longest match and, among equally long ones, the continuation most siblings share; for a
sampled request, the continuation is guessed token by token with the sampler's own noise, each token weighed by how
many siblings wrote it (``DecodeContext.guess``). Siblings are the live requests of the same namespace with the
same prompt (token for token). Finished requests' outputs are the suffix speculator's job: its index holds the
namespace's earlier outputs, so a prompt's rollouts of earlier policy steps draft for its later ones. Confidence:
one acceptance estimate per match length, a prior shrunk toward what this speculator's verified drafts showed
(:mod:`.confidence`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .base import DecodeContext
from .ngram import MatchSpeculator, match_lengths


@dataclass
class SiblingConfig:
    max_ngram: int = 8
    """Longest n-gram of the request's context looked up in the siblings' outputs."""
    min_ngram: int = 2
    """Shortest match that drafts (one shared token is too common a coincidence)."""
    prior: tuple[float, ...] = (0.3, 0.45, 0.55, 0.65, 0.7, 0.75, 0.8)
    """Prior conditional acceptance per draft token for match length 2, 3, ... (the last covers longer ones)."""
    prior_strength: float = 20.0
    """How many observed draft tokens the prior is worth."""
    max_siblings: int = 64
    """Live siblings searched per proposal (the most recently begun)."""


@dataclass
class SiblingSpeculator(MatchSpeculator):
    """Drafts from the live outputs of the other requests of the same prompt; see the module docstring."""

    config: SiblingConfig = field(default_factory=SiblingConfig)
    name: str = "siblings"

    def __post_init__(self) -> None:
        self._check_config()
        self._groups: dict[tuple[str, int], dict[str, DecodeContext]] = {}
        self._keys: dict[str, tuple[str, int]] = {}  # request id -> its group

    # -- protocol ------------------------------------------------------------------------------

    def begin(self, ctx: DecodeContext) -> None:
        key = (ctx.namespace, hash(tuple(ctx.tokens[: ctx.prompt_len])))
        self._keys[ctx.request_id] = key
        self._groups.setdefault(key, {})[ctx.request_id] = ctx

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        key = self._keys.pop(ctx.request_id, None)
        group = self._groups.get(key) if key is not None else None
        if group is not None:
            group.pop(ctx.request_id, None)
            if not group:
                del self._groups[key]

    def stats(self) -> dict:
        return {"groups": len(self._groups), "live": sum(len(g) for g in self._groups.values())}

    # -- mechanics -----------------------------------------------------------------------------

    def find(self, ctx: DecodeContext, budget: int) -> tuple[int, np.ndarray] | None:
        """``(n, continuation)``: the longest match of the context's last n-gram in a sibling's output, and what
        followed it there (the continuation most of the equally long matches share), or None."""
        key = self._keys.get(ctx.request_id)
        group = self._groups.get(key) if key is not None else None
        if not group or len(group) < 2:
            return None
        c = self.config
        own = ctx.array().tokens[: len(ctx.tokens)]
        suffix = own[max(0, len(own) - c.max_ngram):]
        best, conts = 0, []
        for rid, sib in list(group.items())[-c.max_siblings:]:
            if rid == ctx.request_id:
                continue
            buf = sib.array().tokens[sib.prompt_len: len(sib.tokens)]
            if len(buf) < 2:
                continue
            ends = np.flatnonzero(buf[:-1] == suffix[-1])
            if not len(ends):
                continue
            m = match_lengths(buf, ends, suffix, c.max_ngram)
            top = int(m.max())
            if top < c.min_ngram or top < best:
                continue
            e = int(ends[np.flatnonzero(m == top)[-1]])
            cont = buf[e + 1: e + 1 + budget].astype(np.int64)
            if top > best:
                best, conts = top, []
            conts.append(cont)
        if not conts:
            return None
        if ctx.seed is not None:  # a sampled request: guess each token with the sampler's noise
            return best, _coupled(ctx, conts, budget)
        first = Counter(int(x[0]) for x in conts).most_common(1)[0][0]
        cont = max((x for x in conts if int(x[0]) == first), key=len)
        return best, cont

    def confidence(self, n: int) -> float:
        """Conditional acceptance estimate for a draft token found with an n-token match."""
        prior = self.config.prior
        return float(self._counts.rate(prior[min(n - self.config.min_ngram, len(prior) - 1)], n))


def _coupled(ctx: DecodeContext, conts: list[np.ndarray], budget: int) -> np.ndarray:
    """A continuation chosen token by token among what the siblings wrote after the same context: at each depth
    the tokens the still-agreeing siblings wrote next, weighed by how many wrote each (the siblings sample the
    target's distribution, so their counts estimate it) and picked with the seeded sampler's noise
    (``DecodeContext.guess``)."""
    out: list[int] = []
    live = conts
    for d in range(budget):
        live = [c for c in live if len(c) > d]
        if not live:
            break
        tokens, counts = np.unique(np.array([int(c[d]) for c in live], dtype=np.int64), return_counts=True)
        tok = int(tokens[ctx.guess(tokens, np.log(counts), d + 1)])
        out.append(tok)
        live = [c for c in live if int(c[d]) == tok]
    return np.asarray(out, dtype=np.int64)
