"""The adaptive model-free speculator: suffix matching over past outputs and the request itself.

Evidence
    *Global*: every finished output of the namespace, oldest first, in one flat
    token array (outputs separated by ``-1``). An n-gram index maps the hash of
    each n-gram (``n`` in :attr:`SuffixConfig.orders`) to the positions where it
    ends. *Local*: the current request's prompt and output so far, scanned
    directly (one vectorised compare per step).

    For the context's last tokens we collect *occurrences*: earlier positions
    whose preceding tokens match the context's end, each with its match length
    ``m`` (global: the longest indexed order that matched, extended token by
    token beyond the largest order up to :attr:`SuffixConfig.max_depth`; local:
    exact), a weight (global: halves every :attr:`SuffixConfig.half_life_tokens`
    tokens of age; local: :attr:`SuffixConfig.local_weight`) and its
    *continuation*, the tokens that followed it. Only the most recent
    :attr:`SuffixConfig.max_rows` occurrences per match-length level and source
    are kept, which bounds the work per step and is itself a recency window.

Scoring (``scoring="mixture"``, the default)
    Occurrences are sorted by continuation, so every draft-tree node is a
    contiguous range of them (their continuations agree on the path). At a node,
    level ``j`` (occurrences whose match length reaches ``levels[j]``) has
    weighted count ``C_j`` and per-child counts ``c_j(x)``. The next-token
    probability interpolates the levels from short to long matches, each
    smoothed towards the shorter one (hierarchical Dirichlet smoothing, as in
    PPM / interpolated n-gram models)::

        P_0(x) = c_0(x) / (C_0 + beta)                       # beta / (C_0 + beta): a token never seen here
        P_j(x) = (c_j(x) + beta * P_{j-1}(x)) / (C_j + beta)   (levels with C_j = 0 pass P_{j-1} on)

    A long match with few occurrences and a short match with many both count,
    each by its evidence, and local and global occurrences pool into the same
    counts. Below a draft node of depth ``t`` an occurrence's match length is
    ``m + t`` (if the path is accepted, the occurrence matched it too), so
    confidence grows along a path that keeps agreeing with one source.
    ``Draft.probs`` is ``P_top(child)``, a conditional probability.

    Worked example: occurrences with continuations ``[5, 6]`` (m=4), ``[5, 7]``
    (m=1), ``[8]`` (m=1), unit weights, levels ``(1, 4)``, beta 1. Root: level 0
    counts 5:2, 8:1 (C_0=3); level 1 counts 5:1 (C_1=1). ``P(5) = (1 + 1 * 2/4)
    / 2 = 0.75``, ``P(8) = (0 + 1 * 1/4) / 2 = 0.125``.

    Online correction (``self_calibrate``): after each step the last draft is
    scored against the tokens that actually followed (whichever draft the
    engine verified), and per namespace, per (highest evidence level, probability
    bin) the ratio of observed to expected hits rescales later confidences, so
    they follow the traffic (e.g. a code namespace where long matches are surer
    than in chat).

Scoring (``scoring="suffixdecoding"``)
    SuffixDecoding's rule as a baseline: for every match length ``L`` and each
    source separately, occurrences with ``m >= L``; ``p = child.count /
    node.count`` (occurrences that end at the node count in ``node.count``,
    the context's own end included for the local source); at most ``factor * L
    + offset`` tokens and tree depth ``max_depth - L``; path probability >=
    ``min_prob``; the candidate with the highest score (sum of path
    probabilities) wins. It looks at up to :attr:`SuffixConfig.sd_max_rows`
    occurrences per source rather than all of them.

Drafts are trees built best first by path probability up to the budget (or a
chain, ``tree=False``); nodes come out in that order, so ``Draft.prefix(k)`` is
the best ``k``-node subtree.

Learning: ``observe`` keeps the local view current (a long answer matches its
own earlier text) and feeds the online correction; ``end`` appends the output to
the namespace's global index. Cancelled requests are learned from too
(``learn_cancelled``): their tokens are real target output. Memory is bounded
per namespace (FIFO eviction of whole outputs), in total (the oldest outputs of
any namespace go first) and in the number of namespaces (least recently used
dropped). A hash collision in the index can only add a wrong candidate, never
change the output: verification is lossless.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import (PAD, ContextBuffer, DecodeContext, Draft, SpeculatorBase, StepOutcome, label_nodes, path_probs,
                   token_array)
from .ngram import match_lengths
from ..store import StoreCorruptError, arrays_from_bytes, arrays_to_bytes, pack, restore, unpack, write_atomic

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
    orders: tuple[int, ...] = (1, 2, 4, 8, 16)
    """n-gram lengths indexed in the global history (12 bytes per token each); a global occurrence's match
    length is the longest order that matched, and beyond the largest it is extended token by token. On
    ShareGPT replay (1, 2, 3, 4, 6, 8, 12, 16) scores the same; leaving out 1 costs 0.08 tokens per step."""
    levels: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    """Match-length thresholds of the evidence levels of the mixture."""
    max_rows: int = 16
    """Most recent occurrences kept per level and source (mixture); 32 or 64 change ShareGPT replay by < 0.01
    accepted tokens per step and cost time."""
    beta: float = 8.0
    """Smoothing strength of every level towards the shorter one (pseudo-count); 8 gives calibrated
    confidences on ShareGPT replay (1 is overconfident, 16 underconfident)."""
    local_weight: float = 3.0
    """Weight of one occurrence in the request's own context relative to a fresh global one."""
    self_calibrate: bool = True
    """Correct confidences online, per namespace, from how earlier drafts fared against the tokens that
    followed (whichever draft the engine verified), per evidence level and probability bin."""
    calibration_bins: int = 10
    """Probability bins of the online correction."""
    calibration_strength: float = 50.0
    """Pseudo-count (in expected accepted tokens) that holds a correction factor at 1 until evidence builds."""
    calibration_memory: float = 5000.0
    """Expected accepted tokens per cell after which the cell's counts are halved (follows drift)."""
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
        if self.max_depth > PAD or self.max_draft_depth > PAD:
            raise ValueError(f"max_depth and max_draft_depth must be at most {PAD}")
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
    The key of ``t[p-n+1..p]`` is ``(sum_i (t[p-i]+1) * BASE**i mod 2**64) ^ (n * SALT)``, a
    polynomial hash; a (vanishingly rare) collision only adds a wrong candidate occurrence.
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
    MAX_MERGED = 1 << 21  # runs are not merged beyond this many entries (bounds the pause of one insertion)

    def __init__(self, orders: Sequence[int], capacity: int):
        self.orders = tuple(orders)
        self.capacity = int(capacity)  # live-token cap
        self.buf = np.full(1024 + PAD, -1, dtype=np.int32)  # -1 past n, at least PAD of them (see ContextBuffer)
        self.n = 0  # physical end of used buffer
        self.live = 0  # physical start of the oldest live output
        self.responses: deque[tuple[int, int, int]] = deque()  # (start, length, seq)
        self.live_tokens = 0
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (keys int64, pos int32)
        self.entries = 0  # index entries, stale included
        self.stale = 0
        self._thinned = False  # a compaction shrank runs that may now be merged

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
        self.buf[live_n : self.n] = -1
        self.n, self.live = live_n, 0
        runs = []
        for k, p in self.runs:  # filtering keeps each run sorted; no re-sort needed
            if len(p) and p.min() < shift:
                live = p >= shift
                k, p = k[live], p[live]
            if len(k):
                runs.append((k, p - np.int32(shift)))
        self.runs = runs
        self._thinned = True
        self.entries = sum(len(k) for k, _ in self.runs)
        self.stale = 0
        self.responses = deque((s - shift, L, q) for s, L, q in self.responses)
        if len(self.buf) > 4 * max(1024, self.n) + PAD:
            self.buf = self.buf[: max(1024, 2 * self.n) + PAD].copy()

    def _reserve(self, extra: int) -> None:
        need = self.n + extra + PAD
        if need <= len(self.buf):
            return
        if self.live > 0 and self.live * 2 >= self.n:
            self.compact()
            need = self.n + extra + PAD
        if need > len(self.buf):
            grown = np.full(max(need, 2 * len(self.buf)), -1, dtype=np.int32)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown

    def _push_run(self, keys: np.ndarray, pos: np.ndarray) -> None:
        self.entries += len(keys)
        self.runs.append((keys, pos))
        while (len(self.runs) >= 2 and len(self.runs[-2][0]) < self.MERGE_RATIO * len(self.runs[-1][0])
               and len(self.runs[-2][0]) + len(self.runs[-1][0]) <= self.MAX_MERGED):
            self._merge(len(self.runs) - 2)
        if self._thinned and len(self.runs) >= 2:  # after a compaction: merge thin neighbours, one pair per insertion
            sizes = [len(k) for k, _ in self.runs]
            i = min(range(len(sizes) - 1), key=lambda j: sizes[j] + sizes[j + 1])
            if sizes[i] + sizes[i + 1] <= self.MAX_MERGED // 2:
                self._merge(i)
            else:
                self._thinned = False

    def _merge(self, i: int) -> None:
        """Merge runs i and i+1 (i is the older: positions stay ascending within a key)."""
        (k0, p0), (k1, p1) = self.runs[i], self.runs[i + 1]
        k = np.concatenate([k0, k1])
        p = np.concatenate([p0, p1])
        order = np.argsort(k, kind="stable")
        self.runs[i : i + 2] = [(k[order], p[order])]

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
        nq = len(q)
        qk = np.array([k for _, k in q], dtype=np.int64)
        qk = np.concatenate([qk, qk + 1])  # key range [k, k+1) of each query (int keys); wraps only at 2**63 - 1
        need = [per_order] * nq
        got: list[np.ndarray] = []
        got_order: list[int] = []
        live = self.live
        for keys, pos in reversed(self.runs):
            bounds = np.searchsorted(keys, qk).tolist()
            lo, hi = bounds[:nq], bounds[nq:]
            for j in range(nq):
                if hi[j] == lo[j]:
                    break  # an n-gram absent from this run: its extensions are absent too
                if need[j] > 0:
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
    cont: np.ndarray  # [R, D] int continuation tokens, -1 after its end

    @staticmethod
    def empty(depth: int) -> "Rows":
        return Rows(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, depth), np.int64))

    def __len__(self) -> int:
        return len(self.m)

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        return Rows(np.concatenate([p.m for p in parts]), np.concatenate([p.w for p in parts]),
                    np.concatenate([p.cont for p in parts]))


