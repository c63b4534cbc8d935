"""Online calibration of speculator confidence.

A speculator's ``Draft.probs[i]`` is its own guess that node ``i`` is accepted
given its parent was. Guesses are biased in ways that differ per speculator and
drift with the traffic, so the controller routes on *calibrated* probabilities
learned from what verification revealed (nodes labelled by ``Draft.label``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..speculators.base import Draft
from ..speculators.confidence import AcceptanceCounts, shrunk_rate

__all__ = ["Calibrator", "isotonic_rows", "label_nodes",
           "pool_adjacent_violators"]


HALF_LIFE = 256.0
"""Observed steps after which an outcome weighs half; shorter follows drift faster but is noisier."""
PRIOR_STRENGTH = 2.0
"""Pseudo-observations of the prior in every cell: small, so a few dozen outcomes dominate it."""
DEPTH_EDGES = (1, 2, 3, 4, 5, 7, 10, 15)
"""Lower edges of the depth buckets (depth 1 = child of the pending token); the last bucket is open."""
CONF_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
"""Edges of the raw-confidence bins; finer near 1 where count-based speculators put most nodes."""
FLOOR = 0.005
"""Calibrated probabilities are clipped to [FLOOR, 1 - FLOOR]: never certain either way."""
FAST_HALF_LIFE = 16.0
"""Half-life of the recent-outcome counts that detect an abrupt change."""
CHANGE_Z = 3.0
"""Standard errors by which recent outcomes must differ from the long run to declare a change."""
CHANGE_MIN_COUNT = 6.0
"""Recent (decayed) outcomes a cell needs before a change can be declared in it."""


def label_nodes(draft: Draft, emitted: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which nodes of ``draft`` the step's emitted tokens decide, and whether each was accepted
    (:meth:`Draft.label` without the depths)."""
    idx, hit, _ = draft.label(emitted)
    return idx, hit


def _clean(conf: np.ndarray) -> np.ndarray:
    """Confidences clipped to [0, 1], NaN read as 0."""
    c = np.clip(conf, 0.0, 1.0)
    if np.isnan(c).any():
        c = np.where(np.isnan(c), 0.0, c)
    return c


def pool_adjacent_violators(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) least-squares fit of ``y``; ``w`` > 0.

    Example: ``y = [0.2, 0.6, 0.4, 0.9]`` with unit weights -> ``[0.2, 0.5, 0.5, 0.9]``.
    """
    if len(y) < 2 or bool(np.all(y[1:] >= y[:-1])):
        return np.array(y, dtype=np.float64)
    vals: list[float] = []
    wts: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            wts[-2] = wsum
            sizes[-2] += sizes[-1]
            del vals[-1], wts[-1], sizes[-1]
    return np.repeat(np.asarray(vals), sizes)


def isotonic_rows(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise weighted isotonic fit of ``y`` [rows, bins] (same result as pool-adjacent-violators),
    vectorised with the min-max formula ``f_i = max_{j<=i} min_{k>=i} mean_w(y[j..k])``."""
    rows, b = y.shape
    zeros = np.zeros((rows, 1))
    cy = np.concatenate([zeros, np.cumsum(w * y, axis=1)], axis=1)  # [rows, b + 1]
    cw = np.concatenate([zeros, np.cumsum(w, axis=1)], axis=1)
    j = np.arange(b)[:, None]
    k = np.arange(b)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = (cy[:, None, 1:] - cy[:, :-1, None]) / (cw[:, None, 1:] - cw[:, :-1, None])  # [rows, j, k]
    avg = np.where(k >= j, avg, np.inf)
    upper = np.minimum.accumulate(avg[:, :, ::-1], axis=2)[:, :, ::-1]  # min over k' >= k
    upper = np.where(j <= k, upper, -np.inf)  # [rows, j, i], only j <= i counts
    return upper.max(axis=1)


