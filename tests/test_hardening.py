"""The server under hostile input and faults: each test reproduces one way it used to fail.

Bodies that made a parser or tokenizer raise, temperatures that overflow the sampler, a 500 that closed the
keep-alive connection, /metrics labels derived from the API key, learned-state files of the wrong shape,
tokenizing before admission, temporary files of an interrupted snapshot, the exit status after a second
signal, and controller state shared between tenants.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import socket
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from inprocess import loader_with, serving
from test_server import FAKE_CONTEXT, KEY_A, KEY_B, FakeModel, FakeTokenizer, ServerProcess, auth, metric, wait_for

from adaspec.serve.app import PROMPT_CHARS_PER_TOKEN, ServerConfig
from adaspec.store import pack, save_blob

MODEL = "fake-model"


def post(url: str, path: str, body, key: str | None = KEY_A, timeout: float = 30):
    import httpx

    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(auth(key) if key else {})}
    return httpx.post(url + path, content=content, headers=headers, timeout=timeout)


def assert_openai_error(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


class PickyTokenizer(FakeTokenizer):
    """Raises what Hugging Face tokenizers raise for text they cannot take (TypeError), and a RuntimeError --
    a server bug, not the client's -- for the text "boom"; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if "\x7f" in text:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        if "boom" in text:
            raise RuntimeError("tokenizer bug")
        return super().encode(text)


@pytest.fixture(scope="module")
def picky():
    tok = PickyTokenizer()
    with serving(ServerConfig(mode="suffix", api_keys=(KEY_A,), max_tokens_cap=64), loader_with(tok)) as url:
        yield url, tok


# -- parsing and tokenizing ------------------------------------------------------------------------------


@pytest.mark.parametrize("body,code", [
    (b'{"model": "fake-model", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
    (b'{"model": "fake-model", "prompt": "\\ud800abc"}', "invalid_json"),
    (b'{"model": "\\udfff", "prompt": "abc"}', "invalid_json"),
    (b'{"model": "fake-model", "prompt": "hi", "user": {"a": ' * 3000 + b"1" + b"}" * 3001, "invalid_json"),
], ids=["nested-prompt", "lone-surrogate-prompt", "lone-surrogate-model", "nested-ignored-field"])
def test_bodies_that_break_the_parser_get_400(picky, body, code):
    url, _ = picky
    assert_openai_error(post(url, "/v1/completions", body), 400, code)
    assert post(url, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_text_the_tokenizer_cannot_take_gets_400(picky):
    url, _ = picky
    assert_openai_error(post(url, "/v1/completions", {"model": MODEL, "prompt": "a\x7fb"}), 400, param="prompt")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "a\x7fb"}]}
    assert_openai_error(post(url, "/v1/chat/completions", chat), 400, param="messages")


def test_keep_alive_survives_a_500(picky):
    """An unexpected exception is a 500 in the OpenAI shape, and the same connection serves the next request."""
    url, _ = picky
    port = int(url.rsplit(":", 1)[1])

    def request(sock: socket.socket, prompt: str) -> tuple[int, dict, dict]:
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY_A}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        while len(rest) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-response"
            rest += chunk
        return int(lines[0].split()[1]), headers, json.loads(rest)

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        status, headers, body = request(sock, "boom")
        assert status == 500 and body["error"]["code"] == "internal_error"
        assert headers.get("connection", "").lower() != "close"
        status, _, body = request(sock, "fine")
        assert status == 200 and body["usage"]["completion_tokens"] == 2


# -- numbers the sampler cannot compute -----------------------------------------------------------------


def test_temperature_is_checked_against_the_sampler():
    from adaspec.verify.sampling import MIN_TEMPERATURE, SamplingParams, target_probs

    big = torch.finfo(torch.float32).max
    logits = torch.tensor([[big, -big, 0.0, 3.0], [1.0, 2.0, 3.0, 4.0]])  # [2, vocab]
    probs = target_probs(logits, SamplingParams(temperature=MIN_TEMPERATURE))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2, dtype=torch.float64))
    below = math.nextafter(MIN_TEMPERATURE, 0.0)
    assert not torch.isfinite(logits.double() / below).all()  # why the bound is where it is
    for t in (below, 1e-300, 5e-324, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=t)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300])
