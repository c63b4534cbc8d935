"""One engine worker thread that batches the running requests continuously.

The model runs on one thread only (torch already spreads one forward over the cores). Each round prefills one
chunk of a new request's prompt and then gives every running request one speculative step, all verified by one
batched forward (``Engine.step_batch``); requests join and leave the batch between rounds. Admission is bounded
(``QueueFull``: the server answers 429), and everything the engine touches is touched from this thread only.
The round and its rules are on :class:`Scheduler`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..engine import Engine, Request, stable_text
from ..model.base import KVCacheFull
from ..verify import SamplingParams
from .metrics import ServerMetrics, StatsCursor

log = logging.getLogger("adaspec.serve")


@dataclass
class SchedulerConfig:
    max_active: int = 8
    """Requests generated concurrently (batched step by step); each holds its own KV cache."""
    max_queue: int = 64
    """Requests allowed to wait for a slot; one more is refused with 429."""
    kv_positions: int | None = None
    """KV-cache positions the running requests may hold together (None: no limit). A request holds
    ``prompt + max_tokens`` positions from admission to its end; one that would overflow the pool waits its turn
    in the queue (so a full pool shows as 429s, never as a failure mid-generation)."""

    def __post_init__(self) -> None:
        if self.max_active < 1:
            raise ValueError("max_active must be >= 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.kv_positions is not None and self.kv_positions < 1:
            raise ValueError("kv_positions must be >= 1")


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``."""


class NotAccepting(Exception):
    """The scheduler is draining or stopped."""


class Reservation:
    """A place in the waiting queue held by ``Scheduler.reserve`` until ``submit`` uses it or the ``with`` block
    it opens ends."""

    def __init__(self, scheduler: "Scheduler"):
        self._scheduler = scheduler
        self.held = True

    def release(self) -> None:
        self._scheduler._release(self)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Update:
    """What the worker tells a request's consumer after the first token, after steps, and at the end."""

    text: str  # text safe to show so far (``stable_text``); the whole text once finished
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    stats: dict | None = None  # speculation statistics, on the final update of a request that asked for them
    error: str | None = None  # "bad_request: ...", "unavailable: ..." (KV cache full), "shutdown", or "internal"


@dataclass
class Job:
    """A request as the scheduler sees it. ``deliver`` is called on the worker thread; it must not block."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    namespace: str
    deliver: Callable[[Update], None]
    stream: bool = False
    want_stats: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    cancel_reason: str | None = None  # set by ``Scheduler.cancel``
    done: bool = False  # the final update was delivered
    req: Request | None = None
    cursor: StatsCursor = field(default_factory=StatsCursor)
    last_emit: float = 0.0
    sent_text_len: int = 0
    kv_held: int = 0  # KV-cache positions this job holds in the pool while it runs

    @property
    def kv_need(self) -> int:
        """KV-cache positions the request may fill: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_tokens


