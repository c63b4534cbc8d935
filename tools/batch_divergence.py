"""How often a request's greedy output changes when it runs in a batch, per backend.

Each ShareGPT first turn is decoded alone (``Engine.generate``), then all of them together, ``--batch`` at a time,
every step one batched forward (``Engine.step_batch``, what the server runs). The torch backend's rows do not
depend on the batch, so it must report no divergence; llama.cpp computes a row in a batch with other kernels than
the same row alone, so outputs can part at near-ties. For each divergent request the script reports where the
outputs part and the gap between the two best logits there (the same prefix decoded alone): a divergence at a
small gap is batch noise, at a large one a bug.

    python tools/batch_divergence.py --backend llamacpp --requests 24 --batch 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from adaspec.bench.load import sharegpt_prompts
from adaspec.model.loader import load_target
from adaspec.system import build_engine
from adaspec.verify import SamplingParams


def batched(engine, prompts: list[list[int]], params: SamplingParams, batch: int) -> list[list[int]]:
    """Continuous batching as the server does it: up to ``batch`` requests running, a new one joining as one ends."""
    waiting = list(enumerate(prompts))
    running: list[tuple[int, object]] = []
    out: dict[int, list[int]] = {}
    while waiting or running:
        while waiting and len(running) < batch:
            i, p = waiting.pop(0)
            running.append((i, engine.start(p, params)))
        for (i, req), res in zip(running, engine.step_batch([r for _, r in running])):
            if isinstance(res, Exception):
                raise res
        for i, req in [x for x in running if x[1].finished]:
            engine.finish(req)
            out[i] = list(req.output)
        running = [x for x in running if not x[1].finished]
    return [out[i] for i in range(len(prompts))]


def top2_gap(model, prefix: list[int]) -> float:
    cache = model.new_cache()
    logits = model.prefill(cache, prefix).logits[-1].float()
    best = torch.topk(logits, 2).values
    return float(best[0] - best[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="llamacpp", choices=["torch", "llamacpp"])
    ap.add_argument("--mode", default="plain")
    ap.add_argument("--model", default=None, help="GGUF or alias (default: the bundled model)")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    model, tok = load_target(a.model, device="cpu", backend=a.backend)
    texts = sharegpt_prompts(a.requests, a.seed, 2000)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    engine = build_engine(model, tok, a.mode)
    alone = [engine.generate(p, params).tokens for p in prompts]
    engine = build_engine(model, tok, a.mode)
    together = batched(engine, prompts, params, a.batch)
    rows = []
    for i, (x, y) in enumerate(zip(alone, together)):
        if x == y:
            continue
        at = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        rows.append({"request": i, "position": at, "top2_gap": top2_gap(model, prompts[i] + x[:at])})
    summary = {"backend": model.backend, "mode": a.mode, "requests": a.requests, "batch": a.batch,
               "max_tokens": a.max_tokens, "identical": a.requests - len(rows), "divergent": rows,
               "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{model.backend} {a.mode}: {summary['identical']}/{a.requests} greedy outputs identical alone and in "
          f"batches of {a.batch}")
    for r in rows:
        print(f"  request {r['request']}: parts at token {r['position']}, top-2 logit gap there {r['top2_gap']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
