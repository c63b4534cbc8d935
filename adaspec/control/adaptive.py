"""The confidence-aware controller: which speculators to ask, how far ahead, and which draft to verify.

Each step it verifies the candidate draft with the highest expected tokens per second, from calibrated
confidences (``calibration``) and measured costs (``costs``); the rule is spelled out on
:class:`AdaptiveController`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from ..speculators.base import DecodeContext, Draft
from ..stats import StepCounts
from .base import Controller, StepFeedback, StepPlan
from .calibration import Calibrator
from .costs import CostModel

__all__ = ["AdaptiveConfig", "AdaptiveController", "AdaptivePlan", "best_prefix", "merge_drafts", "normalise_siblings"]

STATE_VERSION = 1
_EMPTY = Draft.empty()
WARMUP = 4
"""A speculator is always asked during its first ``WARMUP`` queries, to measure it."""
EXPLORE_FRACTION = 0.01
"""Per skipped speculator, the share of plain-decoding time spent probing it: small, and still enough to notice
within a few hundred steps that a skipped speculator became useful."""
MAX_REQUESTS = 1024
"""Per-request summaries kept (oldest dropped first): the server reads one when its request ends."""


@dataclass
class AdaptiveConfig:
    """Controller settings. Every field has a default that needs no tuning."""

    initial_budget: int = 8
    """Nodes asked of a speculator before anything is known about it."""
    min_budget: int = 2
    """Smallest budget a queried speculator is given."""
    max_budget: int = 32
    """Largest budget (draft nodes); on a GPU, where c(n) is flat, budgets grow up to it."""
    smoothing: float = 0.1
    """Weight of the newest step in each speculator's running gain estimate (~10-step memory)."""
    trees: bool = True
    """Whether the target may verify trees; if not, tree proposals are cut to their most likely chain."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_budget <= self.initial_budget <= self.max_budget:
            raise ValueError("budgets must satisfy 1 <= min_budget <= initial_budget <= max_budget")
        if not 0 < self.smoothing <= 1:
            raise ValueError("smoothing must be in (0, 1]")


# -- pure helpers ------------------------------------------------------------------------------------


def normalise_siblings(draft: Draft) -> Draft:
    """Scale each sibling group whose conditional probabilities sum above 1 down to sum 1."""
    if not len(draft) or (draft.is_chain and bool(np.all(draft.probs <= 1.0))):
        return draft
    sums = np.zeros(len(draft) + 1)
    np.add.at(sums, draft.parents + 1, draft.probs)
    scale = np.where(sums > 1.0, 1.0 / np.maximum(sums, 1e-12), 1.0)
    if np.all(scale == 1.0):
        return draft
    return draft.with_probs(draft.probs * scale[draft.parents + 1])


def best_prefix(draft: Draft, chain_cost: np.ndarray, tree_cost: np.ndarray,
                sunk: float, base: float = 1.0) -> tuple[np.ndarray, int, float, float]:
    """The best-first prefix of ``draft`` with the highest expected rate.

    ``chain_cost[n]`` / ``tree_cost[n]``: verify seconds for ``n`` tokens (indexable up to
    ``len(draft) + 1``). Returns ``(order, k, E, rate)``: node indices best first, how many
    to keep (0 = none), their expected accepted tokens, and ``(base + E) / (sunk + c(1 + k))``.
    ``base`` is the tokens the step emits without any draft: 1 for one request, the batch size for
    the drafts of a whole batch taken as one forest.
    """
    empty_rate = base / max(sunk + chain_cost[1], 1e-12)
    n = len(draft)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0, 0.0, empty_rate
    if draft.is_chain:  # prefixes are the only subtrees
        order = np.arange(n)
        cum = np.cumsum(np.cumprod(draft.probs))  # [n] E for keeping 1..n nodes
        cost = chain_cost[2 : n + 2] + sunk
    else:
        pp = draft.path_probs  # [n]
        order = np.lexsort((np.arange(n), -pp))  # by path probability, ancestors first on ties
        cum = np.cumsum(pp[order])
        ks = np.arange(1, n + 1)
        is_chain = np.maximum.accumulate(draft.depths[order]) == ks
        cost = np.where(is_chain, chain_cost[ks + 1], tree_cost[ks + 1]) + sunk
    rate = (base + cum) / np.maximum(cost, 1e-12)
    j = int(np.argmax(rate))
    if rate[j] <= empty_rate:
        return order, 0, 0.0, empty_rate
    return order, j + 1, float(cum[j]), float(rate[j])


def _subset(draft: Draft, keep: np.ndarray, source: str | None = None) -> Draft:
    """The sub-draft of nodes ``keep`` (ancestor-closed), in the original topological order."""
    sel = np.sort(keep)
    if len(sel) == len(draft) or np.array_equal(sel, np.arange(len(sel))):
        d = draft.prefix(len(sel))  # a prefix keeps the draft distribution of chain drafts
        return d if source is None else Draft(d.tokens, d.parents, d.probs, source, d.match_len, d.dist)
    remap = np.full(len(draft), -1, dtype=np.int64)
    remap[sel] = np.arange(len(sel))
    old_par = draft.parents[sel]
    parents = np.where(old_par < 0, -1, remap[np.maximum(old_par, 0)])
    return Draft(draft.tokens[sel], parents, draft.probs[sel], draft.source if source is None else source,
                 draft.match_len)


def main_chain(draft: Draft) -> Draft:
    """The chain that follows, from the root, the child with the highest probability."""
    if draft.is_chain:
        return draft
    kids = draft.children()
    keep, node = [], -1
    while kids.get(node):
        node = max(kids[node], key=lambda i: draft.probs[i])
        keep.append(node)
    return _subset(draft, np.asarray(keep, dtype=np.int64))


def merge_drafts(drafts: Sequence[Draft]) -> tuple[Draft, list[int]]:
    """Union of draft trees: nodes with the same path are one node with the highest probability.

    Returns the merged draft and, per node, a bit mask of the drafts that proposed it.
    Example: chains ``[5, 6]`` (0.9, 0.8) and ``[5, 7]`` (0.5, 0.6) merge into
    ``5 (0.9) -> {6 (0.8), 7 (0.6)}``.
    """
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    owners: list[int] = []
    for b, d in enumerate(drafts):
        local: list[int] = []
        for t, p, q in zip(d.tokens.tolist(), d.parents.tolist(), d.probs.tolist()):
            key = (-1 if p < 0 else local[p], t)
            j = index.get(key)
            if j is None:
                j = index[key] = len(tokens)
                tokens.append(t)
                parents.append(key[0])
                probs.append(q)
                owners.append(0)
            elif q > probs[j]:
                probs[j] = q
            owners[j] |= 1 << b
            local.append(j)
    merged = Draft(np.asarray(tokens, dtype=np.int64), np.asarray(parents, dtype=np.int64),
                   np.asarray(probs, dtype=np.float64), "+".join(d.source for d in drafts),
                   max((d.match_len for d in drafts), default=0))
    return normalise_siblings(merged), owners


# -- state ---------------------------------------------------------------------------------------------


@dataclass
class _SpecState:
    budget: float
    gain: float = 0.0  # running E of its best standalone candidate
    size: float = 0.0  # running node count of that candidate
    marginal: float = 0.0  # running share of the step's best rate that would be lost without it
    queries: int = 0
    probes: int = 0  # queries made on exploration credit
    credit: float = 0.0  # seconds of exploration earned while skipped


@dataclass(frozen=True)
class AdaptivePlan(StepPlan):
    """A step's plan with what ``choose`` and ``observe`` need of the decisions before them."""

    probes: int = 0  # speculators asked on exploration credit
    # name -> its best prefix alone: (E, nodes, rate)
    standalone: Mapping[str, tuple[float, int, float]] = field(default_factory=dict)
    empty_rate: float = 0.0  # rate of verifying no draft, at this step's sunk cost
    best_rate: float = 0.0  # rate of the chosen candidate
    choose_s: float = 0.0  # time choose() took