_STEPS = np.arange(1, PAD + 1)


def continuations(buf: np.ndarray, ends: np.ndarray, depth: int, separators: bool) -> np.ndarray:
    """``[R, depth]`` tokens following each end position in a padded buffer (see ContextBuffer), -1 after
    the end; ``separators``: the buffer holds several sequences separated by -1 (continuations stop there)."""
    cont = buf[ends[:, None] + _STEPS[:depth]]  # [R, depth]
    if separators:
        cont = np.where(np.logical_and.accumulate(cont >= 0, axis=1), cont, -1)
    return cont


def recent_per_level(m: np.ndarray, levels: np.ndarray, k: int) -> np.ndarray:
    """Mask keeping, for each level, the ``k`` latest entries with ``m >= level`` (entries oldest first).

    An entry is kept iff fewer than ``k`` later entries reach its own (highest) level.
    """
    if len(m) <= k:
        return m > 0
    lv = np.searchsorted(levels, m, "right") - 1  # [N] highest level index reached, -1 for m = 0
    reach = lv[:, None] >= np.arange(len(levels))[None, :]  # [N, J]
    later = np.cumsum(reach[::-1], axis=0)[::-1]  # [N, J] entries from i on that reach level j
    return (lv >= 0) & (later[np.arange(len(m)), np.maximum(lv, 0)] <= k)


