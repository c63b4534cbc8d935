#!/usr/bin/env python3
"""A stand-in for llama-server that speaks the parts of its HTTP API the peers use, for the fast tests.

It takes llama-server's command line, records it (``FAKE_LLAMA_SERVER_ARGS``, a file path), and answers
``/health``, ``/tokenize`` (bytes + 1), ``/completion`` (streamed: the prompt's tokens echoed one per chunk, then a
final chunk with ``timings``; with ``--spec-type`` the timings carry draft counts), ``/v1/models``,
``/v1/chat/completions`` (streamed, with usage) and ``/metrics`` (llama-server's names). ``FAKE_LLAMA_SERVER_FAIL``
makes it exit at once with an error, as a build for the wrong CPU would.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = sys.argv[1:]
SPEC = "--spec-type" in ARGS
STATE = {"drafts": 0, "draft_tokens": 0, "accepted": 0}


def _arg(name: str, default: str) -> str:
    return ARGS[ARGS.index(name) + 1] if name in ARGS else default


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:
        pass

    def _json(self, obj, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _events(self, chunks) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for c in chunks:
            self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
        self.wfile.flush()

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json({"status": "ok"})
        elif self.path == "/v1/models":
            self._json({"object": "list", "data": [{"id": "fake.gguf", "object": "model"}]})
        elif self.path == "/metrics":
            body = "".join(f"# TYPE llamacpp:spec_decode_num_{n}_total counter\nllamacpp:spec_decode_num_{n}_total "
                           f"{STATE[k]}\n" for n, k in (("drafts", "drafts"), ("draft_tokens", "draft_tokens"),
                                                        ("accepted_tokens", "accepted")))
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._json({"error": "not found"}, 404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/tokenize":
            self._json({"tokens": [b + 1 for b in body["content"].encode()]})
        elif self.path == "/completion":
            tokens = list(body["prompt"])[: body["n_predict"]]
            drafted = len(tokens) if SPEC else 0
            STATE["drafts"] += 1 if SPEC else 0
            STATE["draft_tokens"] += drafted
            STATE["accepted"] += drafted // 2
            timings = {"predicted_n": len(tokens), "predicted_per_second": 100.0}
            if SPEC:
                timings.update(draft_n=drafted, draft_n_accepted=drafted // 2)
            self._events([{"content": "x", "tokens": [t], "stop": False} for t in tokens]
                         + [{"content": "", "tokens": [], "stop": True, "timings": timings}])
        elif self.path == "/v1/chat/completions":
            n = body.get("max_tokens", 4)
            chunks = [{"choices": [{"index": 0, "delta": {"content": "y"}}]} for _ in range(n)]
            chunks.append({"choices": [], "usage": {"completion_tokens": n, "prompt_tokens": 3}})
            self._events(chunks)
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            self._json({"error": "not found"}, 404)


def main() -> int:
    if os.environ.get("FAKE_LLAMA_SERVER_FAIL"):
        print("error: this build cannot run here", file=sys.stderr)
        return 1
    record = os.environ.get("FAKE_LLAMA_SERVER_ARGS")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps(ARGS) + "\n")
    server = ThreadingHTTPServer((_arg("--host", "127.0.0.1"), int(_arg("--port", "8080"))), Handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
