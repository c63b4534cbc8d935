"""Drafts from sibling requests: other samples of the same prompt, decoding now or finished earlier.

Group sampling (RL rollouts: G samples of one prompt) runs the siblings side by side, and their outputs share
much of their text (the same reasoning steps, the same code, the same answer format) without being equal; the same
prompt comes back at the next policy step (an epoch over the data), where the earlier step's samples are the best
guide to the new ones. This speculator looks up the request's last n-gram in the outputs of the prompt's live
siblings and of its latest finished ones (``SiblingConfig.history`` per prompt, for the ``max_prompts`` prompts
used most recently: a bounded per-prompt scope, the oldest outputs evicted first) and drafts what followed it
there, preferring the longest match and, among equally long ones, the continuation most matches share; for a
sampled request, the continuation is guessed token by token with the sampler's own noise, each token weighed by how
many matches wrote it (``DecodeContext.guess``). Siblings are the requests of the same namespace with the same
prompt (token for token); a cancelled request's output is not kept. Confidence: one acceptance estimate per match
length, a prior shrunk toward what this speculator's verified drafts showed (:mod:`.confidence`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
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
    history: int = 16
    """Finished outputs kept per prompt (a group of G samples of the last step or two)."""
    max_prompts: int = 512
    """Prompts whose finished outputs are kept; the least recently used go first."""


@dataclass
class SiblingSpeculator(MatchSpeculator):
    """Drafts from the outputs of the other requests of the same prompt, live and recent; see the module
    docstring."""

    config: SiblingConfig = field(default_factory=SiblingConfig)
    name: str = "siblings"

    def __post_init__(self) -> None:
        self._check_config()
        if self.config.history < 0 or self.config.max_prompts < 1:
            raise ValueError("history must be >= 0 and max_prompts >= 1")
        self._groups: dict[tuple[str, int], dict[str, DecodeContext]] = {}
        self._keys: dict[str, tuple[str, int]] = {}  # request id -> its group
        self._history: OrderedDict[tuple[str, int], deque[np.ndarray]] = OrderedDict()  # group -> finished outputs

    # -- protocol ------------------------------------------------------------------------------

    def begin(self, ctx: DecodeContext) -> None:
        key = (ctx.namespace, hash(tuple(ctx.tokens[: ctx.prompt_len])))
        self._keys[ctx.request_id] = key
        self._groups.setdefault(key, {})[ctx.request_id] = ctx
        if key in self._history:
            self._history.move_to_end(key)

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        key = self._keys.pop(ctx.request_id, None)
        group = self._groups.get(key) if key is not None else None
        if group is not None:
            group.pop(ctx.request_id, None)
            if not group:
                del self._groups[key]
        c = self.config
        if key is None or not finished or not c.history:
            return
        out = ctx.array().tokens[ctx.prompt_len: len(ctx.tokens)]
        if len(out) < 2:
            return
        kept = self._history.get(key)
        if kept is None:
            kept = self._history[key] = deque(maxlen=c.history)
            while len(self._history) > c.max_prompts:
                self._history.popitem(last=False)
        else:
            self._history.move_to_end(key)
        kept.append(out.copy())

    def stats(self) -> dict:
        return {"groups": len(self._groups), "live": sum(len(g) for g in self._groups.values()),
                "history_prompts": len(self._history), "history_outputs": sum(len(h) for h in self._history.values())}

    # -- mechanics -----------------------------------------------------------------------------

    def find(self, ctx: DecodeContext, budget: int) -> tuple[int, np.ndarray] | None:
        """``(n, continuation)``: the longest match of the context's last n-gram in a sibling's output, and what
        followed it there (the continuation most of the equally long matches share, or the coupled guess), or
        None."""
        key = self._keys.get(ctx.request_id)
        if key is None:
            return None
        c = self.config
        group = self._groups.get(key, {})
        outs = [sib.array().tokens[sib.prompt_len: len(sib.tokens)]
                for rid, sib in list(group.items())[-c.max_siblings:] if rid != ctx.request_id]
        outs = [o for o in outs if len(o) >= 2] + list(self._history.get(key, ()))
        if not outs:
            return None
        own = ctx.array().tokens[: len(ctx.tokens)]
        suffix = own[max(0, len(own) - c.max_ngram):]
        # every output followed by a -1 that no match or continuation crosses
        buf = np.concatenate([x for o in outs for x in (o, _SEP)])
        ends = np.flatnonzero(buf[:-1] == suffix[-1])
        ends = ends[buf[ends + 1] >= 0]  # a continuation follows
        if not len(ends):
            return None
        m = match_lengths(buf, ends, suffix, c.max_ngram)
        best = int(m.max())
        if best < c.min_ngram:
            return None
        conts = []
        for e in ends[m == best].tolist():
            cont = buf[e + 1: e + 1 + budget]
            stop = np.flatnonzero(cont < 0)
            conts.append((cont[: stop[0]] if len(stop) else cont).astype(np.int64))
        if ctx.coupled:  # a sampled request: guess each token with the sampler's noise
            return best, _coupled(ctx, conts, budget)
        first = Counter(int(x[0]) for x in conts).most_common(1)[0][0]
        cont = max((x for x in conts if int(x[0]) == first), key=len)
        return best, cont

    def confidence(self, n: int) -> float:
        """Conditional acceptance estimate for a draft token found with an n-token match."""
        prior = self.config.prior
        return float(self._counts.rate(prior[min(n - self.config.min_ngram, len(prior) - 1)], n))


_SEP = np.full(1, -1, dtype=np.int32)


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
