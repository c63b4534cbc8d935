"""Prometheus metrics of the server, in its own ``CollectorRegistry``.

Speculation counters use vLLM's names under the ``adaspec:`` prefix (so dashboards built for vLLM read them);
besides them: steps by chosen speculator, lookahead, request outcomes, token counts, queue sizes, latency histograms
and learned-state sizes. The list is on :class:`ServerMetrics`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..stats import StepCounts

PREFIX = "adaspec:"

_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LOOKAHEAD_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class StatsCursor(StepCounts):
    """The part of a request's ``RequestStats`` already counted, so each step adds only its difference."""

    accepted_per_pos: list[int] = field(default_factory=list)


class _LearnedStateCollector:
    """Reports the latest learned-state sizes the engine worker published (read at scrape time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sizes: dict[tuple[str, str], float] = {}

    def publish(self, sizes: Mapping[tuple[str, str], float]) -> None:
        with self._lock:
            self._sizes = dict(sizes)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily(PREFIX + "learned_state_size",
                              "Size of learned speculator state (the speculator's own unit, e.g. tree nodes)",
                              labels=["speculator", "namespace"])
        with self._lock:
            for (spec, ns), v in sorted(self._sizes.items()):
                g.add_metric([spec, ns], v)
        yield g


class _GuardCollector:
    """What the engine's speculation guard measured, per batch size (read at scrape time)."""

    def __init__(self) -> None:
        self._source: Callable[[], Mapping[str, Mapping]] | None = None

    def watch(self, source: Callable[[], Mapping[str, Mapping]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        on = GaugeMetricFamily(PREFIX + "spec_guard_speculating",
                               "1 while batched steps of this many requests speculate, 0 while the guard has them "
                               "decode plainly", labels=["batch_requests"])
        rate = GaugeMetricFamily(PREFIX + "spec_guard_tokens_per_second",
                                 "Tokens per second the guard measured for batched steps of this many requests, "
                                 "speculating or not", labels=["batch_requests", "arm"])
        for batch, st in sorted((self._source() if self._source is not None else {}).items()):
            on.add_metric([batch], 1.0 if st["speculating"] else 0.0)
            for arm, key in (("speculating", "rate_speculating"), ("plain", "rate_plain")):
                if st[key] is not None:
                    rate.add_metric([batch, arm], st[key])
        yield on
        yield rate


class ServerMetrics:
    """All server metrics; methods are thread-safe (prometheus_client's primitives are).

    Speculation counters use vLLM's names under the ``adaspec:`` prefix
    (REFERENCES, "Conventions users expect"); the client library appends
    ``_total`` to counters, exactly as vLLM's exposition does::

        adaspec:spec_decode_num_drafts_total                 steps that verified a non-empty draft
        adaspec:spec_decode_num_draft_tokens_total           draft nodes verified
        adaspec:spec_decode_num_accepted_tokens_total        draft nodes accepted
        adaspec:spec_decode_num_accepted_tokens_per_pos_total{position}   steps whose draft was accepted past depth position

    so mean acceptance length = 1 + accepted / drafts. Besides those: steps by the
    chosen speculator (``none`` = no speculation), the lookahead (draft nodes
    verified per step, 0 included), request outcomes by finish reason, prompt and
    generation tokens, running and waiting requests, rejected requests by reason,
    latency histograms (TTFT, inter-token latency, end-to-end, queue time),
    what the speculation guard measured per batch size (whether batched steps
    speculate, and their tokens per second with and without) and, where the
    speculators report it, learned-state size per speculator and namespace. The
    standard ``process_*`` metrics (resident memory, CPU seconds) come with it.

    Inter-token latency is observed once per engine step that emitted tokens: the
    time since the previous emission of the same request. Tokens accepted in the
    same step reach the client together, so this is what a streaming client sees.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.num_drafts = Counter(p + "spec_decode_num_drafts", "Steps that verified a non-empty draft", registry=r)
        self.num_draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "Draft tokens (nodes) verified",
                                        registry=r)
        self.num_accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                           registry=r)
        self.accepted_per_pos = Counter(p + "spec_decode_num_accepted_tokens_per_pos",
                                        "Steps whose draft was accepted at this depth (0-based)", ["position"],
                                        registry=r)
        self.steps = Counter(p + "spec_decode_steps", "Engine steps by the speculator whose draft was verified",
                             ["speculator"], registry=r)
        self.lookahead = Histogram(p + "spec_decode_lookahead", "Draft tokens verified per step (0 = plain step)",
                                   buckets=_LOOKAHEAD_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds",
                             "Time between successive token emissions of a request", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to the end of the request",
                             buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Arrival to admission by the scheduler",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.request_success = Counter(p + "request_success", "Requests ended, by finish reason",
                                       ["finished_reason"], registry=r)
        self.requests_rejected = Counter(p + "requests_rejected", "Requests refused before generation, by reason",
                                         ["reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests being generated", registry=r)
        self.batch_requests = Histogram(p + "batch_requests", "Requests verified by one batched forward",
                                        buckets=_BATCH_BUCKETS, registry=r)
        self.batch_rows = Histogram(p + "batch_rows", "Rows (pending tokens and draft tokens) of one batched "
                                    "forward", buckets=_ROWS_BUCKETS, registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting for a generation slot", registry=r)
        self.snapshots = Counter(p + "learned_state_snapshots", "Learned-state snapshots, by result", ["result"],
                                 registry=r)
        self.learned_state = _LearnedStateCollector()
        r.register(self.learned_state)
        self.guard = _GuardCollector()
        r.register(self.guard)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        for reason in ("stop", "length", "cancelled", "error"):
            self.request_success.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_stats(self, stats, cur: StatsCursor) -> None:
        """Count what ``stats`` (a ``RequestStats``) gained since ``cur``, and advance ``cur``."""
        d_forwards = stats.forwards - cur.forwards
        d_drafted = stats.drafted - cur.drafted
        if stats.draft_steps > cur.draft_steps:
            self.num_drafts.inc(stats.draft_steps - cur.draft_steps)
        if d_drafted > 0:
            self.num_draft_tokens.inc(d_drafted)
        if stats.accepted > cur.accepted:
            self.num_accepted_tokens.inc(stats.accepted - cur.accepted)
        for i, n in enumerate(stats.accepted_per_pos):
            before = cur.accepted_per_pos[i] if i < len(cur.accepted_per_pos) else 0
            if n > before:
                self.accepted_per_pos.labels(str(i)).inc(n - before)
        for name, n in stats.chosen.items():
            if n > cur.chosen.get(name, 0):
                self.steps.labels(name).inc(n - cur.chosen.get(name, 0))
        if d_forwards == 1 and sum(stats.chosen.values()) > sum(cur.chosen.values()):
            self.lookahead.observe(d_drafted)  # one speculative step (the prefill has no draft and is not counted)
        if stats.output_tokens > cur.output_tokens:
            self.generation_tokens.inc(stats.output_tokens - cur.output_tokens)
        cur.output_tokens, cur.forwards, cur.drafted = stats.output_tokens, stats.forwards, stats.drafted
        cur.accepted, cur.draft_steps = stats.accepted, stats.draft_steps
        cur.accepted_per_pos = list(stats.accepted_per_pos)
        cur.chosen.clear()
        cur.chosen.update(stats.chosen)
