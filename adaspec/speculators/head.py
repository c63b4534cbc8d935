"""The draft head as speculators: ``HeadSpeculator`` (the static head, learns nothing) and
``OnlineHeadSpeculator`` (the same head, trained on the fly from the training pairs every verification step yields;
how, on that class). The network is in :mod:`.head_model`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..store import StoreCorruptError, arrays_from_bytes, arrays_to_bytes, restore, save_blob
from .base import DecodeContext, Draft, SpeculatorBase, StepOutcome
from .head_model import (CHECKPOINT_DIR, SHIPPED_NAME, DraftConfig, DraftHead, LMHead, distill_loss, draft_with_head,
                         fingerprint_matches, load_checkpoint, shared_weights, target_fingerprint)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Speculators
# ---------------------------------------------------------------------------------------------

class HeadSpeculator(SpeculatorBase):
    """The static draft head as a speculator: drafts from ``ctx.hidden``; learns nothing."""

    name = "head"

    def __init__(self, head: DraftHead, config: DraftConfig | None = None, info: dict | None = None):
        self.config = config or DraftConfig()
        self.info = info or {}
        head = head if not any(p.requires_grad for p in head.parameters()) else head.clone_frozen()
        self._lm = LMHead(head.lm_weight, self.config.quantize_lm_head)
        self._serving = head  # the published version; drafting reads this reference once per proposal
        self.proposals = 0

    @classmethod
    def for_target(cls, model: Any, directory: str | os.PathLike | None = None, name: str = SHIPPED_NAME,
                   config: DraftConfig | None = None, required: bool = False) -> "HeadSpeculator | None":
        """The trained head for ``model``: the shipped one for the bundled target, else None.

        ``required=True`` raises ``ValueError`` instead of returning None, naming
        what to do (train a head for this target with ``adaspec train-static``).
        """
        directory = Path(directory) if directory is not None else CHECKPOINT_DIR
        try:
            meta = json.loads((directory / f"{name}.json").read_text())
        except FileNotFoundError:
            if required:
                raise ValueError(f"no draft head checkpoint {directory / name}.json") from None
            return None
        want = meta.get("target", {}).get("fingerprint", {})
        if not model.capabilities.hidden_states:
            if required:
                raise ValueError("this target backend gives no hidden states; a draft head needs them")
            return None
        dims = {"vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
                "num_layers": getattr(getattr(model, "cfg", None), "num_layers", -1)}
        # dimensions first, decided without touching the weights; then a few embedding values
        same = not any(want.get(k) != v for k, v in dims.items())
        if same:
            try:
                same = fingerprint_matches(want, target_fingerprint(model))
            except ValueError:  # a backend without an exposed embedding cannot share it with a head
                if required:
                    raise
                return None
        if not same:
            msg = (f"the draft head {name} was trained for {meta.get('target', {}).get('name', 'another model')}, "
                   "not this target; train one with `adaspec train-static` or run without the head")
            if required:
                raise ValueError(msg)
            log.info(msg)
            return None
        head, info = load_checkpoint(directory, name, *shared_weights(model))
        return cls(head, config, info)

    @property
    def head(self) -> DraftHead:
        """The version drafts are made with now."""
        return self._serving

    def begin(self, ctx: DecodeContext) -> None:
        pass

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        if ctx.hidden is None or budget <= 0:
            return Draft.empty(self.name)
        head = self._serving  # one consistent version for the whole draft
        self.proposals += 1
        return draft_with_head(head, self._lm, head.vocab_ids, ctx.hidden, ctx.tokens[-1], budget, self.config,
                               self.name, ctx)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        pass

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        pass


BUFFER_SIZE = 8192
"""Most recent training pairs kept (FIFO): recent traffic only, so the copy follows the current workload."""
RECENT_FRACTION = 0.5
"""Share of each batch drawn from the newest pairs, the rest uniformly from the buffer (learn new, keep old)."""
WRONG_WEIGHT = 1.0
"""Loss weight of pairs whose head top-1 disagreed with the target (OSD trains on these)."""
RIGHT_WEIGHT = 0.1
"""Loss weight of pairs the head already got right (keeps it from forgetting them)."""
FEATURE_COEF = 0.1
"""Weight of the feature regression term: the static head's training value (train/static.py)."""
EVAL_CHUNK = 64
"""Most new pairs one unit of learner work scores and buffers (one batch): a unit stays short however many pairs
queued up while the learner waited, so a request that arrives meanwhile waits for little of it."""
IDLE_SHARE = 0.5
"""Fraction of wall time the learner may compute when nothing was observed for ``IDLE_AFTER_S``."""
IDLE_AFTER_S = 2.0
"""Idle = no request between begin and end, and nothing observed for this many seconds."""
GUARD_MARGIN = 0.02
"""Reset to the static weights when online agreement < static - margin over a full window (noise allowance)."""