@dataclass
class _Sorted:
    """Rows sorted by continuation; ``lcp[i]`` = leading tokens shared by sorted rows i and i+1."""

    cont: np.ndarray  # [R, D] int
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
            # Rows that both ended (-1) count as equal there: harmless, such ranges are no nodes.
            lcp = np.cumprod(cs[1:] == cs[:-1], axis=1).sum(axis=1)
        else:
            lcp = np.zeros(max(0, R - 1), dtype=np.int64)
        return _Sorted(cs, order, lcp)


@dataclass
class TreeNodes:
    """Draft nodes, best first, with what the online calibration needs to learn from them."""

    tokens: np.ndarray  # [n] int64
    parents: np.ndarray  # [n] int64, -1 = child of the pending token
    probs: np.ndarray  # [n] conditional probabilities (calibrated when a correction was given)
    raw: np.ndarray  # [n] the same before calibration
    level: np.ndarray  # [n] highest evidence level holding the node's token
    prob_bin: np.ndarray  # [n] probability bin of ``raw``

    def __len__(self) -> int:
        return len(self.tokens)


_NO_NODES = TreeNodes(*(np.zeros(0, np.int64),) * 2, np.zeros(0), np.zeros(0), *(np.zeros(0, np.int64),) * 2)


def build_tree(s: _Sorted, m: np.ndarray, w: np.ndarray, levels: np.ndarray, betas: np.ndarray, budget: int,
               max_depth: int, min_prob: float, tree: bool, grow: bool = True, count_ended: bool = False,
               correction: np.ndarray | None = None) -> TreeNodes:
    """The draft over sorted occurrence rows, best first.

    Rows (sorted order) have match length ``m`` [R] and weight ``w`` [R]; a row
    counts at level ``j`` when its match length reaches ``levels[j]``. With
    ``grow`` the match length of a row below a draft node of depth ``t`` is
    ``m + t``: given that the path was accepted, the row matched the context
    and the path. Every node of the continuation trie at depth ``t`` is a
    maximal row range sharing ``t`` tokens, read off ``lcp`` for all depths at
    once: in the [D, R] grid, node ``(d, r)`` starts where row ``r`` differs
    from row ``r-1`` within ``d+1`` tokens. Child probability is the level
    mixture of the module docstring with pseudo-counts ``betas`` [J];
    ``count_ended`` makes rows that end at a node count in its total
    (SuffixDecoding's ``node.count``; use ``betas = 0`` and ``grow=False``
    then). ``correction`` [J', B] (J' >= J) multiplies the probability of a
    node whose highest evidence level is ``j`` and whose probability falls in
    bin ``b`` (of B equal bins) by ``correction[j, b]``; siblings are
    renormalised if they then exceed 1.

    The draft is the ``budget`` nodes of highest path probability that reach
    ``min_prob`` (ties: shallower first), which is what best-first expansion
    yields and always a subtree; with ``tree=False`` only each node's most
    likely child is eligible (a chain).
    """
    R = len(s.cont)
    D = min(max_depth, s.cont.shape[1])
    if R == 0 or budget <= 0 or D <= 0:
        return _NO_NODES
    J = len(levels)
    grid = np.empty((D, R), dtype=bool)  # [D, R] a trie node starts at (depth d, row r)
    grid[:, 0] = True
    grid[:, 1:] = s.lcp[None, :] <= np.arange(D)[:, None]
    flat = grid.ravel()
    starts = np.flatnonzero(flat)  # [G] node k starts at depth starts // R, row starts % R
    node_of = np.cumsum(flat) - 1  # [D*R] node holding each (depth, row)
    tok = s.cont[:, :D].T.ravel()[starts]  # [G] token of each node (-1: rows that ended: no node)
    G = len(starts)
    eff = m[None, :] + np.arange(D if grow else 1)[:, None]  # [D or 1, R] match length of a row below depth d
    wl = np.where(eff[:, :, None] >= levels, w[:, None], 0.0)  # [D or 1, R, J] row weight per level
    if not grow:
        wl = np.broadcast_to(wl, (D, R, J))
    counts = np.add.reduceat(wl.reshape(D * R, J), starts, axis=0)  # [G, J] weighted rows per node and level
    parent = np.where(starts >= R, node_of[starts - R], -1)  # [G] node one level up holding the same first row
    pidx = parent + 1  # 0 = the root
    valid = tok >= 0
    if count_ended:  # SuffixDecoding: child.count / node.count, all rows through the node counted, no smoothing
        C = np.concatenate([wl[0].sum(axis=0, keepdims=True), counts])  # [G+1, J]
        counts[~valid] = 0.0
        lam = 1.0 / np.maximum(C, 1e-300)  # nodes without counted rows have children with zero counts
    else:
        counts[~valid] = 0.0
        cells = (pidx[:, None] * J + np.arange(J)).ravel()
        C = np.bincount(cells, counts.ravel(), (G + 1) * J).reshape(G + 1, J)  # [G+1, J] rows continuing past
        # The level mixture is linear in the counts: P(x) = sum_j lam_j c_j(x) with
        # lam_j = 1/(C_j + b_j) * prod_{i>j} r_i = prod_{i>=j} r_i / b_j, where r_i = b_i / (C_i + b_i).
        lam = np.cumprod((betas / (C + betas))[:, ::-1], axis=1)[:, ::-1] / betas  # [G+1, J]
    raw = np.minimum((lam[pidx] * counts).sum(axis=1), 1.0)  # [G] P(node | parent); 0 for no node
    if correction is None:
        top = bins = np.zeros(G, dtype=np.int64)
        p = raw
    else:
        top = np.maximum((counts > 0).sum(axis=1) - 1, 0)  # [G] highest level holding the node's token (nested)
        nb = correction.shape[1]
        bins = np.minimum((raw * nb).astype(np.int64), nb - 1)
        p = np.minimum(raw * correction[top, bins], 0.99)
        p = p / np.maximum(np.bincount(pidx, p, G + 1)[pidx], 1.0)
    if not tree:  # only the most likely child of each node may be drafted
        o = np.lexsort((-p, pidx))
        best = np.zeros(G, dtype=bool)
        best[o[np.r_[True, pidx[o][1:] != pidx[o][:-1]]]] = True
        p = np.where(best, p, 0.0)
    path = np.cumprod(p[node_of].reshape(D, R), axis=0).ravel()[starts]  # [G] product down from the root
    cand = np.flatnonzero(path >= max(min_prob, 1e-12))
    if not len(cand):
        return _NO_NODES
    chosen = cand[np.lexsort((starts[cand], -path[cand]))][:budget]  # starts grow with depth: ties go shallow
    where = np.full(G + 1, -1)
    where[chosen + 1] = np.arange(len(chosen))
    return TreeNodes(tok[chosen], where[pidx[chosen]], p[chosen], raw[chosen], top[chosen], bins[chosen])


