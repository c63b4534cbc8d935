"""Property-based fuzzing (hypothesis) of the HTTP API and of every learned-state loader.

API: generated bodies -- valid, valid with one field replaced by arbitrary JSON, and hostile (arbitrary JSON,
arbitrary bytes, deep nesting, numeric extremes, odd Unicode) -- against the running app with the stand-in
model. Invariant: never a 5xx, every error in the OpenAI shape, and a valid request is answered right after.

State files: arbitrary bytes, and well-formed containers around arbitrary JSON or arrays, in place of each state
file. Invariant: the engine starts, generates exactly what an engine without state generates, and snapshots.

The default suite runs a short version; ``-m slow`` runs the long one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inprocess import loader_with, serving
from test_server import FAKE_VOCAB, KEY_A, FakeModel, FakeTokenizer

from adaspec.serve.app import ServerConfig
from adaspec.store import pack

MODEL = "fake-model"
SHORT, LONG = 200, 3000  # examples per property: default suite / -m slow

# -- generated request bodies -------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)
texts = st.text(max_size=60) | st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ["", " ", "\x00", "\u202e", "\U0010ffff", "a" * 3000, "<|im_end|>", "{{ 7*7 }}", "{% for x in range(9) %}"])
numbers = (st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from([0, 1, -1, 5e-324, 1e-300, 1.9e-270, 2.0000001, 1e308, 2**63, 2**64, -(2**63) - 1]))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                           "content": texts}), min_size=1, max_size=3)
sampling = {"max_tokens": st.integers(1, 4), "temperature": st.sampled_from([0, 0.5, 1.0, 2]),
            "top_p": st.sampled_from([0.1, 1.0]), "top_k": st.sampled_from([-1, 0, 5]),
            "seed": st.integers(0, 2**32), "stop": st.sampled_from(["\n", ["a", "bb"]]), "stream": st.booleans()}


def _valid_completion():
    prompt = st.text(st.characters(min_codepoint=1, max_codepoint=FAKE_VOCAB - 1), min_size=1, max_size=40) \
        | st.lists(st.integers(1, FAKE_VOCAB - 1), min_size=1, max_size=20)
    return st.tuples(st.just("/v1/completions"),
                     st.fixed_dictionaries({"model": st.just(MODEL), "prompt": prompt}, optional=sampling))


def _valid_chat():
    return st.tuples(st.just("/v1/chat/completions"),
                     st.fixed_dictionaries({"model": st.just(MODEL), "messages": messages}, optional=sampling))


valid = _valid_completion() | _valid_chat()


@st.composite
def near_valid(draw):
    """A valid body with one field replaced by, or one extra field holding, an arbitrary value."""
    path, body = draw(valid)
    key = draw(st.sampled_from(sorted(body) + ["n", "logprobs", "stream_options", "adaspec", "max_completion_tokens",
                                               "response_format", "tools", "user", "unknown"]))
    body = dict(body)
    body[key] = draw(json_values | numbers | texts | messages)
    return path, body


def _nested(depth: int) -> bytes:
    return b'{"model": "fake-model", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


hostile = st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.one_of(
    json_values,
    st.binary(max_size=200),
    st.integers(1, 200_000).map(_nested),
    st.text(max_size=40).map(lambda t: ('{"model": "fake-model", "prompt": "' + t + '"}').encode("utf-8", "replace")),
    st.sampled_from([b'{"model": "fake-model", "prompt": "\\ud800"}', b'{"model": "\\udc00x", "messages": []}',
                     b'{"model": "fake-model", "prompt": "hi", "max_tokens": 1e999}', b"\xef\xbb\xbf{}",
                     b'{"model": "fake-model", "prompt": "hi", "temperature": -0.0}', b"[" * 5 + b"]" * 5,
                     '{"model": "fake-model", "prompt": "hi", "stop": "\u2028"}'.encode()]),
))

bodies = st.one_of(valid, near_valid(), hostile)


def _encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def check_response(r, body) -> None:
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [ln[len("data: "):] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text[-300:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    else:
        out = r.json()
        assert out["choices"][0]["finish_reason"] in ("stop", "length"), out


@pytest.fixture(scope="module")
def fuzz_server():
    with tempfile.TemporaryDirectory() as state:
        cfg = ServerConfig(mode="adaptive", api_keys=(KEY_A,), max_tokens_cap=8, state_dir=state,
                           snapshot_interval=0.5)
        with serving(cfg, loader_with()) as url:
            yield url


def _fuzz_api(url: str, examples: int) -> None:
    import httpx

    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}",
                                                 "Content-Type": "application/json"}, timeout=30)
    probe = {"model": MODEL, "prompt": "still there?", "max_tokens": 1}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bodies)
    def prop(case) -> None:
        path, body = case
        check_response(client.post(path, content=_encode(body)), body)
        r = client.post("/v1/completions", json=probe)  # on the same keep-alive connection
        assert r.status_code == 200, r.text

    try:
        prop()
    finally:
        client.close()


def test_fuzz_api(fuzz_server):
    _fuzz_api(fuzz_server, SHORT)


@pytest.mark.slow
def test_fuzz_api_long(fuzz_server):
    _fuzz_api(fuzz_server, LONG)


# -- state files ----------------------------------------------------------------------------------------------


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _array(xs: list, dtype) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.array(xs, dtype=np.float64).astype(dtype) if xs else np.zeros(0, dtype)


small_arrays = st.sampled_from([np.int64, np.int32, np.float64, np.float32, np.uint8, np.bool_]).flatmap(
    lambda dt: st.lists(st.one_of(st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                                  st.sampled_from([2**31, -(2**40)])), max_size=8).map(lambda xs: _array(xs, dt)))
suffix_payloads = st.dictionaries(st.sampled_from(["tokens_0", "lengths_0", "seqs_0", "cal_hits_0", "cal_expected_0",
                                                   "tokens_1", "lengths_1", "seqs_1"]), small_arrays, max_size=8)
KINDS = {"controller.state": "adaspec.controller", "suffix.state": "adaspec.suffix",
         "tenants.state": "adaspec.tenant_secret"}


@st.composite
def state_file(draw):
    name = draw(st.sampled_from(sorted(KINDS)))
    how = draw(st.sampled_from(["bytes", "json", "arrays"]))
    if how == "bytes":
        return name, draw(st.binary(max_size=300))
    meta = {"kind": KINDS[name], "state_version": draw(st.sampled_from([1, 1, 2, "1", None]))}
    meta.update(draw(st.dictionaries(st.sampled_from(["namespaces", "calibrated"]),
                                     st.lists(st.sampled_from(["default", "a", ""]), max_size=2) | json_values)))
    if how == "json":
        controller_like = st.dictionaries(st.sampled_from(["default", "x"]), st.fixed_dictionaries(
            {"version": st.sampled_from([1, 2])}, optional={"budgets": json_values, "calibration": json_values}))
        payload = json.dumps(draw(json_values | controller_like)).encode()
    else:
        payload = _npz(draw(suffix_payloads))
    return name, pack(payload, meta)


def _fuzz_state(examples: int) -> None:
    from adaspec.serve.auth import tenant_secret
    from adaspec.system import build_engine
    from adaspec.verify import SamplingParams

    prompt, params = FakeTokenizer().encode("state fuzz"), SamplingParams(max_tokens=12)
    clean = build_engine(FakeModel(), FakeTokenizer(), "adaptive").generate(prompt, params).tokens

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(state_file(), min_size=1, max_size=3))
    def prop(files) -> None:
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for name, data in files:
                (Path(d) / name).write_bytes(data)
            assert len(tenant_secret(d)) == 32
            engine = build_engine(FakeModel(), FakeTokenizer(), "adaptive", state_dir=d)
            for ns in ("default", "a"):
                assert engine.generate(prompt, params, namespace=ns).tokens == clean
            engine.close()  # snapshots
            again = build_engine(FakeModel(), FakeTokenizer(), "adaptive", state_dir=d)
            assert again.generate(prompt, params).tokens == clean
            again.close()

    prop()


def test_fuzz_state_files():
    _fuzz_state(SHORT // 2)


@pytest.mark.slow
def test_fuzz_state_files_long():
    _fuzz_state(LONG // 2)
