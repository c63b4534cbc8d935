"""The controller protocol, and the fixed controller used by tests and as a baseline.

A controller decides, every engine step, which speculators to ask and for how many nodes (``plan``), which draft to
verify (``choose``), and learns from what happened (``observe``); the call order is on :class:`Controller`. The plan
travels with the step, so a controller keeps nothing per request between the calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Protocol, Sequence

from ..speculators.base import DecodeContext, Draft, StepOutcome


@dataclass(frozen=True)
class StepPlan:
    """What a controller decided for one step of one request. Controllers that need more between the calls
    subclass it (``choose`` returns a copy with ``draft`` set, never changes the plan it was given)."""

    budgets: Mapping[str, int]  # draft nodes to ask each speculator for (0 or absent: skip it)
    draft: Draft = field(default_factory=Draft.empty)  # what ``choose`` picked; empty until then


@dataclass
class StepFeedback:
    ctx: DecodeContext
    plan: StepPlan  # what ``plan`` and ``choose`` decided for this step
    proposals: Mapping[str, Draft]  # every speculator's proposal this step (empty drafts included)
    propose_seconds: Mapping[str, float]  # time each speculator took to propose
    outcome: StepOutcome  # what was verified (``outcome.draft``, cut to the room left) and what it emitted
    verify_seconds: float  # the target forward that verified the draft (plus the pending token)
    shared_forward: bool = False
    """The forward verified other requests' rows too (a batched step): the engine recorded its cost once, for
    all its rows, so the controller records none of its own."""

    @property
    def chosen(self) -> Draft:
        """The draft that was verified (source says whose; "" for no speculation)."""
        return self.outcome.draft

    @property
    def n_verified(self) -> int:
        return 1 + len(self.chosen)


class Controller(Protocol):
    """The controller protocol. Controllers subclass it explicitly, so they inherit the default of the optional
    hook.

    Each engine step calls, in order (``choose`` only when some speculator proposed; otherwise the plan's draft
    stays empty)::

        plan = controller.plan(ctx, names)                       # StepPlan: nodes to ask each speculator for
        proposals = {name: spec.propose(ctx, plan.budgets[name]) ...}   # (and the seconds each took)
        plan = controller.choose(ctx, plan, proposals, seconds)  # plan.draft: one of them, a prefix, a merge, or empty
        ... verify plan.draft, commit ...
        controller.observe(StepFeedback(ctx, plan, proposals, seconds, outcome, verify_seconds))

    The chosen draft's ``probs`` are the controller's own (calibrated) estimates, so ``draft.score`` is its prediction of the
    accepted tokens; the engine records it beside what was realised.
    """

    def plan(self, ctx: DecodeContext, names: Sequence[str]) -> StepPlan:
        ...

    def choose(self, ctx: DecodeContext, plan: StepPlan, proposals: Mapping[str, Draft],
               propose_seconds: Mapping[str, float]) -> StepPlan:
        ...

    def observe(self, feedback: StepFeedback) -> None:
        ...

    def summary(self, request_id: str) -> dict:
        """What the controller decided for one request, for its statistics; ``{}`` when it has nothing to say."""
        return {}


@dataclass
class FixedController(Controller):
    """Asks every speculator for ``lookahead`` nodes and takes the highest-scoring proposal as is.

    With one speculator this is "that speculator at a fixed lookahead". ``lookahead=0``
    is plain decoding.
    """

    lookahead: int = 8
    steps: int = field(default=0, init=False)

    def plan(self, ctx: DecodeContext, names: Sequence[str]) -> StepPlan:
        return StepPlan({n: self.lookahead for n in names})

    def choose(self, ctx: DecodeContext, plan: StepPlan, proposals: Mapping[str, Draft],
               propose_seconds: Mapping[str, float]) -> StepPlan:
        best = Draft.empty()
        for d in proposals.values():
            if len(d) and (not len(best) or d.score > best.score):
                best = d
        return replace(plan, draft=best.prefix(self.lookahead))

    def observe(self, feedback: StepFeedback) -> None:
        self.steps += 1
