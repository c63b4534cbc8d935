"""What verification steps did, counted one way wherever it is counted.

The engine keeps one record per request, the controller one per request it decided for, the simulator totals
over traces, and the server's metrics a cursor of what it has already exported; all of them are ``StepCounts``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StepCounts:
    """Counts of verification steps; ``mean_accepted`` follows Spec-Bench (plain decoding = 1.00)."""

    output_tokens: int = 0  # tokens emitted
    forwards: int = 0  # target forwards that emitted them
    drafted: int = 0  # draft nodes verified
    accepted: int = 0  # draft nodes accepted
    draft_steps: int = 0  # steps that verified a non-empty draft
    chosen: Counter = field(default_factory=Counter)  # verified draft's origin -> steps ("none" = no speculation)
    predicted_accepted: float = 0.0  # sum over steps of the verified draft's score (its expected accepted nodes)
    propose_s: float = 0.0  # time the speculators took to propose
    verify_s: float = 0.0  # target forwards + acceptance + commit

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per target forward."""
        return self.output_tokens / self.forwards if self.forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def count_step(self, origin: str, drafted: int, accepted: int, predicted: float, propose_s: float,
                   verify_s: float) -> None:
        """One verification forward: the draft's ``origin`` (``Draft.origin``), its size, how many of its nodes
        were accepted, its score, and the step's times. Emitted tokens are counted by the caller, which knows
        which of them it keeps (the engine drops a stop token)."""
        self.forwards += 1
        self.propose_s += propose_s
        self.verify_s += verify_s
        self.chosen[origin] += 1
        if drafted:
            self.draft_steps += 1
            self.drafted += drafted
            self.accepted += accepted
            self.predicted_accepted += predicted

    def add(self, other: StepCounts) -> None:
        """Add ``other``'s counts to these (totals over requests)."""
        self.output_tokens += other.output_tokens
        self.forwards += other.forwards
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.draft_steps += other.draft_steps
        self.chosen.update(other.chosen)
        self.predicted_accepted += other.predicted_accepted
        self.propose_s += other.propose_s
        self.verify_s += other.verify_s
