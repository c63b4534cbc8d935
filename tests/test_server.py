"""The OpenAI-compatible server, tested as a real process on 127.0.0.1.

Two backends: the bundled SmolLM2 model (``real``; the OpenAI client, learned
state across restarts, tenant isolation) and a tiny deterministic stand-in
model with a fixed forward time (``fake``; queueing, disconnects and draining,
where timing must be controlled). Both run the real engine, speculators and
``build_engine``. This file doubles as the stand-in's launcher:
``python tests/test_server.py --port P [serve options]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adaspec.bench.servers import ManagedServer, free_port  # noqa: E402
from adaspec.model.base import Capabilities, ForwardOutput  # noqa: E402

# -- the stand-in model -------------------------------------------------------------------------------

FAKE_VOCAB = 128
FAKE_CONTEXT = 512


class FakeCache:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.pending: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def commit(self, keep) -> None:
        self.tokens += [self.pending[i] for i in keep]
        self.pending = []

    def truncate(self, length: int) -> None:
        del self.tokens[length:]


class FakeModel:
    """Next token = a fixed function of the last two tokens and the position (peaked logits, so sampling is
    near-greedy). The position keeps the text from cycling, so a request's own text predicts little and
    generation costs about one forward per token, unless the same prompt was answered before."""

    vocab_size = FAKE_VOCAB
    hidden_size = 4
    max_context = FAKE_CONTEXT
    device = torch.device("cpu")
    capabilities = Capabilities(trees=True, hidden_states=False, rows_exact=True)

    def __init__(self, forward_s: float = 0.0):
        self.forward_s = forward_s

    def new_cache(self) -> FakeCache:
        return FakeCache()

    @staticmethod
    def next_token(a: int, b: int, position: int) -> int:
        return 32 + (a * 7 + b * 3 + position * 13) % 90

    def _logits(self, seq: list[int]) -> torch.Tensor:
        logits = torch.zeros(FAKE_VOCAB)  # [vocab]
        logits[self.next_token(seq[-2] if len(seq) > 1 else 0, seq[-1], len(seq))] = 12.0
        return logits

    def prefill(self, cache: FakeCache, tokens) -> ForwardOutput:
        cache.tokens += list(tokens)
        return ForwardOutput(self._logits(cache.tokens)[None], None)

    def forward(self, cache: FakeCache, tokens, parents=None) -> ForwardOutput:
        n = len(tokens)
        parents = list(parents) if parents is not None else list(range(-1, n - 1))
        rows = []
        for i in range(n):
            path, j = [], i
            while j >= 0:
                path.append(tokens[j])
                j = parents[j]
            rows.append(self._logits(cache.tokens + path[::-1]))
        cache.pending = list(tokens)
        if self.forward_s:
            time.sleep(self.forward_s)
        return ForwardOutput(torch.stack(rows), None)  # [n, vocab]


class FakeTokenizer:
    """Characters 1..127 are their own token ids; 0 is end-of-sequence."""

    name = "fake-model"
    eos_token_ids = [0]

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text if 0 < ord(c) < FAKE_VOCAB]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")


def fake_loader(cfg):
    from adaspec.serve.app import EngineBundle, _engine_snapshot, _engine_state_sizes
    from adaspec.system import build_engine

    model, tok = FakeModel(float(os.environ.get("FAKE_FORWARD_S", "0.02"))), FakeTokenizer()
    engine = build_engine(model, tok, cfg.mode, state_dir=cfg.state_dir, shared_learning=not cfg.isolated_tenants)
    return EngineBundle(engine, tok, "fake-model", _engine_snapshot(engine), _engine_state_sizes(engine))


# -- running a server ---------------------------------------------------------------------------------


class ServerProcess(ManagedServer):
    """``adaspec serve`` (or, with ``backend="fake"``, this file's fake-model server) in a subprocess on a free port;
    ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, args: list[str], backend: str = "real", env: dict | None = None, tmp: Path | None = None):
        port = free_port()
        self.args = args
        base = ([sys.executable, "-m", "adaspec.serve"] if backend == "real"
                else [sys.executable, str(Path(__file__).resolve())])
        super().__init__("serve", base + ["--port", str(port)] + args, port, env, cwd=ROOT, log_dir=tmp)

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        super().wait_ready(timeout)
        return self

    def namespace(self, key: str) -> str:
        """The namespace id this server gives ``key`` (an HMAC under the secret in its state directory)."""
        from adaspec.serve.auth import SECRET_FILE, namespace_for_key, tenant_secret

        state_dir = Path(self.args[self.args.index("--state-dir") + 1])
        assert (state_dir / SECRET_FILE).exists()
        return namespace_for_key(key, tenant_secret(state_dir))

    def output(self, tail: int | None = None) -> str:
        return super().output(tail)