@dataclass
class _RequestSummary(StepCounts):
    """The steps of one request as the controller saw them (emitted tokens include a stop token)."""

    controller_s: float = 0.0
    probes: int = 0

    def to_dict(self) -> dict:
        return {"steps": self.forwards, "speculated_steps": self.draft_steps,
                "empty_steps": self.forwards - self.draft_steps, "chosen": dict(self.chosen),
                "verified_tokens": self.forwards + self.drafted, "emitted": self.output_tokens,
                "mean_accepted": self.mean_accepted,
                "predicted_accepted": self.predicted_accepted, "realised_accepted": self.accepted,
                "verify_s": self.verify_s, "propose_s": self.propose_s, "controller_s": self.controller_s,
                "probes": self.probes}


# -- the controller ------------------------------------------------------------------------------------


class AdaptiveController(Controller):
    """Chooses speculators, budgets and drafts by expected tokens per second, learning costs and
    calibration online. ``AdaptiveController()`` is the production default; no argument is required.

    Objective. A step that verifies a draft of ``n`` nodes costs ``S + c(1 + n)``
    seconds (``S`` the proposal time already spent, ``c`` the target forward over
    the pending token and the draft) and emits ``1 + E`` tokens on average, where
    ``E`` is the sum over nodes of their calibrated path probabilities (REFERENCES,
    "Choosing the lookahead"). Each step the controller verifies the candidate
    with the highest expected tokens per second

        rate = (1 + E) / (S + c(1 + n)).

    Worked example: a chain whose nodes are each accepted with calibrated
    probability 0.9, on llama.cpp-like costs c(1..5) = 13, 19.3, 25.6, 31.9,
    38.2 ms and S = 0: keeping 0..4 nodes gives E = 0, 0.9, 1.71, 2.44, 3.10 and
    rates 76.9, 98.4, 105.9, 107.8, 107.2 tok/s, so 3 nodes are verified. With a
    flat GPU-like c(n) the same chain is verified in full.

    Candidates: "no speculation" (``Draft.empty()``: rate ``1 / (S + c(1))``), every
    best-first prefix of each calibrated proposal (for a chain, its prefixes; for a
    tree, the ``k`` nodes of highest path probability, which always form a subtree
    because a child's path probability never exceeds its parent's), and the same
    for the merged tree of the proposals that are worth verifying on their own
    (union of nodes sharing a path; a node proposed by several speculators keeps
    the highest calibrated probability).
    Probabilities of siblings are mutually exclusive events (one token follows a
    given prefix), so siblings whose calibrated probabilities sum above 1 are
    scaled down.

    Planning. Before proposals exist, ``plan`` estimates per speculator the
    expected gain of asking it (an average of ``E`` and ``n`` of its best candidate
    over recent steps) and its cost (its measured proposal time at the planned
    budget plus the controller's own time per proposal), and asks the single
    speculator with the best projected rate, or none when plain decoding projects
    faster. Another speculator joins when its *marginal* share -- the running
    fraction of the step's best rate that would be lost without it, e.g. a prompt
    lookup that wins only on copy-heavy steps -- times the projected step time
    covers its cost. Every speculator not asked accrues exploration credit of
    ``EXPLORE_FRACTION`` x c(1) per step (in a batch, each request its share of the
    batch's step) and is probed when the credit covers its
    cost: one that costs half a forward is probed every ~50 steps, which bounds
    the time spent exploring at ``EXPLORE_FRACTION`` of plain decoding time per
    speculator. The budget of a speculator grows by half when its whole proposal
    was worth verifying and the budget cut it, and otherwise relaxes toward the
    length worth verifying plus a margin.

    What the controller learns from (``observe``): the verify time of the size it
    chose (``CostModel``), each speculator's proposal time, and for every proposal
    of the step, chosen or not, which nodes the emitted tokens confirm or refute
    (``Calibrator``). Exploration never affects losslessness: any draft verifies
    exactly; only speed is at stake.
    """

    def __init__(self, config: AdaptiveConfig | None = None, costs: CostModel | None = None,
                 calibrator: Calibrator | None = None, timer: Callable[[], float] = time.perf_counter):
        """``timer`` measures the controller's own work, which is charged to the proposals it weighs
        (a simulation passes its virtual clock so projections stay deterministic)."""
        self.config = config or AdaptiveConfig()
        self.timer = timer
        self.costs = costs or CostModel()
        self.calibrator = calibrator or Calibrator()
        self._specs: dict[str, _SpecState] = {}
        self._requests: OrderedDict[str, _RequestSummary] = OrderedDict()
        self._lock = threading.RLock()
        self._overhead = 0.0  # running seconds of controller work per proposal considered
        self.steps = 0

    # -- protocol ------------------------------------------------------------------------------

    def plan(self, ctx: DecodeContext, names: Sequence[str]) -> AdaptivePlan:
        t0 = self.timer()
        with self._lock:
            cfg = self.config
            chain, _ = self.costs.verify_costs(cfg.max_budget + 1)
            c1 = float(chain[1])
            base = 1.0 + self.costs.others  # tokens the step emits without a draft (every request of a batch)
            states = [(name, self._state(name)) for name in names]
            budgets = {name: self._budget(st) for name, st in states}
            # a proposal costs its own time plus the controller's time to calibrate, weigh and learn from it
            pcost = {name: self.costs.propose_cost(name, budgets[name]) + self._overhead for name, _ in states}
            # the single speculator with the best projected rate, if it beats plain decoding
            best, best_rate, step_s = None, base / max(c1, 1e-12), c1
            for name, st in states:
                size = min(int(round(st.size)), len(chain) - 2)
                t = pcost[name] + chain[1 + size]
                rate = (base + st.gain) / max(t, 1e-12)
                if rate > best_rate:
                    best, best_rate, step_s = name, rate, t
            probes = 0
            out: dict[str, int] = {}
            for name, st in states:
                # others join when the share of throughput they add, over the step, covers their cost
                ask = name == best or st.queries < WARMUP or st.marginal * step_s > pcost[name]
                if not ask:
                    # c1 is the whole batch's step; each of its requests plans, so the batch probes a speculator
                    # for EXPLORE_FRACTION of its step time, as a single stream does
                    st.credit += EXPLORE_FRACTION * c1 / base
                    if st.credit >= pcost[name]:
                        ask = True
                        st.probes += 1
                        probes += 1
                if ask:
                    st.credit = 0.0
                out[name] = budgets[name] if ask else 0
            self._summary(ctx.request_id).controller_s += self.timer() - t0
            return AdaptivePlan(out, probes=probes)

    def choose(self, ctx: DecodeContext, plan: StepPlan, proposals: Mapping[str, Draft],
               propose_seconds: Mapping[str, float]) -> AdaptivePlan:
        t0 = self.timer()
        with self._lock:
            # the proposals' time is spent: what the engine measured, plus the controller's own per proposal
            sunk = sum(propose_seconds.get(n, 0.0) + self._overhead for n in proposals)
            cal: dict[str, Draft] = {}
            for name, d in proposals.items():
                if len(d):
                    c = self.calibrator.calibrate(name, d)
                    c = normalise_siblings(c) if self.config.trees else main_chain(c)
                    cal[name] = c
            upto = 2 * max([len(d) for d in cal.values()], default=0) + 1
            chain_c, tree_c = self.costs.verify_costs(upto)
            base = 1.0 + self.costs.others  # in a batch, a draft must pay for every request's wait
            _, _, _, best_rate = best_prefix(_EMPTY, chain_c, tree_c, sunk, base)
            best = _EMPTY
            empty_rate = best_rate
            standalone: dict[str, tuple[float, int, float]] = {}
            for name, d in cal.items():
                order, k, e, rate = best_prefix(d, chain_c, tree_c, sunk, base)
                standalone[name] = (e, k, rate)
                if rate > best_rate:
                    best, best_rate = _subset(d, order[:k]), rate
            # merge the proposals that are worth verifying on their own (a node that does not pay for
            # itself alone seldom pays as a sibling: each extra node costs about the same)
            useful = {n: d for n, d in cal.items() if standalone[n][1] > 0}
            if len(useful) > 1:
                merged, owners = merge_drafts(list(useful.values()))
                if not self.config.trees:
                    merged, owners = main_chain(merged), None
                if len(merged) + 1 >= len(chain_c):
                    chain_c, tree_c = self.costs.verify_costs(len(merged) + 1)
                order, k, e, rate = best_prefix(merged, chain_c, tree_c, sunk, base)
                if rate > best_rate * (1 + 1e-9):
                    names = list(useful)
                    mask = 0
                    for i in order[:k]:
                        mask |= owners[i] if owners is not None else (1 << len(names)) - 1
                    source = "+".join(n for b, n in enumerate(names) if mask >> b & 1)
                    best, best_rate = _subset(merged, order[:k], source), rate
            choose_s = self.timer() - t0
            self._summary(ctx.request_id).controller_s += choose_s
            base = plan if isinstance(plan, AdaptivePlan) else AdaptivePlan(plan.budgets)
            return replace(base, draft=best, standalone=standalone, empty_rate=empty_rate, best_rate=best_rate,
                           choose_s=choose_s)

    def observe(self, feedback: StepFeedback) -> None:
        t0 = self.timer()
        with self._lock:
            cfg = self.config
            ctx, chosen, outcome = feedback.ctx, feedback.chosen, feedback.outcome
            plan = feedback.plan if isinstance(feedback.plan, AdaptivePlan) else AdaptivePlan(feedback.plan.budgets)
            self.steps += 1
            if not feedback.shared_forward:
                self.costs.observe_verify(feedback.n_verified, feedback.verify_seconds, tree=not chosen.is_chain)
            for name, secs in feedback.propose_seconds.items():
                d = feedback.proposals.get(name)
                self.costs.observe_propose(name, plan.budgets.get(name, len(d) if d is not None else 1), secs)
            t_cal = self.timer()
            for name, d in feedback.proposals.items():
                if len(d):
                    self.calibrator.observe(name, d, outcome.emitted)
            if feedback.proposals:
                per = (plan.choose_s + self.timer() - t_cal) / len(feedback.proposals)
                self._overhead += (0.05 if self._overhead else 1.0) * (per - self._overhead)
            for name, d in feedback.proposals.items():
                st = self._state(name)
                st.queries += 1
                a = max(cfg.smoothing, 1.0 / st.queries)  # a running mean until the average has enough steps
                e, k, _ = plan.standalone.get(name, (0.0, 0, 0.0))
                st.gain += a * (e - st.gain)
                st.size += a * (k - st.size)
                if plan.best_rate > 0:  # share of this step's best rate lost without this speculator
                    without = max([plan.empty_rate] + [r for n, (_, _, r) in plan.standalone.items() if n != name])
                    st.marginal += a * (max(0.0, 1.0 - without / plan.best_rate) - st.marginal)
                b = plan.budgets.get(name, self._budget(st))
                if len(d) >= b and k >= len(d):  # the budget cut a draft that was worth verifying in full
                    st.budget = min(cfg.max_budget, 1.5 * st.budget + 1)
                else:
                    st.budget += 0.2 * (k + max(2, k // 2) - st.budget)
                st.budget = min(max(st.budget, cfg.min_budget), cfg.max_budget)
            s = self._summary(ctx.request_id)
            s.count_step(chosen.origin, len(chosen), outcome.num_accepted, chosen.score,
                         sum(feedback.propose_seconds.values()), feedback.verify_seconds)
            s.output_tokens += len(outcome.emitted)
            s.probes += plan.probes
            s.controller_s += self.timer() - t0

    # -- reporting -----------------------------------------------------------------------------

    def summary(self, request_id: str) -> dict:
        """Per-request decisions: steps, chosen sources, predicted vs realised accepted tokens, times."""
        with self._lock:
            s = self._requests.get(request_id)
            return s.to_dict() if s is not None else {}

    def stats(self) -> dict:
        """Global state: per speculator budget/gain/queries and reliability, and the measured cost curve."""
        with self._lock:
            return {
                "steps": self.steps,
                "speculators": {
                    name: {"budget": st.budget, "gain": st.gain, "size": st.size, "marginal": st.marginal,
                           "queries": st.queries,
                           "probes": st.probes,
                           "calibration_error": self.calibrator.expected_calibration_error(name),
                           "reliability": self.calibrator.reliability(name)}
                    for name, st in self._specs.items()},
                "costs": self.costs.summary(),
            }

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Learned state worth keeping across restarts: calibration and budgets (costs are re-measured)."""
        with self._lock:
            return {"version": STATE_VERSION, "calibration": self.calibrator.state_dict(),
                    "budgets": {n: st.budget for n, st in self._specs.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``, all of it or nothing: raises ValueError for another version, a wrong shape,
        or numbers that are negative or not finite."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise ValueError(f"controller state has version {version!r}, expected {STATE_VERSION}")
        budgets = state.get("budgets", {})
        if not isinstance(budgets, dict) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and np.isfinite(b) for b in budgets.values()):
            raise ValueError("controller budgets must map speculator names to finite numbers")
        with self._lock:
            self.calibrator.load_state_dict(state.get("calibration", {}))  # validates before it changes anything
            for name, b in budgets.items():
                self._state(name).budget = min(max(float(b), self.config.min_budget), self.config.max_budget)

    # -- helpers -------------------------------------------------------------------------------

    def _state(self, name: str) -> _SpecState:
        st = self._specs.get(name)
        if st is None:
            st = self._specs[name] = _SpecState(budget=float(self.config.initial_budget))
        return st

    def _budget(self, st: _SpecState) -> int:
        return int(min(max(round(st.budget), self.config.min_budget), self.config.max_budget))

    def _summary(self, request_id: str) -> _RequestSummary:
        s = self._requests.get(request_id)
        if s is None:
            s = self._requests[request_id] = _RequestSummary()
            while len(self._requests) > MAX_REQUESTS:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(request_id)
        return s
