"""adaspec's proposer inside a real vLLM engine on the bundled model (fp32 on CPU).

Runs where vLLM is installed (``make test-vllm``, which sets ADASPEC_REQUIRE_VLLM=1 so that a missing vLLM fails
instead of skipping). Each engine runs in its own process through the benchmark's worker.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("ADASPEC_REQUIRE_VLLM"):
        raise RuntimeError("vLLM is required here (ADASPEC_REQUIRE_VLLM is set) but not installed")
    pytest.skip("vLLM is not installed (pip install 'adaspec[vllm]')", allow_module_level=True)

from adaspec.bench.servers import free_port  # noqa: E402
from adaspec.bench.workloads import WorkItem  # noqa: E402
from adaspec.vllm.bench import CONFIGS, prompts_of, summarise  # noqa: E402

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "List the planets of the solar system, one per line.",
    "Explain in two sentences what a hash map is.",
    "Write a Rust function that reverses a string.",
]


def test_the_runner_layout_is_the_one_the_proposer_reads():
    from adaspec.vllm.runner import check_layout

    assert check_layout() == []


def _items(max_tokens=40):
    return [WorkItem(f"p{i}", "test", "chat", 0, "test", "test", messages=[{"role": "user", "content": p}],
                     max_tokens=max_tokens).to_dict() for i, p in enumerate(PROMPTS)]


def _run(tmp_path, name, config, items, passes, state_dir=None):
    from adaspec.vllm.export import export

    spec = {"model": str(export(None)), "speculative_config": CONFIGS[config], "passes": passes, "items": items}
    spec_path, out_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("ADASPEC_VLLM_STATE", None)
    if state_dir is not None:
        env["ADASPEC_VLLM_STATE"] = str(state_dir)
    proc = subprocess.run([sys.executable, "-m", "adaspec.vllm.bench", str(spec_path), str(out_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out_path.read_text())["records"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    items = _items()
    plain = _run(tmp, "plain", "vllm", items, passes=2)
    replay = prompts_of(plain, items)
    state = tmp / "state"
    learned = _run(tmp, "adaspec", "adaspec", replay, passes=2, state_dir=state)
    restarted = _run(tmp, "restarted", "adaspec", replay, passes=1, state_dir=state)
    return plain, learned, restarted, state


def test_greedy_outputs_equal_vllm_without_speculation(runs):
    plain, learned, restarted, _ = runs
    reference = {(r["pass"], r["id"]): r["output_ids"] for r in plain}
    assert all(len(r["output_ids"]) > 0 for r in plain)
    for r in learned + restarted:
        assert r["output_ids"] == reference[(r["pass"], r["id"])], r["id"]


def test_a_finished_requests_text_is_proposed_on_a_repeat(runs):
    _, learned, _, _ = runs
    first = summarise([r for r in learned if r["pass"] == 0], None)
    second = summarise([r for r in learned if r["pass"] == 1], None)
    assert second["mean_accepted"] > max(2.0, 1.5 * first["mean_accepted"]), (first, second)


def test_the_learned_state_round_trips_through_a_restart(runs):
    _, learned, restarted, state = runs
    assert (state / "suffix.state").is_file() and (state / "controller.state").is_file()
    cold = summarise([r for r in learned if r["pass"] == 0], None)
    warm = summarise(restarted, None)
    assert warm["mean_accepted"] > max(2.0, 1.5 * cold["mean_accepted"]), (cold, warm)


def test_vllm_serve_answers_the_openai_client_and_learns_per_namespace(tmp_path):
    import httpx
    from openai import OpenAI

    from adaspec.bench.load import wait_healthy

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
    server = subprocess.Popen([sys.executable, "-m", "adaspec", "vllm-serve", "--state", str(tmp_path / "state"),
                               "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
                               "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30),
                               "--enforce-eager", "--served-model-name", "smollm2"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def alive():
        if server.poll() is not None:
            raise AssertionError((tmp_path / "server.log").read_text()[-3000:])

    try:
        assert wait_healthy(url, timeout=300, interval=1.0, check=alive)
        client = OpenAI(base_url=url + "/v1", api_key="unused")

        def ask(namespace):
            r = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=48,
                temperature=0, extra_body={"vllm_xargs": {"adaspec_namespace": namespace}})
            return r.choices[0].message.content

        def accepted():
            text = httpx.get(url + "/metrics", timeout=10).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("vllm:spec_decode_num_accepted_tokens_total"))

        first = ask("team-a")
        cold = accepted()
        other = ask("team-b")  # another namespace has not seen the answer
        after_other = accepted()
        again = ask("team-a")
        after_again = accepted()
        assert first == other == again and len(first) > 20
        assert after_again - after_other > 20  # the repeat in team-a drafts the earlier answer
        assert after_again - after_other > 2 * (after_other - cold)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
