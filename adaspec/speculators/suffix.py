"""The adaptive model-free speculator: suffix matching over past outputs and the request itself.

Evidence comes from every finished output of the namespace (:mod:`.suffix_index`) and from the request's own prompt
and output (``DecodeContext.array``); :mod:`.suffix_tree` scores the occurrences into a draft tree, and an online
correction per namespace keeps the confidences calibrated to the traffic. Memory is bounded per namespace, in total
and in namespaces; a hash collision can only add a wrong candidate, never change the output. Details on
:class:`SuffixSpeculator`.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .base import (PAD, ContextBuffer, DecodeContext, Draft, SpeculatorBase, StepOutcome, label_nodes, path_probs,
                   token_array)
from .confidence import AcceptanceCounts
from .ngram import match_lengths
from .suffix_index import SuffixIndex
from .suffix_tree import NO_NODES, Rows, SortedRows, TreeNodes, build_tree, continuations, recent_per_level
from ..store import StoreCorruptError, arrays_from_bytes, arrays_to_bytes, pack, restore, unpack, write_atomic

STATE_KIND = "adaspec.suffix"
STATE_VERSION = 1
MAX_ROWS = 16
"""Most recent occurrences kept per level and source (mixture); 32 or 64 change ShareGPT replay by < 0.01 accepted
tokens per step and cost time."""
SD_MAX_ROWS = 1024
"""suffixdecoding: occurrences looked at per source (its suffix tree counts all of them)."""
MAX_DRAFT_DEPTH = 32
"""Deepest draft node: as deep as the longest context suffix compared by default."""
CORRECTION_BINS = 10
"""Probability bins of the online correction (part of the saved state's shape)."""
CORRECTION_MEMORY = 5000.0
"""Expected accepted tokens per correction cell after which its counts are halved (follows drift)."""
MIN_LEARN_TOKENS = 2
"""Outputs shorter than this are not indexed: they hold no continuation."""
MAX_REQUESTS = 4096
"""Live request views kept; the least recently used one is dropped beyond it (a request's view is rebuilt)."""


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
    beta: float = 8.0
    """Smoothing strength of every level towards the shorter one (pseudo-count); 8 gives calibrated
    confidences on ShareGPT replay (1 is overconfident, 16 underconfident)."""
    local_weight: float = 3.0
    """Weight of one occurrence in the request's own context relative to a fresh global one."""
    self_calibrate: bool = True
    """Correct confidences online, per namespace, from how earlier drafts fared against the tokens that
    followed (whichever draft the engine verified), per evidence level and probability bin."""
    calibration_strength: float = 50.0
    """Pseudo-count (in expected accepted tokens) that holds a correction factor at 1 until evidence builds."""
    half_life_tokens: float | None = 500_000.0
    """Age (tokens of newer history in the namespace) at which a global occurrence counts half; None: no decay."""
    min_prob: float = 0.1
    """Nodes whose path probability falls below this are not proposed."""
    spec_factor: float = 1.0
    """suffixdecoding: at most ``spec_factor * match_len + spec_offset`` tokens."""
    spec_offset: float = 0.0
    """suffixdecoding: see ``spec_factor``."""
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

    def __post_init__(self) -> None:
        if self.scoring not in ("mixture", "suffixdecoding"):
            raise ValueError(f"scoring must be 'mixture' or 'suffixdecoding', not {self.scoring!r}")
        if not self.orders or sorted(set(self.orders)) != list(self.orders) or self.orders[0] < 1:
            raise ValueError("orders must be increasing positive n-gram lengths")
        if not self.levels or sorted(set(self.levels)) != list(self.levels) or self.levels[0] != 1:
            raise ValueError("levels must be increasing match lengths starting at 1")
        if self.max_depth < self.orders[-1]:
            raise ValueError("max_depth must be at least the largest order")
        if self.max_depth > PAD:
            raise ValueError(f"max_depth must be at most {PAD}")
        if min(self.max_tokens_per_namespace, self.max_total_tokens, self.max_namespaces) < 1:
            raise ValueError("max_tokens_per_namespace, max_total_tokens and max_namespaces must be positive")
        if self.beta <= 0 or self.local_weight < 0 or not 0 <= self.min_prob < 1:
            raise ValueError("need beta > 0, local_weight >= 0 and 0 <= min_prob < 1")
        if self.half_life_tokens is not None and self.half_life_tokens <= 0:
            raise ValueError("half_life_tokens must be positive or None")


class ConfidenceCorrection(AcceptanceCounts):
    """Online correction of draft confidences: observed / expected accepted tokens per (level, bin) cell.

    A node tested against the true continuation (its parent was on the true path) adds its raw probability to
    ``expected`` (the counts' ``tried``) and 1 to ``hits`` if it was right; the factor is ``rate(1.0)``, 1 without
    evidence. Cells are halved once ``expected`` passes ``memory``, so the factor follows drift in the traffic.
    """

    def __init__(self, levels: int, bins: int, strength: float, memory: float):
        super().__init__((levels, bins), strength)
        self.memory = memory
        self._factor: np.ndarray | None = None

    @property
    def expected(self) -> np.ndarray:
        return self.tried

    def factor(self) -> np.ndarray:
        """[levels, bins] multiplier of raw confidences."""
        if self._factor is None:
            self._factor = self.rate(1.0)
        return self._factor

    def set(self, hits: np.ndarray, expected: np.ndarray) -> None:
        self.hits, self.tried, self._factor = hits, expected, None

    def update(self, level: np.ndarray, bins: np.ndarray, raw: np.ndarray, hit: np.ndarray) -> None:
        self.add((level, bins), hit.astype(np.float64), raw)
        full = self.tried > self.memory
        if full.any():
            self.scale(0.5, full)
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
    """Adaptive suffix speculator; see the module docstring. Thread-safe (one lock).

    Evidence: *global*, every finished output of the namespace (:mod:`.suffix_index`), and *local*, the request's
    prompt and output so far (``DecodeContext.array``). For the end of the context the speculator collects the
    occurrences of its last tokens in both, each with its match length ``m`` (global: the longest indexed order that
    matched, extended beyond it up to ``SuffixConfig.max_depth``; local: exact), a weight (global: halves every
    ``SuffixConfig.half_life_tokens`` tokens of age; local: ``SuffixConfig.local_weight``) and its continuation; only
    the most recent ``MAX_ROWS`` per match-length level and source are kept. :mod:`.suffix_tree` scores
    them into a draft tree.

    Online correction (``self_calibrate``): after each step the last draft is
    scored against the tokens that actually followed (whichever draft the
    engine verified), and per namespace, per (highest evidence level, probability
    bin) the ratio of observed to expected hits rescales later confidences, so
    they follow the traffic (e.g. a code namespace where long matches are surer
    than in chat).

    Learning: ``observe`` feeds the online correction; ``end`` appends the output to
    the namespace's global index. Cancelled requests are learned from too
    (``learn_cancelled``): their tokens are real target output. Memory is bounded
    per namespace (FIFO eviction of whole outputs), in total (the oldest outputs of
    any namespace go first) and in the number of namespaces (least recently used
    dropped). A hash collision in the index can only add a wrong candidate, never
    change the output: verification is lossless.
    """

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
            noise = ctx.noise if ctx.coupled else None
            draft, nodes = self._propose(ctx.array(), index, calib, budget, noise)
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
                if len(out) >= MIN_LEARN_TOKENS:
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
        shape = (len(self.config.levels), CORRECTION_BINS)
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
            while len(self._requests) > MAX_REQUESTS:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(ctx.request_id)
        return view

    def _calibration(self, namespace: str) -> ConfidenceCorrection:
        cal = self._calibrations.get(namespace)
        if cal is None:
            c = self.config
            cal = self._calibrations[namespace] = ConfidenceCorrection(len(c.levels), CORRECTION_BINS,
                                                                       c.calibration_strength, CORRECTION_MEMORY)
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
                 budget: int, noise: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
                 ) -> tuple[Draft, TreeNodes]:
        c = self.config
        depth = min(budget, MAX_DRAFT_DEPTH)
        if c.scoring == "suffixdecoding":
            return self._propose_sd(ctxbuf, index, budget, depth), NO_NODES
        local, glob = self._rows(ctxbuf, index, depth, MAX_ROWS)
        rows = Rows.concat([local, glob]) if len(glob) else local
        if not len(rows):
            return Draft.empty(self.name), NO_NODES
        active = self._levels <= rows.m.max() + depth - 1  # a prefix of the levels
        s = SortedRows.of(rows.cont)
        nodes = build_tree(s, rows.m[s.order], rows.w[s.order], self._levels[active], self._betas[active], budget,
                           depth, c.min_prob, c.tree, correction=None if calib is None else calib.factor(),
                           noise=noise)
        if not len(nodes):
            return Draft.empty(self.name), nodes
        return Draft(nodes.tokens, nodes.parents, nodes.probs, self.name, int(rows.m.max())), nodes

    def _propose_sd(self, ctxbuf: ContextBuffer, index: SuffixIndex | None, budget: int, depth: int) -> Draft:
        """SuffixDecoding's rule (baseline): best-scoring candidate over sources and match lengths."""
        c = self.config
        best: tuple[float, TreeNodes, int] = (0.0, NO_NODES, 0)
        for rows in self._rows(ctxbuf, index, depth, SD_MAX_ROWS, include_self=True):
            if not len(rows):
                continue
            s = SortedRows.of(rows.cont)
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
