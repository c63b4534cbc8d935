"""The speculation service behind the vLLM proposer: one call per engine step, for the whole batch.

Per request it runs what the engine loop runs (observe the last step's outcome, plan, propose, choose);
then it trims the drafts jointly, because in a batch every draft token lengthens everyone's step: the
drafts kept are the prefix, over all requests' nodes best first, with the highest expected tokens per
second of the whole batch under its measured step time (``control/batch.py``, shared with the engine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..control.adaptive import AdaptiveConfig, AdaptiveController
from ..control.batch import trim_batch
from ..control.base import Controller, StepFeedback, StepPlan
from ..control.costs import CostModel
from ..control.namespaced import NamespacedController
from ..speculators.base import DecodeContext, Draft, Speculator, StepOutcome
from ..store import Persistent, restore_components


SNAPSHOT_EVERY_S = 10.0
"""Least seconds between snapshots of the learned state, taken after requests finish. vLLM gives a proposer no
shutdown call, so a stop or a crash loses at most this much learning."""


@dataclass
class BatchRow:
    """One request of the step that just ran, as vLLM's runner holds it."""

    request_id: str
    namespace: str
    tokens: Sequence[int]  # prompt + output so far; the last one is the pending token
    prompt_len: int
    sampled: list[int]  # tokens the step emitted for it; [] while its prompt is still being prefilled
    room: int  # most draft tokens it may get (the proposer's limit, cut near the context length)


@dataclass
class BatchView:
    rows: list[BatchRow]
    finished: set[str] = field(default_factory=set)  # requests that ended since the previous step
    step_tokens: int = 0  # tokens the step verified, over the whole batch (prefill chunks included)


class BatchCosts(CostModel):
    """The cost model the per-request controllers see: c(n) is the batch's step time with the other requests'
    pending tokens in it (``others``), so one request's draft is priced at the time the whole step takes.
    The step times come from ``observe_step``; per-request verify timings do not exist in a batch."""

    def observe_verify(self, n: int, seconds: float, tree: bool = False) -> None:
        pass

    def observe_step(self, tokens: int, seconds: float) -> None:
        super().observe_verify(tokens, seconds)


@dataclass
class _Live:
    ctx: DecodeContext
    plan: StepPlan | None = None  # the controller's plan of the step in flight (None: nothing was planned)
    proposals: dict[str, Draft] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)
    draft: Draft = field(default_factory=Draft.empty)  # what was sent to vLLM (the plan's draft, trimmed)


def default_parts(max_draft: int) -> tuple[list[Speculator], NamespacedController]:
    """The suffix speculator and prompt lookup under one confidence-aware controller per namespace, priced by
    the batch's step time. vLLM verifies chains only, so the suffix speculator spends its budget on depth, and
    it proposes every node down to the budget: where the whole draft ends is the controller's call, from the
    step's measured cost, not a fixed probability floor. A proposal costs well under a millisecond beside a vLLM
    step, so every speculator asked is asked for the whole ceiling (no budget to learn)."""
    from ..speculators.ngram import PromptLookupSpeculator
    from ..speculators.suffix import SuffixConfig, SuffixSpeculator

    k = max(1, int(max_draft))
    config = AdaptiveConfig(initial_budget=k, min_budget=k, max_budget=k, trees=False)
    costs = BatchCosts()
    controller = NamespacedController(lambda c: AdaptiveController(config, costs=c), costs=costs)
    return [SuffixSpeculator(SuffixConfig(tree=False, min_prob=0.0)), PromptLookupSpeculator()], controller


