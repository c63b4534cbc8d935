"""``adaspec bench``: speed over a real, shifting request stream, every configuration side by side.

Each request of the stream goes through every configuration before the next request starts, so machine noise hits
all of them alike; each adaspec configuration keeps its own engine (and learned state) for the whole stream, so
adaptation shows along the stream. The configurations are listed on :func:`run_bench`. Writes summary.md, run.json,
PNG plots, and traces.jsonl (greedy plain traces for ``adaspec simulate``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..speculators.oracle import OracleSpeculator
from ..system import MODES, available_modes, build_engine
from ..verify import SamplingParams
from . import workloads
from .report import ReportConfig, RequestRecord, config_name, write_report

ADASPEC_CONFIGS = ("plain", "ngram", "suffix", "head", "adaptive", "oracle")
"""adaspec's configurations: the engine's modes (``system.MODES``, the names ``--mode`` takes), plain first (every
other output is checked against it), and the oracle."""
PEER_CONFIGS = ("llama.cpp", "llama.cpp-pld", "hf", "hf-pld", "llama-server", "llama-server-ngram",
                "llama-server-ngram-tuned", "llama-server-draft")
DEFAULT_PEERS = ("llama.cpp", "llama.cpp-pld", "hf", "hf-pld", "llama-server", "llama-server-ngram",
                 "llama-server-ngram-tuned")
"""The peers of a default run: every one but the draft-model llama-server, which needs --draft-model."""
SERVER_PLAIN = "llama-server"


@dataclass
class BenchPlan:
    scenario: str
    items: list[workloads.WorkItem]
    configs: list[str]
    peers: list[str]
    hf_every: int  # run the (slow) transformers peers on every n-th request only
    gguf_path: str | None = None  # the model file the peers load (None: the bundled GGUF), the same as adaspec's
    draft_model: str | None = None  # llama-server-draft's draft GGUF


def default_plan(scenario: str, full: bool, seed: int, max_tokens: int | None) -> list[workloads.WorkItem]:
    """The stream of a scenario: small by default (fits ~15 minutes with peers), larger with --full."""
    mt = {} if max_tokens is None else {"max_tokens": max_tokens}
    if scenario == "drift":
        return workloads.drift(n_per_phase=16 if full else 5, seed=seed, **({"max_tokens": 96} | mt))
    if scenario == "steady":
        return workloads.steady(n=40 if full else 12, seed=seed, **({"max_tokens": 96} | mt))
    if scenario == "adversarial":
        # sampled (seeded): greedy decoding of random text falls into repetition, which speculation predicts well
        return workloads.adversarial(n=20 if full else 6, seed=seed, temperature=1.0, **({"max_tokens": 64} | mt))
    if scenario == "multi_turn":
        return workloads.multi_turn(n=10 if full else 3, seed=seed, **({"max_tokens": 96} | mt))
    if scenario == "rl_rollouts":
        return workloads.rl_rollouts(n_prompts=4 if full else 2, group_size=4, steps=3 if full else 2, seed=seed,
                                     **({"max_tokens": 96} | mt))
    if scenario == "code_editing":
        return workloads.code_editing(n=12 if full else 4, seed=seed, **({"max_tokens": 160} | mt))
    raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(workloads.SCENARIOS)}")


def _peer_threads() -> int:
    """Threads of the llama.cpp peers: ``ADASPEC_THREADS``, else 2 (this machine's cores)."""
    return int(os.environ.get("ADASPEC_THREADS", "2"))


BACKEND_SUFFIX = "@llamacpp"  # names the configurations that run on the second backend of `--backend both`


def _base_config(config: str) -> str:
    return config.removesuffix(BACKEND_SUFFIX)


def _plain_of(config: str) -> str:
    """The plain configuration whose output ``config`` must reproduce (the one on the same backend)."""
    return "plain" + (BACKEND_SUFFIX if config.endswith(BACKEND_SUFFIX) else "")


def _peer_reference(peer: str, item: workloads.WorkItem, references: dict[str, list[int]]) -> list[int] | None:
    """The output a peer's is compared with: llama-server plain's for llama-server's speculative setups (the same
    engine), adaspec plain's for the other peers on greedy requests (sampled outputs of different engines differ)."""
    if peer.startswith(SERVER_PLAIN) and peer != SERVER_PLAIN:
        return references.get(SERVER_PLAIN)
    return references.get("plain") if item.temperature == 0 else None


def _prompt_ids(tok, prompt: str | None, messages) -> list[int]:
    """Raw prompts as they are; chats through the model's template, or as plain text for a model without one
    (a base model): the turns' contents separated by blank lines."""
    if prompt is not None:
        return tok.encode(prompt)
    if not tok.chat_template:
        return tok.encode("\n\n".join(m["content"] for m in messages))
    return tok.apply_chat_template(messages)


def run_bench(model, tok, plan: BenchPlan, out_dir: Path, second_model=None) -> list[RequestRecord]:
    """Run every request of ``plan`` through every configuration; one record per (configuration, request).

    Configurations named ``<config>@llamacpp`` run on ``second_model``. Every adaspec record says whether its
    output equals the plain output of its backend: greedy requests, and sampled ones too, since seeded sampling
    gives the same tokens with or without speculation. Peers decode greedily, so they run the greedy requests only.

    Configurations:

    - ``plain``: the same engine with no speculation (the baseline of every ratio);
    - ``ngram``, ``suffix``, ``head``: one speculator alone at a fixed lookahead;
    - ``adaptive``: the full system (every speculator under the confidence-aware controller);
    - ``oracle``: drafts the plain output itself (the ceiling of this hardware);
    - peers: ``llama.cpp`` / ``llama.cpp-pld`` (same GGUF, same threads), ``hf`` / ``hf-pld`` (transformers generate),
      ``llama-server`` plain and with its own speculation (``-ngram``, ``-ngram-tuned``, ``-draft``; same GGUF, same
      threads, over HTTP).

    ``--backend both`` runs every adaspec configuration on the torch backend and again, named ``<config>@llamacpp``,
    on the llama.cpp backend, in the same loop; each backend's outputs are checked against its own plain decoding.

    Background learners (the online head) run only while their own configuration decodes, within their busy-time
    duty cycle, so no configuration is timed while another one learns. The llama-cpp-python and transformers peers
    decode greedily and skip sampled requests; the llama-server peers run every request, each in its own server
    process for the whole stream. A llama-server peer's output is checked against llama-server plain (its own
    engine), every other peer's against adaspec plain.
    """
    from .peers import PeerConfig, make_peers

    engines = {c: build_engine(second_model if c.endswith(BACKEND_SUFFIX) else model, tok, _base_config(c))
               for c in plan.configs if _base_config(c) in MODES}
    oracle = OracleSpeculator()
    if "oracle" in plan.configs:
        from ..control.base import FixedController
        from ..engine import Engine

        engines["oracle"] = Engine(model, tok, [oracle], FixedController(16))
    peers = make_peers(plan.peers, PeerConfig(gguf_path=plan.gguf_path, n_threads=_peer_threads(),
                                              draft_model=plan.draft_model)) if plan.peers else None
    # background learners work only while their own configuration decodes (within their duty cycle), so that
    # they take no CPU time from the configuration being timed next
    learners = {c: list(e.speculators) for c, e in engines.items()}
    for s in (s for ls in learners.values() for s in ls):
        s.pause()
    records: list[RequestRecord] = []
    traces = open(out_dir / "traces.jsonl", "w")
    index = 0
    try:
        for n, item in enumerate(tqdm(plan.items, desc=f"{plan.scenario}", unit="req")):
            answers: list[str] = []
            for turn in range(item.n_turns):
                messages = workloads.turn_messages(item, answers) if item.user_turns else item.messages
                ids = _prompt_ids(tok, item.prompt, messages)
                rid = f"{item.id}/t{turn}" if item.user_turns else item.id
                params = SamplingParams(max_tokens=item.max_tokens, temperature=item.temperature, seed=item.seed)
                references: dict[str, list[int]] = {}
                for config in plan.configs:
                    eng = engines[config]
                    reference = references.get(_plain_of(config))
                    if config == "oracle" and reference is not None:
                        oracle.add(ids, reference)
                    for s in learners[config]:
                        s.resume()
                    g = eng.generate(ids, params, request_id=f"{config}:{rid}")
                    for s in learners[config]:
                        s.pause()
                    if config == _plain_of(config):
                        references[config] = g.tokens
                    if config == "plain":
                        answers.append(g.text)
                        if item.temperature == 0:
                            traces.write(json.dumps({"id": rid, "domain": item.domain, "prompt_ids": ids,
                                                     "output_ids": g.tokens}) + "\n")
                    checked = reference is not None and config != _plain_of(config)
                    records.append(RequestRecord.from_stats(config, item, index, g.stats, request_id=rid,
                                                            matches_reference=g.tokens == reference if checked
                                                            else None))
                for name, peer in (peers.peers.items() if peers else ()):
                    if (item.temperature > 0 and not peer.samples) or (name.startswith("hf") and n % plan.hf_every):
                        continue
                    res = peer.generate(ids, item.max_tokens, _peer_reference(name, item, references),
                                        temperature=item.temperature, seed=item.seed)
                    if name == SERVER_PLAIN:
                        references[name] = res.tokens
                    records.append(RequestRecord.from_peer(item, index, res, request_id=rid))
                index += 1
    finally:
        traces.close()
        if peers:
            peers.close()
        for eng in engines.values():
            eng.close()
    return records


def cost_curves(model, with_llama_cpp: bool, gguf: str | None = None, second=None) -> dict[str, dict[int, float]]:
    """c(k) in seconds for the cost plot: adaspec chains and trees (on each backend of the run), and llama.cpp's
    chains timed in the same loop when that peer runs (and can run) in this benchmark."""
    from .cost_curve import LlamaCppCosts, measure_costs
    from .peers import PeerUnavailable, bundled_gguf, missing_packages

    ks, context = (1, 2, 4, 8, 12, 16, 24, 32), 100
    peer = None
    if with_llama_cpp and not missing_packages("llama.cpp") and (gguf is None or gguf.lower().endswith(".gguf")):
        try:
            path = gguf or bundled_gguf()
            peer = LlamaCppCosts(path, context, threads=_peer_threads())
        except (PeerUnavailable, OSError, ValueError) as e:
            print(f"llama.cpp cost curve skipped: {e}")
    try:
        m = measure_costs(model, ks=ks, reps=5, context_len=context, peer=peer,
                          others={"llamacpp": second} if second is not None else None)
    finally:
        if peer is not None:
            peer.close()
    out = {f"adaspec chain ({model.backend})": m["verify"], f"adaspec tree ({model.backend})": m["tree"]}
    for name, r in m.get("backends", {}).items():
        out[f"adaspec chain ({name})"] = {k: v / 1e3 for k, v in r["verify_ms"].items()}
        out[f"adaspec tree ({name})"] = {k: v / 1e3 for k, v in r["tree_ms"].items()}
    if "llama_cpp" in m:
        out["llama.cpp chain"] = m["llama_cpp"]["verify"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adaspec bench", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--scenario", default="drift", choices=list(workloads.SCENARIOS))
    ap.add_argument("--full", action="store_true", help="the long version (more requests per phase, every peer)")
    ap.add_argument("--engine", default="adaspec", choices=["adaspec", "vllm"],
                    help="adaspec's own engine, or vLLM with each speculation method (needs adaspec[vllm])")
    ap.add_argument("--configs", default=None,
                    help="comma-separated configurations (default: all of the engine's: "
                         f"{', '.join(ADASPEC_CONFIGS)}, where the earlier names adaspec-plain and adaspec still "
                         "work; with --engine vllm: vllm, vllm-ngram, vllm-suffix, adaspec)")
    ap.add_argument("--passes", type=int, default=1,
                    help="--engine vllm: run the stream this many times in one engine (2 = repeated traffic)")
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help=f"comma-separated peers ('' for none) from {', '.join(PEER_CONFIGS)}; the llama-server ones "
                         "build llama-server once per machine on first use (`make peers` builds it ahead)")
    ap.add_argument("--draft-model", default=None, metavar="GGUF",
                    help="the draft model of the llama-server-draft peer (a GGUF with the target's tokenizer)")
    ap.add_argument("--hf-every", type=int, default=None, help="run transformers peers on every n-th request")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: runs/bench-<scenario>-<time>)")
    ap.add_argument("--model", default=None,
                    help="model path or qwen2.5-coder-0.5b (default: the bundled model); the peers load the same file")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "llamacpp", "both"],
                    help="target backend of the adaspec configurations; both = each configuration on torch and, "
                         f"named <config>{BACKEND_SUFFIX}, on llama.cpp, in the same loop (default auto)")
    ap.add_argument("--no-costs", action="store_true", help="skip the c(k) cost curve")
    ap.add_argument("--from-run", default=None, metavar="RUN_JSON",
                    help="run nothing: write the table and plots of a saved run.json (into --out, else beside it)")