class ConfidenceCorrection:
    """Online correction of draft confidences: observed / expected accepted tokens per (level, bin) cell.

    A node tested against the true continuation (its parent was on the true
    path) adds its raw probability to ``expected`` and 1 to ``hits`` if it was
    right. The factor ``(hits + s) / (expected + s)`` is 1 without evidence.
    Cells are halved once ``expected`` passes ``memory``, so the factor follows
    drift in the traffic.
    """

    def __init__(self, levels: int, bins: int, strength: float, memory: float):
        self.hits = np.zeros((levels, bins))
        self.expected = np.zeros((levels, bins))
        self.strength = strength
        self.memory = memory
        self._factor: np.ndarray | None = None

    def factor(self) -> np.ndarray:
        """[levels, bins] multiplier of raw confidences."""
        if self._factor is None:
            self._factor = (self.hits + self.strength) / (self.expected + self.strength)
        return self._factor

    def set(self, hits: np.ndarray, expected: np.ndarray) -> None:
        self.hits, self.expected, self._factor = hits, expected, None

    def update(self, level: np.ndarray, bins: np.ndarray, raw: np.ndarray, hit: np.ndarray) -> None:
        np.add.at(self.hits, (level, bins), hit.astype(np.float64))
        np.add.at(self.expected, (level, bins), raw)
        full = self.expected > self.memory
        if full.any():
            self.hits[full] *= 0.5
            self.expected[full] *= 0.5
        self._factor = None


