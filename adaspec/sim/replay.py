"""The model stand-in of a trace replay: recorded greedy outputs, a target that reproduces them, a virtual clock.

A *trace* is one greedy generation recorded from the real target. Under greedy decoding the target's behaviour
along that path is known, so ``ReplayTarget`` stands in for the model and the production ``Engine`` runs over it
unchanged; a ``VirtualClock`` charges each forward a recorded c(n). The trace file is described on
:func:`load_traces`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..control.costs import parse_cost_curve
from ..files import write_atomic
from ..model.base import Capabilities, ForwardOutput
from ..speculators.base import DecodeContext, Draft, Speculator, SpeculatorBase, StepOutcome

CPU_LLAMACPP_COSTS = {1: 0.013, 2: 0.024, 4: 0.033, 8: 0.057, 16: 0.089}
"""llama.cpp batch-eval seconds of the bundled SmolLM2-135M Q4_1 on a 2-core CPU (REFERENCES); the default curve."""


# -- traces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    id: str
    domain: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]

    def to_json(self) -> dict:
        return {"id": self.id, "domain": self.domain, "prompt_ids": list(self.prompt_ids),
                "output_ids": list(self.output_ids)}


def _ids(value: object, key: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                              for t in value):
        raise ValueError(f"{where}: {key!r} must be a list of non-negative integers")
    return tuple(value)


def parse_trace(obj: object, where: str = "trace") -> Trace:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key in ("prompt_ids", "output_ids"):
        if key not in obj:
            raise ValueError(f"{where}: missing {key!r}")
    prompt = _ids(obj["prompt_ids"], "prompt_ids", where)
    if not prompt:
        raise ValueError(f"{where}: 'prompt_ids' is empty")
    tid, domain = obj.get("id", where), obj.get("domain", "default")
    if not isinstance(tid, (str, int)) or not isinstance(domain, str):
        raise ValueError(f"{where}: 'id' must be a string and 'domain' a string")
    return Trace(str(tid), domain, prompt, _ids(obj["output_ids"], "output_ids", where))


def load_traces(path: str | Path) -> list[Trace]:
    """Read a JSONL trace file; raises ValueError naming the line of the first bad record.

    Trace file: JSON Lines, one object per line::

        {"id": "sharegpt-17", "domain": "chat", "prompt_ids": [1, 2, ...], "output_ids": [5, 6, ...]}

    ``id`` and ``domain`` (default ``"default"``) label the trace; ``output_ids`` is the greedy output without the
    stop token.
    """
    traces = []
    try:
        with open(path) as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not JSON ({e.msg})") from None
                traces.append(parse_trace(obj, where))
    except OSError as e:
        raise ValueError(f"cannot read traces {path}: {e}") from e
    return traces


def save_traces(path: str | Path, traces: Iterable[Trace]) -> None:
    """Write traces as JSONL (atomically, :func:`adaspec.files.write_atomic`)."""
    write_atomic(path, "".join(json.dumps(t.to_json()) + "\n" for t in traces), world_readable=True)


def compact_vocabulary(traces: Sequence[Trace]) -> list[Trace]:
    """The traces with token ids renumbered 0..V-1 in order of first use.

    Model-free speculators compare token ids for equality, so a one-to-one renumbering changes
    no decision (except ties a speculator breaks by token id), and the replay's logits shrink from
    the model's vocabulary to the tokens that occur (a [n, 49152] one-hot per forward would
    dominate the simulation's time).
    """
    ids: dict[int, int] = {}

    def remap(seq: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(ids.setdefault(t, len(ids)) for t in seq)

    return [Trace(t.id, t.domain, remap(t.prompt_ids), remap(t.output_ids)) for t in traces]


# -- time ------------------------------------------------------------------------------------------


class VirtualClock:
    """A clock that advances by charged costs, optionally plus real time spent outside charged calls.

    ``real_time_scale = 0`` (default) makes every timing deterministic; ``1`` adds the
    real overhead of speculators, controller and engine loop as measured on this machine.
    """

    def __init__(self, real_time_scale: float = 0.0):
        self.real_time_scale = real_time_scale
        self._virtual = 0.0
        self._excluded = 0.0
        self._t0 = time.perf_counter()

    def __call__(self) -> float:
        if not self.real_time_scale:
            return self._virtual
        real = time.perf_counter() - self._t0 - self._excluded
        return self._virtual + self.real_time_scale * real

    def advance(self, seconds: float) -> None:
        self._virtual += seconds

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Real time inside this block is not counted (it stands for a charged cost)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside the block: a replay's one-hot logits are too small to gain from more, and on a
    busy machine the threads' synchronisation costs more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class CostCurve:
    """Seconds per forward of n tokens from recorded points: linear in between, last-segment slope beyond."""

    def __init__(self, points: Mapping[int, float]):
        pts = parse_cost_curve({str(k): v for k, v in points.items()})
        self.ns = np.asarray(sorted(pts), dtype=np.float64)
        self.secs = np.asarray([pts[int(n)] for n in self.ns])

    def __call__(self, n: int) -> float:
        if len(self.ns) == 1 or n <= self.ns[-1]:
            return float(np.interp(n, self.ns, self.secs))
        slope = max(0.0, (self.secs[-1] - self.secs[-2]) / (self.ns[-1] - self.ns[-2]))
        return float(self.secs[-1] + slope * (n - self.ns[-1]))

    def to_dict(self) -> dict[str, float]:
        return {str(int(n)): float(s) for n, s in zip(self.ns, self.secs)}


# -- the replay target -----------------------------------------------------------------------------


class ReplayCache:
    """The committed token sequence of one replayed request, and where it stands on the recorded path."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ref: tuple[int, ...] | None = None  # recorded prompt + output
        self.on_trace = True  # tokens == ref[:len(tokens)]
        self._last: tuple[list[int], list[int]] | None = None  # tokens and parents of the last forward

    @property
    def length(self) -> int:
        return len(self.tokens)

    def commit(self, keep: Sequence[int]) -> None:
        """Keep rows ``keep`` of the last forward; they must form a root-first path."""
        keep = [int(i) for i in keep]
        if not keep:
            self._last = None
            return
        if self._last is None:
            raise ValueError("commit without a forward to commit from")
        toks, parents = self._last
        for j, i in enumerate(keep):
            if not 0 <= i < len(toks) or parents[i] != (keep[j - 1] if j else -1):
                raise ValueError(f"commit rows {keep} are not a root-first path of the last forward")
        self._extend([toks[i] for i in keep])
        self._last = None

    def truncate(self, length: int) -> None:
        self.tokens = self.tokens[: max(0, length)]
        self.on_trace = self.ref is not None and tuple(self.tokens) == self.ref[: len(self.tokens)]

    def _extend(self, tokens: list[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        if self.on_trace and self.ref is not None:
            self.on_trace = tuple(tokens) == self.ref[start : start + len(tokens)]


class ReplayTarget:
    """A ``TargetModel`` whose greedy continuation of each recorded prompt is the recorded output.

    Row i of a forward predicts (as a one-hot argmax) the recorded token after the path
    ``committed + ancestors(i) + i`` when that path lies on the recorded sequence, and the
    filler token ``vocab_size - 1`` otherwise (off the path, or past the recorded end).
    Each forward advances ``clock`` by ``cost(n)``; a prefill is charged ``cost(1)``.
    """

    device = torch.device("cpu")
    hidden_size = 0
    capabilities = Capabilities(trees=True, hidden_states=False, rows_exact=True)

    def __init__(self, traces: Iterable[Trace] = (), vocab_size: int | None = None,
                 cost: Callable[[int], float] | None = None, clock: VirtualClock | None = None,
                 max_context: int = 1 << 20):
        self._refs: dict[tuple[int, ...], tuple[int, ...]] = {}
        top = 0
        for t in traces:
            self.add(t.prompt_ids, t.output_ids)
            top = max([top, *t.prompt_ids, *t.output_ids])
        self.vocab_size = vocab_size if vocab_size is not None else top + 2  # + the filler token
        if self.vocab_size <= top:
            raise ValueError(f"vocab_size {self.vocab_size} does not cover token id {top}")
        self.filler = self.vocab_size - 1
        self.cost = cost
        self.clock = clock
        self.max_context = max_context
        self.forward_sizes: Counter = Counter()  # n tokens -> forwards run

    def add(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        key = tuple(int(t) for t in prompt_ids)
        ref = key + tuple(int(t) for t in output_ids)
        old = self._refs.get(key)
        if old is not None and old != ref:
            raise ValueError("two traces share a prompt but differ in output; replay them with separate targets")
        self._refs[key] = ref

    def new_cache(self) -> ReplayCache:
        return ReplayCache()

    def prefill(self, cache: ReplayCache, tokens: Sequence[int]) -> ForwardOutput:
        if not len(tokens):
            raise ValueError("prefill needs at least one token")
        toks = [int(t) for t in tokens]
        with self._charged(1):
            if cache.ref is None:
                ref = self._refs.get(tuple(cache.tokens + toks))
                if ref is None:
                    raise ValueError("no recorded trace starts with this prompt")
                cache.ref = ref
            cache._extend(toks)
            nxt = self._next(cache, cache.length - 1, cache.on_trace)
            return ForwardOutput(self._one_hot([nxt]), None)

    def forward(self, cache: ReplayCache, tokens: Sequence[int], parents: Sequence[int] | None = None) -> ForwardOutput:
        n = len(tokens)
        if n == 0:
            raise ValueError("forward needs at least one token")
        toks = [int(t) for t in tokens]
        par = list(range(-1, n - 1)) if parents is None else [int(p) for p in parents]
        if len(par) != n or any(not -1 <= p < i for i, p in enumerate(par)):
            raise ValueError("parents must point to earlier tokens (or -1)")
        with self._charged(n):
            L = cache.length
            ref = cache.ref or ()
            depth = [0] * n  # 0-based: row i sits at position L + depth[i]
            on = [False] * n
            pred = [self.filler] * n
            for i, p in enumerate(par):
                depth[i] = 0 if p < 0 else depth[p] + 1
                pos = L + depth[i]
                on[i] = (cache.on_trace if p < 0 else on[p]) and pos < len(ref) and ref[pos] == toks[i]
                pred[i] = self._next(cache, pos, on[i])
            cache._last = (toks, par)
            return ForwardOutput(self._one_hot(pred), None)

    def _next(self, cache: ReplayCache, pos: int, on_trace: bool) -> int:
        """The recorded token after position ``pos`` if the path to it is on the trace, else the filler."""
        ref = cache.ref or ()
        return int(ref[pos + 1]) if on_trace and pos + 1 < len(ref) else self.filler

    def _one_hot(self, pred: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(pred), self.vocab_size)  # [n, vocab]
        logits[torch.arange(len(pred)), torch.as_tensor(pred)] = 1.0
        return logits

    @contextmanager
    def _charged(self, n: int) -> Iterator[None]:
        self.forward_sizes[n] += 1
        if self.clock is None:
            yield
            return
        with self.clock.excluded():
            yield
        self.clock.advance(self.cost(n) if self.cost is not None else 0.0)


class WrappedSpeculator(SpeculatorBase):
    """A speculator seen through a wrapper that adds bookkeeping around its calls (subclasses override them)."""

    def __init__(self, inner: Speculator):
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    def begin(self, ctx: DecodeContext) -> None:
        self.inner.begin(ctx)

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        return self.inner.propose(ctx, budget)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        self.inner.observe(ctx, outcome)

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        self.inner.end(ctx, finished)

    def stats(self) -> dict:
        return self.inner.stats()

    def pause(self) -> None:
        self.inner.pause()

    def resume(self) -> None:
        self.inner.resume()

    def close(self) -> None:
        self.inner.close()


class ChargedSpeculator(WrappedSpeculator):
    """Wraps a speculator so that each proposal advances the virtual clock by a fixed cost."""

    def __init__(self, inner: Speculator, clock: VirtualClock, seconds: float):
        super().__init__(inner)
        self.clock = clock
        self.seconds = seconds

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        with self.clock.excluded():
            d = self.inner.propose(ctx, budget)
        self.clock.advance(self.seconds)
        return d