class Scheduler:
    """The model runs on one thread only: torch already spreads one forward over the
    cores, and two forwards in parallel threads would only fight for them. The
    worker repeats a *round*:

    1. run queued worker tasks (learned-state snapshots), in order;
    2. admit waiting requests while a slot is free (``max_active``) and the KV pool
       (``kv_positions``) holds their prompt and ``max_tokens``, in arrival order;
    3. prefill one chunk (``engine.PREFILL_CHUNK`` tokens) of the oldest admitted
       request whose prompt is not in its KV cache yet; after its last chunk it
       emits its first token and joins the batch. One chunk per round bounds how
       long a long prompt holds up the running requests;
    4. give every running request one speculative step, all verified by one
       batched forward (``Engine.step_batch``), finishing those that are done,
       cancelled or failed. The drafts share one budget: at high load the batch
       drafts little, at low load as much as pays (``control/batch.py``).

    A request's output does not depend on the batch on the row-exact backends
    (each forward row is computed as if alone, and each request keeps its own
    generator and prompt chunking), so batching changes only timing.

    Admission is bounded: at most ``max_active`` requests run and ``max_queue`` wait;
    ``submit`` raises ``QueueFull`` beyond that (the server answers 429). A consumer
    that must do expensive work before it can submit (tokenizing a long prompt)
    takes a place first with ``reserve``, so a burst beyond the bound is refused
    before any of that work is done. A consumer
    that goes away calls ``cancel``: a waiting request is dropped at once, a
    running one is finished as cancelled at its next turn (its speculators then
    learn from it as an unfinished request). A request that fails (in its step or
    in the batch's forward, which is then retried request by request) ends with an
    error while the others go on. Everything the engine touches, speculator state
    included, is touched from this thread only; learned-state snapshots are worker
    tasks for that reason.

    Load the model and build the engine on a thread that then ends (the server's
    loader thread does), not on the thread that goes on living beside this one:
    a thread that ran an OpenMP parallel loop keeps its idle team, libgomp then
    counts more threads than cores, and this thread's team sleeps and wakes at
    every loop instead of spinning (measured: decoding 2-3x slower).
    """

    def __init__(self, engine: Engine, metrics: ServerMetrics, config: SchedulerConfig | None = None,
                 state_sizes: Callable[[], Mapping[tuple[str, str], float]] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.engine = engine
        self.metrics = metrics
        self.config = config or SchedulerConfig()
        self.state_sizes = state_sizes
        self.clock = clock
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # admitted, prefilling or decoding
        self._kv_used = 0  # KV positions held by the admitted jobs
        self._tasks: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self._reserved = 0  # places held by reservations not yet submitted
        self._accepting = True
        self._stopping = False
        self._final: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="adaspec-engine", daemon=True)
        self._thread.start()

    # -- consumer side ------------------------------------------------------------------------------

    def reserve(self) -> Reservation:
        """Hold a place for a job about to be submitted; raises ``QueueFull`` or ``NotAccepting`` as ``submit``
        would. Use it as a context manager: an unused place is given back when the block ends."""
        with self._cond:
            self._check_room()
            self._reserved += 1
        return Reservation(self)

    def submit(self, job: Job, reservation: Reservation | None = None) -> None:
        """Queue ``job``, in the place ``reservation`` holds if given (it then cannot be refused for room)."""
        with self._cond:
            if reservation is not None and reservation.held:
                if not self._accepting:
                    raise NotAccepting()
                reservation.held = False
                self._reserved -= 1
            else:
                self._check_room()
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify_all()

    def _check_room(self) -> None:
        if not self._accepting:
            raise NotAccepting()
        free_slots = self.config.max_active - len(self._active)
        if len(self._waiting) + self._reserved >= self.config.max_queue + max(0, free_slots):
            raise QueueFull()

    def _release(self, reservation: Reservation) -> None:
        with self._cond:
            if reservation.held:
                reservation.held = False
                self._reserved -= 1

    def cancel(self, job: Job, reason: str = "client disconnected") -> None:
        """Stop a request: dropped now if waiting, finished as cancelled at its next turn if running."""
        with self._cond:
            if job.done or job.cancel_reason is not None:
                return
            job.cancel_reason = reason
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.waiting.set(len(self._waiting))
                self._deliver_final(job, "cancelled")
            self._cond.notify_all()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the engine thread between steps; the future holds its result or exception."""
        fut: Future = Future()
        with self._cond:
            if self._stopping:
                fut.set_exception(NotAccepting())
                return fut
            self._tasks.append((fn, fut))
            self._cond.notify_all()
        return fut

    def stop_admissions(self) -> None:
        with self._cond:
            self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._active

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._cond:
            return len(self._active), len(self._waiting)

    def cancel_all(self, reason: str = "shutdown") -> None:
        with self._cond:
            jobs = list(self._waiting) + list(self._active)
        for job in jobs:
            self.cancel(job, reason)

    def shutdown(self, final: Callable[[], None] | None = None, timeout: float = 60.0) -> None:
        """Refuse new work, cancel what is left, run ``final`` on the engine thread, and join it."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._final = final
            self._cond.notify_all()
        self.cancel_all("shutdown")
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the engine thread did not stop within %.0f s", timeout)

    # -- worker side -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._tasks or self._stopping):
                    self._cond.wait()
                tasks = list(self._tasks)
                self._tasks.clear()
                admit = []
                while self._waiting and len(self._active) + len(admit) < self.config.max_active and \
                        not self._stopping and self._fits(self._waiting[0], bool(admit)):
                    job = self._waiting.popleft()
                    job.kv_held = job.kv_need
                    self._kv_used += job.kv_held
                    admit.append(job)
                self.metrics.waiting.set(len(self._waiting))
                stop = self._stopping and not self._active and not self._waiting
            for fn, fut in tasks:
                self._run_task(fn, fut)
            if stop:
                break
            for job in admit:
                self._admit(job)
            for job in self._active:
                if job.req is not None and job.req.prefilling:
                    self._prefill(job)
                    break
            self._step([j for j in self._active if j.req is not None and not j.req.prefilling])
        if self._final is not None:
            try:
                self._final()
            except Exception:
                log.exception("final learned-state save failed")

    def _fits(self, job: Job, admitting: bool) -> bool:
        """Whether the KV pool holds ``job`` beside the admitted ones; a job alone always fits (the model's
        context bounds it), so nothing waits forever."""
        pool = self.config.kv_positions
        return pool is None or not (self._active or admitting) or self._kv_used + job.kv_need <= pool

    @staticmethod
    def _run_task(fn: Callable[[], object], fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the caller through the future
            fut.set_exception(e)

    def _admit(self, job: Job) -> None:
        if job.cancel_reason is not None:
            self._give_back(job)
            self._deliver_final(job, "cancelled")
            return
        self.metrics.queue_time.observe(self.clock() - job.arrival)
        try:
            job.req = self.engine.begin(job.prompt_ids, job.params, job.id, job.namespace)
        except ValueError as e:  # a prompt the engine refuses (checked before submission, so rare)
            self._fail_start(job, f"bad_request: {e}")
            return
        except Exception:
            log.exception("request %s failed at admission", job.id)
            self._fail_start(job, "internal")
            return
        with self._cond:
            self._active.append(job)
            self.metrics.running.set(len(self._active))

    def _fail_start(self, job: Job, error: str) -> None:
        self._give_back(job)
        self.metrics.request_success.labels("error").inc()
        self._deliver_final(job, "error", error=error)

    def _give_back(self, job: Job) -> None:
        with self._cond:
            self._kv_used -= job.kv_held
            job.kv_held = 0

    def _prefill(self, job: Job) -> None:
        """One chunk of ``job``'s prompt; after the last one, its first token."""
        req = job.req
        assert req is not None
        if job.cancel_reason is not None:
            self._end(job, cancelled=True)
            return
        try:
            self.engine.prefill_step(req)
        except Exception as e:
            log.exception("request %s failed at prefill", job.id)
            self._end(job, error=f"bad_request: {e}" if isinstance(e, ValueError) else "internal")
            return
        if req.prefilling:
            return
        t = self.clock()
        job.last_emit = t
        self.metrics.ttft.observe(t - job.arrival)
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        self.metrics.observe_stats(req.stats, job.cursor)
        if req.finished:
            self._end(job)
        else:
            self._progress(job)

    def _step(self, jobs: list[Job]) -> None:
        """One batched step of the running jobs (cancelled ones end first)."""
        batch = []
        for job in jobs:
            if job.cancel_reason is not None:
                log.info("request %s cancelled (%s) after %d tokens", job.id, job.cancel_reason, len(job.req.output))
                self._end(job, cancelled=True)
            else:
                batch.append(job)
        if not batch:
            return
        steps_before = [len(job.req.stats.step_drafted) for job in batch]
        try:
            results = self.engine.step_batch([job.req for job in batch])
        except Exception as e:  # the step itself broke (not one request): every request of it ends
            log.exception("a batched step failed")
            results = [e] * len(batch)
        t = self.clock()
        verified = [job.req.stats.step_drafted[-1] for job, n in zip(batch, steps_before)
                    if len(job.req.stats.step_drafted) > n]
        if verified:
            self.metrics.batch_requests.observe(len(verified))
            self.metrics.batch_rows.observe(len(verified) + sum(verified))
        for job, added in zip(batch, results):
            req = job.req
            if isinstance(added, KVCacheFull):
                log.warning("request %s stopped: %s", job.id, added)
                self._end(job, error="unavailable: the KV cache is full")
                continue
            if isinstance(added, BaseException):
                log.error("request %s failed during a step", job.id, exc_info=added)
                self._end(job, error="internal")
                continue
            self.metrics.observe_stats(req.stats, job.cursor)
            if added:
                self.metrics.itl.observe(t - job.last_emit)
                job.last_emit = t
            if req.finished:
                self._end(job)
            else:
                self._progress(job)

    def _progress(self, job: Job) -> None:
        if not job.stream:
            return
        text = stable_text(job.req)
        if len(text) > job.sent_text_len:
            job.sent_text_len = len(text)
            self._safe_deliver(job, Update(text, False, None, len(job.prompt_ids), len(job.req.output)))

    def _end(self, job: Job, cancelled: bool = False, error: str | None = None) -> None:
        req = job.req
        assert req is not None
        try:
            self.engine.finish(req, cancelled=cancelled or error is not None)
        except Exception:
            log.exception("request %s: finishing failed", job.id)
            error = error or "internal"
        self.metrics.observe_stats(req.stats, job.cursor)
        reason = "error" if error else ("cancelled" if cancelled else (req.finish_reason or "stop"))
        self.metrics.request_success.labels(reason).inc()
        self.metrics.e2e.observe(self.clock() - job.arrival)
        with self._cond:
            if job in self._active:
                self._active.remove(job)
            self._kv_used -= job.kv_held
            job.kv_held = 0
            self.metrics.running.set(len(self._active))
        stats = self._stats(job) if job.want_stats and not error else None
        self._deliver_final(job, reason, error=error, stats=stats)
        self.publish_state_sizes()

    def _stats(self, job: Job) -> dict:
        out = job.req.stats.to_dict()
        try:
            ctl = self.engine.controller.summary(job.id)
            if ctl:
                out["controller"] = ctl
        except Exception:
            log.exception("controller summary failed")
        return out

    def _deliver_final(self, job: Job, reason: str, error: str | None = None, stats: dict | None = None) -> None:
        if job.done:
            return
        job.done = True
        req = job.req
        text = req.text if req is not None else ""
        completion = len(req.output) if req is not None else 0
        if req is None and reason == "cancelled":
            self.metrics.request_success.labels("cancelled").inc()
        if reason == "cancelled" and error is None and job.cancel_reason == "shutdown":
            error = "shutdown"
        self._safe_deliver(job, Update(text, True, reason, len(job.prompt_ids), completion, stats, error))

    @staticmethod
    def _safe_deliver(job: Job, update: Update) -> None:
        try:
            job.deliver(update)
        except Exception:  # the consumer's loop is gone; nothing is waiting for this update
            log.debug("request %s: update not delivered", job.id)

    def publish_state_sizes(self) -> None:
        """Refresh the learned-state sizes /metrics reports (engine thread: done when a request ends)."""
        if self.state_sizes is None:
            return
        try:
            self.metrics.learned_state.publish(self.state_sizes())
        except Exception:
            log.exception("reading learned-state sizes failed")
