"""The speculator protocol and the draft value every speculator returns.

A draft is a token tree rooted at the *pending* token (emitted, not yet consumed by the target) whose nodes carry the
speculator's conditional confidence; its score, the expected number of accepted tokens, is what controllers route
on. :class:`Draft` draws an example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Draft:
    """Token ids proposed ahead of the target, as a tree, with confidences.

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

    @property
    def origin(self) -> str:
        """Whose draft this is, for statistics: its source ("unnamed" without one), "none" when it is empty."""
        return (self.source or "unnamed") if len(self) else "none"

    @cached_property
    def is_chain(self) -> bool:
        return bool(np.array_equal(self.parents, np.arange(-1, len(self) - 1)))

    @cached_property
    def depths(self) -> np.ndarray:
        """Depth of every node: 1 for children of the pending token."""
        if self.is_chain:
            return np.arange(1, len(self) + 1)
        d = [0] * len(self)
        for i, p in enumerate(self.parents.tolist()):
            d[i] = 1 if p < 0 else d[p] + 1
        return np.asarray(d, dtype=np.int64)

    @cached_property
    def path_probs(self) -> np.ndarray:
        """Probability that every node on the path to node i is accepted (the product of ``probs`` down to it)."""
        return np.asarray(path_probs(self.parents.tolist(), self.probs.tolist()), dtype=np.float64)

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

    def follow(self, want: Callable[[int, int], int | None]) -> list[int]:
        """The path of nodes, root first, that goes down to the child holding ``want(node, depth)`` at each
        step (``node`` = -1 and ``depth`` = 0 at the pending token) while there is one; ``want`` returning None
        stops. The verifier follows the target's choices this way, the replay simulator a recorded output."""
        kids = self.children()
        tokens = self.tokens.tolist()
        path: list[int] = []
        node = -1
        while True:
            token = want(node, len(path))
            nxt = None if token is None else next((c for c in kids.get(node, ()) if tokens[c] == token), None)
            if nxt is None:
                return path
            path.append(nxt)
            node = nxt

    def label(self, truth: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`label_nodes` of this draft as arrays: ``(index, accepted, depth)``."""
        idx, hit, depth = label_nodes(self.tokens.tolist(), self.parents.tolist(), truth)
        return np.asarray(idx, dtype=np.int64), np.asarray(hit, dtype=bool), np.asarray(depth, dtype=np.int64)

    def path_to(self, i: int) -> list[int]:
        """Node indices from the root down to node ``i`` inclusive."""
        path = []
        while i >= 0:
            path.append(i)
            i = int(self.parents[i])
        return path[::-1]


def path_probs(parents: Sequence[int], probs: Sequence[float]) -> list[float]:
    """Per node, the product of ``probs`` down the path from the root to it (parents come before children)."""
    out = [0.0] * len(probs)
    for i, p in enumerate(parents):
        out[i] = probs[i] * (out[p] if p >= 0 else 1.0)
    return out


def token_array(tokens: Iterable[int]) -> np.ndarray:
    """``tokens`` as a flat int64 array, checked to lie in [0, 2**31) (``ValueError`` otherwise)."""
    arr = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("token ids must be a flat sequence")
    if len(arr) and (arr.min() < 0 or arr.max() >= 2**31):
        raise ValueError(f"token ids must lie in [0, 2**31); got {int(arr.min())}..{int(arr.max())}")
    return arr


def label_nodes(tokens: Sequence[int], parents: Sequence[int],
                truth: Sequence[int]) -> tuple[list[int], list[bool], list[int]]:
    """The draft nodes that the tokens which followed (``truth``) decide, whether each was right, and its depth.

    A node is decided when its parent lies on the path that equals ``truth`` (the root's children always) and
    ``truth`` reaches its depth; it is right when its token is the one ``truth`` holds there. Nodes below a
    wrong one, or deeper than ``truth``, are left out: nothing says whether they would have been accepted.

    Worked example: tokens ``[7, 8, 9]``, parents ``[-1, 0, -1]``, truth ``[7, 5]``: node 0 (7) is right,
    node 1 (8, child of 0) is wrong, node 2 (9) is wrong -> ``([0, 1, 2], [True, False, False], [1, 2, 1])``.
    """
    truth = [int(t) for t in truth]
    depth_of = {-1: 0}  # nodes on the true path -> their depth
    idx: list[int] = []
    hit: list[bool] = []
    dep: list[int] = []
    for i, (tok, par) in enumerate(zip(tokens, parents)):
        d = depth_of.get(par)
        if d is None or d >= len(truth):
            continue
        right = tok == truth[d]
        idx.append(i)
        hit.append(right)
        dep.append(d + 1)
        if right:
            depth_of[i] = d + 1
    return idx, hit, dep


PAD = 64  # buffers keep at least this many -1 entries past their end (see ContextBuffer)


class ContextBuffer:
    """A request's tokens as a growable int32 array, synchronised with ``DecodeContext.tokens``.

    Syncing appends only the new tail, so the per-step cost is O(new tokens).
    Every entry past ``n`` is -1 and at least :data:`PAD` of them exist, so a
    read up to ``PAD`` past the end, or up to ``PAD`` before the start (numpy
    wraps negative indices to the end), yields -1 ("no token") without bounds
    checks.
    """

    __slots__ = ("buf", "n")

    def __init__(self, capacity: int = 256):
        self.buf = np.full(max(16, capacity) + PAD, -1, dtype=np.int32)
        self.n = 0

    @property
    def tokens(self) -> np.ndarray:
        return self.buf[: self.n]

    def sync(self, tokens: list[int]) -> None:
        """Make the buffer equal ``tokens``: appends the new tail when the known part is unchanged (checked at
        its first, middle and last token), else rebuilds."""
        n = self.n
        if len(tokens) < n or (n and (tokens[n - 1] != self.buf[n - 1] or tokens[0] != self.buf[0]
                                      or tokens[n // 2] != self.buf[n // 2])):
            self.buf[:n] = -1
            n = self.n = 0
        if len(tokens) > n:
            self.extend(tokens[n:])

    def extend(self, tokens) -> None:
        new = token_array(tokens)
        need = self.n + len(new)
        if need + PAD > len(self.buf):
            grown = np.full(max(need + PAD, 2 * len(self.buf)), -1, dtype=np.int32)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = new
        self.n = need


@dataclass
class DecodeContext:
    """What a speculator may look at when it proposes: the request and everything committed so far."""

    request_id: str
    namespace: str
    tokens: list[int]  # prompt + generated tokens, the last one is the pending token
    prompt_len: int
    hidden: object | None = None  # target's last hidden state that produced the pending token ([d] tensor), if the backend exposes it
    seed: int | None = None  # the seeded sampler's seed (sampled requests): drafters guess with its noise (``guess``)
    temperature: float = 0.0  # the request's sampling temperature; 0 decodes greedily
    vocab: int = 0  # the target's vocabulary size (the width of its logits), which the noise is drawn over
    _array: ContextBuffer | None = field(default=None, init=False, repr=False, compare=False)

    def array(self) -> ContextBuffer:
        """``tokens`` as a padded int32 array, brought up to date (only the new tail is copied): one per request,
        shared by the speculators that search the context."""
        if self._array is None:
            self._array = ContextBuffer(len(self.tokens) + 256)
        self._array.sync(self.tokens)
        return self._array

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def coupled(self) -> bool:
        """Whether drafts for this request guess with the seeded sampler's noise: a sampled request whose seed and
        vocabulary are known (``guess``, ``noise``)."""
        return self.seed is not None and self.vocab > 0 and self.temperature > 0

    def guess(self, tokens: np.ndarray, logq: np.ndarray, depth: int = 1) -> int:
        """Which of the candidate ``tokens`` to draft at ``depth`` (1: the token after the pending one), given a
        drafter's log-probabilities ``logq`` of them at the request's temperature (up to a constant): for a
        sampled request the argmax of ``logq`` plus the Gumbel noise the seeded sampler will use at that position,
        which is accepted far more often than a fixed guess where ``q`` is close to the target (verify/noise.py);
        for a greedy request the argmax of ``logq``. Returns an index into ``tokens``."""
        if not self.coupled:
            return int(np.argmax(logq))
        from ..verify.noise import coupled_choice

        return coupled_choice(np.asarray(tokens), logq, self.seed, len(self.tokens) + depth - 1, self.vocab)

    def noise(self, tokens: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """[n] the seeded sampler's Gumbel noise of each token at its depth (1: the token after the pending one);
        a coupled request only (``coupled``)."""
        from ..verify.noise import gumbel_keys, noise_key

        levels, which = np.unique(depths, return_inverse=True)
        keys = [noise_key(self.seed, len(self.tokens) + int(d) - 1) for d in levels]
        return gumbel_keys(keys, which.astype(np.int64), np.asarray(tokens, dtype=np.int64), self.vocab)


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
