"""The controller protocol, and the fixed controller used by tests and as a baseline.

Each engine step calls, in order::

    budgets = controller.plan(ctx, names)        # how many nodes to ask each speculator for (0 = skip it)
    proposals = {name: spec.propose(ctx, budgets[name]) ...}
    draft = controller.choose(ctx, proposals)    # one of them, a prefix, a merge, or Draft.empty()
    ... verify, commit ...
    controller.observe(StepFeedback(...))        # what happened, with timings

The returned draft's ``probs`` are the controller's own (calibrated) estimates,
so ``draft.score`` is its prediction of the accepted tokens; the engine records
it beside what was realised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from ..speculators.base import DecodeContext, Draft, StepOutcome


@dataclass
class StepFeedback:
    ctx: DecodeContext
    proposals: Mapping[str, Draft]  # every speculator's proposal this step (empty drafts included)
    propose_seconds: Mapping[str, float]  # time each speculator took to propose
    chosen: Draft  # what was verified (source says whose; "" for no speculation)
    outcome: StepOutcome
    verify_seconds: float  # the target forward that verified ``chosen`` (plus the pending token)

    @property
    def n_verified(self) -> int:
        return 1 + len(self.chosen)


class Controller(Protocol):
    """The controller protocol (call order in the module docstring). Controllers subclass it explicitly, so
    they inherit the default of the optional hook."""

    def plan(self, ctx: DecodeContext, names: Sequence[str]) -> Mapping[str, int]:
        ...

    def choose(self, ctx: DecodeContext, proposals: Mapping[str, Draft]) -> Draft:
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

    def plan(self, ctx: DecodeContext, names: Sequence[str]) -> Mapping[str, int]:
        return {n: self.lookahead for n in names}

    def choose(self, ctx: DecodeContext, proposals: Mapping[str, Draft]) -> Draft:
        best = Draft.empty()
        for d in proposals.values():
            if len(d) and (not len(best) or d.score > best.score):
                best = d
        return best.prefix(self.lookahead)

    def observe(self, feedback: StepFeedback) -> None:
        self.steps += 1