def test_tiny_temperature_gets_400(picky, temperature):
    url, _ = picky
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": temperature})
    assert_openai_error(r, 400, "invalid_value", "temperature")
    from adaspec.verify.sampling import MIN_TEMPERATURE

    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": MIN_TEMPERATURE})
    assert r.status_code == 200, r.text


# -- admission before tokenizing --------------------------------------------------------------------------


def test_full_queue_and_oversized_prompts_are_refused_before_tokenizing():
    tok = PickyTokenizer()
    cfg = ServerConfig(mode="plain", max_active=1, max_queue=0, max_tokens_cap=400)
    with serving(cfg, loader_with(tok, forward_s=0.02)) as url:
        huge = "y" * (FAKE_CONTEXT * PROMPT_CHARS_PER_TOKEN + 1)
        calls = tok.calls
        err = assert_openai_error(post(url, "/v1/completions", {"model": MODEL, "prompt": huge}), 400,
                                  "context_length_exceeded", "prompt")
        assert "characters" in err["message"]
        chat = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": huge}]}]}
        assert_openai_error(post(url, "/v1/chat/completions", chat), 400, "context_length_exceeded", "messages")
        assert tok.calls == calls
        # one request runs, none may wait: the rest get 429 without a tokenizer pass
        done: dict = {}
        t = threading.Thread(target=lambda: done.setdefault("r", post(url, "/v1/completions", {
            "model": MODEL, "prompt": "long one", "max_tokens": 200, "temperature": 0})))
        t.start()
        wait_for(lambda: metric(url, "adaspec:num_requests_running") == 1, what="the long request to run")
        calls = tok.calls
        for _ in range(5):
            assert_openai_error(post(url, "/v1/completions", {"model": MODEL, "prompt": "x" * 400}), 429, "queue_full")
        assert tok.calls == calls
        t.join(60)
        assert done["r"].status_code == 200


def test_reservations_hold_places():
    from adaspec.control.base import FixedController
    from adaspec.engine import Engine
    from adaspec.serve.metrics import ServerMetrics
    from adaspec.serve.scheduler import QueueFull, Scheduler, SchedulerConfig

    sched = Scheduler(Engine(FakeModel(), FakeTokenizer(), [], FixedController(0)), ServerMetrics(),
                      SchedulerConfig(max_active=1, max_queue=1))
    try:
        first, second = sched.reserve(), sched.reserve()
        with pytest.raises(QueueFull):
            sched.reserve()
        first.release()
        first.release()  # idempotent
        with sched.reserve():
            with pytest.raises(QueueFull):
                sched.reserve()
        sched.reserve().release()
        second.release()
    finally:
        sched.shutdown()


# -- /metrics -------------------------------------------------------------------------------------------------


def test_metrics_key_and_unguessable_tenant_labels(tmp_path):
    import httpx

    from adaspec.serve.auth import SECRET_FILE

    def labels(url: str) -> set[str]:
        text = httpx.get(url + "/metrics", headers=auth("scrape-key")).text
        return {ln.split('namespace="')[1].split('"')[0] for ln in text.splitlines()
                if ln.startswith("adaspec:learned_state_size{")}

    cfg = ServerConfig(mode="suffix", api_keys=(KEY_A,), state_dir=str(tmp_path / "s1"), metrics_key="scrape-key")
    with serving(cfg, loader_with()) as url:
        assert_openai_error(httpx.get(url + "/metrics"), 401, "invalid_api_key")
        assert_openai_error(httpx.get(url + "/metrics", headers=auth(KEY_A)), 401, "invalid_api_key")
        assert post(url, "/v1/completions", {"model": MODEL, "prompt": "learn me", "max_tokens": 8}).status_code == 200
        first = labels(url)
    unsalted = "t-" + hashlib.sha256(b"adaspec-tenant\x00" + KEY_A.encode()).hexdigest()[:16]
    assert len(first) == 1 and unsalted not in first
    assert oct((tmp_path / "s1" / SECRET_FILE).stat().st_mode & 0o777) == "0o600"
    with serving(cfg, loader_with()) as url:  # the same state dir: the same namespace, its state restored
        assert labels(url) == first
    other = ServerConfig(mode="suffix", api_keys=(KEY_A,), state_dir=str(tmp_path / "s2"), metrics_key="scrape-key")
    with serving(other, loader_with()) as url:  # another server: another secret, another label for the same key
        assert post(url, "/v1/completions", {"model": MODEL, "prompt": "learn me", "max_tokens": 8}).status_code == 200
        assert labels(url) and labels(url).isdisjoint(first)


