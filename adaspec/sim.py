"""Trace-replay simulator: project speculation speed without running the model.

A *trace* is one greedy generation recorded from the real target: its prompt and
output token ids. Under greedy decoding the target's whole behaviour along that
path is known, so ``ReplayTarget`` stands in for the model: at every position
on the recorded path its logits make the recorded next token the argmax, and a
draft node that leaves the path is rejected exactly as the real target would
reject it. The real ``Engine`` loop then runs over it with speculators and a
controller, and a ``VirtualClock`` charges each forward the recorded cost
c(n) of verifying n tokens, so speed projections are deterministic and take
seconds instead of model time (ArcticInference replays responses through its
suffix cache the same way).

What is and is not projected: verify forwards cost c(n) from the curve; the
prefill is charged c(1) (the same in every setup; decode speed excludes it);
proposals cost what the cost file says (default 0: model-free speculators take
microseconds); the Python time of speculators, controller and engine loop is
left out unless ``real_time_scale`` is 1 (``--real-overhead``), which makes
runs machine-dependent. Speculators that need the target's hidden states
cannot run here (the replay has none).

Trace file: JSON Lines, one object per line::

    {"id": "sharegpt-17", "domain": "chat", "prompt_ids": [1, 2, ...], "output_ids": [5, 6, ...]}

``id`` (string) and ``domain`` (string, default ``"default"``) label the trace;
``output_ids`` is the greedy output without the stop token.

Cost file: JSON ``{n: seconds}`` for a forward over ``n`` tokens (pending token
plus draft), or an object with that curve under ``"verify"`` and optionally
``"propose": {speculator: seconds}`` per proposal call. Between recorded sizes
the cost is interpolated linearly, beyond them extrapolated along the last
segment.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .control.base import Controller, FixedController
from .control.costs import parse_cost_curve
from .engine import Engine
from .files import write_atomic
from .model.base import Capabilities, ForwardOutput
from .speculators.base import DecodeContext, Draft, Speculator, SpeculatorBase, StepOutcome
from .verify import SamplingParams

__all__ = ["Trace", "load_traces", "save_traces", "VirtualClock", "ReplayCache", "ReplayTarget", "CostCurve",
           "ChargedSpeculator", "SimEnv", "Setup", "compact_vocabulary", "default_setups", "simulate", "SimResult",
           "format_table", "add_parser"]

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
    """Read a JSONL trace file; raises ValueError naming the line of the first bad record."""
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


@dataclass
class ChargedSpeculator(SpeculatorBase):
    """Wraps a speculator so that each proposal advances the virtual clock by a fixed cost."""

    inner: Speculator
    clock: VirtualClock
    seconds: float

    @property
    def name(self) -> str:
        return self.inner.name

    def begin(self, ctx: DecodeContext) -> None:
        self.inner.begin(ctx)

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        with self.clock.excluded():
            d = self.inner.propose(ctx, budget)
        self.clock.advance(self.seconds)
        return d

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        self.inner.observe(ctx, outcome)

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        self.inner.end(ctx, finished)


# -- setups and the run ----------------------------------------------------------------------------


@dataclass
class SimEnv:
    """What a setup is built against: the run's virtual clock (a controller that times itself should
    use it) and the traces as replayed (token ids renumbered, see ``compact_vocabulary``)."""

    clock: VirtualClock
    traces: Sequence[Trace]


@dataclass
class Setup:
    """One configuration to simulate: ``build(env)`` returns fresh speculators and a controller."""

    name: str
    build: Callable[[SimEnv], tuple[list[Speculator], Controller]]


def _available_speculators() -> dict[str, Callable[[], Speculator]]:
    """Model-free speculators that can run in a replay (those needing hidden states cannot)."""
    found: dict[str, Callable[[], Speculator]] = {}
    try:
        from .speculators.suffix import SuffixSpeculator

        found["suffix"] = SuffixSpeculator
    except ImportError:
        pass
    try:
        from .speculators.ngram import PromptLookupSpeculator

        found["ngram"] = PromptLookupSpeculator
    except ImportError:
        pass
    return found


def _oracle(env: SimEnv) -> Speculator:
    from .speculators.oracle import OracleSpeculator

    oracle = OracleSpeculator()
    for t in env.traces:
        oracle.add(list(t.prompt_ids), list(t.output_ids))
    return oracle


def default_setups(lookahead: int = 8, names: Sequence[str] | None = None) -> list[Setup]:
    """plain; each available model-free speculator alone at ``lookahead``; all of them under the adaptive
    controller. ``names`` selects among those (``plain``, ``<speculator>``, ``adaptive``) and ``oracle``,
    the recorded continuation itself at ``lookahead`` (the ceiling of speculation on this cost curve)."""
    from .control.adaptive import AdaptiveController

    specs = _available_speculators()
    setups = [Setup("plain", lambda env: ([], FixedController(0)))]
    for name, make in specs.items():
        setups.append(Setup(f"{name}@{lookahead}", lambda env, make=make: ([make()], FixedController(lookahead))))
    if specs:
        setups.append(Setup("adaptive", lambda env: ([m() for m in specs.values()],
                                                     AdaptiveController(timer=env.clock))))
    if names is not None:
        setups.append(Setup(f"oracle@{lookahead}", lambda env: ([_oracle(env)], FixedController(lookahead))))
        wanted = set(names)
        setups = [s for s in setups if s.name in wanted or s.name.split("@")[0] in wanted]
        missing = wanted - {s.name for s in setups} - {s.name.split("@")[0] for s in setups}
        if missing:
            raise ValueError(f"unknown setups {sorted(missing)}; available: plain, "
                             f"{''.join(n + ', ' for n in specs)}{'adaptive, ' if specs else ''}oracle")
    return setups


@dataclass
class SimResult:
    """Totals of one setup over the replayed traces (times are projected, from the cost curve)."""

    setup: str
    traces: int = 0
    output_tokens: int = 0
    forwards: int = 0  # prefill included, as RequestStats counts them
    decode_tokens: int = 0  # tokens after the first of each request
    decode_s: float = 0.0  # projected seconds after prefill: forwards + proposals
    plain_decode_s: float = 0.0  # the same tokens decoded without speculation: decode_tokens x c(1)
    drafted: int = 0
    accepted: int = 0
    mismatches: int = 0  # outputs that differ from the trace (must be 0: decoding is lossless)
    chosen: Counter = field(default_factory=Counter)
    by_domain: dict[str, "SimResult"] = field(default_factory=dict)
    by_quarter: list["SimResult"] = field(default_factory=list)  # the traces in order, in four parts: learning

    @property
    def mean_accepted(self) -> float:
        """Output tokens per target forward (Spec-Bench's mean accepted tokens; plain = 1.00)."""
        return self.output_tokens / self.forwards if self.forwards else 0.0

    @property
    def speedup(self) -> float:
        return self.plain_decode_s / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def add(self, n_out: int, forwards: int, decode_s: float, plain_s: float, drafted: int, accepted: int,
            mismatch: bool, chosen: Mapping[str, int]) -> None:
        self.traces += 1
        self.output_tokens += n_out
        self.forwards += forwards
        self.decode_tokens += max(0, n_out - 1)
        self.decode_s += decode_s
        self.plain_decode_s += plain_s
        self.drafted += drafted
        self.accepted += accepted
        self.mismatches += int(mismatch)
        self.chosen.update(chosen)

    def to_dict(self) -> dict:
        d = {"setup": self.setup, "traces": self.traces, "output_tokens": self.output_tokens,
             "forwards": self.forwards, "mean_accepted": self.mean_accepted, "decode_tokens": self.decode_tokens,
             "projected_decode_s": self.decode_s, "projected_tok_s": self.tok_s, "speedup_vs_plain": self.speedup,
             "drafted": self.drafted, "accepted": self.accepted, "mismatches": self.mismatches,
             "chosen": dict(self.chosen)}
        if self.by_domain:
            d["by_domain"] = {k: v.to_dict() for k, v in self.by_domain.items()}
        if self.by_quarter:
            d["by_quarter"] = [q.to_dict() for q in self.by_quarter]
        return d


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


def simulate(traces: Sequence[Trace], costs: Mapping[int, float] | Callable[[int], float],
             setups: Sequence[Setup] | None = None, propose_costs: Mapping[str, float] | None = None,
             namespace_by_domain: bool = False, real_time_scale: float = 0.0,
             progress: Callable[[str, int], None] | None = None) -> list[SimResult]:
    """Replay ``traces`` in order through each setup with fresh speculators and controller.

    ``costs``: the verify cost curve {n: seconds} (or a callable). ``propose_costs``: seconds
    charged per proposal call by speculator name (default 0: model-free speculators take
    microseconds). Returns one result per setup; outputs are checked against the traces.
    """
    curve = costs if callable(costs) else CostCurve(costs)
    c1 = curve(1)
    setups = list(setups) if setups is not None else default_setups()
    usable = compact_vocabulary([t for t in traces if t.output_ids])
    results = []
    for setup in setups:
        clock = VirtualClock(real_time_scale)
        target = ReplayTarget(usable, cost=curve, clock=clock)
        specs, controller = setup.build(SimEnv(clock, usable))
        pc = propose_costs or {}
        wrapped = [ChargedSpeculator(s, clock, pc[s.name]) if pc.get(s.name) else s for s in specs]
        engine = Engine(target, None, wrapped, controller, clock=clock)
        res = SimResult(setup.name)
        res.by_quarter = [SimResult(f"{setup.name}[{q}/4]") for q in range(1, 5)]
        for i, tr in enumerate(usable):
            params = SamplingParams(max_tokens=len(tr.output_ids), temperature=0.0, ignore_eos=True)
            ns = tr.domain if namespace_by_domain else "default"
            g = engine.generate(list(tr.prompt_ids), params, request_id=f"{setup.name}/{tr.id}/{i}", namespace=ns)
            st = g.stats
            n_out = len(g.tokens)
            args = (n_out, st.forwards, st.wall_s - st.prefill_s, max(0, n_out - 1) * c1, st.drafted, st.accepted,
                    list(g.tokens) != list(tr.output_ids), st.chosen)
            for r in (res, res.by_domain.setdefault(tr.domain, SimResult(tr.domain)),
                      res.by_quarter[min(3, 4 * i // max(1, len(usable)))]):
                r.add(*args)
            if progress is not None:
                progress(setup.name, i + 1)
        engine.close()
        results.append(res)
    return results


def format_table(results: Sequence[SimResult], by_domain: bool = True) -> str:
    """A plain-text table: one row per setup (and per domain when there are several)."""
    head = f"{'setup':<24}{'traces':>7}{'tokens':>9}{'acc/fwd':>9}{'tok/s':>9}{'speedup':>9}{'mismatch':>9}"
    lines = [head, "-" * len(head)]

    def row(label: str, r: SimResult) -> str:
        return (f"{label:<24}{r.traces:>7}{r.output_tokens:>9}{r.mean_accepted:>9.2f}{r.tok_s:>9.1f}"
                f"{r.speedup:>8.2f}x{r.mismatches:>9}")

    for r in results:
        lines.append(row(r.setup, r))
        if by_domain and len(r.by_domain) > 1:
            for dom, dr in sorted(r.by_domain.items()):
                lines.append(row(f"  {dom}", dr))
    quarters = [r for r in results if r.by_quarter and any(q.traces for q in r.by_quarter)]
    if quarters:
        lines.append("")
        lines.append("speedup by quarter of the trace sequence (learning): "
                     + "; ".join(f"{r.setup}: " + " ".join(f"{q.speedup:.2f}" for q in r.by_quarter)
                                 for r in quarters))
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------


def load_costs(path: str | None) -> tuple[dict[int, float], dict[str, float]]:
    """Verify curve and per-speculator proposal seconds from a cost file (defaults when ``path`` is None)."""
    if path is None:
        return dict(CPU_LLAMACPP_COSTS), {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read cost file {path}: {e}") from e
    verify = parse_cost_curve(data, str(path))
    propose: dict[str, float] = {}
    if isinstance(data, dict) and isinstance(data.get("propose"), dict):
        for name, s in data["propose"].items():
            if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise ValueError(f"{path}: propose cost of {name!r} must be seconds >= 0")
            propose[name] = float(s)
    return verify, propose


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``simulate`` on a subcommand parser; the handler is ``run``."""
    p = sub.add_parser("simulate", help="replay recorded greedy traces to project speculation speed",
                       description="Replay recorded (prompt, output) greedy traces through speculators and "
                                   "controllers without the model, charging a recorded cost per forward.")
    p.add_argument("traces", help="JSONL file of {id, domain, prompt_ids, output_ids}")
    p.add_argument("--costs", default=None,
                   help="JSON {n: seconds} per forward of n tokens (default: llama.cpp on a 2-core CPU)")
    p.add_argument("--lookahead", type=int, default=8, help="lookahead of the fixed-speculator setups (default 8)")
    p.add_argument("--setups", default=None,
                   help="comma-separated subset of: plain, <speculator name>, adaptive, oracle "
                        "(default: all but oracle)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N traces")
    p.add_argument("--namespace-by-domain", action="store_true", help="each domain is its own namespace")
    p.add_argument("--real-overhead", action="store_true",
                   help="also charge the real time of speculators, controller and engine loop (not deterministic)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        traces = load_traces(args.traces)
        verify, propose = load_costs(args.costs)
        if args.lookahead < 1:
            raise ValueError("--lookahead must be at least 1")
        setups = default_setups(args.lookahead, args.setups.split(",") if args.setups else None)
    except ValueError as e:
        print(f"adaspec simulate: error: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        traces = traces[: args.limit]
    results = simulate(traces, verify, setups, propose, namespace_by_domain=args.namespace_by_domain,
                       real_time_scale=1.0 if args.real_overhead else 0.0)
    print(format_table(results))
    if args.json:
        out = {"traces": args.traces, "costs": {str(k): v for k, v in verify.items()}, "propose_costs": propose,
               "results": [r.to_dict() for r in results]}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 1 if any(r.mismatches for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adaspec")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
