"""Servers side by side under the same load: ``adaspec serve`` in several modes and llama-server's setups.

    python -m adaspec.bench.load --compare plain,adaptive,llama-server,llama-server-ngram --concurrency 1,4,8,16

For every concurrency, every setup gets a fresh server (llama-server with as many parallel slots as clients, so it
batches them continuously), one warm-up request, then the load test's requests (the same prompts for every
setup), ``--passes`` times over in the same server (pass 2 is the same traffic again: what a server that learns
gains from repeats). The setups run one after another, never two at once.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import httpx

from ..system import MODES
from .load import LoadConfig, run_load
from .servers import LLAMA_SERVER_SETUPS, ManagedServer, adaspec_server_command, free_port, start_llama_server

SERVER_SETUPS = (*MODES, *LLAMA_SERVER_SETUPS)
"""What ``--compare`` takes: adaspec's modes (``adaspec serve --mode``) and the llama-server setups."""


def check_setups(names: Sequence[str], draft_model: str | None) -> list[str]:
    unknown = [n for n in names if n not in SERVER_SETUPS]
    if unknown:
        raise ValueError(f"unknown setup(s) {', '.join(unknown)}; choose from {', '.join(SERVER_SETUPS)}")
    if not names:
        raise ValueError("--compare names no setup")
    if any(LLAMA_SERVER_SETUPS[n].needs_draft for n in names if n in LLAMA_SERVER_SETUPS) and not draft_model:
        raise ValueError("llama-server-draft needs --draft-model GGUF")
    return list(names)


def start_server(setup: str, concurrency: int, model: str | None, threads: int,
                 draft_model: str | None = None) -> ManagedServer:
    """A ready server of ``setup`` for ``concurrency`` clients, on the given model (None: the bundled GGUF)."""
    if setup in LLAMA_SERVER_SETUPS:
        from ..files import bundled_gguf_path, resolve_model

        return start_llama_server(setup, resolve_model(model) if model else bundled_gguf_path(), threads, parallel=concurrency,
                                  draft_model=draft_model)
    port = free_port()
    # as many requests in flight as clients, so that neither server makes clients queue where the other does not
    extra = ["--max-active", str(max(concurrency, 1))]
    return ManagedServer(f"adaspec-{setup}", adaspec_server_command(port, setup, model, threads, extra),
                         port).wait_ready()


def _warm_up(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    httpx.post(url + "/v1/chat/completions", json={"model": model, **body}, timeout=300).raise_for_status()


def compare(setups: Sequence[str], concurrencies: Sequence[int], base: LoadConfig, passes: int = 1,
            model: str | None = None, threads: int = 2, draft_model: str | None = None,
            log: Callable[[str], None] = print) -> list[dict]:
    """One load summary (:func:`adaspec.bench.load.summarise`) per (concurrency, setup, pass), with ``setup``,
    ``concurrency`` and ``pass`` added."""
    if passes < 1:
        raise ValueError("passes must be >= 1")
    from ..llamacpp_build import BuildError

    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for c in concurrencies:
        for setup in setups:
            if setup in skipped:
                continue
            log(f"{setup} at concurrency {c}: starting a fresh server")
            try:
                server = start_server(setup, c, model, threads, draft_model)
            except BuildError as e:  # no llama-server here: the comparison goes on without it
                skipped[setup] = str(e)
                log(f"skipping {setup}: {e}")
                continue
            try:
                _warm_up(server.url)
                for p in range(1, passes + 1):
                    cfg = replace(base, url=server.url, concurrency=c, pid=server.pid)
                    s = asyncio.run(run_load(cfg))
                    s.update(setup=setup, concurrency=c, **{"pass": p})
                    rows.append(s)
                    log(f"  pass {p}: {s['output_tok_per_s']:.1f} output tok/s, "
                        f"TPOT p50 {_ms(s['tpot_s']['p50'])}, {s['ok']}/{s['requests']} ok")
            finally:
                server.stop()
    return rows


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def table(rows: Sequence[dict]) -> str:
    """Markdown: one row per (concurrency, pass, setup); the ratios are against adaspec ``plain`` and llama-server
    plain at the same concurrency and pass, when those ran."""
    head = ("setup", "conc.", "pass", "ok", "output tok/s", "vs plain", "vs llama-server", "TTFT p50", "TPOT p50",
            "TPOT vs plain", "E2E p50", "acc. rate", "tok/step")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(r["concurrency"], r["pass"], r["setup"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["pass"])):
        plain = by.get((r["concurrency"], r["pass"], "plain"))
        server = by.get((r["concurrency"], r["pass"], "llama-server"))
        srv = r["server"]
        cells = [r["setup"], str(r["concurrency"]), str(r["pass"]), f"{r['ok']}/{r['requests']}",
                 f"{r['output_tok_per_s']:.1f}",
                 _ratio(r["output_tok_per_s"], plain and plain["output_tok_per_s"]) if r is not plain else "1.00x",
                 _ratio(r["output_tok_per_s"], server and server["output_tok_per_s"]) if r is not server else "1.00x",
                 _ms(r["ttft_s"]["p50"]), _ms(r["tpot_s"]["p50"]),
                 _ratio(r["tpot_s"]["p50"], plain and plain["tpot_s"]["p50"]) if r is not plain else "1.00x",
                 _ms(r["e2e_s"]["p50"]),
                 "-" if srv.get("acceptance_rate") is None else f"{srv['acceptance_rate']:.0%}",
                 "-" if srv.get("tokens_per_step") is None else f"{srv['tokens_per_step']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def run(args, base: LoadConfig) -> int:
    """``--compare``: run, print the table, write JSON (``--json``) with the machine's load before the run."""
    setups = check_setups([s for s in args.compare.split(",") if s], args.draft_model)
    concurrencies = [int(c) for c in str(args.concurrency).split(",") if c]
    if not concurrencies or min(concurrencies) < 1:
        raise ValueError("--concurrency takes positive integers, comma-separated")
    load_before = os.getloadavg()
    print(f"load average before the run: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    rows = compare(setups, concurrencies, base, args.passes, args.serve_model, args.threads, args.draft_model)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average_before": load_before, "rows": rows}, indent=1))
    return 0 if all(r["ok"] == r["requests"] for r in rows) else 1

