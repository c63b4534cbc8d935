"""The adaptive model-free speculator: suffix matching over past outputs and the request itself.

Evidence
    *Global*: every finished output of the namespace, oldest first, in one flat
    token array (outputs separated by ``-1``). An n-gram index maps the hash of
    each n-gram (``n`` in :attr:`SuffixConfig.orders`) to the positions where it
    ends. *Local*: the current request's prompt and output so far, scanned
    directly (one vectorised compare per step).

    For the context's last tokens we collect *occurrences*: earlier positions
    whose preceding tokens match the context's end, each with its match length
    ``m`` (how many tokens agree, up to :attr:`SuffixConfig.max_depth`), a
    weight (global: halves every :attr:`SuffixConfig.half_life_tokens` tokens of
    age; local: :attr:`SuffixConfig.local_weight`) and its *continuation*, the
    tokens that followed it. Only the most recent :attr:`SuffixConfig.max_rows`
    occurrences at each match-length level are kept per source, which bounds the
    work per step and is itself a recency window.

Scoring (``scoring="mixture"``, the default)
    Occurrences are sorted by continuation, so every draft-tree node is a
    contiguous range of them (their continuations agree on the path). At a node,
    level ``j`` (occurrences with ``m >= levels[j]``) has weighted count
    ``C_j`` and per-child counts ``c_j(x)``. The next-token probability
    interpolates the levels from short to long matches, each smoothed towards
    the shorter one (hierarchical Dirichlet smoothing, as in PPM/interpolated
    n-gram models)::

        P_0(x) = c_0(x) / (C_0 + beta_0)                       # beta_0 / (C_0 + beta_0): an unseen token
        P_j(x) = (c_j(x) + beta_j * P_{j-1}(x)) / (C_j + beta_j)   (levels with C_j = 0 are skipped)

    So a long match with few occurrences and a short match with many both count,
    each by its evidence, and local and global occurrences pool into the same
    counts. ``Draft.probs`` is ``P_top(child)``: a conditional probability that
    drops with thin evidence and disagreement.

    Worked example: occurrences with continuations ``[5, 6]`` (m=4), ``[5, 7]``
    (m=1), ``[8]`` (m=1), unit weights, levels ``(1, 4)``, beta 1. Root: level 0
    counts 5:2, 8:1 (C_0=3); level 1 counts 5:1 (C_1=1). ``P(5) = (1 + 1 * 2/4)
    / 2 = 0.75``, ``P(8) = (0 + 1 * 1/4) / 2 = 0.125``.

Scoring (``scoring="suffixdecoding"``)
    SuffixDecoding's rule as a baseline: for every match length ``L`` and each
    source separately, occurrences with ``m >= L``; ``p = child.count /
    node.count`` (occurrences that end at the node count in ``node.count``);
    at most ``factor * L + offset`` tokens and tree depth ``max_depth - L``;
    path probability >= ``min_prob``; the candidate with the highest score
    (sum of path probabilities) wins.

Drafts are trees built best first by path probability up to the budget (or a
chain, ``tree=False``); nodes come out in that order, so ``Draft.prefix(k)`` is
the best ``k``-node subtree.

Learning: ``observe`` keeps the local view current (a long answer matches its
own earlier text); ``end`` appends the output to the namespace's global index.
Cancelled requests are learned from too (``learn_cancelled``): their tokens
are real target output. Memory is bounded per namespace (FIFO eviction of
whole outputs), in total, and in the number of namespaces (least recently used
dropped).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .base import DecodeContext, Draft, StepOutcome
from .ngram import ContextBuffer, match_lengths
from .store import StoreCorruptError, arrays_from_bytes, arrays_to_bytes, load_blob, pack, unpack, write_atomic

STATE_KIND = "adaspec.suffix"
STATE_VERSION = 1


@dataclass
class SuffixConfig:
    """Knobs of :class:`SuffixSpeculator`; defaults tuned by trace replay on ShareGPT (see tests and report)."""

    scoring: str = "mixture"
    """``"mixture"`` (interpolated evidence across match lengths and sources) or ``"suffixdecoding"`` (baseline)."""
    tree: bool = True
    """Propose a tree (best-first by path probability) rather than a chain."""
    max_depth: int = 32
    """Longest context suffix compared (tokens)."""
    orders: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
    """n-gram lengths indexed in the global history; matches longer than the largest are found by extension."""
    levels: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    """Match-length thresholds of the evidence levels of the mixture."""
    max_rows: int = 32
    """Most recent occurrences kept per level and source (mixture)."""
    beta: float = 1.0
    """Smoothing strength of every level towards the shorter one (pseudo-count)."""
    local_weight: float = 1.0
    """Weight of one occurrence in the request's own context relative to a fresh global one."""
    half_life_tokens: float | None = 500_000.0
    """Age (tokens of newer history in the namespace) at which a global occurrence counts half; None: no decay."""
    min_prob: float = 0.1
    """Nodes whose path probability falls below this are not proposed."""
    max_draft_depth: int = 32
    """Deepest draft node."""
    spec_factor: float = 1.0
    """suffixdecoding: at most ``spec_factor * match_len + spec_offset`` tokens."""
    spec_offset: float = 0.0
    """suffixdecoding: see ``spec_factor``."""
    sd_max_rows: int = 1024
    """suffixdecoding: occurrences looked at per source (its suffix tree counts all of them)."""
    max_tokens_per_namespace: int = 1_000_000
    """Global history kept per namespace; the oldest whole outputs are evicted beyond it."""
    max_total_tokens: int = 4_000_000
    """Global history kept over all namespaces; the oldest outputs (any namespace) are evicted beyond it."""
    max_namespaces: int = 256
    """Namespaces kept; the least recently used one is dropped beyond it."""
    learn_cancelled: bool = True
    """Add the output of cancelled requests to the global index (it is real target output)."""
    learn_prompts: bool = False
    """Also add prompts to the global index (helps workloads that repeat prompt text, e.g. agent loops)."""
    min_learn_tokens: int = 2
    """Outputs shorter than this are not indexed."""
    max_requests: int = 4096
    """Live request views kept; the least recently used one is dropped beyond it."""

    def __post_init__(self) -> None:
        if self.scoring not in ("mixture", "suffixdecoding"):
            raise ValueError(f"scoring must be 'mixture' or 'suffixdecoding', not {self.scoring!r}")
        if not self.orders or sorted(set(self.orders)) != list(self.orders) or self.orders[0] < 1:
            raise ValueError("orders must be increasing positive n-gram lengths")
        if not self.levels or sorted(set(self.levels)) != list(self.levels) or self.levels[0] != 1:
            raise ValueError("levels must be increasing match lengths starting at 1")
        if self.max_depth < self.orders[-1]:
            raise ValueError("max_depth must be at least the largest order")
        for name in ("max_rows", "max_tokens_per_namespace", "max_total_tokens", "max_namespaces", "max_requests",
                     "max_draft_depth", "sd_max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.beta <= 0 or self.local_weight < 0 or not 0 <= self.min_prob < 1:
            raise ValueError("need beta > 0, local_weight >= 0 and 0 <= min_prob < 1")
        if self.half_life_tokens is not None and self.half_life_tokens <= 0:
            raise ValueError("half_life_tokens must be positive or None")


# -- hashing of n-grams ------------------------------------------------------------------------

_MASK = (1 << 64) - 1
_BASE = 0x9E3779B97F4A7C15  # odd 64-bit multiplier of the polynomial hash
_SALT = 0xD6E8FEB86659FD93  # separates the orders: the key of an n-gram depends on n


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def ngram_keys(seg: np.ndarray, orders: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keys of every n-gram (n in ``orders``) of ``seg`` that contains no separator (``-1``).

    ``seg`` must start right after a separator (or at the start of history).
    Returns ``(keys, ends)`` ([E] int64 each): the hash of the n-gram ending at
    ``seg[ends[i]]``; entries are grouped by order, ends increasing within an order.
    The key of ``t[p-n+1..p]`` is ``(sum_i (t[p-i]+1) * BASE**i mod 2**64) ^ (n * SALT)``: a
    polynomial hash (lookups verify matches against the tokens, so a rare collision costs nothing).
    """
    n = len(seg)
    t = seg.astype(np.int64).astype(np.uint64) + np.uint64(1)  # separators become 0 (never used: masked)
    idx = np.arange(n)
    last_sep = np.maximum.accumulate(np.where(seg < 0, idx, -1)) if n else idx
    run = idx - last_sep  # tokens since the last separator, this one included (0 on separators)
    h = np.zeros(n, dtype=np.uint64)
    power = 1
    keys, ends = [], []
    want = set(orders)
    for i in range(max(orders)):
        if i >= n:
            break
        h[i:] += t[: n - i] * np.uint64(power)
        power = (power * _BASE) & _MASK
        k = i + 1
        if k in want:
            at = np.flatnonzero(run >= k)
            keys.append((h[at] ^ np.uint64((k * _SALT) & _MASK)).view(np.int64))
            ends.append(at)
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(ends).astype(np.int64)


_POWERS = [pow(_BASE, i, 1 << 64) for i in range(256)]


def query_keys(suffix: Sequence[int], orders: Sequence[int]) -> list[tuple[int, int]]:
    """``(order, key)`` for each order the context suffix is long enough for (same hash as :func:`ngram_keys`)."""
    out = []
    h = 0
    L = len(suffix)
    want = set(orders)
    for i in range(min(max(orders), L)):
        h = (h + (int(suffix[L - 1 - i]) + 1) * _POWERS[i]) & _MASK
        if i + 1 in want:
            out.append((i + 1, _signed(h ^ (((i + 1) * _SALT) & _MASK))))
    return out


# -- the global index of one namespace ---------------------------------------------------------

class SuffixIndex:
    """Finished outputs of one namespace in time order, with an n-gram -> recent occurrences index.

    Layout: ``buf[live:n]`` holds the live outputs, each followed by ``-1``.
    The index is a list of *runs* (``keys`` sorted, ``pos`` = physical end
    position of the n-gram; positions ascending within equal keys), newest
    last, merged like a log-structured merge tree so insertion is amortised
    O(log) vectorised work per token and a lookup costs one ``searchsorted``
    per run. Evicted entries stay in the runs until a compaction (triggered
    when they outnumber the live ones) drops them and shifts positions.

    Memory: 4 bytes per history token + 12 bytes per (token, order) index
    entry, i.e. about ``4 + 12 * len(orders)`` bytes per token (+ dead space
    and stale entries before a compaction, at most about 2x).
    """

    MERGE_RATIO = 4  # a run is merged into the previous one while that is < 4x its size

    def __init__(self, orders: Sequence[int], capacity: int):
        self.orders = tuple(orders)
        self.capacity = int(capacity)  # live-token cap
        self.buf = np.empty(1024, dtype=np.int32)
        self.n = 0  # physical end of used buffer
        self.live = 0  # physical start of the oldest live output
        self.responses: deque[tuple[int, int, int]] = deque()  # (start, length, seq)
        self.live_tokens = 0
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (keys int64, pos int32)
        self.entries = 0  # index entries, stale included
        self.stale = 0

    # -- insertion and eviction

    def entries_for(self, length: int) -> int:
        return sum(max(0, length - k + 1) for k in self.orders)

    def add(self, tokens: np.ndarray, seq: int) -> None:
        """Append one output (int token ids >= 0), evicting the oldest outputs beyond the cap."""
        self.add_many([tokens], [seq])

    def add_many(self, outputs: Sequence[np.ndarray], seqs: Sequence[int]) -> None:
        outputs = [np.asarray(o, dtype=np.int32)[: self.capacity] for o in outputs]
        keep = [(o, s) for o, s in zip(outputs, seqs) if len(o)]
        if not keep:
            return
        total = sum(len(o) for o, _ in keep)
        # Outputs of this batch that would be evicted at once are simply not added.
        while total > self.capacity:
            total -= len(keep.pop(0)[0])
        while self.responses and self.live_tokens + total > self.capacity:
            self.evict_oldest()
        self._reserve(total + len(keep))
        start = self.n
        for o, s in keep:
            self.buf[self.n : self.n + len(o)] = o
            self.buf[self.n + len(o)] = -1
            self.responses.append((self.n, len(o), s))
            self.n += len(o) + 1
        self.live_tokens += total
        keys, ends = ngram_keys(self.buf[start : self.n], self.orders)
        order = np.argsort(keys, kind="stable")
        self._push_run(keys[order], (ends[order] + start).astype(np.int32))

    def evict_oldest(self) -> int:
        """Drop the oldest output; returns its sequence number."""
        start, length, seq = self.responses.popleft()
        self.live = start + length + 1
        self.live_tokens -= length
        self.stale += self.entries_for(length)
        if self.stale * 2 > self.entries:
            self.compact()
        return seq

    def oldest_seq(self) -> int | None:
        return self.responses[0][2] if self.responses else None

    def compact(self) -> None:
        """Drop evicted tokens and index entries; shift positions so the oldest live token is at 0."""
        shift = self.live
        live_n = self.n - shift
        self.buf[:live_n] = self.buf[shift : self.n].copy()
        self.n, self.live = live_n, 0
        keys = [k[p >= shift] for k, p in self.runs]
        pos = [p[p >= shift] - np.int32(shift) for _, p in self.runs]
        self.runs = []
        if keys and sum(len(k) for k in keys):
            k = np.concatenate(keys)  # runs are oldest first, so positions stay ascending within a key
            p = np.concatenate(pos)
            order = np.argsort(k, kind="stable")
            self.runs = [(k[order], p[order])]
        self.entries = sum(len(k) for k, _ in self.runs)
        self.stale = 0
        self.responses = deque((s - shift, L, q) for s, L, q in self.responses)
        if len(self.buf) > 4 * max(1024, self.n):
            self.buf = self.buf[: max(1024, 2 * self.n)].copy()

    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        if need <= len(self.buf):
            return
        if self.live > 0 and self.live * 2 >= self.n:
            self.compact()
            need = self.n + extra
        if need > len(self.buf):
            grown = np.empty(max(need, 2 * len(self.buf)), dtype=np.int32)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown

    def _push_run(self, keys: np.ndarray, pos: np.ndarray) -> None:
        self.entries += len(keys)
        self.runs.append((keys, pos))
        while len(self.runs) >= 2 and len(self.runs[-2][0]) < self.MERGE_RATIO * len(self.runs[-1][0]):
            (k0, p0), (k1, p1) = self.runs[-2], self.runs[-1]
            k = np.concatenate([k0, k1])
            p = np.concatenate([p0, p1])
            order = np.argsort(k, kind="stable")  # older run first: positions stay ascending within a key
            self.runs[-2:] = [(k[order], p[order])]

    # -- lookup

    def occurrences(self, suffix: Sequence[int], per_order: int) -> tuple[np.ndarray, np.ndarray]:
        """The most recent occurrences of the context's last n-grams: ``(ends, order)``.

        For every indexed order ``n <= len(suffix)``, up to ``per_order`` most
        recent live positions where the last ``n`` tokens of ``suffix`` end.
        Returns unique physical end positions (ascending, i.e. oldest first) and
        the largest order each was found with, a lower bound of its match length.
        """
        empty = np.zeros(0, dtype=np.int64)
        if not self.runs or not len(suffix):
            return empty, empty
        q = query_keys(suffix, self.orders)
        qk = np.array([k for _, k in q], dtype=np.int64)
        need = [per_order] * len(q)
        got: list[np.ndarray] = []
        got_order: list[int] = []
        live = self.live
        for keys, pos in reversed(self.runs):
            lo = np.searchsorted(keys, qk, "left").tolist()
            hi = np.searchsorted(keys, qk, "right").tolist()
            for j in range(len(q)):
                if hi[j] > lo[j] and need[j] > 0:
                    seg = pos[max(lo[j], hi[j] - need[j]) : hi[j]]
                    if seg[0] < live:  # older entries of this key are evicted too
                        seg = seg[seg >= live]
                        need[j] = 0
                    else:
                        need[j] -= len(seg)
                    got.append(seg)
                    got_order.append(q[j][0])
            if not any(x > 0 for x in need):
                break
        if not got:
            return empty, empty
        ends = np.concatenate(got).astype(np.int64)
        order = np.repeat(np.asarray(got_order, dtype=np.int64), [len(g) for g in got])
        o = np.lexsort((-order, ends))  # by position, highest order first
        ends, order = ends[o], order[o]
        first = np.ones(len(ends), dtype=bool)
        first[1:] = ends[1:] != ends[:-1]
        return ends[first], order[first]

    def live_outputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens of all live outputs concatenated, their lengths, their sequence numbers), oldest first."""
        lengths = np.array([L for _, L, _ in self.responses], dtype=np.int64)
        seqs = np.array([q for _, _, q in self.responses], dtype=np.int64)
        if not len(lengths):
            return np.zeros(0, np.int32), lengths, seqs
        tok = np.concatenate([self.buf[s : s + L] for s, L, _ in self.responses])
        return tok, lengths, seqs

    def memory_bytes(self) -> int:
        return int(self.buf.nbytes + sum(k.nbytes + p.nbytes for k, p in self.runs))


# -- occurrence rows and the draft tree --------------------------------------------------------

@dataclass
class Rows:
    """Occurrences of the context's end: match lengths, weights, continuations."""

    m: np.ndarray  # [R] int64 match length
    w: np.ndarray  # [R] float64 weight
    cont: np.ndarray  # [R, D] int64 continuation tokens, -1 after its end

    @staticmethod
    def empty(depth: int) -> "Rows":
        return Rows(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, depth), np.int64))

    def __len__(self) -> int:
        return len(self.m)

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        return Rows(np.concatenate([p.m for p in parts]), np.concatenate([p.w for p in parts]),
                    np.concatenate([p.cont for p in parts]))