# -- learned-state files ------------------------------------------------------------------------------------


def _bad_state_files() -> dict[str, dict[str, bytes]]:
    """file name -> case -> content: valid containers of the wrong shape or with non-finite numbers."""
    import io

    def npz(**arrays) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def ctl(state) -> bytes:
        return pack(json.dumps(state).encode(), {"kind": "adaspec.controller", "state_version": 1})

    good_cal = {"hit": [[0.0] * 12] * 8, "tried": [[1.0] * 12] * 8, "conf": [[0.5] * 12] * 8, "steps": 3}
    suffix_meta = {"kind": "adaspec.suffix", "state_version": 1, "namespaces": ["default"], "calibrated": []}
    return {
        "controller.state": {
            "list": ctl([1, 2, 3]),
            "wrong-shape": ctl({"default": {"version": 1, "calibration": {"suffix": {**good_cal, "hit": [[0.0]]}}}}),
            "nan-in-json": pack(b'{"default": {"version": 1, "budgets": {"suffix": NaN}}}',
                                {"kind": "adaspec.controller", "state_version": 1}),
            "huge-count": ctl({"default": {"version": 1, "calibration": {"suffix": {
                **good_cal, "conf": [[1e309] * 12] * 8}}}}),
            "string-budget": ctl({"default": {"version": 1, "budgets": {"suffix": "8"}}}),
            "plain-json": b'{"version": 1}',
        },
        "suffix.state": {
            "token-outside-vocab": pack(npz(tokens_0=np.array([5, 6, 10**6]), lengths_0=np.array([3]),
                                            seqs_0=np.array([1])), suffix_meta),
            "float-tokens": pack(npz(tokens_0=np.array([5.0, 6.0]), lengths_0=np.array([2]), seqs_0=np.array([1])),
                                 suffix_meta),
            "inf-calibration": pack(npz(tokens_0=np.array([5, 6]), lengths_0=np.array([2]), seqs_0=np.array([1]),
                                        cal_hits_0=np.full((4, 10), np.inf), cal_expected_0=np.ones((4, 10))),
                                    {**suffix_meta, "calibrated": ["default"]}),
        },
        "tenants.state": {
            "short-secret": pack(b"abc", {"kind": "adaspec.tenant_secret"}),
            "garbage": b"\x00" * 10,
        },
    }


@pytest.mark.parametrize("name,case", [(n, c) for n, cases in _bad_state_files().items() for c in cases])
def test_bad_state_file_is_moved_aside_and_the_server_starts_clean(tmp_path, name, case):
    """A state file that is well formed but holds the wrong shape or non-finite numbers never stops the server
    or poisons a request: it is moved aside with a warning, and greedy output equals a server without state."""
    state = tmp_path / "state"
    state.mkdir()
    (state / name).write_bytes(_bad_state_files()[name][case])
    cfg = ServerConfig(mode="adaptive", api_keys=(KEY_A,), state_dir=str(state), max_tokens_cap=64)
    body = {"model": MODEL, "prompt": "a prompt", "max_tokens": 20, "temperature": 0}
    with pytest.warns(RuntimeWarning, match="damaged"):
        with serving(cfg, loader_with()) as url:
            r = post(url, "/v1/completions", body)
            assert r.status_code == 200, r.text
    assert list(state.glob(name + ".bad-*")), sorted(p.name for p in state.iterdir())
    with serving(ServerConfig(mode="adaptive", max_tokens_cap=64), loader_with()) as url:
        assert post(url, "/v1/completions", body).json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    with warnings.catch_warnings():  # what the server saved at shutdown loads cleanly
        warnings.simplefilter("error")
        with serving(cfg, loader_with()) as url:
            assert post(url, "/v1/completions", body).status_code == 200


