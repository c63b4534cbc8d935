"""One controller per namespace, so that what the controller learns from one tenant never steers another.

Calibration, budgets and gains are functions of a tenant's text, so each namespace gets its own controller; costs
are a property of the machine and the model, so all of them share one ``CostModel`` (the reasoning is on
:class:`NamespacedController`). The learned state of every namespace is saved in one checksummed file.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

from ..speculators.base import DecodeContext, Draft
from ..store import StoreCorruptError, restore, save_blob
from .adaptive import AdaptiveController
from .base import Controller, StepFeedback, StepPlan
from .costs import CostModel

STATE_KIND = "adaspec.controller"
STATE_VERSION = 1


class NamespacedController(Controller):
    """The controller protocol, routed by ``ctx.namespace`` to that namespace's ``AdaptiveController``.

    The adaptive controller learns two kinds of things. From acceptance -- which
    drafts the target confirmed -- it learns calibration tables, budgets and each
    speculator's expected gain: those are functions of the traffic's text, so a
    tenant whose drafts are cut by tables that another tenant's traffic shaped
    could infer that traffic from its own step timing. From the clock it learns
    how long the hardware takes to verify ``n`` tokens and to run each speculator:
    a property of the machine and the model, which every tenant already observes
    in its own latency. So each namespace gets its own controller and all of them
    share one ``CostModel``.

    Namespaces are kept up to ``max_namespaces``; the least recently used one is
    dropped beyond that (it starts again from the defaults, as a new tenant does).
    The learned state of every namespace is saved in one checksummed file.
    """

    def __init__(self, make: Callable[[CostModel], AdaptiveController] | None = None,
                 costs: CostModel | None = None, max_namespaces: int = 256):
        """``make(costs)`` builds a namespace's controller around the shared cost model (default:
        ``AdaptiveController(costs=costs)``)."""
        if max_namespaces < 1:
            raise ValueError("max_namespaces must be >= 1")
        self._make = make or (lambda c: AdaptiveController(costs=c))
        self.costs = costs or CostModel()
        self.max_namespaces = max_namespaces
        self._controllers: OrderedDict[str, AdaptiveController] = OrderedDict()
        self._request_ns: OrderedDict[str, str] = OrderedDict()  # request id -> namespace, for ``summary``
        self._lock = threading.Lock()

    def controller(self, namespace: str) -> AdaptiveController:
        """The namespace's controller (created on first use)."""
        with self._lock:
            c = self._controllers.get(namespace)
            if c is None:
                c = self._controllers[namespace] = self._make(self.costs)
                while len(self._controllers) > self.max_namespaces:
                    self._controllers.popitem(last=False)
            else:
                self._controllers.move_to_end(namespace)
            return c

    @property
    def namespaces(self) -> list[str]:
        with self._lock:
            return list(self._controllers)

    # -- protocol ------------------------------------------------------------------------------

    def plan(self, ctx: DecodeContext, names: Sequence[str]) -> StepPlan:
        with self._lock:
            self._request_ns[ctx.request_id] = ctx.namespace
            self._request_ns.move_to_end(ctx.request_id)
            while len(self._request_ns) > 4096:
                self._request_ns.popitem(last=False)
        return self.controller(ctx.namespace).plan(ctx, names)

    def choose(self, ctx: DecodeContext, plan: StepPlan, proposals: Mapping[str, Draft],
               propose_seconds: Mapping[str, float]) -> StepPlan:
        return self.controller(ctx.namespace).choose(ctx, plan, proposals, propose_seconds)

    def observe(self, feedback: StepFeedback) -> None:
        self.controller(feedback.ctx.namespace).observe(feedback)

    # -- reporting -----------------------------------------------------------------------------

    def summary(self, request_id: str) -> dict:
        """The request's decisions, from its namespace's controller ({} if unknown)."""
        with self._lock:
            ns = self._request_ns.get(request_id)
            c = self._controllers.get(ns) if ns is not None else None
        return c.summary(request_id) if c is not None else {}

    def stats(self) -> dict:
        with self._lock:
            controllers = dict(self._controllers)
        return {"namespaces": {ns: c.stats() for ns, c in controllers.items()}, "costs": self.costs.summary()}

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        with self._lock:
            controllers = dict(self._controllers)
        return {ns: c.state_dict() for ns, c in controllers.items()}

    def load_state_dict(self, state: dict) -> None:
        """Replace every namespace's learned state, all or nothing (ValueError if any part is invalid)."""
        if not isinstance(state, dict) or not all(isinstance(ns, str) for ns in state):
            raise ValueError("controller state must map namespaces to controller states")
        fresh: OrderedDict[str, AdaptiveController] = OrderedDict()
        for ns, s in list(state.items())[-self.max_namespaces:]:
            c = self._make(self.costs)
            c.load_state_dict(s)
            fresh[ns] = c
        with self._lock:
            self._controllers = fresh

    def save(self, path: str | os.PathLike) -> None:
        """Write every namespace's learned state atomically to ``path`` (one checksummed file)."""
        data = json.dumps(self.state_dict(), sort_keys=True, allow_nan=False).encode()
        save_blob(path, data, {"kind": STATE_KIND, "state_version": STATE_VERSION})

    def load(self, path: str | os.PathLike, vocab_size: int | None = None) -> bool:
        """Restore from ``save`` (True). Missing: False. Damaged or of the wrong shape: moved aside with a
        warning, False, and the controllers start from their defaults. (``vocab_size`` is unused: the
        controller's state holds no token ids.)"""
        return restore(path, self._load_payload, "controller")

    def _load_payload(self, payload: bytes, meta: dict) -> None:
        if meta.get("kind") != STATE_KIND or meta.get("state_version") != STATE_VERSION:
            raise StoreCorruptError(f"not a controller state of version {STATE_VERSION}")
        try:
            state = json.loads(payload.decode(), parse_constant=_reject_constant)
            self.load_state_dict(state)
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise StoreCorruptError(str(e)) from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")