@dataclass
class OnlineConfig:
    """How the online head learns from verification steps."""

    lr: float = 3e-4
    """Adam learning rate of the online copy."""
    batch_size: int = 64
    """Training pairs per update step."""
    min_new_pairs: int = 16
    """Learning waits for this many pairs observed since it last ran."""
    passes: float = 2.0
    """Expected times each new pair is trained on: ceil(passes * new / batch_size) update steps per digest."""
    publish_every: int = 4
    """Update steps between publications of a new serving version."""
    max_share: float = 0.04
    """Fraction of wall time the learner may compute while requests are decoding, on a core decoding does not
    use; with no spare core (decoding's threads cover every core) it learns only while idle, since a learner
    sharing a core with decoding slows every step it overlaps."""
    guard_window: int = 512
    """Pairs in the sliding window that compares online vs static top-1 agreement."""
    background: bool = True
    """Learn in a daemon thread; False learns only when ``learn_now`` is called (tests, replay)."""


def spare_core() -> bool:
    """Whether this process may use more cores than decoding's threads (torch's, on the calling thread), so that a
    background learner can compute on a core decoding leaves free. Without one, a learner shares decoding's cores
    and slows every step it overlaps."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


class OnlineHeadSpeculator(HeadSpeculator):
    """A copy of the static head that keeps training on live traffic.

    ``observe`` only queues the step's training pairs (a few tensor copies); the
    learner thread evaluates each new pair with both heads *before* training on
    it (prequential top-1 agreement, the drift guard's measure), trains the
    private copy, and publishes a frozen clone by replacing one reference. A
    proposal reads that reference once, so every draft comes from one version.

    Online learning (Online Speculative Decoding, Liu et al. 2024): every
    verification step yields training pairs for free. With ``H_0`` the hidden state
    that produced the pending token ``T_0`` and ``outcome.hidden[j] = H_{j+1}``,
    ``outcome.emitted[j] = T_{j+1}``, the pairs are ``(H_j, T_j) -> (H_{j+1}, T_{j+1})``
    for ``j = 0 .. accepted``. A background thread distils the head on them (forward
    KL to ``softmax(E_V H_{j+1})`` plus a feature regression), weighting pairs the
    head got wrong, and publishes each new version by swapping one reference.
    """

    name = "head_online"

    def __init__(self, head: DraftHead, config: DraftConfig | None = None, online: OnlineConfig | None = None,
                 info: dict | None = None):
        super().__init__(head, config, info)
        self.online = online or OnlineConfig()
        self.static = self._serving  # frozen static weights (the drift guard's reference and reset point)
        self._train = self._fresh_trainable()
        self._opt = torch.optim.Adam(self._train.parameters(), lr=self.online.lr)
        self.version = 0
        self.updates = 0
        self.resets = 0
        self.compute_s = 0.0  # learner time spent on evaluation + updates
        self.compute_busy_s = 0.0  # ... of which while requests were decoding
        self._owed = 0  # update steps the buffered pairs still call for
        self._recent = 0  # size of the newest digested group of pairs (drawn from first in each batch)
        self._active: set[str] = set()  # requests between begin and end
        self._spare_core = spare_core()  # read here, on the thread that decodes
        self._pending: deque = deque()  # new pairs not yet evaluated: (h_in [d], tok_in, h_out [d], tok_out)
        self._buffer: deque = deque(maxlen=BUFFER_SIZE)
        self._guard: deque = deque(maxlen=self.online.guard_window)  # (online_right, static_right) per pair
        self._prev_hidden: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Event()  # cleared by pause()
        self._running.set()
        self._step_lock = threading.Lock()  # held by the learner thread during one unit of work
        self._last_observe = 0.0
        self._thread: threading.Thread | None = None
        if self.online.background:
            self._thread = threading.Thread(target=self._loop, name="adaspec-head-online", daemon=True)
            self._thread.start()

    @classmethod
    def for_target(cls, model: Any, directory: str | os.PathLike | None = None, name: str = SHIPPED_NAME,
                   config: DraftConfig | None = None, required: bool = False,
                   online: OnlineConfig | None = None) -> "OnlineHeadSpeculator | None":
        static = HeadSpeculator.for_target(model, directory, name, config, required)
        return None if static is None else cls(static.head, config, online, static.info)

    def _fresh_trainable(self) -> DraftHead:
        twin = self.static.clone_frozen()
        twin.requires_grad_(True).train()
        return twin

    # -- speculator hooks (decode thread) -------------------------------------------------------

    def begin(self, ctx: DecodeContext) -> None:
        self._active.add(ctx.request_id)
        self._last_observe = time.monotonic()
        if ctx.hidden is not None:
            self._prev_hidden[ctx.request_id] = _plain(ctx.hidden)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        prev = self._prev_hidden.get(ctx.request_id)
        if outcome.hidden is None or prev is None:
            return
        rows = _plain(outcome.hidden).float()  # [1 + accepted, d]
        toks = ctx.tokens[len(ctx.tokens) - len(outcome.emitted) - 1:]  # pending, then emitted
        h_in = torch.cat([prev.reshape(1, -1).float(), rows[:-1]])  # [1 + accepted, d]
        pairs = [(h_in[j], toks[j], rows[j], toks[j + 1]) for j in range(rows.shape[0])]
        self._prev_hidden[ctx.request_id] = rows[-1]
        with self._lock:
            self._pending.extend(pairs)
        self._last_observe = time.monotonic()
        self._wake.set()

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        self._prev_hidden.pop(ctx.request_id, None)
        self._active.discard(ctx.request_id)

    # -- learning ----------------------------------------------------------------------------

    def learn_now(self) -> int:
        """Digest the queued pairs and run every update step they call for, in the calling thread; returns the steps run."""
        before = self.updates
        while self._step_once():
            pass
        return self.updates - before

    def _step_once(self) -> bool:
        """One short unit of learner work: digest up to ``EVAL_CHUNK`` queued pairs (if enough are queued) and run at
        most one update step.

        New pairs are first scored by both heads (the drift guard), then buffered;
        they owe ``ceil(passes * new / batch_size)`` update steps, paid one per
        call so that a learner burst stays short. False when there was nothing to do.
        """
        new = []
        with self._lock:
            if len(self._pending) >= self.online.min_new_pairs:
                new = [self._pending.popleft() for _ in range(min(len(self._pending), EVAL_CHUNK))]
        if not new and self._owed == 0:
            return False
        t0 = time.perf_counter()
        if new:
            h_in = torch.stack([p[0] for p in new])  # [m, d]
            t_in = torch.tensor([p[1] for p in new], dtype=torch.long)
            t_out = torch.tensor([p[3] for p in new], dtype=torch.long)
            self._evaluate(h_in, t_in, t_out)
            self._buffer.extend(new)
            self._recent = len(new)
            self._owed += max(1, math.ceil(self.online.passes * len(new) / self.online.batch_size))
        if self._owed > 0:
            self._owed -= 1
            self._update(self._recent)
        self.compute_s += time.perf_counter() - t0
        return True

    def _evaluate(self, h_in: torch.Tensor, t_in: torch.Tensor, t_out: torch.Tensor) -> None:
        """Prequential top-1 agreement of the serving online head and the static head; the drift guard."""
        with torch.inference_mode():
            on = self._top1(self._serving, h_in, t_in) == t_out
            st = self._top1(self.static, h_in, t_in) == t_out
        self._guard.extend(zip(on.tolist(), st.tolist()))
        if self.updates and len(self._guard) == self._guard.maxlen:
            g = np.asarray(self._guard, dtype=np.float64)
            if g[:, 0].mean() < g[:, 1].mean() - GUARD_MARGIN:
                log.warning("online head agreement %.3f fell below the static head's %.3f: reset to static",
                            g[:, 0].mean(), g[:, 1].mean())
                self.reset_to_static()

    def _top1(self, head: DraftHead, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        idx = self._lm(head(h, t)).argmax(-1)
        return idx if head.vocab_ids is None else head.vocab_ids[idx]

    def _update(self, n_new: int) -> None:
        cfg = self.online
        buf = list(self._buffer)
        n_recent = min(n_new, int(cfg.batch_size * RECENT_FRACTION))
        idx = list(range(len(buf) - n_recent, len(buf)))
        idx += random.choices(range(len(buf)), k=max(0, min(cfg.batch_size, len(buf)) - n_recent))
        h_in = torch.stack([buf[i][0] for i in idx])
        t_in = torch.tensor([buf[i][1] for i in idx], dtype=torch.long)
        h_out = torch.stack([buf[i][2] for i in idx])
        head = self._train
        f = head(h_in, t_in)  # [b, d]
        with torch.no_grad():
            wrong = head.logits(f).argmax(-1) != head.logits(h_out).argmax(-1)
            w = torch.where(wrong, WRONG_WEIGHT, RIGHT_WEIGHT)
        loss, _ = distill_loss(head, f, h_out, w, FEATURE_COEF)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        self._opt.step()
        self.updates += 1
        if self.updates % cfg.publish_every == 0:
            self.publish()

    def publish(self) -> None:
        """Replace the serving version by a frozen clone of the trained copy (one reference swap)."""
        self.version += 1
        self._serving = self._train.clone_frozen()

    def reset_to_static(self) -> None:
        """Forget online learning: serve and train from the static weights again."""
        self._train = self._fresh_trainable()
        self._opt = torch.optim.Adam(self._train.parameters(), lr=self.online.lr)
        self._serving = self.static
        self._guard.clear()
        self.resets += 1
        self.version += 1

    def guard_stats(self) -> dict[str, float]:
        """Prequential top-1 agreement over the guard window (online, static) and counters."""
        g = np.asarray(self._guard, dtype=np.float64).reshape(-1, 2)
        return {"online_top1": float(g[:, 0].mean()) if len(g) else float("nan"),
                "static_top1": float(g[:, 1].mean()) if len(g) else float("nan"),
                "window": len(g), "updates": self.updates, "version": self.version, "resets": self.resets,
                "compute_s": self.compute_s, "compute_busy_s": self.compute_busy_s}

    def _loop(self) -> None:
        """Background learner: bounded duty cycle, more of it when the server is idle."""
        from ..kernels import limit_this_thread

        limit_this_thread(1)  # no OpenMP team of its own beside decoding's (see there)
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            while not self._stop.is_set() and self._running.is_set():
                if not self._spare_core and not self._idle():  # wait for the engine to go idle
                    if self._stop.wait(0.1):
                        return
                    continue
                t0 = time.perf_counter()
                try:
                    with self._step_lock:
                        if not self._running.is_set() or not self._step_once():
                            break
                except Exception:  # a learner failure must never reach decoding
                    log.exception("online head update failed; resetting to the static weights")
                    self.reset_to_static()
                    break
                dt = time.perf_counter() - t0
                idle = self._idle()
                if not idle:
                    self.compute_busy_s += dt
                share = IDLE_SHARE if idle else self.online.max_share
                if self._stop.wait(dt * (1.0 / share - 1.0)):
                    return

    def _idle(self) -> bool:
        return not self._active and time.monotonic() - self._last_observe > IDLE_AFTER_S

    def pause(self) -> None:
        """Hold the background learner (after its unit of work in flight) until ``resume``; pairs keep queueing.

        For side-by-side measurements on one machine: the learner of one configuration must not take CPU time
        while another configuration is being timed.
        """
        self._running.clear()
        with self._step_lock:
            pass

    def resume(self) -> None:
        """Let the background learner run again; a resumed configuration is about to decode, so it counts as
        busy from here (not idle because nothing was observed while it was held)."""
        self._last_observe = time.monotonic()
        self._running.set()
        self._wake.set()

    def close(self) -> None:
        """Stop the learner thread (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- persistence -------------------------------------------------------------------------

    STATE_KIND = "adaspec.head_online"

    def save(self, path: str | os.PathLike) -> None:
        """Write the serving weights atomically to ``path`` (a checksummed container around an ``.npz``)."""
        head = self._serving
        arrays = {k: v.detach().float().numpy() for k, v in head.state_dict().items()}
        meta = {"kind": self.STATE_KIND, "config": asdict(head.cfg), "version": self.version,
                "updates": self.updates, "resets": self.resets, "static_sha256": self.info.get("weights_sha256"),
                "draft_vocab_sha256": _vocab_hash(head.vocab_ids)}
        save_blob(path, arrays_to_bytes(arrays), meta)

    def load(self, path: str | os.PathLike, vocab_size: int | None = None) -> bool:
        """Resume from ``save``; False (and the static weights) when nothing matching is stored. A file of another
        static head is left alone; a damaged one (wrong arrays, shapes or non-finite weights) is moved aside."""
        matched: list[bool] = []
        restore(path, lambda payload, meta: matched.append(self._load_payload(payload, meta)), "online head")
        return bool(matched and matched[0])

    def _load_payload(self, payload: bytes, meta: dict) -> bool:
        if meta.get("kind") != self.STATE_KIND:
            raise StoreCorruptError(f"not an online head state: {meta.get('kind')!r}")
        if (meta.get("config") != asdict(self.static.cfg)
                or meta.get("draft_vocab_sha256") != _vocab_hash(self.static.vocab_ids)
                or meta.get("static_sha256") != self.info.get("weights_sha256")):
            log.warning("stored online head belongs to another static head; starting from static")
            return False
        counters = [meta.get(k, 0) for k in ("version", "updates", "resets")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counters):
            raise StoreCorruptError("version, updates and resets must be non-negative integers")
        arrays = arrays_from_bytes(payload)
        expected = self._train.state_dict()
        if set(arrays) != set(expected):
            raise StoreCorruptError(f"weights {sorted(arrays)} do not match the head's {sorted(expected)}")
        state = {}
        for k, v in arrays.items():
            if v.shape != tuple(expected[k].shape) or not np.issubdtype(v.dtype, np.floating):
                raise StoreCorruptError(f"weight {k!r} has shape {v.shape} and type {v.dtype}, expected "
                                        f"{tuple(expected[k].shape)} floats")
            if not np.all(np.isfinite(v)):
                raise StoreCorruptError(f"weight {k!r} holds non-finite numbers")
            state[k] = torch.from_numpy(np.array(v, dtype=np.float32))
        self._train.load_state_dict(state)
        self._opt = torch.optim.Adam(self._train.parameters(), lr=self.online.lr)
        self.version, self.updates, self.resets = counters
        self._serving = self._train.clone_frozen()
        return True


def _vocab_hash(vocab_ids: torch.Tensor | None) -> str | None:
    if vocab_ids is None:
        return None
    return hashlib.sha256(vocab_ids.to(torch.int64).numpy().tobytes()).hexdigest()


def _plain(t: Any) -> torch.Tensor:
    """A normal fp32 copy of a tensor the engine produced under inference mode (autograd may use it)."""
    with torch.inference_mode(False):
        return torch.as_tensor(t).detach().float().clone()
