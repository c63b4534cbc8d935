"""From occurrences to a draft tree: the suffix speculator's scoring.

An *occurrence* is an earlier position whose preceding tokens match the end of the context, with its match length
``m``, a weight and its *continuation* (the tokens that followed it); :class:`Rows` holds them. :func:`build_tree`
scores them into a draft tree, by evidence interpolated across match lengths (the default) or by SuffixDecoding's
rule (the baseline), best first by path probability, so ``Draft.prefix(k)`` is the best ``k``-node subtree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .base import PAD


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
class SortedRows:
    """Rows sorted by continuation; ``lcp[i]`` = leading tokens shared by sorted rows i and i+1."""

    cont: np.ndarray  # [R, D] int
    order: np.ndarray  # [R] original row of each sorted row
    lcp: np.ndarray  # int64

    @staticmethod
    def of(cont: np.ndarray) -> "SortedRows":
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
        return SortedRows(cs, order, lcp)


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


NO_NODES = TreeNodes(*(np.zeros(0, np.int64),) * 2, np.zeros(0), np.zeros(0), *(np.zeros(0, np.int64),) * 2)


def build_tree(s: SortedRows, m: np.ndarray, w: np.ndarray, levels: np.ndarray, betas: np.ndarray, budget: int,
               max_depth: int, min_prob: float, tree: bool, grow: bool = True, count_ended: bool = False,
               correction: np.ndarray | None = None,
               noise: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> TreeNodes:
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
    renormalised if they then exceed 1. ``noise`` (a sampled request): ``(tokens, depths) -> `` the seeded
    sampler's Gumbel noise of each token at each depth (1: after the pending token); each node's *guess* is then
    its child with the highest ``log p + noise`` (the coupled guess, ``DecodeContext.guess``), which trades
    places with its most likely child (probabilities included), so that a chain follows the guesses.

    The draft is the ``budget`` nodes of highest path probability that reach
    ``min_prob`` (ties: shallower first), which is what best-first expansion
    yields and always a subtree; with ``tree=False`` only each node's most
    likely child is eligible (a chain).

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

    Scoring (``scoring="suffixdecoding"``)
        SuffixDecoding's rule as a baseline: for every match length ``L`` and each
        source separately, occurrences with ``m >= L``; ``p = child.count /
        node.count`` (occurrences that end at the node count in ``node.count``,
        the context's own end included for the local source); at most ``factor * L
        + offset`` tokens and tree depth ``max_depth - L``; path probability >=
        ``min_prob``; the candidate with the highest score (sum of path
        probabilities) wins. It looks at up to ``suffix.SD_MAX_ROWS``
        occurrences per source rather than all of them.
    """
    R = len(s.cont)
    D = min(max_depth, s.cont.shape[1])
    if R == 0 or budget <= 0 or D <= 0:
        return NO_NODES
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
    if noise is not None:
        p = _guess_first(p, tok, pidx, starts // R + 1, noise)
    if not tree:  # only the most likely child of each node may be drafted
        o = np.lexsort((-p, pidx))
        best = np.zeros(G, dtype=bool)
        best[o[np.r_[True, pidx[o][1:] != pidx[o][:-1]]]] = True
        p = np.where(best, p, 0.0)
    path = np.cumprod(p[node_of].reshape(D, R), axis=0).ravel()[starts]  # [G] product down from the root
    cand = np.flatnonzero(path >= max(min_prob, 1e-12))
    if not len(cand):
        return NO_NODES
    chosen = cand[np.lexsort((starts[cand], -path[cand]))][:budget]  # starts grow with depth: ties go shallow
    where = np.full(G + 1, -1)
    where[chosen + 1] = np.arange(len(chosen))
    return TreeNodes(tok[chosen], where[pidx[chosen]], p[chosen], raw[chosen], top[chosen], bins[chosen])


GUESS_MIN_PROB = 0.01
"""Children less likely than this are not guessed (they would win the coupled draw rarely, and cost noise)."""


def _guess_first(p: np.ndarray, tok: np.ndarray, pidx: np.ndarray, depth: np.ndarray,
                 noise: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``p`` [G] with each parent's guessed child and most likely child trading probabilities (``build_tree``)."""
    live = np.flatnonzero(p >= GUESS_MIN_PROB)
    if not len(live):
        return p
    score = np.log(p[live]) + noise(tok[live], depth[live])
    o = live[np.lexsort((-score, pidx[live]))]  # per parent, the guess first
    guess = o[np.r_[True, pidx[o][1:] != pidx[o][:-1]]]
    o = live[np.lexsort((-p[live], pidx[live]))]  # per parent, the most likely first
    likely = o[np.r_[True, pidx[o][1:] != pidx[o][:-1]]]
    out = p.copy()
    out[guess], out[likely] = p[likely], p[guess]  # the same parents, in the same order
    return out