class SpeculationService:
    """Drafts for every request of a batch, learning from each step and each finished request."""

    def __init__(self, speculators: Sequence[Speculator], controller: Controller, costs: BatchCosts,
                 state_dir: str | Path | None = None, clock: Callable[[], float] = time.perf_counter):
        self.speculators = list(speculators)
        self.names = [s.name for s in self.speculators]
        self.controller = controller
        self.costs = costs
        self.clock = clock
        self._live: dict[str, _Live] = {}
        self._last_end: float | None = None
        self.steps = 0
        self.finished = 0
        self._unsaved = False
        self.state_files: list[tuple[Persistent, Path]] = []
        self._saved_at = clock()
        if state_dir is not None:
            self.state_files = restore_components(state_dir, self.speculators, self.controller)

    @classmethod
    def default(cls, max_draft: int, state_dir: str | Path | None = None,
                clock: Callable[[], float] = time.perf_counter) -> "SpeculationService":
        specs, controller = default_parts(max_draft)
        return cls(specs, controller, controller.costs, state_dir, clock)

    # -- the step --------------------------------------------------------------------------------

    def step(self, view: BatchView) -> list[list[int]]:
        """Learn from the step that just ran, then return one draft (token ids) per row of ``view``."""
        now = self.clock()
        if self._last_end is not None and view.step_tokens > 0:
            self.costs.observe_step(view.step_tokens, now - self._last_end)
        present = {r.request_id for r in view.rows}
        for rid in [rid for rid in self._live if rid not in present or rid in view.finished]:
            self._end(rid, finished=rid in view.finished)
        decoding = [r for r in view.rows if r.sampled]
        self.costs.others = max(0, len(decoding) - 1)
        drafts: dict[str, Draft] = {}
        for row in decoding:
            live = self._observe(row)
            drafts[row.request_id] = self._propose(live, row.room)
        kept = self._trim(decoding, drafts)
        out = []
        for row in view.rows:
            d = kept.get(row.request_id)
            if d is None:
                out.append([])
                continue
            self._live[row.request_id].draft = d
            out.append(d.tokens.tolist())
        self.steps += 1
        if self._unsaved and self.state_files and self.clock() - self._saved_at >= SNAPSHOT_EVERY_S:
            self.snapshot()
        self._last_end = self.clock()
        return out

    def _observe(self, row: BatchRow) -> _Live:
        live = self._live.get(row.request_id)
        if live is None or len(live.ctx.tokens) + len(row.sampled) != len(row.tokens):
            if live is not None:  # resumed after a preemption, or out of step: start it again
                self._end(row.request_id, finished=False)
            ctx = DecodeContext(row.request_id, row.namespace, [int(t) for t in row.tokens], int(row.prompt_len))
            live = self._live[row.request_id] = _Live(ctx)
            for s in self.speculators:
                s.begin(ctx)
            return live
        ctx, draft = live.ctx, live.draft
        emitted = [int(t) for t in row.sampled]
        accepted = 0
        for want, got in zip(draft.tokens.tolist(), emitted[:-1]):
            if want != got:
                break
            accepted += 1
        ctx.tokens.extend(emitted)
        outcome = StepOutcome(draft, list(range(accepted)), emitted)
        for s in self.speculators:
            s.observe(ctx, outcome)
        if live.plan is not None:
            # the batch's step time is learned in ``step``; the per-request verify time has no meaning here
            self.controller.observe(StepFeedback(ctx, live.plan, live.proposals, live.spent, outcome, 0.0))
        live.plan, live.proposals, live.spent, live.draft = None, {}, {}, Draft.empty()
        return live

    def _propose(self, live: _Live, room: int) -> Draft:
        if room <= 0:
            return Draft.empty()
        ctx = live.ctx
        plan = self.controller.plan(ctx, self.names)
        for s in self.speculators:
            b = min(int(plan.budgets.get(s.name, 0)), room)
            if b > 0:
                t = self.clock()
                live.proposals[s.name] = s.propose(ctx, b)
                live.spent[s.name] = self.clock() - t
        if live.proposals:
            plan = self.controller.choose(ctx, plan, live.proposals, live.spent)
        live.plan = plan
        return plan.draft.prefix(room)

    def _trim(self, rows: Sequence[BatchRow], drafts: dict[str, Draft]) -> dict[str, Draft]:
        """The drafts cut to one budget for the batch (``control/batch.py``); every decoding row is in ``drafts``."""
        ids = [r.request_id for r in rows]
        return dict(zip(ids, trim_batch([drafts[rid] for rid in ids], self.costs)))

    def _end(self, rid: str, finished: bool) -> None:
        live = self._live.pop(rid, None)
        if live is None:
            return
        for s in self.speculators:
            s.end(live.ctx, finished)
        self.finished += finished
        self._unsaved |= finished

    # -- learned state ---------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Save every component's learned state, each file atomically."""
        for component, path in self.state_files:
            component.save(path)
        self._saved_at = self.clock()
        self._unsaved = False

    def close(self) -> None:
        """End the requests in flight (not learned from: they did not finish) and save the state."""
        for rid in list(self._live):
            self._end(rid, finished=False)
        if self.state_files:
            self.snapshot()
        for s in self.speculators:
            s.close()

