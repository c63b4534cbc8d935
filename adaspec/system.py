"""Assembles the engine for a speculation mode: which speculators, which controller, which learned state."""

from __future__ import annotations

import logging
from pathlib import Path

from .control.base import FixedController
from .engine import Engine

log = logging.getLogger(__name__)

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
        _attach_state(engine, Path(state_dir))
    engine.on_close.extend(s.close for s in specs)
    return engine


def _attach_state(engine: Engine, directory: Path) -> None:
    """Restore every component's learned state from ``directory`` and list its files in ``engine.state_files``
    (what ``engine.snapshot()`` saves).

    Each component keeps one file, ``<name>.state``. Temporary files of a snapshot that a crash interrupted are
    deleted first; a damaged or mis-shaped file is moved aside with a warning and its component starts clean
    (``store.restore``)."""
    from .store import Persistent, remove_temporaries

    directory.mkdir(parents=True, exist_ok=True)
    for p in remove_temporaries(directory):
        log.warning("removed %s, left by an interrupted snapshot", p.name)
    files = [(s, directory / f"{s.name}.state") for s in engine.speculators if isinstance(s, Persistent)]
    if isinstance(engine.controller, Persistent):
        files.append((engine.controller, directory / "controller.state"))
    for obj, path in files:
        obj.load(path, engine.model.vocab_size)
    engine.state_files = files
