"""Prompt lookup: draft by copying what followed the last occurrence of the context's final n-gram.

The request's own tokens (prompt + output so far) are the only source; a worked example is on
:meth:`PromptLookupSpeculator.lookup`. Confidence (``Draft.probs``): one conditional acceptance probability per match
length, the prior (:attr:`PromptLookupConfig.prior`) shrunk toward what this speculator's own verified drafts showed
(:mod:`.confidence`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import DecodeContext, Draft, SpeculatorBase, StepOutcome
from .confidence import AcceptanceCounts

_GATHER_MAX = 256  # candidates above this are narrowed token by token before one vectorised gather


def match_lengths(buf: np.ndarray, ends: np.ndarray, suffix: np.ndarray, max_len: int,
                  padded: bool = False) -> np.ndarray:
    """For every candidate end position ``e``, how many tokens ``buf[.. e]`` shares with the end of ``suffix``.

    ``m[i]`` is the largest ``l <= min(max_len, len(suffix))`` with
    ``buf[ends[i] - j] == suffix[-1 - j]`` for all ``j < l``. Negative entries
    of ``buf`` (separators) never match. ``padded``: ``buf`` ends with at
    least ``max_len`` entries of -1 (as :class:`ContextBuffer` and the suffix
    index guarantee), so reads before ``buf[0]`` wrap onto them and need no
    bounds check; otherwise the comparison never reads before ``buf[0]``.
    """
    ends = np.asarray(ends, dtype=np.int64)
    depth = min(max_len, len(suffix))
    rev = np.asarray(suffix)[::-1][:depth]  # rev[j] = suffix[-1 - j]
    m = np.zeros(len(ends), dtype=np.int64)
    alive = np.arange(len(ends))
    j = 0
    # Narrow a large candidate set token by token; most candidates drop out within a few tokens.
    while j < depth and len(alive) > _GATHER_MAX:
        p = ends[alive] - j
        if padded:
            ok = buf[p] == rev[j]
        else:
            ok = p >= 0
            ok[ok] = buf[p[ok]] == rev[j]
        alive = alive[ok]
        m[alive] += 1
        j += 1
    if j < depth and len(alive):
        idx = ends[alive, None] - np.arange(j, depth)  # [alive, depth - j]
        if padded:
            eq = buf[idx] == rev[j:]
        else:
            eq = (idx >= 0) & (buf[np.maximum(idx, 0)] == rev[j:])
        m[alive] += np.cumprod(eq, axis=1).sum(axis=1)
    return m


@dataclass
class PromptLookupConfig:
    max_ngram: int = 3
    """Longest context n-gram looked up; longer matches are preferred."""
    min_ngram: int = 1
    """Shortest n-gram looked up before giving up."""
    prior: tuple[float, ...] = (0.28, 0.5, 0.72)
    """Prior conditional acceptance per token for match length 1, 2, 3, ... (the last entry covers longer
    matches). Measured by replaying ShareGPT first-turn answers (SmolLM2 tokenizer) through this speculator."""
    prior_strength: float = 20.0
    """How many observed draft tokens the prior is worth."""


class MatchSpeculator(SpeculatorBase):
    """A speculator that drafts, as a chain, what followed a match of the context's last tokens somewhere
    (``find``), its confidence one acceptance estimate per match length: ``config.prior`` shrunk toward what its
    verified drafts showed. ``config`` has ``min_ngram``, ``max_ngram``, ``prior`` and ``prior_strength``."""

    def _check_config(self) -> None:
        c = self.config
        if not 1 <= c.min_ngram <= c.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {c.min_ngram}, {c.max_ngram}")
        if not c.prior or not all(0.0 < p < 1.0 for p in c.prior):
            raise ValueError("prior must be a non-empty sequence of probabilities in (0, 1)")
        self._counts = AcceptanceCounts(c.max_ngram + 1, c.prior_strength)  # per match length

    def find(self, ctx: DecodeContext, budget: int) -> tuple[int, np.ndarray] | None:
        """``(match length, continuation)``, or None."""
        raise NotImplementedError

    def confidence(self, n: int) -> float:
        raise NotImplementedError

    # -- protocol ------------------------------------------------------------------------------

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        if budget <= 0:
            return Draft.empty(self.name)
        found = self.find(ctx, budget)
        if found is None:
            return Draft.empty(self.name)
        n, cont = found
        return Draft.chain(cont, np.full(len(cont), self.confidence(n)), self.name, n)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        d = outcome.draft
        if d.source == self.name and len(d) and self.config.min_ngram <= d.match_len <= self.config.max_ngram:
            a = outcome.num_accepted
            self._counts.add(d.match_len, a, min(a + 1, len(d)))


@dataclass
class PromptLookupSpeculator(MatchSpeculator):
    """Prompt-lookup (n-gram) speculator over the request's own context; see the module docstring."""

    config: PromptLookupConfig = field(default_factory=PromptLookupConfig)
    name: str = "ngram"

    def __post_init__(self) -> None:
        self._check_config()

    def find(self, ctx: DecodeContext, budget: int) -> tuple[int, np.ndarray] | None:
        return self.lookup(ctx.array().tokens, budget)

    # -- mechanics -----------------------------------------------------------------------------

    def lookup(self, tokens: np.ndarray, budget: int) -> tuple[int, np.ndarray] | None:
        """``(n, continuation)`` for the longest matching n-gram's most recent earlier occurrence, or None.

        For ``n = max_ngram .. min_ngram`` it looks for the most recent earlier position
        where the last ``n`` tokens occurred, and drafts the tokens that followed
        there. Worked example with ``max_ngram=3``::

            context  [1, 2, 3, 4, 2, 3]      last 3-gram [4, 2, 3]: no earlier occurrence
                                             last 2-gram [2, 3] occurred at positions 1..2
            draft    [4, 2, 3]               the tokens after it (up to the budget, and only
                                             tokens already in the context)
        """
        L = len(tokens)
        c = self.config
        if L < 2:
            return None
        ends = np.flatnonzero(tokens[: L - 1] == tokens[L - 1])
        if not len(ends):
            return None
        # The most recent candidates suffice: we only need the latest one of each match length.
        m = match_lengths(tokens, ends, tokens[max(0, L - c.max_ngram):], c.max_ngram)  # (a view: no padding)
        for n in range(min(c.max_ngram, int(m.max())), c.min_ngram - 1, -1):
            hits = np.flatnonzero(m >= n)
            if len(hits):
                e = int(ends[hits[-1]])
                return n, tokens[e + 1 : min(e + 1 + budget, L)].astype(np.int64)
        return None

    def confidence(self, n: int) -> float:
        """Conditional acceptance estimate for a draft token found with an n-gram match."""
        prior = self.config.prior
        return float(self._counts.rate(prior[min(n, len(prior)) - 1], n))
