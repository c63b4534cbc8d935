"""Whether speculating pays in batched steps, measured: the engine stops it where it does not.

The controller prices a draft at what it adds to the batch's forward (``CostModel.others``) and at its own and the
speculators' measured time. What that model leaves out grows with the batch: every request's planning, proposing and
learning runs one after the other on the engine's thread, and a calibration error is paid once per request. On a
steep cost curve (a CPU, where a batch of 8 rows already keeps the cores busy and each extra row costs ~5-7% of the
step) those small terms decide, and speculation in a batch can lose a few percent where a single stream gains.

So the engine measures it. Batched steps are grouped by their number of requests (2-3, 4-7, 8-15, ...) and run in
blocks of ``BLOCK`` steps, each block either speculating or not (the speculators go on learning from every step
either way). The rate of an arm is the tokens its steps emitted over their wall time (planning, proposing, the
forward and verification: what the batch waits for), exponentially weighted over its last ``HALF_LIFE`` blocks.
The first blocks alternate; after that a block takes the faster arm, and now and then the other: speculation every
``EXPLORE_ON``-th block while it measures slower (in a batch it loses a few percent, where it wins it can win half
again, so a workload that turns, such as requests repeating earlier ones, is worth noticing within a few blocks),
plain decoding every ``EXPLORE_OFF``-th block while speculation measures faster. An explored block that beats the
faster arm's rate is run again at once, so the estimates follow a turn within a few blocks. Blocks alternate in
time, so a machine that slows down slows both arms alike. Single requests are not guarded: there the controller's
model holds all the costs.
Only speed is at stake: a step that does not speculate verifies no draft and emits the target's own token.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

__all__ = ["SpeculationGuard", "BLOCK", "EXPLORE_ON", "EXPLORE_OFF", "HALF_LIFE"]

BLOCK = 8
"""Batched steps per decision."""
EXPLORE_ON = 4
"""While speculating measures slower, every this many blocks one speculates anyway (its cost: a quarter of the gap)."""
EXPLORE_OFF = 16
"""While speculating measures faster, every this many blocks one does not."""
HALF_LIFE = 16.0
"""Blocks of an arm over which its rate halves its weight."""
WARMUP_BLOCKS = 2
"""Blocks of each arm measured (alternating, speculation first) before the faster one is preferred."""


@dataclass
class _Arm:
    tokens: float = 0.0
    seconds: float = 0.0
    blocks: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


@dataclass
class _Bucket:
    on: _Arm
    off: _Arm
    speculate: bool = True
    left: int = 0  # steps left in the current block
    tokens: int = 0  # of the current block
    seconds: float = 0.0
    again: bool = False  # the block just ended ran the slower arm and beat the faster one's rate: run it again


class SpeculationGuard:
    """Per batch size (powers of two), whether batched steps speculate (module docstring). ``allow(rows)`` before
    a step, ``record(rows, speculated, tokens, seconds)`` after it."""

    def __init__(self, min_rows: int = 2):
        self.min_rows = min_rows
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    def allow(self, rows: int) -> bool:
        if rows < self.min_rows:
            return True
        with self._lock:
            b = self._buckets.get(rows.bit_length())
            if b is None:
                b = self._buckets[rows.bit_length()] = _Bucket(_Arm(), _Arm())
            if b.left <= 0:
                b.speculate = self._next_arm(b)
                b.left, b.tokens, b.seconds = BLOCK, 0, 0.0
            return b.speculate

    def record(self, rows: int, speculated: bool, tokens: int, seconds: float) -> None:
        """One batched step of ``rows`` requests: whether it speculated, the tokens it emitted, its wall time."""
        if rows < self.min_rows or not math.isfinite(seconds) or seconds < 0:
            return
        with self._lock:
            b = self._buckets.get(rows.bit_length())
            if b is None or b.left <= 0 or speculated != b.speculate:
                return  # not a step of the current block
            b.tokens += tokens
            b.seconds += seconds
            b.left -= 1
            if b.left == 0:
                arm, other = (b.on, b.off) if b.speculate else (b.off, b.on)
                decay = 0.5 ** (1.0 / HALF_LIFE)
                arm.tokens = arm.tokens * decay + b.tokens
                arm.seconds = arm.seconds * decay + b.seconds
                arm.blocks += 1
                beat = b.seconds > 0 and b.tokens / b.seconds > other.rate  # False while other.rate is nan
                b.again = beat and arm.rate < other.rate

    def _next_arm(self, b: _Bucket) -> bool:
        if b.on.blocks < WARMUP_BLOCKS or b.off.blocks < WARMUP_BLOCKS:
            return b.on.blocks <= b.off.blocks
        if b.again:
            return b.speculate
        faster_on = b.on.rate >= b.off.rate
        every = EXPLORE_OFF if faster_on else EXPLORE_ON
        explore = (b.on.blocks + b.off.blocks) % every == every - 1
        return faster_on != explore

    def stats(self) -> dict:
        """Per batch-size bucket (``"8-15"``): the rates measured with and without speculation (tokens per second),
        the blocks each ran, and whether the current block speculates."""
        with self._lock:
            out = {}
            for k, b in sorted(self._buckets.items()):
                lo, hi = 1 << (k - 1), (1 << k) - 1
                out[f"{lo}-{hi}"] = {
                    "speculating": b.speculate,
                    "rate_speculating": None if math.isnan(b.on.rate) else b.on.rate,
                    "rate_plain": None if math.isnan(b.off.rate) else b.off.rate,
                    "blocks_speculating": b.on.blocks, "blocks_plain": b.off.blocks}
            return out