@dataclass
class _Table:
    """Decayed counts of one speculator: [depth buckets, confidence bins]."""

    slow: AcceptanceCounts  # decayed with ``HALF_LIFE``
    fast: AcceptanceCounts  # the same outcomes, decayed with ``FAST_HALF_LIFE``
    conf: np.ndarray  # decayed sum of raw confidences, for the prior mean and the reliability summary
    calibrated: np.ndarray | None = None  # cached estimates, None when never fitted
    steps: int = 0
    changes: int = 0  # cells whose history was dropped after a detected change
    fitted_at: int = -1  # ``steps`` when ``calibrated`` was computed
    # prequential reliability: the calibrated prediction made *before* each outcome was learned, by predicted bin
    pred_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pred_hit: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pred_n: np.ndarray = field(default_factory=lambda: np.zeros(0))


class Calibrator:
    """Per-speculator map from (raw confidence, depth) to acceptance probability, learned online.

    Model. For each speculator the map (raw confidence, depth) -> acceptance
    probability is a table of cells, one per (depth bucket, confidence bin). A
    cell holds exponentially decayed counts of accepted ``a`` and tried ``t`` nodes
    and the estimate is the Beta-posterior mean (:mod:`adaspec.speculators.confidence`)

        p = (a + k * m) / (t + k)

    with prior strength ``k`` and prior mean ``m``: the bin's mean raw confidence at
    depth 1 (trust the speculator until evidence says otherwise) and, at deeper
    buckets, the fitted map of the bucket above (deep cells see little data, so
    they borrow from shallower ones). Within a depth bucket the estimates are then
    made non-decreasing in raw confidence by isotonic regression weighted by the
    data ``t`` (the pool-adjacent-violators solution; cells without data conform
    to the cells with data instead of pulling them), since a more confident guess
    should never be calibrated lower than a less confident one. Decay by ``0.5 ** (1 / HALF_LIFE)`` per
    observed step makes recent outcomes weigh more, so the map follows drift; an
    abrupt change (a cell's recent outcomes, counted with a short half-life,
    contradicting its long-run rate by several standard errors) drops the cell's
    long history at once.

    Labels (:meth:`Draft.label`): for *any* draft of a step, chosen or not, a node whose parent path equals the
    emitted tokens was (or would have been) tried, and accepted iff its token is the next emitted one. Under
    greedy decoding this is exact for counterfactual drafts as well; under sampling it scores the event "the
    target sampled this token", whose probability is the one-hot acceptance probability.
    """

    def __init__(self, max_refit_interval: int = 16):
        """``max_refit_interval``: most observed steps between refits of the map (refitting costs ~0.1 ms; one step
        barely moves it; tests set 1 to compare against a fresh fit)."""
        self.max_refit_interval = max_refit_interval
        self._depth_edges = np.asarray(DEPTH_EDGES)
        self._inner_conf = np.asarray(CONF_EDGES[1:-1])
        edges = np.asarray(CONF_EDGES)
        self._centers = (edges[:-1] + edges[1:]) / 2
        self._decay = 0.5 ** (1.0 / HALF_LIFE)
        self._fast_decay = 0.5 ** (1.0 / FAST_HALF_LIFE)
        self._tables: dict[str, _Table] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return len(DEPTH_EDGES), len(CONF_EDGES) - 1

    def _table(self, name: str) -> _Table:
        t = self._tables.get(name)
        if t is None:
            d, b = self.shape
            t = _Table(AcceptanceCounts((d, b), PRIOR_STRENGTH), AcceptanceCounts((d, b), 0.0),
                       np.zeros((d, b)), pred_sum=np.zeros(b), pred_hit=np.zeros(b), pred_n=np.zeros(b))
            self._tables[name] = t
        return t

    def _cells(self, conf: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        conf = _clean(conf)
        return (np.searchsorted(self._depth_edges, depth, side="right") - 1,
                np.searchsorted(self._inner_conf, conf, side="right"))

    def _fit(self, t: _Table) -> np.ndarray:
        """Posterior means with the hierarchical prior, made monotone in confidence per depth bucket."""
        k, eps = PRIOR_STRENGTH, FLOOR
        tried = t.slow.tried
        raw_mean = np.where(tried[0] > 1e-9, t.conf[0] / np.maximum(tried[0], 1e-9), self._centers)
        out = np.empty_like(tried)
        prior = np.clip(raw_mean, eps, 1 - eps)
        for d in range(out.shape[0]):  # each depth's prior is the fit of the depth above
            post = t.slow.rate(prior, d)
            if np.any(post[1:] < post[:-1]):
                # cells with data dominate the monotone fit; cells without only conform to them
                post = isotonic_rows(post[None], tried[d][None] + 1e-3)[0]
            prior = out[d] = np.clip(post, eps, 1 - eps)
        return out

    def _fitted(self, t: _Table) -> np.ndarray:
        """The cached fit, refreshed after every step early on and every ~``steps / 8`` steps (at most
        ``max_refit_interval``) later, when one more step barely moves it."""
        interval = min(self.max_refit_interval, max(1, t.steps // 8))
        if t.calibrated is None or t.steps - t.fitted_at >= interval:
            t.calibrated = self._fit(t)
            t.fitted_at = t.steps
        return t.calibrated

    def probability(self, name: str, conf: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Calibrated conditional acceptance probability for raw confidences at depths (same shapes)."""
        t = self._table(name)
        calibrated = self._fitted(t)
        di, bi = self._cells(np.asarray(conf, dtype=np.float64), np.asarray(depth))
        return calibrated[di, bi]

    def calibrate(self, name: str, draft: Draft) -> Draft:
        """``draft`` with its probs replaced by calibrated ones (tokens, tree, source unchanged)."""
        if not len(draft):
            return draft
        return draft.with_probs(self.probability(name, draft.probs, draft.depths))

    def observe(self, name: str, draft: Draft, emitted: list[int] | np.ndarray) -> int:
        """Learn from one step's outcome for ``name``'s proposal; returns how many nodes were labelled."""
        idx, hit, depth = draft.label(emitted)
        if not len(idx):
            return 0
        t = self._table(name)
        conf = draft.probs[idx]
        # score the prediction first (prequential), then learn
        pred = self.probability(name, conf, depth)
        pb = np.searchsorted(self._inner_conf, pred, side="right")
        nb = len(t.pred_n)
        t.pred_sum += np.bincount(pb, pred, nb)
        t.pred_hit += np.bincount(pb, hit.astype(np.float64), nb)
        t.pred_n += np.bincount(pb, None, nb)
        t.slow.scale(self._decay)
        t.conf *= self._decay
        t.fast.scale(self._fast_decay)
        di, bi = self._cells(conf, depth)
        shape = t.conf.shape
        flat = di * shape[1] + bi
        hits = np.bincount(flat, hit.astype(np.float64), t.conf.size).reshape(shape)
        tried = np.bincount(flat, None, t.conf.size).reshape(shape)
        t.slow.add(slice(None), hits, tried)
        t.fast.add(slice(None), hits, tried)
        t.conf += np.bincount(flat, _clean(conf), t.conf.size).reshape(shape)
        t.steps += 1
        self._detect_change(t, di, bi)
        return len(idx)

    def _detect_change(self, t: _Table, di: np.ndarray, bi: np.ndarray) -> None:
        """Drop a cell's long history when its recent outcomes contradict it.

        With ``n`` recent (fast-decayed) outcomes at rate ``f`` and the long-run rate ``s``, a
        change is declared when ``|f - s| > z * sqrt(s (1 - s) / n)``; the cell's long-run counts
        are then replaced by the recent ones (and the map refitted at once), so an abrupt drift is
        followed within ~10 steps instead of ~a half-life.
        """
        n = t.fast.tried[di, bi]
        ok = n >= CHANGE_MIN_COUNT
        if not ok.any():
            return
        di, bi, n = di[ok], bi[ok], n[ok]
        f = t.fast.hits[di, bi] / n
        slow = shrunk_rate(t.slow.hits[di, bi], t.slow.tried[di, bi], 0.5, 1.0)
        changed = np.abs(f - slow) > CHANGE_Z * np.sqrt(slow * (1 - slow) / n)
        if changed.any():
            di, bi = di[changed], bi[changed]
            scale = t.fast.tried[di, bi] / np.maximum(t.slow.tried[di, bi], 1e-12)
            t.conf[di, bi] *= scale
            t.slow.hits[di, bi] = t.fast.hits[di, bi]
            t.slow.tried[di, bi] = t.fast.tried[di, bi]
            t.changes += int(changed.sum())
            t.calibrated = None  # refit now

    def names(self) -> list[str]:
        return sorted(self._tables)

    def reliability(self, name: str) -> list[dict]:
        """Predicted vs realised acceptance per bin of the calibrated prediction (prequential, undecayed).

        Each row: ``bin`` [lo, hi), ``n`` nodes, ``predicted`` mean calibrated probability at the time
        of the prediction, ``realised`` accepted fraction. A calibrated map has predicted ~ realised.
        """
        t = self._table(name)
        edges = CONF_EDGES
        rows = []
        for b in range(len(edges) - 1):
            n = float(t.pred_n[b])
            if n > 0:
                rows.append({"bin": [edges[b], edges[b + 1]], "n": int(n), "predicted": float(t.pred_sum[b] / n),
                             "realised": float(t.pred_hit[b] / n)})
        return rows

    def raw_reliability(self, name: str) -> list[dict]:
        """Per raw-confidence bin (all depths pooled, decayed counts): the speculator's stated
        confidence, the realised rate and the current calibrated estimate at depth 1."""
        t = self._table(name)
        calibrated = self._fit(t)
        edges = CONF_EDGES
        tried, hit, conf = t.slow.tried.sum(0), t.slow.hits.sum(0), t.conf.sum(0)
        return [{"bin": [edges[b], edges[b + 1]], "weight": float(tried[b]), "stated": float(conf[b] / tried[b]),
                 "realised": float(hit[b] / tried[b]), "calibrated_depth1": float(calibrated[0, b])}
                for b in range(len(edges) - 1) if tried[b] > 1e-6]

    def expected_calibration_error(self, name: str) -> float:
        """Count-weighted mean |predicted - realised| over the prequential reliability bins."""
        rows = self.reliability(name)
        n = sum(r["n"] for r in rows)
        return sum(r["n"] * abs(r["predicted"] - r["realised"]) for r in rows) / n if n else 0.0

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {name: {"hit": t.slow.hits.tolist(), "tried": t.slow.tried.tolist(), "conf": t.conf.tolist(),
                       "steps": t.steps}
                for name, t in self._tables.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore learned counts, all tables or none: raises ValueError for a table of another shape (other
        bins) or with negative or non-finite counts."""
        shape = self.shape
        if not isinstance(state, dict):
            raise ValueError(f"calibration state must be an object, not {type(state).__name__}")
        tables = {}
        for name, s in state.items():
            if not isinstance(s, dict):
                raise ValueError(f"calibration state for {name!r} must be an object")
            try:
                arrs = [np.asarray(s[k], dtype=np.float64) for k in ("hit", "tried", "conf")]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"calibration state for {name!r} is unreadable: {e!r}") from None
            if any(a.shape != shape for a in arrs):
                raise ValueError(f"calibration state for {name!r} has shape {arrs[0].shape}, expected {shape}")
            if not all(np.all(np.isfinite(a)) and np.all(a >= 0) for a in arrs):
                raise ValueError(f"calibration state for {name!r} holds negative or non-finite counts")
            steps = s.get("steps", 0)
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                raise ValueError(f"calibration state for {name!r}: steps must be a non-negative integer")
            tables[name] = (arrs, steps)
        for name, (arrs, steps) in tables.items():
            t = self._table(name)
            t.slow.hits, t.slow.tried, t.conf = arrs
            t.fast.hits, t.fast.tried = np.zeros(shape), np.zeros(shape)
            t.steps = steps
            t.calibrated, t.fitted_at = None, -1
