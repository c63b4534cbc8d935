"""One speculator on recorded outputs: how much it gets accepted, how fast it proposes, how well it ranks its nodes.

``replay`` runs the production engine over :class:`~.replay.ReplayTarget` with the speculator alone at a fixed
budget and scores every verified draft against the recorded continuation. It is the tool for tuning a
speculator's confidences; ``adaspec simulate`` projects the speed of whole setups.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Sequence

import numpy as np

from ..control.base import FixedController
from ..engine import Engine
from ..speculators.base import DecodeContext, Draft, Speculator, StepOutcome
from ..verify import SamplingParams
from .replay import CPU_LLAMACPP_COSTS, CostCurve, ReplayTarget, Trace, WrappedSpeculator, one_thread

TokenTrace = tuple[Sequence[int], Sequence[int]]  # (prompt ids, output ids)
THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # path-probability cuts of the frontier


class _Recorder(WrappedSpeculator):
    """Times each proposal and scores each verified draft against the recorded output of the request."""

    def __init__(self, inner: Speculator, thresholds: Sequence[float]):
        super().__init__(inner)
        self.thresholds = thresholds
        self.output: list[int] = []  # the recorded output of the request being replayed
        self.times: list[float] = []
        self.drafts: list[Draft] = []  # every verified draft
        self.cal_p: list[float] = []
        self.cal_hit: list[bool] = []
        self.cuts: list[list[tuple[int, int]]] = []  # per step, per threshold: (drafted, accepted)

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        t0 = time.perf_counter()
        d = self.inner.propose(ctx, budget)
        self.times.append(time.perf_counter() - t0)
        return d

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        d = outcome.draft
        pos = len(ctx.tokens) - len(outcome.emitted) - ctx.prompt_len  # output position of the step's first token
        truth = self.output[pos:]
        self.drafts.append(d)
        # nodes whose parent was reached (Draft.label); one past the recorded end counts as rejected
        idx, hit, _ = d.label(truth + [-1] * len(d))
        self.cal_p.extend(d.probs[idx].tolist())
        self.cal_hit.extend(hit.tolist())
        self.cuts.append(_cuts(d, outcome.accepted_nodes, self.thresholds))
        self.inner.observe(ctx, outcome)


def replay(speculator: Speculator, traces: Sequence[TokenTrace], budget: int, namespace: str = "default",
           cost: Callable[[int], float] | None = None, request_prefix: str = "replay",
           calibration_bins: int = 10, thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Replay ``traces`` through ``speculator`` with ``budget`` draft nodes per step (greedy decoding).

    Returns a dict with
      ``mean_accepted``: output tokens per forward (Spec-Bench; plain decoding 1.0);
      ``acceptance_rate``: accepted / drafted nodes; ``draft_len``: mean nodes per step;
      ``propose_ms_mean/median/p99``: time of ``propose``; ``steps``, ``tokens``, ``requests``;
      ``predicted_accepted``: mean draft score (the speculator's own expectation) vs ``accepted_per_step``;
      ``calibration``: per probability bin of draft nodes whose parent was accepted, ``[lo, hi, n,
      mean prob, hit rate]``;
      ``frontier``: for each threshold ``tau``, what the same steps would have given had each draft been cut
      to the nodes whose path probability (by the draft's own confidences) reaches ``tau``:
      ``{"tau", "draft_len", "accepted_per_step", "mean_accepted"[, "est_speedup"]}``; this measures how
      useful the confidences are to a controller that sets the lookahead from them (the contexts are those
      of the full-budget run, so it is an approximation for other cuts);
      ``est_speedup`` (only with ``cost``, the seconds of a forward over ``n`` tokens): decode time of plain
      decoding (one 1-token forward per token after the first) over that of this run (a ``1 + len(draft)``
      token forward per step, plus the propose time measured here).
    """
    if budget < 0:
        raise ValueError("budget must be >= 0")
    rec = _Recorder(speculator, thresholds)
    tokens = forwards = drafted = accepted = n_req = 0
    for i, (prompt, output) in enumerate(traces):
        prompt, output = [int(t) for t in prompt], [int(t) for t in output]
        if not prompt or not output:
            continue
        n_req += 1
        rec.output = output
        engine = Engine(ReplayTarget([Trace(str(i), namespace, tuple(prompt), tuple(output))]), None, [rec],
                        FixedController(budget))
        params = SamplingParams(max_tokens=len(output), temperature=0.0, ignore_eos=True)
        with one_thread():
            st = engine.generate(prompt, params, request_id=f"{request_prefix}-{i}", namespace=namespace).stats
        tokens, forwards = tokens + st.output_tokens, forwards + st.forwards
        drafted, accepted = drafted + st.drafted, accepted + st.accepted
    steps = len(rec.drafts)
    t = np.asarray(rec.times) * 1e3
    out = {
        "requests": n_req, "tokens": tokens, "steps": steps,
        "mean_accepted": tokens / forwards if forwards else 0.0,
        "accepted_per_step": accepted / steps if steps else 0.0,
        "predicted_accepted": sum(d.score for d in rec.drafts) / steps if steps else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "draft_len": drafted / steps if steps else 0.0,
        "propose_ms_mean": float(t.mean()) if len(t) else 0.0,
        "propose_ms_median": float(np.median(t)) if len(t) else 0.0,
        "propose_ms_p99": float(np.percentile(t, 99)) if len(t) else 0.0,
        "calibration": _bins(rec.cal_p, rec.cal_hit, calibration_bins),
    }
    propose_s = float(np.sum(rec.times))
    if cost is not None and steps:
        verify_s = sum(cost(1 + len(d)) for d in rec.drafts)
        out["est_speedup"] = (tokens - n_req) * cost(1) / (verify_s + propose_s)
    out["frontier"] = _frontier(rec.cuts, thresholds, forwards, n_req, cost, propose_s)
    return out


