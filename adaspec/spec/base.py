"""The speculator protocol and the draft value every speculator returns.

A draft is a token tree rooted at the *pending* token: the last token the engine
has emitted but the target has not yet consumed. ``parents[i] == -1`` means node
``i`` hangs directly off the pending token; a linear draft has
``parents == [-1, 0, 1, ..., n-2]``.

``probs[i]`` is the speculator's own confidence that node ``i`` is what the
target produces *given that its parent was accepted* (a conditional
probability). The probability of reaching node ``i`` is the product along its
path, and the expected number of accepted tokens is the sum of those path
products (SuffixDecoding's score; REFERENCES "Choosing the lookahead").

Worked example: tokens ``[7, 8, 9]``, parents ``[-1, 0, -1]``, probs
``[0.9, 0.5, 0.05]`` is the tree::

    pending ─┬─ 7 (0.9) ── 8 (0.5)
             └─ 9 (0.05)

path probabilities ``[0.9, 0.45, 0.05]``, score ``1.4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Draft:
    """Token ids proposed ahead of the target, as a tree, with confidences."""

    tokens: np.ndarray  # [n] int64
    parents: np.ndarray  # [n] int64, -1 = child of the pending token, else an earlier index
    probs: np.ndarray  # [n] float64, conditional confidence of each node
    source: str = ""
    match_len: int = 0  # length of the context suffix the draft was conditioned on (suffix speculators)
    dist: object | None = None  # [n, vocab] torch probabilities the tokens were sampled from (chain drafts of a draft model), else None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.parents) != n or len(self.probs) != n:
            raise ValueError("Draft tokens, parents and probs must have equal length")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"Draft parent {p} of node {i} must be -1 or an earlier node")

    @classmethod
    def empty(cls, source: str = "") -> "Draft":
        """The "no speculation" draft: the step verifies only the pending token."""
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.copy(), np.zeros(0, dtype=np.float64), source)

    @classmethod
    def chain(cls, tokens: Sequence[int], probs: Sequence[float] | None = None, source: str = "",
              match_len: int = 0) -> "Draft":
        """A linear draft; ``probs`` defaults to 1.0 for every token (no confidence known)."""
        n = len(tokens)
        p = np.ones(n) if probs is None else np.asarray(probs, dtype=np.float64)
        return cls(np.asarray(tokens, dtype=np.int64).reshape(n), np.arange(-1, n - 1, dtype=np.int64),
                   p.reshape(n), source, match_len)

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def is_chain(self) -> bool:
        return bool(np.array_equal(self.parents, np.arange(-1, len(self) - 1)))

    @cached_property
    def depths(self) -> np.ndarray:
        """Depth of every node: 1 for children of the pending token."""
        d = np.zeros(len(self), dtype=np.int64)
        for i, p in enumerate(self.parents):
            d[i] = 1 if p < 0 else d[p] + 1
        return d

    @cached_property
    def path_probs(self) -> np.ndarray:
        """Probability that every node on the path to node i is accepted."""
        out = np.zeros(len(self))
        for i, p in enumerate(self.parents):
            out[i] = self.probs[i] * (1.0 if p < 0 else out[p])
        return out

    @property
    def score(self) -> float:
        """Expected number of accepted draft tokens under the draft's own confidences."""
        return float(self.path_probs.sum())

    def prefix(self, n: int) -> "Draft":
        """The first ``n`` nodes (nodes are topologically ordered, so any prefix is a tree)."""
        n = max(0, min(n, len(self)))
        dist = None if self.dist is None else self.dist[:n]
        return Draft(self.tokens[:n], self.parents[:n], self.probs[:n], self.source, self.match_len, dist)

    def with_probs(self, probs: np.ndarray) -> "Draft":
        return Draft(self.tokens, self.parents, np.asarray(probs, dtype=np.float64), self.source, self.match_len, self.dist)

    def children(self) -> dict[int, list[int]]:
        """Node index -> its children's indices in draft order; key -1 is the pending token."""
        kids: dict[int, list[int]] = {-1: []}
        for i, p in enumerate(self.parents):
            kids.setdefault(int(p), []).append(i)
        return kids

    def path_to(self, i: int) -> list[int]:
        """Node indices from the root down to node ``i`` inclusive."""
        path = []
        while i >= 0:
            path.append(i)
            i = int(self.parents[i])
        return path[::-1]


@dataclass
class DecodeContext:
    """What a speculator may look at when it proposes: the request and everything committed so far."""

    request_id: str
    namespace: str
    tokens: list[int]  # prompt + generated tokens, the last one is the pending token
    prompt_len: int
    hidden: object | None = None  # target's last hidden state that produced the pending token ([d] tensor), if the backend exposes it

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclass
class StepOutcome:
    """What one verification step did with a draft."""

    draft: Draft
    accepted_nodes: list[int]  # draft node indices on the accepted path, root first
    emitted: list[int]  # tokens appended to the output this step: accepted draft tokens, then the bonus/recovered token
    hidden: object | None = None  # target hidden states [len(accepted_nodes) + 1, d] for the pending token and each accepted node

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)


@runtime_checkable
class Speculator(Protocol):
    """Proposes drafts and learns from what the target did with them.

    Speculators are shared across concurrent requests, so any per-request state
    is keyed by ``ctx.request_id``.
    """

    name: str

    def begin(self, ctx: DecodeContext) -> None:
        """A request starts; ``ctx.tokens`` holds its prompt and the first generated token."""

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        """At most ``budget`` nodes; ``Draft.empty()`` when there is nothing worth proposing."""
        ...

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        """After each verification step (for every speculator, whichever draft was chosen)."""

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        """The request is over; ``ctx.tokens`` holds the final output. ``finished`` is False if it was cancelled."""

    def stats(self) -> dict:
        """What the speculator has learned, for reports and metrics; ``{"namespaces": {ns: {"tokens": n}}}``
        gives the size of each namespace's learned state. ``{}`` when it learns nothing."""
        ...

    def pause(self) -> None:
        """Hold any background work (a learner thread) until ``resume``; side-by-side timings use it."""

    def resume(self) -> None:
        """Let background work run again."""

    def close(self) -> None:
        """Release threads and resources (idempotent); the engine's ``close`` calls it."""


class SpeculatorBase:
    """The :class:`Speculator` protocol with no-op hooks: subclasses override what they use."""

    name: str = "base"

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name

    def begin(self, ctx: DecodeContext) -> None:
        pass

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        return Draft.empty(self.name)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        pass

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        pass
