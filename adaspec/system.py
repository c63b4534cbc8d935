"""Assembles the engine for a speculation mode: which speculators, which controller, which learned state."""

from __future__ import annotations

from .control.base import FixedController
from .engine import Engine

MODES = ("adaptive", "plain", "ngram", "suffix")
"""adaptive: every speculator under the confidence-aware controller (the full system, default);
plain: no speculation; ngram / suffix: that speculator alone at a fixed lookahead."""

FIXED_LOOKAHEAD = 8


def build_engine(model, tokenizer, mode: str = "adaptive", state_dir: str | None = None) -> Engine:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "plain":
        return Engine(model, tokenizer, [], FixedController(0))
    from .spec.ngram import PromptLookupSpeculator

    if mode == "ngram":
        return Engine(model, tokenizer, [PromptLookupSpeculator()], FixedController(FIXED_LOOKAHEAD))
    from .spec.suffix import SuffixSpeculator

    if mode == "suffix":
        return Engine(model, tokenizer, [SuffixSpeculator()], FixedController(FIXED_LOOKAHEAD))
    from .control.adaptive import AdaptiveController

    return Engine(model, tokenizer, [SuffixSpeculator(), PromptLookupSpeculator()], AdaptiveController())