def _cuts(draft: Draft, path: Sequence[int], thresholds: Sequence[float]) -> list[tuple[int, int]]:
    """(nodes kept, accepted) when the draft is cut to path probability >= tau, for each tau."""
    if not len(draft):
        return [(0, 0)] * len(thresholds)
    pp = draft.path_probs
    out = []
    for tau in thresholds:
        kept = pp >= tau if tau > 0 else np.ones(len(pp), dtype=bool)
        acc = 0
        while acc < len(path) and kept[path[acc]]:
            acc += 1
        out.append((int(kept.sum()), acc))
    return out


def _frontier(cuts: list[list[tuple[int, int]]], thresholds: Sequence[float], forwards: int, n_req: int,
              cost: Callable[[int], float] | None, propose_s: float) -> list[dict]:
    if not cuts:
        return []
    a = np.asarray(cuts, dtype=np.float64)  # [steps, thresholds, 2]
    steps = len(a)
    res = []
    for j, tau in enumerate(thresholds):
        drafted, acc = a[:, j, 0], a[:, j, 1]
        row = {"tau": float(tau), "draft_len": float(drafted.mean()), "accepted_per_step": float(acc.mean()),
               "mean_accepted": float((n_req + steps + acc.sum()) / forwards)}
        if cost is not None:
            tokens = steps + acc.sum()
            row["est_speedup"] = float(tokens * cost(1) / (sum(cost(1 + int(d)) for d in drafted) + propose_s))
        res.append(row)
    return res


def _bins(probs: list[float], hits: list[bool], n: int) -> list[list[float]]:
    if not probs:
        return []
    p = np.asarray(probs)
    h = np.asarray(hits, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n - 1)
    out = []
    for b in range(n):
        sel = which == b
        if sel.any():
            out.append([float(edges[b]), float(edges[b + 1]), int(sel.sum()), float(p[sel].mean()),
                        float(h[sel].mean())])
    return out


# -- ShareGPT first turns ----------------------------------------------------------------------------


def sharegpt_traces(tokenizer, limit: int, max_prompt: int = 2048, max_output: int = 1024) -> list[TokenTrace]:
    """The first ``limit`` ShareGPT conversations that open with a user turn answered by the assistant, as
    token traces (prompt tail, answer head)."""
    from ..jsonstream import iter_json_array
    from ..sharegpt import sharegpt_path, sharegpt_turns

    out: list[TokenTrace] = []
    with open(sharegpt_path()) as f:
        for rec in iter_json_array(f):
            found = sharegpt_turns(rec)
            if found is None or len(found[1]) < 2 or found[1][1][0] != "assistant":
                continue
            (_, prompt), (_, answer) = found[1][:2]
            pi = tokenizer.encode(prompt, add_special_tokens=False)[-max_prompt:]
            ri = tokenizer.encode(answer, add_special_tokens=False)[:max_output]
            if pi and ri:
                out.append((pi, ri))
                if len(out) >= limit:
                    break
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m adaspec.sim.speculator --traces 1000 --budget 8``: ShareGPT first turns through the
    model-free speculators (prompt lookup, SuffixDecoding's rule, the adaptive suffix mixture)."""
    import argparse

    from ..model.loader import load_target
    from ..speculators.ngram import PromptLookupSpeculator
    from ..speculators.suffix import SuffixConfig, SuffixSpeculator

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--traces", type=int, default=300)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--max-output", type=int, default=2048)
    ap.add_argument("--speculators", default="ngram,suffixdecoding,suffix")
    args = ap.parse_args(argv)
    makers = {"ngram": PromptLookupSpeculator,
              "suffixdecoding": lambda: SuffixSpeculator(SuffixConfig(scoring="suffixdecoding")),
              "suffix": SuffixSpeculator}
    traces = sharegpt_traces(load_target()[1], args.traces, max_output=args.max_output)
    print(json.dumps({"traces": len(traces), "output_tokens": sum(len(o) for _, o in traces),
                      "budget": args.budget}))
    for name in args.speculators.split(","):
        r = replay(makers[name](), traces, args.budget, cost=CostCurve(CPU_LLAMACPP_COSTS))
        keep = ("mean_accepted", "acceptance_rate", "draft_len", "accepted_per_step", "predicted_accepted",
                "est_speedup", "propose_ms_median", "propose_ms_p99")
        print(json.dumps({"speculator": name, **{k: round(r[k], 4) for k in keep}}), flush=True)


if __name__ == "__main__":
    main()
