"""Online cost model: how long the target takes to verify n tokens, and each speculator to propose.

The controller trades expected accepted tokens against time, so it needs c(n), the seconds of one target forward over
``n`` tokens. Its shape decides everything (steep on a CPU, nearly flat on a GPU), and nothing here assumes either:
the curve is measured from the forwards the engine runs (:class:`Curve` says how).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from pathlib import Path
from typing import Mapping

import numpy as np

from .calibration import pool_adjacent_violators

__all__ = ["Curve", "CostModel", "load_cost_curve", "parse_cost_curve"]


WINDOW = 31
"""Recent timings kept per size; the estimate is their median (a 31-sample median is within ~4% for 15% timing
noise, and follows a lasting change after ~16 timings)."""
EXPLORE_DISCOUNT = 0.8
"""Unmeasured target sizes are priced at this fraction of the interpolated estimate (optimism, bounded)."""
EXTRAPOLATION_SLOPE = 0.5
"""Beyond the largest measured size, grow at this fraction of the fitted slope (optimistic)."""
PRIOR_SLOPE = 0.1
"""Until two sizes are measured, each extra token is assumed to cost this fraction of a one-token forward: between
a GPU (~0.002) and llama.cpp on two CPU cores (~0.5), so early drafts stay modest."""


class Curve:
    """A non-decreasing cost curve over positive integer sizes, learned from noisy timings.

    Refitting (medians, isotonic fit, table) runs after every timing while few are known and
    every ``max_refit_interval`` timings later, and at once when a size is measured for the
    first time (so its exploration discount ends immediately).

    Per n it keeps the last ``WINDOW`` timings and take their
    median (robust to the spikes of a shared machine, follows drift within a
    window). Fit the medians with weighted isotonic regression (a forward over more
    tokens never costs less), interpolate linearly between measured sizes and
    extrapolate past the largest with a fraction of the fitted slope. Sizes never
    measured are priced at ``EXPLORE_DISCOUNT`` times that estimate: optimistic
    enough that the controller tries them once when they are close to the best
    choice, bounded so it does not chase them. Before two sizes are measured a
    prior shape stands in (each extra token costs ``PRIOR_SLOPE`` of a one-token
    forward), so the first drafts are modest rather than as large as the budget.
    An optional recorded curve (seed) gives the shape for unmeasured sizes,
    rescaled to the level of what was measured.
    """

    def __init__(self, window: int = 31, explore_discount: float = 1.0, extrapolation_slope: float = 0.5,
                 prior_slope: float | None = None, max_refit_interval: int = 8):
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.explore_discount = explore_discount
        self.extrapolation_slope = extrapolation_slope
        # relative cost of one more token while fewer than two sizes are measured; None: unknown costs are 0
        self.prior_slope = prior_slope
        self.max_refit_interval = max_refit_interval
        self._samples: dict[int, deque[float]] = {}
        self._medians: dict[int, float] = {}
        self._dirty: set[int] = set()
        self._seed: tuple[np.ndarray, np.ndarray] | None = None
        self._table: np.ndarray | None = None  # value(n) for n = 0..len-1, cached
        self._size = 34  # length of the cached table, grown on demand
        self._adds = 0
        self._adds_at_fit = 0
        self.version = 0  # bumped whenever the cached table is rebuilt

    def add(self, n: int, seconds: float) -> None:
        if n < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        q = self._samples.get(n)
        if q is None:
            q = self._samples[n] = deque(maxlen=self.window)
            self._table = None  # a newly measured size: refit now
        q.append(float(seconds))
        self._dirty.add(n)
        self._adds += 1
        if self._adds - self._adds_at_fit >= min(self.max_refit_interval, max(1, self._adds // 16)):
            self._table = None

    def seed(self, points: Mapping[int, float]) -> None:
        """A recorded curve {n: seconds} that shapes the estimate where nothing was measured."""
        items = sorted((int(k), float(v)) for k, v in points.items() if int(k) >= 1 and float(v) > 0)
        if not items:
            raise ValueError("a seed cost curve needs at least one positive point")
        ns = np.asarray([k for k, _ in items], dtype=np.float64)
        vals = pool_adjacent_violators(np.asarray([v for _, v in items]), np.ones(len(items)))
        self._seed = (ns, vals)
        self._table = None

    @property
    def count_sizes(self) -> int:
        """How many sizes have been measured."""
        return len(self._samples)

    def count(self, n: int) -> int:
        q = self._samples.get(n)
        return len(q) if q else 0

    @property
    def measured(self) -> dict[int, float]:
        """Median timing per measured size."""
        self._refresh_medians()
        return dict(sorted(self._medians.items()))

    def _refresh_medians(self) -> None:
        for n in self._dirty:
            xs = sorted(self._samples[n])
            m = len(xs)
            self._medians[n] = xs[m // 2] if m % 2 else 0.5 * (xs[m // 2 - 1] + xs[m // 2])
        self._dirty.clear()

    def _estimate(self, n: np.ndarray) -> np.ndarray:
        """Interpolated estimate before the exploration discount."""
        self._refresh_medians()
        if not self._medians:
            if self._seed is not None:
                return self._interp(n, *self._seed, factor=1.0)
            if self.prior_slope is None:
                return np.zeros(n.shape)
            return 1.0 + self.prior_slope * (n - 1)  # a unit-free shape: only ratios matter until measured
        sizes = sorted(self._medians)
        xs = np.asarray(sizes, dtype=np.float64)
        ys = pool_adjacent_violators(np.asarray([self._medians[k] for k in sizes]),
                                     np.asarray([len(self._samples[k]) for k in sizes], dtype=np.float64))
        if self._seed is not None:
            sx, sy = self._seed
            level = float(np.median(ys / self._interp(xs, sx, sy, 1.0)))  # measured / recorded at measured sizes
            return np.where((n >= xs[0]) & (n <= xs[-1]), np.interp(n, xs, ys),
                            level * self._interp(n, sx, sy, 1.0))
        return self._interp(n, xs, ys, self.extrapolation_slope)

    def _interp(self, n: np.ndarray, xs: np.ndarray, ys: np.ndarray, factor: float) -> np.ndarray:
        """Linear between points; outside, the least-squares slope (times ``factor`` above the range)."""
        if len(xs) > 1:
            dx = xs - xs.mean()
            slope = factor * max(0.0, float((dx * (ys - ys.mean())).sum() / (dx * dx).sum()))
        elif self.prior_slope is not None:  # one point: the prior's relative slope at its level
            slope = self.prior_slope * ys[0] / (1.0 + self.prior_slope * (xs[0] - 1))
        else:
            slope = 0.0
        inside = np.interp(n, xs, ys)
        above = ys[-1] + slope * (n - xs[-1])
        below = np.maximum(ys[0] - slope * (xs[0] - n), 0.5 * ys[0])
        return np.where(n > xs[-1], above, np.where(n < xs[0], below, inside))

    def values(self, upto: int) -> np.ndarray:
        """Estimates for sizes 0..upto (index = size; index 0 is unused and equals index 1)."""
        if self._table is None or len(self._table) <= upto:
            size = self._size = max(upto + 1, self._size)
            n = np.arange(size, dtype=np.float64)
            n[0] = 1
            est = self._estimate(n)
            measured = np.zeros(size, dtype=bool)
            known = [k for k in self._samples if k < size]
            measured[known] = True
            measured[0] = measured[1]
            self._table = np.where(measured, est, est * self.explore_discount)
            self._adds_at_fit = self._adds
            self.version += 1
        return self._table[: upto + 1]

    def value(self, n: int) -> float:
        table = self.values(n) if self._table is None or len(self._table) <= n else self._table
        return float(table[n])


class CostModel:
    """The target's verify cost per size (chains and trees apart) and each speculator's proposal cost."""

    def __init__(self, seed: Mapping[int, float] | None = None):
        self.chain = Curve(WINDOW, EXPLORE_DISCOUNT, EXTRAPOLATION_SLOPE, PRIOR_SLOPE)
        self.tree = Curve(WINDOW, EXPLORE_DISCOUNT, EXTRAPOLATION_SLOPE, PRIOR_SLOPE)
        self._propose: dict[str, Curve] = {}
        self._tree_key: tuple | None = None
        self._tree_table = np.zeros(0)
        if seed is not None:
            self.chain.seed(seed)

    @classmethod
    def from_json(cls, path: str | Path) -> "CostModel":
        return cls(seed=load_cost_curve(path))

    def observe_verify(self, n: int, seconds: float, tree: bool = False) -> None:
        (self.tree if tree else self.chain).add(n, seconds)

    def observe_propose(self, name: str, budget: int, seconds: float) -> None:
        curve = self._propose.get(name)
        if curve is None:
            curve = self._propose[name] = Curve(WINDOW, explore_discount=1.0, extrapolation_slope=1.0)
        curve.add(max(1, budget), seconds)

    others: int = 0
    """The other requests of the batch whose step is being planned: each adds its pending token's row to the
    forward, and emits a token whatever the drafts. While it is set, ``verify_costs(upto)[n]`` is the time of a
    forward of ``others + n`` rows, and a controller weighs a draft's tokens against the ``1 + others`` tokens
    the step yields without it: a draft must pay for every request's wait (``control/batch.py``)."""

    def verify_costs(self, upto: int) -> tuple[np.ndarray, np.ndarray]:
        """(chain, tree) estimated seconds for n = 0..upto verified tokens (after ``others`` rows of the rest of a
        batch); a tree size never measured is priced like a chain of that size scaled by the measured tree/chain
        ratio."""
        if self.others:
            chain, tree = self._verify_costs(upto + self.others)
            return chain[self.others:], tree[self.others:]
        return self._verify_costs(upto)

    def step_costs(self, upto: int) -> np.ndarray:
        """Seconds of a forward of n = 0..upto rows, whoever's rows they are."""
        return self.chain.values(upto)

    def _verify_costs(self, upto: int) -> tuple[np.ndarray, np.ndarray]:
        chain = self.chain.values(upto)
        if not self.tree.count_sizes:
            return chain, chain
        tree = self.tree.values(upto)
        key = (self.chain.version, self.tree.version, len(chain))
        if self._tree_key != key:
            meas = self.tree.measured
            ratio = statistics.median([v / max(chain[k], 1e-12) for k, v in meas.items() if k < len(chain)] or [1.0])
            has = np.zeros(len(chain), dtype=bool)
            has[[k for k in meas if k < len(chain)]] = True
            self._tree_table = np.where(has, tree, chain * max(ratio, 1.0))
            self._tree_key = key
        return chain, self._tree_table

    def verify_cost(self, n: int, tree: bool = False) -> float:
        chain, tr = self.verify_costs(n)
        return float((tr if tree else chain)[n])

    def propose_cost(self, name: str, budget: int) -> float:
        """Estimated seconds for one proposal of ``budget`` nodes; 0 until measured (try it once)."""
        curve = self._propose.get(name)
        return curve.value(max(1, budget)) if curve is not None else 0.0

    def summary(self) -> dict:
        return {"verify_chain": {str(k): v for k, v in self.chain.measured.items()},
                "verify_tree": {str(k): v for k, v in self.tree.measured.items()},
                "propose": {name: {str(k): v for k, v in c.measured.items()} for name, c in self._propose.items()}}


def load_cost_curve(path: str | Path) -> dict[int, float]:
    """Read a recorded verify-cost curve: JSON ``{n: seconds}``, or an object holding one under ``"verify"``.

    ``n`` is the number of tokens in the forward (pending token + draft nodes).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read cost curve {path}: {e}") from e
    return parse_cost_curve(data, str(path))


def parse_cost_curve(data: object, where: str = "cost curve") -> dict[int, float]:
    if isinstance(data, dict) and isinstance(data.get("verify"), dict):
        data = data["verify"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected a JSON object {{n: seconds}}")
    out: dict[int, float] = {}
    for k, v in data.items():
        try:
            n, s = int(k), float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: entry {k!r}: {v!r} is not n: seconds") from None
        if n < 1 or not math.isfinite(s) or s <= 0:
            raise ValueError(f"{where}: entry {k!r}: {v!r} needs n >= 1 and seconds > 0")
        out[n] = s
    return out