@contextlib.contextmanager
def serving(args: list[str], backend: str = "real", tmp: Path | None = None, env: dict | None = None
            ) -> Iterator[ServerProcess]:
    srv = ServerProcess(args, backend, env, tmp)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


class Fleet:
    """One server at a time with fixed options; tests may restart it (``replace``) or stop it for good."""

    def __init__(self, args: list[str], backend: str, tmp: Path):
        self.args, self.backend, self.tmp = args, backend, tmp
        self._srv: ServerProcess | None = None

    @property
    def srv(self) -> ServerProcess:
        if self._srv is None or self._srv.proc.poll() is not None:
            self._srv = ServerProcess(self.args, self.backend, tmp=self.tmp).wait_ready()
        return self._srv

    def replace(self, sig: int = signal.SIGTERM) -> ServerProcess:
        if self._srv is not None:
            self._srv.stop(sig)
        self._srv = None
        return self.srv

    def close(self) -> None:
        if self._srv is not None:
            self._srv.stop()


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Samples of /metrics parsed with prometheus_client: {(name, sorted label items): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(url: str, name: str, **labels) -> float:
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(pred, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


KEY_A, KEY_B, KEY_C, KEY_D = (f"key-tenant-{t}-0123456789" for t in "abcd")
SPEC_FIELDS = ("output_tokens", "forwards", "drafted", "accepted", "draft_steps", "accepted_per_pos",
               "drafted_per_pos", "chosen")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- fake-backed server: input handling, queueing, disconnects ----------------------------------------


@pytest.fixture(scope="module")
def fake_fleet(tmp_path_factory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fake")
    fleet = Fleet(["--mode", "suffix", "--api-key", KEY_A, "--api-key", KEY_B, "--max-active", "1", "--max-queue",
                   "1", "--max-tokens-cap", "400", "--state-dir", str(tmp / "state"), "--snapshot-interval", "0.3"],
                  "fake", tmp)
    yield fleet
    fleet.close()


@pytest.fixture
def fake_server(fake_fleet) -> ServerProcess:
    return fake_fleet.srv


def _bad_cases() -> list[tuple[str, str, object, int, str | None]]:
    c = "/v1/completions"
    ch = "/v1/chat/completions"
    long_prompt = "x" * (FAKE_CONTEXT - 5)
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("malformed json", c, b'{"model": "fake-model", "prompt": ', 400, "invalid_json"),
        ("empty body", c, b"", 400, "invalid_json"),
        ("not an object", c, [1, 2], 400, "invalid_type"),
        ("missing model", c, {"prompt": "hi"}, 400, "missing_required_parameter"),
        ("missing prompt", c, {"model": "fake-model"}, 400, "missing_required_parameter"),
        ("missing messages", ch, {"model": "fake-model"}, 400, "missing_required_parameter"),
        ("prompt wrong type", c, {"model": "fake-model", "prompt": 5}, 400, "invalid_type"),
        ("max_tokens string", c, {"model": "fake-model", "prompt": "hi", "max_tokens": "5"}, 400, "invalid_type"),
        ("max_tokens float", c, {"model": "fake-model", "prompt": "hi", "max_tokens": 2.5}, 400, "invalid_type"),
        ("stream not bool", c, {"model": "fake-model", "prompt": "hi", "stream": "yes"}, 400, "invalid_type"),
        ("max_tokens zero", c, {"model": "fake-model", "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
        ("max_tokens negative", ch, {"model": "fake-model", "messages": msgs, "max_tokens": -3}, 400,
         "invalid_value"),
        ("max_tokens above cap", c, {"model": "fake-model", "prompt": "hi", "max_tokens": 401}, 400,
         "invalid_value"),
        ("max_completion_tokens zero", ch, {"model": "fake-model", "messages": msgs, "max_completion_tokens": 0},
         400, "invalid_value"),
        ("context exceeded", c, {"model": "fake-model", "prompt": long_prompt, "max_tokens": 10}, 400,
         "context_length_exceeded"),
        ("prompt alone exceeds", ch, {"model": "fake-model", "messages": [{"role": "user",
                                                                        "content": "y" * FAKE_CONTEXT}]},
         400, "context_length_exceeded"),
        ("n=2", c, {"model": "fake-model", "prompt": "hi", "n": 2}, 400, "unsupported_value"),
        ("temperature too high", c, {"model": "fake-model", "prompt": "hi", "temperature": 5}, 400,
         "invalid_value"),
        ("top_p zero", c, {"model": "fake-model", "prompt": "hi", "top_p": 0}, 400, "invalid_value"),
        ("NaN", c, b'{"model": "fake-model", "prompt": "hi", "temperature": NaN}', 400, "invalid_json"),
        ("token id outside vocab", c, {"model": "fake-model", "prompt": [1, 2, 999]}, 400, "invalid_value"),
        ("empty prompt", c, {"model": "fake-model", "prompt": ""}, 400, "invalid_value"),
        ("empty stop string", c, {"model": "fake-model", "prompt": "hi", "stop": ["a", ""]}, 400, "invalid_value"),
        ("two prompts", c, {"model": "fake-model", "prompt": ["a", "b"]}, 400, "unsupported_value"),
        ("logprobs", c, {"model": "fake-model", "prompt": "hi", "logprobs": 2}, 400, "unsupported_parameter"),
        ("stream_options without stream", c, {"model": "fake-model", "prompt": "hi",
                                              "stream_options": {"include_usage": True}}, 400, "invalid_value"),
        ("bad role", ch, {"model": "fake-model", "messages": [{"role": "wizard", "content": "x"}]}, 400,
         "invalid_value"),
        ("no messages", ch, {"model": "fake-model", "messages": []}, 400, "invalid_value"),
        ("image content", ch, {"model": "fake-model", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
         "unsupported_value"),
        ("tools", ch, {"model": "fake-model", "messages": msgs, "tools": [{"type": "function"}]}, 400,
         "unsupported_parameter"),
        ("unknown adaspec option", c, {"model": "fake-model", "prompt": "hi", "adaspec": {"nope": 1}}, 400,
         "unknown_parameter"),
        ("unknown model", c, {"model": "gpt-17", "prompt": "hi"}, 404, "model_not_found"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_gets_openai_error(fake_server, case):
    import httpx

    _, path, body, status, code = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(fake_server.url + path, content=content, headers={**auth(KEY_A), "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    assert err["message"] and "Traceback" not in err["message"] and str(ROOT) not in err["message"]


def test_server_survives_bad_input_and_unknown_routes(fake_server):
    import httpx

    r = httpx.get(fake_server.url + "/v1/nothing-here", headers=auth(KEY_A))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(fake_server.url + "/v1/completions", headers=auth(KEY_A))
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(fake_server.url + "/v1/completions", content=b"\xff\xfe garbage", headers=auth(KEY_A))
    assert r.status_code == 400
    assert httpx.get(fake_server.url + "/health").status_code == 200
    r = httpx.post(fake_server.url + "/v1/completions", headers=auth(KEY_A),
                   json={"model": "fake-model", "prompt": "abc", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    with httpx.stream("POST", fake_server.url + "/v1/chat/completions", headers=auth(KEY_A), json={
            "model": "fake-model", "messages": [{"role": "user", "content": "one"}], "max_completion_tokens": 1,
            "stream": True}) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len("".join(c["choices"][0]["delta"].get("content", "") for c in chunks)) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "Traceback" not in fake_server.output()


def test_auth(fake_server):
    import httpx
    import openai

    body = {"model": "fake-model", "prompt": "abc", "max_tokens": 2}
    for headers in ({}, auth("wrong-key"), {"Authorization": KEY_A}, {"Authorization": "Basic " + KEY_A}):
        r = httpx.post(fake_server.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(fake_server.url + "/v1/models").status_code == 401
    assert httpx.get(fake_server.url + "/health").status_code == 200  # open
    assert httpx.get(fake_server.url + "/metrics").status_code == 200  # open
    assert httpx.post(fake_server.url + "/v1/completions", json=body, headers=auth(KEY_B)).status_code == 200
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="fake-model", prompt="abc", max_tokens=2)


def _stream_until_first_chunk(url: str, key: str, max_tokens: int = 400):
    """Open a streaming completion and read its first chunk; returns (client, response, lines) still open.

    Keep ``lines`` referenced: httpx closes the response when its line iterator is garbage collected."""
    import httpx

    client = httpx.Client(timeout=30)
    req = client.build_request("POST", url + "/v1/completions", headers=auth(key),
                               json={"model": "fake-model", "prompt": "stream me", "max_tokens": max_tokens,
                                     "temperature": 0, "stream": True})
    resp = client.send(req, stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["text"] is not None
    return client, resp, lines


def test_queue_full_and_disconnect_cancels(fake_server):
    """One slot, one queue place: the third concurrent request gets 429; closing a stream cancels its work."""
    import httpx

    url = fake_server.url
    cancelled0 = metric(url, "adaspec:request_success_total", finished_reason="cancelled")
    client, resp, lines = _stream_until_first_chunk(url, KEY_A)  # occupies the only slot (400 tokens at 20 ms/step)
    result: dict = {}

    def waiting_request() -> None:
        result["r"] = httpx.post(url + "/v1/completions", headers=auth(KEY_A), timeout=60,
                                 json={"model": "fake-model", "prompt": "queued", "max_tokens": 3})

    t = threading.Thread(target=waiting_request)
    t.start()
    wait_for(lambda: metric(url, "adaspec:num_requests_waiting") == 1, what="a waiting request")
    r = httpx.post(url + "/v1/completions", headers=auth(KEY_A), json={"model": "fake-model", "prompt": "x"})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "queue_full" and r.headers.get("retry-after")
    assert metric(url, "adaspec:requests_rejected_total", reason="queue_full") >= 1
    assert next(lines).startswith("data: ") or True  # still streaming
    resp.close()  # the client goes away mid-stream
    client.close()
    del lines
    wait_for(lambda: metric(url, "adaspec:request_success_total", finished_reason="cancelled") == cancelled0 + 1,
             what="the stream's cancellation")
    t.join(30)
    assert result["r"].status_code == 200  # the queued request got the slot
    gen = metric(url, "adaspec:generation_tokens_total")
    assert gen < 400 + 3 + 200, "the cancelled stream must not have run to max_tokens"
    assert "cancelled" in fake_server.output()


def test_nonstreaming_disconnect_cancels(fake_server):
    import httpx

    url = fake_server.url
    cancelled0 = metric(url, "adaspec:request_success_total", finished_reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", headers=auth(KEY_A), timeout=httpx.Timeout(30, read=0.5),
                   json={"model": "fake-model", "prompt": "long one", "max_tokens": 400, "temperature": 0})
    wait_for(lambda: metric(url, "adaspec:request_success_total", finished_reason="cancelled") == cancelled0 + 1,
             what="the cancellation")
    assert metric(url, "adaspec:num_requests_running") == 0


def test_stop_strings_and_streaming_agree(fake_server):
    """Streaming deltas concatenate to the non-streaming text, also when a stop string cuts it."""
    import httpx

    body = {"model": "fake-model", "prompt": "abcdef", "max_tokens": 60, "temperature": 0}
    full = httpx.post(fake_server.url + "/v1/completions", headers=auth(KEY_A), json=body).json()
    text = full["choices"][0]["text"]
    stop = text[20:23]
    cut = text[: text.index(stop)]
    for stream in (False, True):
        b = {**body, "stop": [stop], "stream": stream}
        if not stream:
            r = httpx.post(fake_server.url + "/v1/completions", headers=auth(KEY_A), json=b).json()
            assert r["choices"][0]["text"] == cut and r["choices"][0]["finish_reason"] == "stop"
            continue
        parts, reasons = [], []
        with httpx.stream("POST", fake_server.url + "/v1/completions", headers=auth(KEY_A), json=b) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ch = json.loads(line[6:])["choices"][0]
                    parts.append(ch["text"])
                    reasons.append(ch["finish_reason"])
        assert "".join(parts) == cut and reasons[-1] == "stop"


def _check_metrics_count_speculation(srv: ServerProcess, key: str, model: str, prompt: str) -> None:
    """Send ``prompt`` twice; the second request's stats must match what /metrics gained during it."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "adaspec": {"stats": True}}
    assert httpx.post(srv.url + "/v1/completions", headers=auth(key), timeout=300, json=body).status_code == 200
    before = metrics(srv.url)
    r = httpx.post(srv.url + "/v1/completions", headers=auth(key), timeout=300, json=body)
    stats = r.json()["adaspec"]["stats"]
    after = metrics(srv.url)

    def d(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps = stats["forwards"] - 1  # the prefill is not a speculative step
    assert d("adaspec:spec_decode_num_drafts_total") == stats["draft_steps"] > 0
    assert d("adaspec:spec_decode_num_draft_tokens_total") == stats["drafted"]
    assert d("adaspec:spec_decode_num_accepted_tokens_total") == stats["accepted"] > 0
    for i, n in enumerate(stats["accepted_per_pos"]):
        assert d("adaspec:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) == n
    assert d("adaspec:generation_tokens_total") == stats["output_tokens"] == 24
    assert d("adaspec:prompt_tokens_total") == stats["prompt_tokens"]
    assert d("adaspec:request_success_total", finished_reason="length") == 1
    assert d("adaspec:time_to_first_token_seconds_count") == 1
    assert d("adaspec:e2e_request_latency_seconds_count") == 1
    assert d("adaspec:inter_token_latency_seconds_count") == steps
    assert d("adaspec:spec_decode_lookahead_count") == steps
    assert d("adaspec:spec_decode_lookahead_sum") == stats["drafted"]
    assert sum(d("adaspec:spec_decode_steps_total", speculator=k) for k in stats["chosen"]) == steps
    assert after[("process_resident_memory_bytes", ())] > 10e6
    assert after[("adaspec:learned_state_size", (("namespace", srv.namespace(key)), ("speculator", "suffix")))] > 0


def test_metrics_parse_and_count_speculation(fake_server):
    _check_metrics_count_speculation(fake_server, KEY_A, "fake-model", "count with me")


def test_metrics_show_the_speculation_guard(tmp_path):
    """Concurrent requests share batched steps, and /metrics says whether batches of that size speculate."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    with serving(["--mode", "suffix", "--max-active", "4"], "fake", tmp_path) as srv:
        def ask(prompt: str) -> int:
            return httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "model": "fake-model", "prompt": prompt, "max_tokens": 60, "temperature": 0}).status_code

        with ThreadPoolExecutor(3) as ex:
            assert list(ex.map(ask, ["guard one", "guard two", "guard three"])) == [200] * 3
        seen = {labels for (name, labels) in metrics(srv.url) if name == "adaspec:spec_guard_speculating"}
    assert seen & {(("batch_requests", "2-3"),)}, seen


def _fake_stats(srv: ServerProcess, prompt: str, max_tokens: int = 120) -> dict:
    import httpx

    r = httpx.post(srv.url + "/v1/completions", timeout=60, headers=auth(KEY_B), json={
        "model": "fake-model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "adaspec": {"stats": True}})
    assert r.status_code == 200, r.text
    return r.json()["adaspec"]["stats"]


def test_learned_state_survives_kill9(fake_fleet):
    """Snapshots on an interval: after kill -9 the restarted server drafts a repeated prompt as well as before."""
    prompt = "the same question again"
    srv = fake_fleet.srv
    cold = _fake_stats(srv, prompt)
    warm = _fake_stats(srv, prompt)
    assert warm["mean_accepted"] > 1.5 * cold["mean_accepted"], (cold, warm)
    ok0 = metric(srv.url, "adaspec:learned_state_snapshots_total", result="ok")
    wait_for(lambda: metric(srv.url, "adaspec:learned_state_snapshots_total", result="ok") >= ok0 + 2,
             what="a snapshot after the traffic")
    srv = fake_fleet.replace(signal.SIGKILL)
    restored = metric(srv.url, "adaspec:learned_state_size", speculator="suffix", namespace=srv.namespace(KEY_B))
    assert restored > 0, "nothing restored"
    after_kill = _fake_stats(srv, prompt)
    assert after_kill["mean_accepted"] >= warm["mean_accepted"], (warm, after_kill)
    other = _fake_stats(srv, "a question never asked")  # learned state is per prompt text, not a global speed-up
    assert other["mean_accepted"] < warm["mean_accepted"]


def test_sigterm_drains_running_requests(fake_fleet):
    """SIGTERM: /health turns 503, new requests 503, the running one completes, exit status 0."""
    import httpx

    srv = fake_fleet.srv
    result: dict = {}

    def long_request() -> None:
        result["r"] = httpx.post(srv.url + "/v1/completions", timeout=60, headers=auth(KEY_A), json={
            "model": "fake-model", "prompt": "drain me", "max_tokens": 80, "temperature": 0})

    t = threading.Thread(target=long_request)
    t.start()
    wait_for(lambda: metric(srv.url, "adaspec:num_requests_running") == 1, what="the request to run")
    srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(srv.url + "/health").status_code == 503, what="health 503")
    assert httpx.get(srv.url + "/health").json()["status"] == "draining"
    r = httpx.post(srv.url + "/v1/completions", headers=auth(KEY_A), json={"model": "fake-model", "prompt": "late"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    t.join(60)
    assert result["r"].status_code == 200
    assert result["r"].json()["choices"][0]["finish_reason"] == "length"
    assert result["r"].json()["usage"]["completion_tokens"] == 80
    assert srv.proc.wait(60) == 0
    assert "engine stopped" in srv.output()


def test_scheduler_batches_every_running_request():
    """Every running request is in every round's batched step, whatever its neighbours do; requests join after
    their prefill and leave when they end."""
    from adaspec.engine import Engine
    from adaspec.control.base import FixedController
    from adaspec.serve.metrics import ServerMetrics
    from adaspec.serve.scheduler import Job, Scheduler, SchedulerConfig
    from adaspec.verify import SamplingParams

    engine = Engine(FakeModel(), FakeTokenizer(), [], FixedController(0))
    batches: list[list[str]] = []
    step_batch = engine.step_batch
    engine.step_batch = lambda reqs: (batches.append([r.id for r in reqs]), step_batch(reqs))[1]
    done = threading.Event()
    finals: dict[str, object] = {}

    def deliver(jid):
        def f(update):
            if update.finished:
                finals[jid] = update
                if len(finals) == 3:
                    done.set()
        return f

    sched = Scheduler(engine, ServerMetrics(), SchedulerConfig(max_active=3, max_queue=0))
    for jid, n in (("a", 30), ("b", 10), ("c", 20)):
        sched.submit(Job(jid, FakeTokenizer().encode("prompt " + jid), SamplingParams(max_tokens=n), "ns",
                         deliver(jid)))
    assert done.wait(30)
    sched.shutdown()
    assert {k: u.completion_tokens for k, u in finals.items()} == {"a": 30, "b": 10, "c": 20}
    # each job emits its first token at prefill and one per step: a 29 steps, b 9, c 19
    assert [sum(jid in b for b in batches) for jid in "abc"] == [29, 9, 19], batches
    full = [b for b in batches if len(b) == 3]
    assert len(full) >= 8 and all(b == ["a", "b", "c"] for b in full)
    assert all(b == sorted(b) for b in batches)  # admission order
def test_namespaces_separate_tenants_unless_shared():
    """In process: with per-key namespaces, A's traffic leaves B's drafts unchanged; one shared namespace does not."""
    from adaspec.serve.auth import KeyRing
    from adaspec.system import build_engine
    from adaspec.verify import SamplingParams

    prompt = FakeTokenizer().encode("a prompt both tenants send")
    params = SamplingParams(max_tokens=60)

    def b_stats_after_a(shared: bool) -> tuple[dict, dict]:
        ring = KeyRing.build([KEY_A, KEY_B], shared_namespace=shared)
        ns_a, ns_b = (ring.authenticate(f"Bearer {k}") for k in (KEY_A, KEY_B))
        engine = build_engine(FakeModel(), FakeTokenizer(), "suffix")
        alone = engine.generate(prompt, params, namespace=ns_b + "-control").stats
        for _ in range(2):
            engine.generate(prompt, params, namespace=ns_a)
        after = engine.generate(prompt, params, namespace=ns_b).stats
        return ({f: getattr(alone, f) for f in SPEC_FIELDS}, {f: getattr(after, f) for f in SPEC_FIELDS})

    alone, after = b_stats_after_a(shared=False)
    assert after == alone
    alone, after = b_stats_after_a(shared=True)
    assert after["accepted"] > alone["accepted"]


def test_command_line_rejects_bad_arguments(capsys, tmp_path):
    from adaspec.serve.__main__ import main

    assert main(["--model", str(tmp_path / "missing.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["--state-dir", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--port", "70000"])


# -- real model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_fleet(tmp_path_factory) -> Iterator[Fleet]:
    pytest.importorskip("adaspec.model.loader")
    tmp = tmp_path_factory.mktemp("real")
    keys = [arg for k in (KEY_A, KEY_B, KEY_C, KEY_D) for arg in ("--api-key", k)]
    # one thread: the test machine's cores are shared, where two OpenMP threads per process run far slower
    fleet = Fleet(keys + ["--mode", "suffix", "--max-tokens-cap", "256", "--state-dir", str(tmp / "state"),
                          "--snapshot-interval", "0", "--threads", "1"],
                  "real", tmp)
    yield fleet
    fleet.close()


@pytest.fixture
def real_server(real_fleet) -> ServerProcess:
    return real_fleet.srv


def _model_id(srv: ServerProcess) -> str:
    import httpx

    return httpx.get(srv.url + "/v1/models", headers=auth(KEY_A)).json()["data"][0]["id"]


def test_openai_client_completions_and_chat(real_server):
    """The official client, unchanged, against the real model and its chat template: JSON and SSE agree."""
    import openai

    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key=KEY_A, max_retries=0)
    model = _model_id(real_server)
    assert [m.id for m in client.models.list()] == [model]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"adaspec": {"stats": True}})
    text = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length") and text
    assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 5
    stats = chat.model_extra["adaspec"]["stats"]
    assert stats["output_tokens"] == chat.usage.completion_tokens and stats["forwards"] >= 1
    # streaming gives the same text (greedy), in deltas, with usage at the end
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens and not chunks[-1].choices
    # legacy completions, both ways
    comp = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=6, temperature=0)
    assert comp.usage.completion_tokens == 6 and comp.choices[0].finish_reason == "length"
    sc = list(client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=6, temperature=0,
                                        stream=True))
    assert "".join(c.choices[0].text for c in sc) == comp.choices[0].text
    # sampling parameters, the top_k extension included
    sampled = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0.9,
                                        top_p=0.95, seed=7, extra_body={"top_k": 40})
    assert sampled.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages, max_tokens=8200)
    assert e.value.code in ("context_length_exceeded", "invalid_value")


@pytest.mark.slow
def test_metrics_count_speculation_real_model(real_server):
    _check_metrics_count_speculation(real_server, KEY_C, _model_id(real_server),
                                     "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,")


def _spec_stats(srv: ServerProcess, key: str, prompt: str, max_tokens: int = 48) -> dict:
    import httpx

    r = httpx.post(srv.url + "/v1/chat/completions", headers=auth(key), timeout=300, json={
        "model": _model_id(srv), "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "adaspec": {"stats": True}})
    assert r.status_code == 200, r.text
    return r.json()["adaspec"]["stats"]


@pytest.mark.slow
def test_tenant_isolation(real_server):
    """Tenant A's traffic never shapes tenant B's drafts: B's stats are what a tenant without neighbours gets.

    B asks P, A asks P three times (A's namespace learns P's answer), B asks P again. Tenant D, which has
    sent nothing before, asks P twice with no traffic in between. B's two requests must match D's two
    exactly (same drafts, same accepted tokens), while A drafts more of P once it has seen it.
    """
    prompt = "List the first ten prime numbers, separated by commas."
    b1 = _spec_stats(real_server, KEY_B, prompt)
    a = [_spec_stats(real_server, KEY_A, prompt) for _ in range(3)]
    b2 = _spec_stats(real_server, KEY_B, prompt)
    d1 = _spec_stats(real_server, KEY_D, prompt)
    d2 = _spec_stats(real_server, KEY_D, prompt)
    assert {f: b1[f] for f in SPEC_FIELDS} == {f: d1[f] for f in SPEC_FIELDS}
    assert {f: b2[f] for f in SPEC_FIELDS} == {f: d2[f] for f in SPEC_FIELDS}
    assert a[1]["accepted"] > a[0]["accepted"], "A's namespace should have learned from A's traffic"


@pytest.mark.slow
def test_restart_keeps_learned_state(real_fleet):
    """Learned state is saved at shutdown (no interval snapshots here) and restored: a repeated prompt drafts at
    least as well after the restart as just before it, and better than the first time."""
    prompt = "Write a Python function that checks whether a string is a palindrome."
    srv = real_fleet.srv
    cold = _spec_stats(srv, KEY_A, prompt, 64)
    warm = _spec_stats(srv, KEY_A, prompt, 64)
    srv = real_fleet.replace(signal.SIGTERM)
    restarted = _spec_stats(srv, KEY_A, prompt, 64)
    assert warm["mean_accepted"] > cold["mean_accepted"], (cold, warm)
    assert restarted["mean_accepted"] >= warm["mean_accepted"], (warm, restarted)


# -- launcher for the stand-in ----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse

    from adaspec.serve.__main__ import add_arguments, cmd_serve

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    sys.exit(cmd_serve(ap.parse_args(), loader=fake_loader))
