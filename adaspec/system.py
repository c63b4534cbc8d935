"""Assembles the engine for a speculation mode: which speculators, which controller, which learned state."""

from __future__ import annotations

from pathlib import Path

from .control.base import FixedController
from .engine import Engine

MODES = ("adaptive", "plain", "ngram", "suffix", "head")
"""adaptive: every speculator under the confidence-aware controller (the full system, default);
plain: no speculation; ngram / suffix / head: that speculator alone at a fixed lookahead."""

FIXED_LOOKAHEAD = 8
"""Lookahead of the single-speculator modes: the best fixed value for the suffix speculator in simulation."""


def available_modes(model=None) -> tuple[str, ...]:
    """The modes that can run: "head" needs a trained draft head for the target."""
    from .speculators.head_model import CHECKPOINT_DIR, SHIPPED_NAME

    has_head = (Path(CHECKPOINT_DIR) / f"{SHIPPED_NAME}.json").exists()
    return tuple(m for m in MODES if m != "head" or has_head)


def build_engine(model, tokenizer, mode: str = "adaptive", state_dir: str | None = None,
                 shared_learning: bool = True) -> Engine:
    """An engine for ``mode``. With ``state_dir``, learned state is restored now and saved by ``engine.snapshot()``
    (also run by ``engine.close()``). ``shared_learning=False`` leaves out the online head, which learns one set of
    weights from every namespace (the server does that when tenants are isolated)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    from .speculators.head import HeadSpeculator, OnlineHeadSpeculator
    from .speculators.ngram import PromptLookupSpeculator
    from .speculators.suffix import SuffixSpeculator

    if mode == "plain":
        specs, controller = [], FixedController(0)
    elif mode == "ngram":
        specs, controller = [PromptLookupSpeculator()], FixedController(FIXED_LOOKAHEAD)
    elif mode == "suffix":
        specs, controller = [SuffixSpeculator()], FixedController(FIXED_LOOKAHEAD)
    elif mode == "head":
        head = HeadSpeculator.for_target(model, required=True)
        specs, controller = [head], FixedController(4)
    else:
        from .control.namespaced import NamespacedController

        specs = [SuffixSpeculator(), PromptLookupSpeculator()]
        head = HeadSpeculator.for_target(model)
        if head is not None:
            specs.append(head)
            if shared_learning:
                specs.append(OnlineHeadSpeculator.for_target(model))
        controller = NamespacedController()
    engine = Engine(model, tokenizer, specs, controller)
    if state_dir is not None:
        from .store import restore_components

        engine.state_files = restore_components(state_dir, engine.speculators, engine.controller,
                                                engine.model.vocab_size)
    engine.on_close.extend(s.close for s in specs)
    return engine
