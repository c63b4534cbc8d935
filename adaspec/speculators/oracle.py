"""The oracle speculator: replays a known continuation, the ceiling of speculation on given hardware.

Given the output plain decoding produces for a prompt, it proposes exactly the
next tokens of that output while the request follows it, so every draft is
accepted; what remains is the cost of verifying ``budget`` tokens per forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import DecodeContext, Draft, SpeculatorBase


@dataclass
class OracleSpeculator(SpeculatorBase):
    name: str = "oracle"
    references: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # prompt ids -> expected output ids

    def add(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        self.references[tuple(prompt_ids)] = list(output_ids)

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        ref = self.references.get(tuple(ctx.tokens[: ctx.prompt_len]))
        done = ctx.generated
        if ref is None or ref[: len(done)] != done:
            return Draft.empty(self.name)
        return Draft.chain(ref[len(done) : len(done) + budget], source=self.name)
