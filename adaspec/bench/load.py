"""Load test of a running ``adaspec serve`` with ShareGPT first turns (vLLM's serving benchmark recipe).

    python -m adaspec.bench.load --url http://127.0.0.1:8000 --concurrency 8 --requests 64
    python -m adaspec.bench.load --compare plain,adaptive,llama-server,llama-server-ngram --concurrency 1,8

The second form starts each server itself, one after another, and prints them side by side (:mod:`.serving`).

Clients send streaming chat requests back to back; per request it measures TTFT, ITL, TPOT and E2E, and it reports
throughput, percentiles, errors and the server's speculation figures (what each means: :func:`summarise`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    """Server base URL."""
    concurrency: int = 8
    """Clients sending requests back to back."""
    requests: int = 64
    """Requests in total."""
    max_tokens: int = 64
    """max_tokens of every request."""
    temperature: float = 0.0
    """Sampling temperature (0 = greedy)."""
    api_key: str | None = None
    """Bearer key, if the server wants one."""
    model: str | None = None
    """Model id; None = the first one /v1/models lists."""
    seed: int = 0
    """Seed of the prompt draw."""
    max_prompt_chars: int = 2000
    """ShareGPT first turns longer than this are skipped (keeps prompts inside a 2k context)."""
    pid: int | None = None
    """Server process id on this machine: read VmRSS from /proc instead of /metrics."""
    timeout: float = 600.0
    """Per-request timeout in seconds."""

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.requests < 1 or self.max_tokens < 1:
            raise ValueError("concurrency, requests and max_tokens must be >= 1")


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def sharegpt_prompts(n: int, seed: int, max_chars: int) -> list[str]:
    """``n`` ShareGPT first human turns (drawn with replacement when the corpus is smaller)."""
    from .corpus import load_sharegpt

    convs, _ = load_sharegpt()
    pool = [c.prompt for c in convs if 0 < len(c.prompt.strip()) <= max_chars]
    if not pool:
        raise ValueError("no ShareGPT prompt fits the length limit")
    rng = random.Random(seed)
    return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]


def _headers(cfg: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


async def one_request(client: httpx.AsyncClient, cfg: LoadConfig, model: str, prompt: str) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=_headers(cfg)) as r:
            if r.status_code != 200:
                await r.aread()
                try:
                    code = r.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = None
                res.error = f"http {r.status_code}" + (f" {code}" if code else "")
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error {obj['error'].get('code')}"
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                for ch in obj.get("choices", []):
                    if ch.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = type(e).__name__
        return res
    res.e2e = time.perf_counter() - t0
    if last is None:  # no content at all (e.g. the first token was end-of-sequence)
        res.ttft = res.e2e
    res.ok = True
    return res


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """Flat ``{sample name{labels}: value}`` of the server's /metrics (empty for a server without them)."""
    r = await client.get("/metrics")
    if r.status_code in (404, 501):
        return {}
    r.raise_for_status()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_healthy(url: str, timeout: float, interval: float = 0.2, check: Callable[[], None] | None = None) -> bool:
    """Poll ``url``/health until it answers 200 (True) or ``timeout`` seconds pass (False). ``check()`` runs
    before each poll and may raise, e.g. when the server's process has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def rss_from_proc(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``xs``, linear between the nearest ranks; None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def run_load(cfg: LoadConfig) -> dict:
    limits = httpx.Limits(max_connections=cfg.concurrency + 2)
    async with httpx.AsyncClient(base_url=cfg.url, timeout=cfg.timeout, limits=limits) as client:
        model = cfg.model
        if model is None:
            r = await client.get("/v1/models", headers=_headers(cfg))
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = sharegpt_prompts(cfg.requests, cfg.seed, cfg.max_prompt_chars)
        before = await scrape(client)
        rss_before = rss_from_proc(cfg.pid) if cfg.pid else before.get("process_resident_memory_bytes")
        queue: asyncio.Queue[str] = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, cfg, model, queue.get_nowait()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        wall = time.perf_counter() - t0
        after = await scrape(client)
        rss_after = rss_from_proc(cfg.pid) if cfg.pid else after.get("process_resident_memory_bytes")
    return summarise(cfg, model, results, wall, before, after, rss_before, rss_after)


def summarise(cfg: LoadConfig, model: str, results: list[RequestResult], wall: float, before: dict, after: dict,
              rss_before: float | None, rss_after: float | None) -> dict:
    """The run's figures from the per-request results and the server's metrics before and after.

    Each of ``--concurrency`` clients sends streaming chat requests back to back
    until ``--requests`` have been sent. Client-side measurements per request:
    TTFT (send -> first content chunk), ITL (gaps between content chunks; tokens
    accepted in one speculative step arrive in one chunk), TPOT ((E2E - TTFT) /
    (tokens - 1)) and E2E; output tokens come from the server's usage chunk.
    Reported: requests/s, output tok/s, p50/p99 of each latency, errors by kind,
    and from the server's ``/metrics`` the resident memory before and after and
    the speculation figures of the run (mean acceptance length = 1 + accepted
    tokens / drafts, as vLLM defines it). ``--pid`` reads the resident memory from
    ``/proc/PID/status`` instead, for a server on this machine.
    """
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tok = sum(r.output_tokens for r in ok)

    def lat(xs: list[float]) -> dict:
        return {"mean": statistics.fmean(xs) if xs else None, "p50": percentile(xs, 0.5), "p99": percentile(xs, 0.99)}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    # adaspec's metrics, or llama-server's (the same names under its own prefix; its steps are not counted alike)
    prefix = "adaspec:" if any(k.startswith("adaspec:") for k in after) else "llamacpp:"
    drafts = delta(prefix + "spec_decode_num_drafts_total")
    draft_tokens = delta(prefix + "spec_decode_num_draft_tokens_total")
    accepted = delta(prefix + "spec_decode_num_accepted_tokens_total")
    gen = delta("adaspec:generation_tokens_total")
    steps = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith("adaspec:spec_decode_steps_total{"))
    return {
        "config": asdict(cfg), "model": model, "wall_s": wall, "requests": len(results), "ok": len(ok),
        "errors": errors, "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "output_tok_per_s": out_tok / wall if wall > 0 else 0.0, "output_tokens": out_tok,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "ttft_s": lat([r.ttft for r in ok]), "itl_s": lat([x for r in ok for x in r.itl]),
        "tpot_s": lat([t for r in ok if (t := r.tpot) is not None]), "e2e_s": lat([r.e2e for r in ok]),
        "server": {"rss_before_mib": rss_before / 2**20 if rss_before else None,
                   "rss_after_mib": rss_after / 2**20 if rss_after else None,
                   "drafts": drafts, "draft_tokens": draft_tokens, "accepted_tokens": accepted,
                   "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
                   "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
                   "tokens_per_step": gen / steps if steps else None},
    }


def format_report(s: dict) -> str:
    def ms(d: dict) -> str:
        f = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
        return f"p50 {f(d['p50'])} ms, p99 {f(d['p99'])} ms, mean {f(d['mean'])} ms"

    srv = s["server"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"model {s['model']}: {s['ok']}/{s['requests']} ok in {s['wall_s']:.1f} s "
        f"(concurrency {s['config']['concurrency']}, max_tokens {s['config']['max_tokens']})",
        f"  requests/s      {s['requests_per_s']:.2f}",
        f"  output tok/s    {s['output_tok_per_s']:.1f}  ({s['output_tokens']} tokens; prompts {s['prompt_tokens']})",
        f"  TTFT            {ms(s['ttft_s'])}",
        f"  ITL (chunks)    {ms(s['itl_s'])}",
        f"  TPOT            {ms(s['tpot_s'])}",
        f"  E2E             {ms(s['e2e_s'])}",
        f"  errors          {s['errors'] or 'none'}",
        f"  server RSS      {fmt(srv['rss_before_mib'], '.0f')} MiB -> {fmt(srv['rss_after_mib'], '.0f')} MiB",
        f"  speculation     mean acceptance length {fmt(srv['mean_acceptance_length'], '.2f')}, "
        f"tokens per step {fmt(srv['tokens_per_step'], '.2f')}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaspec.bench.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=LoadConfig.url)
    ap.add_argument("--concurrency", default=str(LoadConfig.concurrency),
                    help="clients; with --compare a comma-separated list, each run in turn")
    ap.add_argument("--requests", type=int, default=LoadConfig.requests)
    ap.add_argument("--max-tokens", type=int, default=LoadConfig.max_tokens)
    ap.add_argument("--temperature", type=float, default=LoadConfig.temperature)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None, help="model id in the API (default: the first /v1/models lists)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prompt-chars", type=int, default=LoadConfig.max_prompt_chars)
    ap.add_argument("--pid", type=int, default=None, help="server PID on this machine (RSS from /proc)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the summary as JSON")
    cmp = ap.add_argument_group("comparing servers (--compare starts them itself; --url is not used)")
    cmp.add_argument("--compare", default=None, metavar="SETUPS",
                     help="comma-separated: adaspec modes (plain, ngram, suffix, head, adaptive) and llama-server "
                          "setups (llama-server, llama-server-ngram, llama-server-ngram-tuned, llama-server-draft)")
    cmp.add_argument("--passes", type=int, default=1, help="send the same requests this many times per server")
    cmp.add_argument("--serve-model", default=None, metavar="PATH", help="model file (default: the bundled GGUF)")
    cmp.add_argument("--threads", type=int, default=int(os.environ.get("ADASPEC_THREADS", "2")),
                     help="threads of every server (default: ADASPEC_THREADS, else 2)")
    cmp.add_argument("--draft-model", default=None, metavar="GGUF", help="llama-server-draft's draft model")
    args = ap.parse_args(argv)
    try:
        if args.compare is not None:
            from . import serving

            base = LoadConfig(requests=args.requests, max_tokens=args.max_tokens, temperature=args.temperature,
                              seed=args.seed, max_prompt_chars=args.max_prompt_chars)
            return serving.run(args, base)
        cfg = LoadConfig(url=args.url.rstrip("/"), concurrency=int(args.concurrency), requests=args.requests,
                         max_tokens=args.max_tokens, temperature=args.temperature, api_key=args.api_key,
                         model=args.model, seed=args.seed, max_prompt_chars=args.max_prompt_chars, pid=args.pid)
        summary = asyncio.run(run_load(cfg))
    except (ValueError, FileNotFoundError) as e:
        print(f"load: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a server of --compare could not start; its log is in the message
        print(f"load: error: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"load: error: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    print(format_report(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["ok"] == summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