def draft_verdicts(tokens: Sequence[int], parents: Sequence[int], truth: Sequence[int]) -> tuple[list[int], list[bool]]:
    """:func:`~adaspec.speculators.base.label_nodes` without the depths (the calibration keys on its own levels)."""
    tested, hits, _ = label_nodes(tokens, parents, truth)
    return tested, hits


# -- the speculator ----------------------------------------------------------------------------

@dataclass
class _RequestView:
    """A live request: the last draft's nodes awaiting their verdict."""

    pending: tuple[int, TreeNodes] | None = None  # (context length when proposed, nodes)

class SuffixSpeculator(SpeculatorBase):
    """Adaptive suffix speculator; see the module docstring. Thread-safe (one lock)."""

    def __init__(self, config: SuffixConfig | None = None, name: str = "suffix"):
        self.config = config if config is not None else SuffixConfig()
        self.name = name
        self._lock = threading.RLock()
        self._requests: OrderedDict[str, _RequestView] = OrderedDict()
        self._indexes: OrderedDict[str, SuffixIndex] = OrderedDict()
        self._calibrations: OrderedDict[str, ConfidenceCorrection] = OrderedDict()
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
            view = self._view(ctx)
            index = self._indexes.get(ctx.namespace)
            if index is not None:
                self._indexes.move_to_end(ctx.namespace)
            c = self.config
            calib = self._calibration(ctx.namespace) if c.self_calibrate and c.scoring == "mixture" else None
            draft, nodes = self._propose(ctx.array(), index, calib, budget)
            view.pending = (len(ctx.tokens), nodes) if len(nodes) and calib is not None else None
            return draft

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        """Keeps the request's view current and, with ``self_calibrate``, scores this step's draft against the
        tokens that followed, whichever draft was verified."""
        with self._lock:
            view = self._requests.get(ctx.request_id)
            if view is None:
                return
            if view.pending is not None:
                at, nodes = view.pending
                view.pending = None
                tested, hits = draft_verdicts(nodes.tokens.tolist(), nodes.parents.tolist(), ctx.tokens[at:])
                if tested:
                    self._calibration(ctx.namespace).update(nodes.level[tested], nodes.prob_bin[tested],
                                                            nodes.raw[tested], np.asarray(hits))

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
        arr = token_array(tokens).astype(np.int32)
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
        """Forget all learned state (histories and confidence corrections)."""
        with self._lock:
            self._indexes.clear()
            self._calibrations.clear()

    def state_bytes(self) -> bytes:
        """Serialised learned state: global histories and confidence corrections per namespace (checksummed
        container around an ``.npz`` of integer/float arrays; no pickle)."""
        with self._lock:
            names = list(self._indexes)
            arrays = {}
            for i, ns in enumerate(names):
                tok, lengths, seqs = self._indexes[ns].live_outputs()
                arrays[f"tokens_{i}"], arrays[f"lengths_{i}"], arrays[f"seqs_{i}"] = tok, lengths, seqs
            calibrated = list(self._calibrations)
            for i, ns in enumerate(calibrated):
                cal = self._calibrations[ns]
                arrays[f"cal_hits_{i}"], arrays[f"cal_expected_{i}"] = cal.hits, cal.expected
            meta = {"kind": STATE_KIND, "state_version": STATE_VERSION, "namespaces": names,
                    "calibrated": calibrated}
            return pack(arrays_to_bytes(arrays), meta)

    def load_state_bytes(self, data: bytes) -> None:
        """Replace the learned state by one from :meth:`state_bytes`; raises StoreCorruptError if invalid."""
        payload, meta = unpack(data)
        self._load_payload(payload, meta)

    def save(self, path) -> None:
        """Write the learned state atomically to ``path``."""
        write_atomic(path, self.state_bytes())

    def load(self, path, vocab_size: int | None = None) -> bool:
        """Replace the learned state by the one at ``path`` (True). A missing file changes nothing (False); a
        damaged one, or one holding token ids outside ``vocab_size``, is moved aside with a warning and the state
        starts empty (False)."""
        if not os.path.lexists(path):
            return False
        if restore(path, lambda payload, meta: self._load_payload(payload, meta, vocab_size), "suffix speculator"):
            return True
        self.clear()
        return False

    # -- internals -----------------------------------------------------------------------------

    def _load_payload(self, payload: bytes, meta: dict, vocab_size: int | None = None) -> None:
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
            top = 2**31 if vocab_size is None else vocab_size
            if (tok.ndim != 1 or lengths.ndim != 1 or seqs.shape != lengths.shape
                    or not all(np.issubdtype(a.dtype, np.integer) for a in (tok, lengths, seqs))
                    or lengths.min(initial=0) < 0 or int(lengths.sum()) != len(tok)
                    or (len(tok) and (tok.min() < 0 or tok.max() >= top))
                    or seqs.min(initial=0) < 0 or seqs.max(initial=0) >= 2**62):
                raise StoreCorruptError(f"inconsistent arrays for namespace {ns!r}")
            cuts = np.cumsum(lengths)[:-1]
            loaded.append((ns, np.split(tok.astype(np.int32), cuts) if len(lengths) else [], seqs.tolist()))
        cals: list[tuple[str, np.ndarray, np.ndarray]] = []
        calibrated = meta.get("calibrated", [])
        if not isinstance(calibrated, list) or not all(isinstance(n, str) for n in calibrated):
            raise StoreCorruptError("calibrated list malformed")
        shape = (len(self.config.levels), self.config.calibration_bins)
        for i, ns in enumerate(calibrated):
            hits, expected = arrays.get(f"cal_hits_{i}"), arrays.get(f"cal_expected_{i}")
            if hits is None or expected is None:
                raise StoreCorruptError(f"missing calibration arrays for namespace {ns!r}")
            if not (np.issubdtype(hits.dtype, np.number) and np.issubdtype(expected.dtype, np.number)
                    and np.all(np.isfinite(hits)) and np.all(np.isfinite(expected))
                    and np.all(hits >= 0) and np.all(expected >= 0)):
                raise StoreCorruptError(f"calibration of namespace {ns!r} holds negative or non-finite numbers")
            if hits.shape == expected.shape == shape:
                cals.append((ns, hits.astype(np.float64), expected.astype(np.float64)))
            else:  # saved with other levels/bins: start that correction afresh
                warnings.warn(f"suffix speculator: confidence correction of {ns!r} has shape {hits.shape}, "
                              f"expected {shape}; not restored", RuntimeWarning, stacklevel=3)
        with self._lock:
            self.clear()
            self._seq = 0
            for ns, outs, seqs in loaded:
                if outs:
                    self._index(ns).add_many(outs, seqs)
                    self._seq = max(self._seq, max(seqs) + 1)
            self._enforce_total()
            for ns, hits, expected in cals:
                self._calibration(ns).set(hits, expected)

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

    def _view(self, ctx: DecodeContext) -> "_RequestView":
        view = self._requests.get(ctx.request_id)
        if view is None:
            view = self._requests[ctx.request_id] = _RequestView()
            while len(self._requests) > self.config.max_requests:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(ctx.request_id)
        return view

    def _calibration(self, namespace: str) -> ConfidenceCorrection:
        cal = self._calibrations.get(namespace)
        if cal is None:
            c = self.config
            cal = self._calibrations[namespace] = ConfidenceCorrection(len(c.levels), c.calibration_bins,
                                                              c.calibration_strength, c.calibration_memory)
            while len(self._calibrations) > c.max_namespaces:
                self._calibrations.popitem(last=False)
        else:
            self._calibrations.move_to_end(namespace)
        return cal

    def _rows(self, ctxbuf: ContextBuffer, index: SuffixIndex | None, depth: int, per_level: int,
              include_self: bool = False) -> tuple[Rows, Rows]:
        """(local rows, global rows) for the request's context.

        ``include_self`` (suffixdecoding) adds the context's own end as a local occurrence with no
        continuation (a suffix tree over the context counts it in every node on the matched path) and
        measures every global match length exactly.
        """
        c = self.config
        L, buf = ctxbuf.n, ctxbuf.buf
        suffix = buf[max(0, L - c.max_depth) : L]
        local = glob = Rows.empty(depth)
        if L >= 2 or (include_self and L >= 1):
            ends = np.flatnonzero(buf[: L if include_self else L - 1] == buf[L - 1])
            if len(ends):
                m = match_lengths(buf, ends, suffix, c.max_depth, padded=True)
                if len(m) > per_level:
                    keep = recent_per_level(m, self._levels, per_level)
                    ends, m = ends[keep], m[keep]
                local = Rows(m, np.full(len(m), c.local_weight), continuations(buf, ends, depth, False))
        if index is not None and index.live_tokens and L >= 1:
            top = c.orders[-1]
            ends, m = index.occurrences(suffix[-top:].tolist(), per_level)
            if len(ends):
                if include_self:  # (suffixdecoding) exact match lengths for every occurrence
                    m = match_lengths(index.buf, ends, suffix, c.max_depth, padded=True)
                elif len(suffix) > top:  # the order found is the match length (quantised); extend the longest
                    long = np.flatnonzero(m >= top)
                    if len(long):
                        m[long] = match_lengths(index.buf, ends[long], suffix, c.max_depth, padded=True)
                if c.half_life_tokens is None:
                    w = np.ones(len(m))
                else:
                    w = np.exp2((ends - index.n) / c.half_life_tokens)
                glob = Rows(m, w, continuations(index.buf, ends, depth, True))
        return local, glob

    def _propose(self, ctxbuf: ContextBuffer, index: SuffixIndex | None, calib: ConfidenceCorrection | None,
                 budget: int) -> tuple[Draft, TreeNodes]:
        c = self.config
        depth = min(budget, c.max_draft_depth)
        if c.scoring == "suffixdecoding":
            return self._propose_sd(ctxbuf, index, budget, depth), _NO_NODES
        local, glob = self._rows(ctxbuf, index, depth, c.max_rows)
        rows = Rows.concat([local, glob]) if len(glob) else local
        if not len(rows):
            return Draft.empty(self.name), _NO_NODES
        active = self._levels <= rows.m.max() + depth - 1  # a prefix of the levels
        s = _Sorted.of(rows.cont)
        nodes = build_tree(s, rows.m[s.order], rows.w[s.order], self._levels[active], self._betas[active], budget,
                           depth, c.min_prob, c.tree, correction=None if calib is None else calib.factor())
        if not len(nodes):
            return Draft.empty(self.name), nodes
        return Draft(nodes.tokens, nodes.parents, nodes.probs, self.name, int(rows.m.max())), nodes

    def _propose_sd(self, ctxbuf: ContextBuffer, index: SuffixIndex | None, budget: int, depth: int) -> Draft:
        """SuffixDecoding's rule (baseline): best-scoring candidate over sources and match lengths."""
        c = self.config
        best: tuple[float, TreeNodes, int] = (0.0, _NO_NODES, 0)
        for rows in self._rows(ctxbuf, index, depth, c.sd_max_rows, include_self=True):
            if not len(rows):
                continue
            s = _Sorted.of(rows.cont)
            m = rows.m[s.order]
            ones = np.ones(len(m))
            for L in sorted(set(m.tolist()), reverse=True):
                limit = min(budget, int(L * c.spec_factor + c.spec_offset + 1e-6))
                tree_depth = min(depth, c.max_depth - L)
                if limit <= 0 or tree_depth <= 0:
                    continue
                nodes = build_tree(s, m, ones, np.array([L]), np.zeros(1), limit, tree_depth, c.min_prob, c.tree,
                                   grow=False, count_ended=True)
                score = float(sum(path_probs(nodes.parents.tolist(), nodes.probs.tolist())))
                if score > best[0]:
                    best = (score, nodes, L)
        _, nodes, L = best
        if not len(nodes):
            return Draft.empty(self.name)
        return Draft(nodes.tokens, nodes.parents, nodes.probs, self.name, L)