def continuations(buf: np.ndarray, ends: np.ndarray, limit: int, depth: int) -> np.ndarray:
    """``[R, depth]`` tokens following each end position; -1 past ``limit`` or past a separator."""
    idx = ends[:, None] + 1 + np.arange(depth)[None, :]  # [R, depth]
    inside = idx < limit
    cont = buf[np.minimum(idx, max(limit - 1, 0))].astype(np.int64)
    bad = np.logical_or.accumulate(~inside | (cont < 0), axis=1)
    cont[bad] = -1
    return cont


def recent_per_level(m: np.ndarray, levels: np.ndarray, k: int) -> np.ndarray:
    """Mask keeping, for each level, the ``k`` latest entries with ``m >= level`` (entries oldest first).

    An entry is kept iff fewer than ``k`` later entries reach its own (highest) level.
    """
    lv = np.searchsorted(levels, m, "right") - 1  # [N] highest level index reached, -1 for m = 0
    reach = lv[:, None] >= np.arange(len(levels))[None, :]  # [N, J]
    later = np.cumsum(reach[::-1], axis=0)[::-1]  # [N, J] entries from i on that reach level j
    return (lv >= 0) & (later[np.arange(len(m)), np.maximum(lv, 0)] <= k)


@dataclass
class _Sorted:
    """Rows sorted by continuation; ``lcp[i]`` = leading tokens shared by sorted rows i and i+1."""

    cont: np.ndarray  # [R, D] int64
    order: np.ndarray  # [R] original row of each sorted row
    lcp: np.ndarray  # int64

    @staticmethod
    def of(cont: np.ndarray) -> "_Sorted":
        R, D = cont.shape
        if R > 1 and D:
            # Big-endian (token + 1) bytes sort like the token sequences (-1 = ended sorts first).
            keys = np.ascontiguousarray((cont + 1).astype(">u4")).view(f"S{4 * D}").ravel()
            order = np.argsort(keys, kind="stable")
        else:
            order = np.arange(R)
        cs = cont[order]
        if R > 1 and D:
            eq = (cs[1:] == cs[:-1]) & (cs[1:] >= 0)
            lcp = np.cumprod(eq, axis=1).sum(axis=1)
        else:
            lcp = np.zeros(max(0, R - 1), dtype=np.int64)
        return _Sorted(cs, order, lcp)