def run(args: argparse.Namespace) -> int:
    from ..files import resolve_model
    from ..model.loader import load_target

    if args.from_run:
        return rewrite_report(Path(args.from_run), Path(args.out) if args.out else None)

    if args.engine == "vllm":
        from ..vllm.bench import run as run_vllm

        return run_vllm(args)
    configs = [config_name(c) for c in (args.configs or ",".join(ADASPEC_CONFIGS)).split(",") if c]
    unknown = [c for c in configs if c not in ADASPEC_CONFIGS]
    peers = [p for p in args.peers.split(",") if p]
    unknown += [p for p in peers if p not in PEER_CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}")
    if "plain" not in configs:
        configs.insert(0, "plain")
    configs.sort(key=ADASPEC_CONFIGS.index)  # plain first: the oracle replays its output
    configs = [c for c in configs if c == "oracle" or c in available_modes()]
    if args.model:  # a model name (files.MODEL_ALIASES) becomes its file, which the peers load too
        args.model = str(resolve_model(args.model))
    out = Path(args.out or f"runs/bench-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_target(args.model, backend="torch" if args.backend == "both" else args.backend)
    print(f"backend {model.backend}: {model.backend_reason}")
    if not tok.chat_template:
        print("the model has no chat template: chat requests are sent as plain text")
    second = None
    if args.backend == "both":
        second = load_target(args.model, backend="llamacpp")[0]
        configs += [c + BACKEND_SUFFIX for c in configs if c != "oracle"]
    items = default_plan(args.scenario, args.full, args.seed, args.max_tokens)
    if peers and args.model and not str(args.model).lower().endswith(".gguf"):
        print(f"peers skipped: they run GGUF files, and {args.model} is not one")
        peers = []
    if "llama-server-draft" in peers and not args.draft_model:
        print("peer llama-server-draft skipped: it needs --draft-model GGUF")
        peers.remove("llama-server-draft")
    plan = BenchPlan(args.scenario, items, configs, peers, args.hf_every or (1 if args.full else 4), args.model,
                     args.draft_model)
    load_before = os.getloadavg()  # the machine's load when the run starts, for the report
    costs = None
    if not args.no_costs:
        costs = cost_curves(model, "llama.cpp" in peers, args.model, second)
    t0 = time.perf_counter()
    records = run_bench(model, tok, plan, out, second)
    meta = {"scenario": args.scenario, "full": args.full, "configs": configs, "peers": peers, "seed": args.seed,
            "requests": len(items), "seconds": time.perf_counter() - t0, "model": tok.name,
            "device": str(model.device), "hf_every": plan.hf_every, "backend": model.backend,
            "backend_reason": model.backend_reason, "second_backend": second.backend if second else None,
            "load_average_before": load_before}
    files = write_report(records, out, _report_config(args.full), costs=costs, meta=meta,
                         title=f"adaspec bench: {args.scenario}")
    print(files.markdown.read_text())
    _print_overhead(records)
    print(f"wrote {files.markdown}, {files.json}, " + ", ".join(str(p) for p in files.plots.values()))
    return 0


def _print_overhead(records: Sequence[RequestRecord]) -> None:
    """Median share of decoding time outside target forwards, per adaspec configuration."""
    import statistics

    shares: dict[str, list[float]] = {}
    for r in records:
        if r.overhead_share is not None:
            shares.setdefault(r.config, []).append(r.overhead_share)
    if shares:
        print("per-step overhead (median share of decode time outside target forwards): " +
              ", ".join(f"{c} {100 * statistics.median(v):.1f}%" for c, v in shares.items()))


def _report_config(full: bool) -> ReportConfig:
    # the rolling median spans about one phase of the short stream, so phase changes stay visible
    return ReportConfig(window=9 if full else 5)


def rewrite_report(run_json: Path, out: Path | None = None) -> int:
    """The summary table and plots of a saved run, written again (e.g. after the report format changed)."""
    from .report import load_run

    saved = load_run(run_json)
    meta = {k: v for k, v in saved.meta.items() if k != "report_config"}
    files = write_report(saved.records, out or run_json.parent, _report_config(bool(meta.get("full"))),
                         costs=saved.costs, meta=meta, title=f"adaspec bench: {meta.get('scenario', 'run')}")
    print(files.markdown.read_text())
    return 0
