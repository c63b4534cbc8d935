"""Assembles the engine for a speculation mode: which speculators, which controller, which learned state."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .control.base import FixedController
from .engine import Engine

log = logging.getLogger("adaspec")

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


_told: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _told:
        _told.add(message)
        log.warning(message)


def online_learning_pays(model) -> bool:
    """Whether the online head's background learner can run beside decoding without slowing it: the target decodes
    on an accelerator, or the CPU has a core that decoding's threads leave free. With every core decoding (two
    threads on two cores), a learner that computes even in the gaps between requests slows the steps it overlaps
    (README, "Learning never costs speed"), so it is left out and the log says so."""
    from .speculators.head import spare_core

    return model.device.type != "cpu" or spare_core()


def build_engine(model, tokenizer, mode: str = "adaptive", state_dir: str | None = None,
                 shared_learning: bool = True) -> Engine:
    """An engine for ``mode``. With ``state_dir``, learned state is restored now and saved by ``engine.snapshot()``
    (also run by ``engine.close()``). ``shared_learning=False`` leaves out the online head, which learns one set of
    weights from every namespace (the server does that when tenants are isolated); so does a machine where
    learning would cost decoding speed (:func:`online_learning_pays`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    from .speculators.head import HeadSpeculator, OnlineHeadSpeculator
    from .speculators.ngram import PromptLookupSpeculator
    from .speculators.siblings import SiblingSpeculator
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

        specs = [SuffixSpeculator(), PromptLookupSpeculator(), SiblingSpeculator()]
        head = HeadSpeculator.for_target(model)
        if head is not None:
            specs.append(head)
            if shared_learning and online_learning_pays(model):
                specs.append(OnlineHeadSpeculator.for_target(model))
            elif shared_learning:
                _say_once(f"online draft-head learning is off: decoding's {torch.get_num_threads()} threads use "
                          "every core, and a learner beside them slows each step it overlaps; the static head "
                          "drafts alone (give decoding fewer threads, e.g. --threads, to leave the learner a core)")
        controller = NamespacedController()
    engine = Engine(model, tokenizer, specs, controller)
    if state_dir is not None:
        from .store import restore_components

        engine.state_files = restore_components(state_dir, engine.speculators, engine.controller,
                                                engine.model.vocab_size)
    engine.on_close.extend(s.close for s in specs)
    return engine