def build_tree(s: _Sorted, weights: np.ndarray, betas: np.ndarray, budget: int, max_depth: int,
               min_prob: float, tree: bool, count_ended: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The draft over sorted occurrence rows: (tokens, parents, conditional probs), best first.

    ``weights`` [R, J] (sorted order) is each row's weight at each evidence
    level (0 where the row is not in the level). Every node of the continuation
    trie at depth ``t`` (1-based) is a maximal row range sharing ``t`` tokens;
    these are read off ``lcp`` for all depths at once. Child probability is
    the level mixture of the module docstring with pseudo-counts ``betas``
    [J]; ``count_ended`` makes rows that end at a node count in its total
    (SuffixDecoding's ``node.count``; use ``betas = 0`` then).

    The draft is the ``budget`` nodes of highest path probability that reach
    ``min_prob`` (ties: shallower first), which is what best-first expansion
    yields and always a subtree; with ``tree=False`` only each node's most
    likely child is eligible (a chain).
    """
    R = len(s.cont)
    D = min(max_depth, s.cont.shape[1])
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if R == 0 or budget <= 0 or D <= 0:
        return none
    cs = s.cont[:, :D]
    J = weights.shape[1]
    cum = np.zeros((R + 1, J))
    np.cumsum(weights, axis=0, out=cum[1:])
    # Trie nodes: a new node starts at depth t+1 on row i when row i differs from row i-1 within t+1 tokens.
    newgrp = np.empty((R, D), dtype=bool)
    newgrp[0] = True
    newgrp[1:] = s.lcp[:, None] <= np.arange(D)[None, :]
    t_all, s_all = np.nonzero(newgrp.T)  # [G'] depth index (0-based) and first row, sorted by (depth, row)
    e_all = np.full(len(s_all), R)
    same = t_all[1:] == t_all[:-1]
    e_all[:-1][same] = s_all[1:][same]
    tok_all = cs[s_all, t_all]
    keep = tok_all >= 0  # ranges of rows that already ended are no nodes
    t, st, en, tok = t_all[keep], s_all[keep], e_all[keep], tok_all[keep]
    G = len(t)
    if G == 0:
        return none
    counts = cum[en] - cum[st]  # [G, J] weighted rows of each node per level
    key = t * (R + 1) + st
    parent = np.searchsorted(key, (t - 1) * (R + 1) + st, "right") - 1  # the depth-t node holding row st
    parent[t == 0] = -1
    pidx = parent + 1  # 0 = the root
    if count_ended:
        C = np.concatenate([cum[R:] - cum[:1], counts])  # [G+1, J] every row through the node
    else:
        C = np.zeros((G + 1, J))
        np.add.at(C, pidx, counts)  # rows that continue past the node
    denom = C + betas[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(denom > 0, 1.0 / denom, 0.0)
    r = np.where(denom > 0, betas[None, :] * inv, 1.0)  # weight passed down to the next shorter level
    mu = np.ones_like(r)
    if J > 1:
        mu[:, :-1] = np.cumprod(r[:, :0:-1], axis=1)[:, ::-1]  # mu_j = prod_{i>j} r_i
    lam = mu * inv  # [G+1, J] coefficient of each level's count in a child's probability
    p = np.minimum((lam[pidx] * counts).sum(axis=1), 1.0)  # [G] P(node | parent)
    if not tree:
        o = np.lexsort((-p, pidx))
        first = np.ones(G, dtype=bool)
        first[1:] = pidx[o][1:] != pidx[o][:-1]
        eligible = np.zeros(G, dtype=bool)
        eligible[o[first]] = True
        path = np.where(eligible, p, 0.0)
    else:
        path = p.copy()
    off = np.searchsorted(t, np.arange(D + 1)).tolist()
    for d in range(1, D):
        if off[d] == off[d + 1]:
            break
        blk = slice(off[d], off[d + 1])
        path[blk] *= path[parent[blk]]
    cand = np.flatnonzero(path >= max(min_prob, 1e-12))
    if not len(cand):
        return none
    chosen = cand[np.lexsort((t[cand], -path[cand]))][:budget]
    where = np.full(G, -1)
    where[chosen] = np.arange(len(chosen))
    par = parent[chosen]
    return tok[chosen], np.where(par >= 0, where[np.maximum(par, 0)], -1), p[chosen]


# -- the speculator ----------------------------------------------------------------------------

class SuffixSpeculator:
    """Adaptive suffix speculator; see the module docstring. Thread-safe (one lock)."""

    def __init__(self, config: SuffixConfig | None = None, name: str = "suffix"):
        self.config = config if config is not None else SuffixConfig()
        self.name = name
        self._lock = threading.RLock()
        self._requests: OrderedDict[str, tuple[ContextBuffer, str]] = OrderedDict()
        self._indexes: OrderedDict[str, SuffixIndex] = OrderedDict()
        self._seq = 0
        c = self.config
        self._levels = np.asarray(c.levels, dtype=np.int64)
        self._betas = np.full(len(c.levels), float(c.beta))

    # -- protocol ------------------------------------------------------------------------------

    def begin(self, ctx: DecodeContext) -> None:
        with self._lock:
            self._view(ctx)

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        if budget <= 0:
            return Draft.empty(self.name)
        with self._lock:
            buf = self._view(ctx)
            index = self._indexes.get(ctx.namespace)
            if index is not None:
                self._indexes.move_to_end(ctx.namespace)
            return self._propose(buf.tokens, index, budget)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        with self._lock:
            if ctx.request_id in self._requests:
                self._requests[ctx.request_id][0].sync(ctx.tokens)

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        with self._lock:
            self._requests.pop(ctx.request_id, None)
            if not finished and not self.config.learn_cancelled:
                return
            outputs = [ctx.tokens[: ctx.prompt_len]] if self.config.learn_prompts else []
            outputs.append(ctx.tokens[ctx.prompt_len :])
            for out in outputs:
                if len(out) >= self.config.min_learn_tokens:
                    self.add(ctx.namespace, out)

    # -- learned state -------------------------------------------------------------------------

    def add(self, namespace: str, tokens: Sequence[int]) -> None:
        """Append one output to the namespace's global history (what ``end`` does)."""
        arr = _as_tokens(tokens)
        if not len(arr):
            return
        with self._lock:
            self._index(namespace).add(arr, self._next_seq())
            self._enforce_total()

    def stats(self) -> dict:
        """Sizes of the learned state: per namespace live tokens, outputs and bytes; totals."""
        with self._lock:
            per = {ns: {"tokens": ix.live_tokens, "outputs": len(ix.responses), "bytes": ix.memory_bytes()}
                   for ns, ix in self._indexes.items()}
            return {"namespaces": per, "tokens": sum(v["tokens"] for v in per.values()),
                    "bytes": sum(v["bytes"] for v in per.values()), "live_requests": len(self._requests)}

    def clear(self) -> None:
        with self._lock:
            self._indexes.clear()

    def state_bytes(self) -> bytes:
        """Serialised global histories (checksummed container around an ``.npz``; no pickle)."""
        with self._lock:
            names = list(self._indexes)
            arrays = {}
            for i, ns in enumerate(names):
                tok, lengths, seqs = self._indexes[ns].live_outputs()
                arrays[f"tokens_{i}"], arrays[f"lengths_{i}"], arrays[f"seqs_{i}"] = tok, lengths, seqs
            meta = {"kind": STATE_KIND, "state_version": STATE_VERSION, "namespaces": names}
            return pack(arrays_to_bytes(arrays), meta)

    def load_state_bytes(self, data: bytes) -> None:
        """Replace the learned state by one from :meth:`state_bytes`; raises StoreCorruptError if invalid."""
        payload, meta = unpack(data)
        self._load_payload(payload, meta)

    def save(self, path) -> None:
        """Write the learned state atomically to ``path``."""
        write_atomic(path, self.state_bytes())

    def load(self, path) -> bool:
        """Replace the learned state by the one at ``path`` (True). A missing file changes nothing (False); a
        damaged one warns and leaves the state empty (False)."""
        try:
            got = load_blob(path)
            if got is None:
                return False
            self._load_payload(*got)
            return True
        except StoreCorruptError as e:
            warnings.warn(f"suffix speculator: ignoring damaged state file {path}: {e}; starting empty",
                          RuntimeWarning, stacklevel=2)
            self.clear()
            return False

    # -- internals -----------------------------------------------------------------------------

    def _load_payload(self, payload: bytes, meta: dict) -> None:
        if meta.get("kind") != STATE_KIND or meta.get("state_version") != STATE_VERSION:
            raise StoreCorruptError(f"not a suffix state of version {STATE_VERSION}: {meta.get('kind')!r} "
                                    f"v{meta.get('state_version')!r}")
        arrays = arrays_from_bytes(payload)
        names = meta.get("namespaces")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StoreCorruptError("namespaces list missing")
        loaded: list[tuple[str, list[np.ndarray], list[int]]] = []
        for i, ns in enumerate(names):
            try:
                tok, lengths, seqs = arrays[f"tokens_{i}"], arrays[f"lengths_{i}"], arrays[f"seqs_{i}"]
            except KeyError as e:
                raise StoreCorruptError(f"missing array {e}") from e
            if (tok.ndim != 1 or lengths.ndim != 1 or seqs.shape != lengths.shape or lengths.min(initial=0) < 0
                    or int(lengths.sum()) != len(tok) or (len(tok) and (tok.min() < 0 or tok.max() >= 2**31))
                    or not np.issubdtype(tok.dtype, np.integer)):
                raise StoreCorruptError(f"inconsistent arrays for namespace {ns!r}")
            cuts = np.cumsum(lengths)[:-1]
            loaded.append((ns, np.split(tok.astype(np.int32), cuts) if len(lengths) else [], seqs.tolist()))
        with self._lock:
            self._indexes.clear()
            self._seq = 0
            for ns, outs, seqs in loaded:
                if outs:
                    self._index(ns).add_many(outs, seqs)
                    self._seq = max(self._seq, max(seqs) + 1)
            self._enforce_total()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _index(self, namespace: str) -> SuffixIndex:
        ix = self._indexes.get(namespace)
        if ix is None:
            ix = self._indexes[namespace] = SuffixIndex(self.config.orders, self.config.max_tokens_per_namespace)
            while len(self._indexes) > self.config.max_namespaces:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(namespace)
        return ix

    def _enforce_total(self) -> None:
        total = sum(ix.live_tokens for ix in self._indexes.values())
        while total > self.config.max_total_tokens:
            oldest = min((ix for ix in self._indexes.values() if ix.responses), key=lambda ix: ix.oldest_seq())
            before = oldest.live_tokens
            oldest.evict_oldest()
            total -= before - oldest.live_tokens

    def _view(self, ctx: DecodeContext) -> ContextBuffer:
        item = self._requests.get(ctx.request_id)
        if item is None:
            item = self._requests[ctx.request_id] = (ContextBuffer(len(ctx.tokens) + 256), ctx.namespace)
            while len(self._requests) > self.config.max_requests:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(ctx.request_id)
        item[0].sync(ctx.tokens)
        return item[0]

    def _rows(self, tokens: np.ndarray, index: SuffixIndex | None, depth: int, per_level: int,
              include_self: bool = False) -> tuple[Rows, Rows]:
        """(local rows, global rows) for the context ``tokens``.

        ``include_self`` (suffixdecoding) adds the context's own end as a local occurrence with no
        continuation (a suffix tree over the context counts it in every node on the matched path) and
        measures every global match length exactly.
        """
        c = self.config
        L = len(tokens)
        suffix = tokens[max(0, L - c.max_depth):]
        local = glob = Rows.empty(depth)
        if L >= 2 or (include_self and L >= 1):
            ends = np.flatnonzero(tokens[: L if include_self else L - 1] == tokens[L - 1])
            if len(ends):
                m = match_lengths(tokens, ends, suffix, c.max_depth)
                keep = recent_per_level(m, self._levels, per_level)
                ends, m = ends[keep], m[keep]
                local = Rows(m, np.full(len(m), c.local_weight), continuations(tokens, ends, L, depth))
        if index is not None and index.live_tokens and L >= 1:
            top = c.orders[-1]
            ends, m = index.occurrences(suffix[-top:].tolist(), per_level)
            if len(ends):
                if include_self:  # (suffixdecoding) exact match lengths for every occurrence
                    m = match_lengths(index.buf[: index.n], ends, suffix, c.max_depth)
                else:  # the order found is the match length (quantised); extend only the longest matches
                    long = np.flatnonzero(m >= top)
                    if len(long) and len(suffix) > top:
                        m[long] = match_lengths(index.buf[: index.n], ends[long], suffix, c.max_depth)
                if c.half_life_tokens is None:
                    w = np.ones(len(m))
                else:
                    w = np.exp2((ends - index.n) / c.half_life_tokens)
                glob = Rows(m, w, continuations(index.buf, ends, index.n, depth))
        return local, glob

    def _propose(self, tokens: np.ndarray, index: SuffixIndex | None, budget: int) -> Draft:
        c = self.config
        depth = min(budget, c.max_draft_depth)
        if c.scoring == "suffixdecoding":
            return self._propose_sd(tokens, index, budget, depth)
        local, glob = self._rows(tokens, index, depth, c.max_rows)
        rows = Rows.concat([local, glob]) if len(glob) else local
        if not len(rows):
            return Draft.empty(self.name)
        active = self._levels <= rows.m.max()
        s = _Sorted.of(rows.cont)
        m, w = rows.m[s.order], rows.w[s.order]
        weights = np.where(m[:, None] >= self._levels[None, active], w[:, None], 0.0)  # [R, J]
        toks, parents, probs = build_tree(s, weights, self._betas[active], budget, depth, c.min_prob, c.tree,
                                          count_ended=False)
        if not len(toks):
            return Draft.empty(self.name)
        return Draft(toks, parents, probs, self.name, int(rows.m.max()))

    def _propose_sd(self, tokens: np.ndarray, index: SuffixIndex | None, budget: int, depth: int) -> Draft:
        """SuffixDecoding's rule (baseline): best-scoring candidate over sources and match lengths."""
        c = self.config
        best: tuple[float, np.ndarray, np.ndarray, np.ndarray, int] = (0.0, np.zeros(0), np.zeros(0), np.zeros(0), 0)
        for rows in self._rows(tokens, index, depth, c.sd_max_rows, include_self=True):
            if not len(rows):
                continue
            s = _Sorted.of(rows.cont)
            m = rows.m[s.order]
            for L in sorted(set(m.tolist()), reverse=True):
                limit = min(budget, int(L * c.spec_factor + c.spec_offset + 1e-6))
                tree_depth = min(depth, c.max_depth - L)
                if limit <= 0 or tree_depth <= 0:
                    continue
                weights = (m >= L).astype(np.float64)[:, None]
                toks, parents, probs = build_tree(s, weights, np.zeros(1), limit, tree_depth, c.min_prob, c.tree,
                                                  count_ended=True)
                score = _score(parents.tolist(), probs.tolist())
                if score > best[0]:
                    best = (score, toks, parents, probs, L)
        _, toks, parents, probs, L = best
        if not len(toks):
            return Draft.empty(self.name)
        return Draft(toks, parents, probs, self.name, L)


def _score(parents: Sequence[int], probs: Sequence[float]) -> float:
    path: list[float] = []
    for p, q in zip(parents, probs):
        path.append(q * (1.0 if p < 0 else path[p]))
    return float(sum(path))


def _as_tokens(tokens: Iterable[int]) -> np.ndarray:
    arr = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("token ids must be a flat sequence")
    if len(arr) and (arr.min() < 0 or arr.max() >= 2**31):
        raise ValueError(f"token ids must lie in [0, 2**31); got {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.int32)
