"""``adaspec bench --engine vllm``: a scenario's requests through vLLM with no speculation, vLLM's ``ngram`` and
``suffix`` methods, and adaspec's proposer; same prompts, same settings, each configuration in its own process.

Reported per configuration: mean accepted tokens per forward (output tokens over target forwards; a forward
emits its accepted draft tokens plus one, so forwards = output tokens - accepted, the accepted count read from
vLLM's own counter), tokens per second per request, and whether each greedy output equals the one without
speculation. With ``--passes 2`` the stream runs a second time in the same engine (repeated traffic).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .serve import MAX_DRAFT, speculative_config

CONFIGS = {
    "vllm": None,
    # vLLM's documented n-gram settings
    "vllm-ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    # ArcticInference's SuffixDecoding with vLLM's defaults (24 tokens at most)
    "vllm-suffix": {"method": "suffix"},
    "adaspec": speculative_config(MAX_DRAFT),
}
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 4096, "seed": 0,
               "kv_cache_memory_bytes": 1 << 30, "disable_log_stats": False}
"""The same for every configuration: fp32 (outputs comparable bit for bit), no graph capture (CPU)."""

ACCEPTED = "vllm:spec_decode_num_accepted_tokens"


# -- the worker: one configuration, one process ----------------------------------------------------------


def _accepted(llm) -> int:
    return int(sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == ACCEPTED))


def worker(spec_path: str, out_path: str) -> int:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..bench.workloads import WorkItem, turn_messages

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], speculative_config=spec["speculative_config"], **ENGINE_ARGS)
    start_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    records = []
    for p in range(spec["passes"]):
        for item in spec["items"]:
            answers: list[str] = []
            for turn in range(max(1, len(item.get("user_turns") or []))):
                key = f"{item['id']}/t{turn}"
                if "prompt_ids" in item:
                    ids = item["prompt_ids"][turn]
                elif item.get("prompt") is not None:
                    ids = tok.encode(item["prompt"])
                else:
                    messages = turn_messages(WorkItem(**item), answers) if item["user_turns"] else item["messages"]
                    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                    ids = tok.encode(text, add_special_tokens=False)
                params = SamplingParams(max_tokens=item["max_tokens"], temperature=item["temperature"],
                                        seed=item["seed"], extra_args={"adaspec_namespace": "bench"})
                before = _accepted(llm)
                t = time.perf_counter()
                out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0].outputs[0]
                wall = time.perf_counter() - t
                accepted = _accepted(llm) - before
                answers.append(out.text)
                records.append({"pass": p, "id": key, "phase": item["phase"], "phase_name": item["phase_name"],
                                "temperature": item["temperature"], "prompt_ids": ids,
                                "output_ids": list(out.token_ids), "wall_s": wall, "accepted": accepted})
    Path(out_path).write_text(json.dumps({"start_s": start_s, "records": records}))
    return 0


# -- the driver ----------------------------------------------------------------------------------------------


def prompts_of(records: list[dict], items: list[dict]) -> list[dict]:
    """The items with the prompt ids the first configuration built (turns included), so every configuration
    is sent the same tokens."""
    by_id: dict[str, list[list[int]]] = {}
    for r in records:
        if r["pass"] == 0:
            by_id.setdefault(r["id"].rsplit("/t", 1)[0], []).append(r["prompt_ids"])
    return [dict(item, prompt_ids=by_id[item["id"]]) for item in items]


def summarise(records: list[dict], reference: dict[tuple[int, str], list[int]] | None) -> dict:
    out_tokens = sum(len(r["output_ids"]) for r in records)
    forwards = sum(max(1, len(r["output_ids"]) - r["accepted"]) for r in records)
    greedy = [r for r in records if r["temperature"] == 0]
    same = None if reference is None else sum(r["output_ids"] == reference.get((r["pass"], r["id"])) for r in greedy)
    tok_s = [len(r["output_ids"]) / r["wall_s"] for r in records if r["wall_s"] > 0]
    return {"requests": len(records), "output_tokens": out_tokens, "forwards": forwards,
            "mean_accepted": out_tokens / forwards if forwards else 0.0,
            "median_tok_s": statistics.median(tok_s) if tok_s else 0.0,
            "total_tok_s": out_tokens / sum(r["wall_s"] for r in records) if records else 0.0,
            "greedy": len(greedy), "equal_to_plain": same}


def run(args) -> int:
    from ..bench.drift import default_plan
    from .export import export
    from .serve import _require_vllm

    _require_vllm()
    if args.passes < 1:
        raise ValueError(f"--passes must be at least 1, not {args.passes}")
    configs = [c for c in args.configs.split(",") if c] if args.configs else list(CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown vLLM configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if "vllm" in configs:
        configs.remove("vllm")
    configs.insert(0, "vllm")  # first: it builds the prompts and the reference outputs
    if "vllm-suffix" in configs and not _has_arctic():
        print("vllm-suffix skipped: arctic-inference is not installed")
        configs.remove("vllm-suffix")
    out = Path(args.out or f"runs/bench-vllm-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = export(args.model)
    items = [i.to_dict() for i in default_plan(args.scenario, args.full, args.seed, args.max_tokens)]
    print(f"load: {os.getloadavg()[0]:.2f} (1 min); model {model_dir}; {len(items)} items x {args.passes} pass(es)")
    results: dict[str, dict] = {}
    reference = None
    for config in configs:
        spec = {"model": str(model_dir), "speculative_config": CONFIGS[config], "passes": args.passes,
                "items": items if reference is None else prompts_of(results["vllm"]["records"], items)}
        spec_path, rec_path = out / f"{config}.spec.json", out / f"{config}.json"
        spec_path.write_text(json.dumps(spec))
        env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL",
                                                                                               "WARNING")}
        t = time.perf_counter()
        with open(out / f"{config}.log", "w") as log:
            rc = subprocess.call([sys.executable, "-m", "adaspec.vllm.bench", str(spec_path), str(rec_path)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            raise RuntimeError(f"the {config} run failed (exit {rc}); see {out / f'{config}.log'}")
        results[config] = json.loads(rec_path.read_text())
        if reference is None:
            reference = {(r["pass"], r["id"]): r["output_ids"] for r in results[config]["records"]}
        print(f"{config}: {time.perf_counter() - t:.0f} s (engine start {results[config]['start_s']:.0f} s)", flush=True)
    per_pass = {c: [summarise([r for r in res["records"] if r["pass"] == p], reference) for p in range(args.passes)]
                for c, res in results.items()}
    table = _table(per_pass)
    summary = {"scenario": args.scenario, "passes": args.passes, "load_1min": os.getloadavg()[0],
               "model": str(model_dir), "configs": {c: CONFIGS[c] for c in results},
               "summary": {c: {f"pass{p}": s for p, s in enumerate(ss)} for c, ss in per_pass.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(table)
    print(table)
    print(f"written to {out}")
    return 0


def _table(per_pass: dict[str, list[dict]]) -> str:
    """One row per configuration and pass, from ``summarise`` of each; speed as a ratio to no speculation."""
    plain = per_pass["vllm"]
    lines = ["| configuration | pass | mean accepted tokens / forward | median tok/s | tok/s vs vllm | "
             "greedy outputs equal to vllm |", "|---|---|---|---|---|---|"]
    for c, summaries in per_pass.items():
        for p, s in enumerate(summaries):
            ratio = s["median_tok_s"] / plain[p]["median_tok_s"] if plain[p]["median_tok_s"] else 0.0
            lines.append(f"| {c} | {p + 1} | {s['mean_accepted']:.3f} | {s['median_tok_s']:.1f} | {ratio:.2f}x | "
                         f"{s['equal_to_plain']}/{s['greedy']} |")
    return "\n".join(lines) + "\n"


def _has_arctic() -> bool:
    import importlib.util

    return importlib.util.find_spec("arctic_inference") is not None


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2]))
