"""The suffix speculator's global evidence: every finished output of a namespace, and an n-gram index into it.

Outputs are kept oldest first in one flat token array (separated by ``-1``); the index maps the hash of each
n-gram (``n`` in ``SuffixConfig.orders``) to the positions where it ends. A hash collision can only add a wrong
candidate, never change the output: verification is lossless.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

from .base import PAD


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
