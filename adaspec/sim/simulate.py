"""``adaspec simulate``: project the speed of speculation setups on recorded traces, without the model.

Each setup (speculators and a controller) decodes every trace through the production engine over
:class:`~.replay.ReplayTarget`, so the projection is deterministic and takes seconds; what is charged, and the cost
file's format, is on :func:`simulate`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..control.base import Controller, FixedController
from ..control.costs import parse_cost_curve
from ..engine import Engine, RequestStats
from ..speculators.base import Speculator
from ..stats import StepCounts
from ..verify import SamplingParams
from .replay import (CPU_LLAMACPP_COSTS, ChargedSpeculator, CostCurve, ReplayTarget, Trace, VirtualClock,
                     compact_vocabulary, load_traces)

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
    from ..speculators.ngram import PromptLookupSpeculator
    from ..speculators.suffix import SuffixSpeculator

    return {"suffix": SuffixSpeculator, "ngram": PromptLookupSpeculator}


def _oracle(env: SimEnv) -> Speculator:
    from ..speculators.oracle import OracleSpeculator

    oracle = OracleSpeculator()
    for t in env.traces:
        oracle.add(list(t.prompt_ids), list(t.output_ids))
    return oracle


def default_setups(lookahead: int = 8, names: Sequence[str] | None = None) -> list[Setup]:
    """plain; each available model-free speculator alone at ``lookahead``; all of them under the adaptive
    controller. ``names`` selects among those (``plain``, ``<speculator>``, ``adaptive``) and ``oracle``,
    the recorded continuation itself at ``lookahead`` (the ceiling of speculation on this cost curve)."""
    from ..control.adaptive import AdaptiveController

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


@dataclass(kw_only=True)
class SimResult(StepCounts):
    """Totals of one setup over the replayed traces (times are projected, from the cost curve; ``forwards``
    include each request's prefill, as the engine counts them)."""

    setup: str
    traces: int = 0
    decode_tokens: int = 0  # tokens after the first of each request
    decode_s: float = 0.0  # projected seconds after prefill: forwards + proposals
    plain_decode_s: float = 0.0  # the same tokens decoded without speculation: decode_tokens x c(1)
    mismatches: int = 0  # outputs that differ from the trace (must be 0: decoding is lossless)
    by_domain: dict[str, "SimResult"] = field(default_factory=dict)
    by_quarter: list["SimResult"] = field(default_factory=list)  # the traces in order, in four parts: learning

    @property
    def speedup(self) -> float:
        return self.plain_decode_s / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def add_request(self, stats: RequestStats, plain_s: float, mismatch: bool) -> None:
        """One replayed request: its engine statistics, its plain decoding time, whether its output differs."""
        self.traces += 1
        self.add(stats)
        self.decode_tokens += max(0, stats.output_tokens - 1)
        self.decode_s += stats.wall_s - stats.prefill_s
        self.plain_decode_s += plain_s
        self.mismatches += int(mismatch)

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


def simulate(traces: Sequence[Trace], costs: Mapping[int, float] | Callable[[int], float],
             setups: Sequence[Setup] | None = None, propose_costs: Mapping[str, float] | None = None,
             namespace_by_domain: bool = False, real_time_scale: float = 0.0,
             progress: Callable[[str, int], None] | None = None) -> list[SimResult]:
    """Replay ``traces`` in order through each setup with fresh speculators and controller.

    ``costs``: the verify cost curve {n: seconds} (or a callable). ``propose_costs``: seconds
    charged per proposal call by speculator name (default 0: model-free speculators take
    microseconds). Returns one result per setup; outputs are checked against the traces.

    Verify forwards cost c(n) from a curve, the prefill c(1); proposals cost what the cost file says (default 0:
    model-free speculators take microseconds); the Python time of speculators, controller and engine loop is left out unless ``real_time_scale``
    is 1 (``--real-overhead``). Speculators that need the target's hidden states cannot run here.

    Cost file: JSON ``{n: seconds}`` for a forward over ``n`` tokens (pending token plus draft), or an object with
    that curve under ``"verify"`` and optionally ``"propose": {speculator: seconds}`` per proposal call.
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
        res = SimResult(setup=setup.name)
        res.by_quarter = [SimResult(setup=f"{setup.name}[{q}/4]") for q in range(1, 5)]
        for i, tr in enumerate(usable):
            params = SamplingParams(max_tokens=len(tr.output_ids), temperature=0.0, ignore_eos=True)
            ns = tr.domain if namespace_by_domain else "default"
            g = engine.generate(list(tr.prompt_ids), params, request_id=f"{setup.name}/{tr.id}/{i}", namespace=ns)
            plain_s = max(0, len(g.tokens) - 1) * c1
            mismatch = list(g.tokens) != list(tr.output_ids)
            for r in (res, res.by_domain.setdefault(tr.domain, SimResult(setup=tr.domain)),
                      res.by_quarter[min(3, 4 * i // max(1, len(usable)))]):
                r.add_request(g.stats, plain_s, mismatch)
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
