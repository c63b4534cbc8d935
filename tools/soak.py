"""Soak test: many clients, valid and invalid bodies mixed, against ``adaspec serve`` on 127.0.0.1.

    python tools/soak.py --clients 8 --requests 1000 --max-tokens 8 [--serve-args "--threads 1"]

Reports the count of each status, server errors, the server's resident memory at start and end and p50/p99 latency
of the valid and the invalid requests, as one JSON object; exit status 1 if any server error was seen (details on
:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from adaspec.bench.load import percentile, rss_from_proc, wait_healthy
from adaspec.bench.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
MAX_REQUESTS = 100_000
MAX_SECONDS = 3600

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "def fibonacci(n):",
           "List three prime numbers.", "Explain recursion in one sentence.", "Translate 'good morning' to German."]


def valid_body(rng: random.Random, model: str, max_tokens: int) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.7, 1.0]),
              "stream": rng.random() < 0.4}
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
    return "/v1/completions", {**common, "prompt": rng.choice(PROMPTS)}


def invalid_body(rng: random.Random, model: str) -> tuple[str, bytes]:
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    cases = [
        b'{"model": "' + model.encode() + b'", "prompt": ',
        b"",
        b"[1, 2, 3]",
        json.dumps({"model": model, "prompt": 5}).encode(),
        json.dumps({"model": model, "prompt": "hi", "max_tokens": "5"}).encode(),
        json.dumps({"model": model, "prompt": "hi", "max_tokens": 10**9}).encode(),
        json.dumps({"model": model, "prompt": "hi", "temperature": 1e-300}).encode(),
        json.dumps({"model": model, "prompt": "hi", "temperature": 7}).encode(),
        json.dumps({"model": "no-such-model", "prompt": "hi"}).encode(),
        json.dumps({"model": model, "messages": []}).encode(),
        json.dumps({"model": model, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        b'{"model": "' + model.encode() + b'", "prompt": "\\ud800 lone surrogate"}',
        b'{"model": "' + model.encode() + b'", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        json.dumps({"model": model, "prompt": "x" * 200_000}).encode(),
        json.dumps({"model": model, "prompt": [1, 2, 10**12]}).encode(),
        json.dumps({"model": model, "prompt": "hi", "n": 3}).encode(),
        b"\xff\xfe\x00garbage",
    ]
    return path, rng.choice(cases)


def rss_kib(pid: int) -> int:
    rss = rss_from_proc(pid)
    if rss is None:
        raise RuntimeError("no VmRSS")
    return int(rss) // 1024


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def main(argv: list[str] | None = None) -> int:
    """Starts the server (the bundled model unless ``--serve-args`` names another) on a free port of 127.0.0.1, waits
    for /health, then ``--clients`` clients send ``--requests`` requests in all, back to back: about half valid
    (chat and completions, streaming or not, ``max_tokens`` at most ``--max-tokens``), the rest invalid (malformed
    JSON, wrong types, unknown models, hostile nesting and Unicode, oversize numbers). It stops early at
    ``--time-limit`` seconds. Reports the count of each status, server errors (5xx, or a stream that ended in an
    error event), the server's resident memory at start and end (``/proc/PID/status``) and p50/p99 latency of the
    valid and the invalid requests, as one JSON object. Exit status 1 if any server error was seen.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--invalid-share", type=float, default=0.5)
    ap.add_argument("--time-limit", type=float, default=1800.0, help="seconds; the run stops early beyond it")
    ap.add_argument("--serve-args", default="", help="extra arguments for adaspec serve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= MAX_REQUESTS and 0 < args.time_limit <= MAX_SECONDS):
        ap.error(f"need 1..64 clients, 1..{MAX_REQUESTS} requests and a time limit of at most {MAX_SECONDS} s")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "adaspec.serve", "--host", "127.0.0.1", "--port", str(port)] + shlex.split(
        args.serve_args)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        def alive() -> None:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}; log: {log.name}")

        if not wait_healthy(url, 600, interval=0.5, check=alive):
            raise SystemExit(f"server not ready; log: {log.name}")
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        # one warm-up request, so the start figure is the memory of a server that has served
        httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=120)
        rss_start = rss_kib(proc.pid)

        lock = threading.Lock()
        counter = iter(range(args.requests))
        statuses: Counter = Counter()
        server_errors: list[str] = []
        latency = {"valid": [], "invalid": []}
        stop_at = time.monotonic() + args.time_limit

        def client(cid: int) -> None:
            rng = random.Random(args.seed * 1000 + cid)
            with httpx.Client(base_url=url, timeout=300) as http:
                while time.monotonic() < stop_at:
                    with lock:
                        if next(counter, None) is None:
                            return
                    if rng.random() < args.invalid_share:
                        kind, (path, content) = "invalid", invalid_body(rng, model)
                    else:
                        kind = "valid"
                        path, body = valid_body(rng, model, args.max_tokens)
                        content = json.dumps(body).encode()
                    t0 = time.perf_counter()
                    try:
                        r = http.post(path, content=content, headers={"Content-Type": "application/json"})
                        text = r.text
                    except httpx.HTTPError as e:
                        with lock:
                            server_errors.append(f"transport: {type(e).__name__}: {e}")
                        continue
                    dt = time.perf_counter() - t0
                    bad = r.status_code >= 500 or (r.status_code == 200 and '"error"' in text
                                                    and r.headers.get("content-type", "").startswith("text/event"))
                    with lock:
                        statuses[r.status_code] += 1
                        latency[kind].append(dt)
                        if bad:
                            server_errors.append(f"{r.status_code}: {text[:200]}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        rss_end = rss_kib(proc.pid)
        report = {
            "clients": args.clients, "requests": sum(statuses.values()), "seconds": round(elapsed, 1),
            "statuses": dict(sorted(statuses.items())), "server_errors": len(server_errors),
            "server_error_samples": server_errors[:5],
            "rss_mib_start": round(rss_start / 1024, 1), "rss_mib_end": round(rss_end / 1024, 1),
            **{f"{k}_p{int(q * 100)}_s": _round(percentile(v, q)) for k, v in latency.items() for q in (0.5, 0.99)},
            "server_log": log.name,
        }
        print(json.dumps(report, indent=1))
        return 1 if server_errors else 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