def test_interrupted_snapshot_temporaries_are_removed(tmp_path):
    from adaspec.system import build_engine

    state = tmp_path / "state"
    state.mkdir()
    left = [state / ".suffix.state.k2j4h1.tmp", state / ".controller.state.abc.tmp"]
    for p in left:
        p.write_bytes(b"half a snapsh")
    keep = state / "notes.tmp"  # not a temporary of ours
    keep.write_text("mine")
    engine = build_engine(FakeModel(), FakeTokenizer(), "adaptive", state_dir=str(state))
    assert not any(p.exists() for p in left) and keep.exists()
    engine.snapshot()
    assert {p.name for p in state.iterdir()} == {"suffix.state", "controller.state", "notes.tmp"}
    engine.close()


def test_second_signal_exits_non_zero(tmp_path):
    """SIGTERM drains; a second SIGTERM during the drain exits at once, with 128 + 15 as a shell reports it."""
    srv = ServerProcess(["--mode", "plain", "--max-tokens-cap", "400", "--drain-timeout", "60"], "fake",
                        {"FAKE_FORWARD_S": "0.05"}, tmp_path).wait_ready()
    t = threading.Thread(target=lambda: post(srv.url, "/v1/completions", {
        "model": MODEL, "prompt": "slow", "max_tokens": 400}, key=None, timeout=60))
    t.start()
    wait_for(lambda: metric(srv.url, "adaspec:num_requests_running") == 1, what="the request to run")
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert srv.proc.poll() is None  # still draining
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 128 + signal.SIGTERM
    t.join(60)
    srv.stop()


# -- controller state per namespace ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_namespace", [True, False])
def test_controller_learns_per_namespace(per_namespace):
    """Adaptive mode: tenant B's drafts after tenant A's traffic are exactly those of a tenant without neighbours.
    With one controller for all (``per_namespace=False``, the old design) A's traffic changes them. Timings
    are zero (a frozen clock), so the shared cost model measures the same for every run."""
    from adaspec.control.adaptive import AdaptiveController
    from adaspec.control.namespaced import NamespacedController
    from adaspec.engine import Engine
    from adaspec.speculators.ngram import PromptLookupSpeculator
    from adaspec.speculators.suffix import SuffixSpeculator
    from adaspec.verify import SamplingParams
    from test_server import SPEC_FIELDS

    prompt = FakeTokenizer().encode("a prompt both tenants send")
    params = SamplingParams(max_tokens=80)
    frozen = lambda: 0.0  # noqa: E731

    def stats_of_b(a_requests: int) -> list[dict]:
        make = lambda costs: AdaptiveController(costs=costs, timer=frozen)  # noqa: E731
        ctl = NamespacedController(make) if per_namespace else make(None)
        engine = Engine(FakeModel(), FakeTokenizer(), [SuffixSpeculator(), PromptLookupSpeculator()], ctl,
                        clock=frozen)
        out = [engine.generate(prompt, params, namespace="b").stats]
        for i in range(a_requests):
            engine.generate(FakeTokenizer().encode(f"tenant a asks {i}"), params, namespace="a")
        out.append(engine.generate(prompt, params, namespace="b").stats)
        return [{f: getattr(s, f) for f in SPEC_FIELDS} for s in out]

    alone, after = stats_of_b(0), stats_of_b(6)
    assert after[0] == alone[0]
    if per_namespace:
        assert after[1] == alone[1]
    else:
        assert after[1] != alone[1]
