"""The llama-server peers: the build's instruction sets, the command lines, the peer over HTTP (against a stand-in
that speaks llama-server's API), the skip with a reason, the reports' columns, the side-by-side load test; and, marked
slow, the real llama-server built from the pinned sources and run on the bundled model."""

import json
import os
import stat
import sys
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest

from adaspec import llamacpp_build
from adaspec.bench import drift, serving
from adaspec.bench.load import LoadConfig, summarise
from adaspec.bench.peers import LlamaServerPeer, PeerConfig, PeerUnavailable, make_peers
from adaspec.bench.report import RequestRecord, summarize
from adaspec.bench.servers import LLAMA_SERVER_SETUPS, llama_server_command

FAKE = Path(__file__).with_name("fake_llama_server.py")
AVX2 = {"fpu", "sse2", "avx", "avx2", "fma", "f16c", "bmi2"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "amx_tile", "amx_int8"}


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """ADASPEC_LLAMA_SERVER pointing at the stand-in; returns the file where it records its command lines."""
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "args.jsonl"
    monkeypatch.setenv("ADASPEC_LLAMA_SERVER", str(wrapper))
    monkeypatch.setenv("FAKE_LLAMA_SERVER_ARGS", str(record))
    return record


def _config(tmp_path) -> PeerConfig:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return PeerConfig(gguf_path=str(gguf), n_threads=2, warmup_tokens=2)


# -- the build ----------------------------------------------------------------------------------------


def test_the_build_names_its_instruction_sets_and_never_amx():
    variant, args = llamacpp_build.isa_variant(AVX2)
    assert variant == "avx2" and "-DGGML_AVX512=OFF" in args and "-DGGML_NATIVE=OFF" in args
    variant, args = llamacpp_build.isa_variant(AVX512)
    assert variant == "avx512-vnni"
    assert "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_VNNI=ON" in args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert not any("AMX" in a and a.endswith("=ON") for a in args)
    with pytest.raises(llamacpp_build.BuildError, match="AVX2"):
        llamacpp_build.isa_variant({"sse2"})


def test_the_flags_line_is_what_the_install_script_reads(capsys):
    assert llamacpp_build.main(["flags"]) == 0
    version, variant, *args = capsys.readouterr().out.split()
    assert version == llamacpp_build.LLAMA_CPP_PYTHON_VERSION
    assert variant.startswith(("avx2", "avx512")) and all(a.startswith("-D") for a in args)
    assert f"VERSION=0" not in Path("tools/install-llama-cpp.sh").read_text()  # the version has one home


def test_the_server_binary_is_cached_per_variant_and_missing_builds_say_how(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    monkeypatch.delenv("ADASPEC_LLAMA_SERVER", raising=False)
    assert llamacpp_build.server_path("avx2") != llamacpp_build.server_path("avx512-vnni")
    assert llamacpp_build.server_path("avx2").is_relative_to(tmp_path)
    with pytest.raises(llamacpp_build.BuildError, match="make peers"):
        llamacpp_build.find_server(build=False)
    monkeypatch.setenv("ADASPEC_LLAMA_SERVER", str(tmp_path / "nothing-here"))
    with pytest.raises(llamacpp_build.BuildError, match="not an executable"):
        llamacpp_build.find_server()


def test_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp_build.shutil, "which", lambda name: None)
    with pytest.raises(llamacpp_build.BuildError, match="needs 'cmake'"):
        llamacpp_build.build_server(tmp_path / "llama-server", [], "avx2", log=lambda s: None)
    assert not (tmp_path / "llama-server").exists()


# -- command lines ------------------------------------------------------------------------------------


def test_command_lines_pin_threads_flash_attention_and_no_prompt_cache():
    cmd = llama_server_command("/bin/llama-server", "llama-server", "m.gguf", 9000, threads=2, parallel=8,
                               ctx_per_slot=2048)
    joined = " ".join(cmd)
    for part in ("-m m.gguf", "--port 9000", "-t 2", "-tb 2", "-fa on", "-np 8", "-c 16384", "--no-cache-prompt",
                 "--cache-ram 0", "--metrics", "--host 127.0.0.1"):
        assert part in joined
    assert "--spec-type" not in cmd
    ngram = llama_server_command("/b", "llama-server-ngram", "m.gguf", 1, threads=2)
    assert ngram[ngram.index("--spec-type") + 1] == "ngram-mod"
    tuned = llama_server_command("/b", "llama-server-ngram-tuned", "m.gguf", 1, threads=2)
    assert tuned[tuned.index("--spec-ngram-mod-n-max") + 1] == "16"
    with pytest.raises(ValueError, match="draft model"):
        llama_server_command("/b", "llama-server-draft", "m.gguf", 1, threads=2)
    draft = llama_server_command("/b", "llama-server-draft", "m.gguf", 1, threads=2, draft_model="d.gguf")
    assert draft[draft.index("-md") + 1] == "d.gguf" and draft[draft.index("--spec-type") + 1] == "draft-simple"
    with pytest.raises(ValueError, match="unknown llama-server setup"):
        llama_server_command("/b", "llama-server-eagle", "m.gguf", 1, threads=2)


# -- the peer over HTTP -------------------------------------------------------------------------------


def test_the_peer_streams_token_ids_and_reads_draft_counts_from_timings(fake_server, tmp_path):
    with LlamaServerPeer(_config(tmp_path), "llama-server-ngram") as peer:
        res = peer.generate([5, 6, 7, 8], max_tokens=3, reference=[5, 6, 7], temperature=0.7, seed=3)
    assert res.tokens == [5, 6, 7] and res.matches_reference is True
    assert (res.drafted, res.accepted) == (3, 1)
    assert res.ttft_seconds is not None and 0 < res.ttft_seconds <= res.seconds
    assert res.timings["predicted_per_second"] == 100.0
    rec = RequestRecord.from_peer(Namespace(id="r", phase=0, phase_name="p", domain="d", scenario="s"), 0, res)
    assert (rec.drafted, rec.accepted) == (3, 1)
    started = [json.loads(line) for line in fake_server.read_text().splitlines()]
    assert started and started[0][started[0].index("--spec-type") + 1] == "ngram-mod"


def test_only_sampling_peers_take_sampled_requests(fake_server, tmp_path):
    with LlamaServerPeer(_config(tmp_path)) as peer:
        assert peer.generate([1, 2], max_tokens=2, temperature=1.0, seed=1).tokens == [1, 2]
        assert peer.request_body([1], 4, 0.0, None)["cache_prompt"] is False
        body = peer.request_body([1], 4, 0.8, 11)
        assert (body["temperature"], body["seed"], body["top_k"], body["top_p"], body["min_p"]) == (0.8, 11, 0, 1.0, 0.0)


def test_a_server_that_cannot_start_is_skipped_with_its_reason(fake_server, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_SERVER_FAIL", "1")
    logged: list[str] = []
    peers = make_peers(["llama-server"], _config(tmp_path), log=logged.append)
    assert not peers.peers and "this build cannot run here" in peers.skipped["llama-server"]
    assert logged and "skipping peer llama-server" in logged[0]


def test_a_failed_build_is_skipped_with_its_reason(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise llamacpp_build.BuildError("building llama-server needs 'cmake' on PATH")

    monkeypatch.delenv("ADASPEC_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llamacpp_build, "find_server", fail)
    with pytest.raises(PeerUnavailable, match="needs 'cmake'"):
        LlamaServerPeer(_config(tmp_path))


# -- the benchmark ------------------------------------------------------------------------------------


def test_every_llama_server_setup_is_a_bench_peer_and_the_draft_one_waits_for_its_model():
    assert set(LLAMA_SERVER_SETUPS) <= set(drift.PEER_CONFIGS)
    assert "llama-server-draft" not in drift.DEFAULT_PEERS
    assert {"llama-server", "llama-server-ngram", "llama-server-ngram-tuned"} <= set(drift.DEFAULT_PEERS)


def _rec(config, rid, tokens, wall, ttft=None, drafted=0, accepted=0):
    return RequestRecord(config, rid, 0, 0, "p", "d", output_tokens=tokens, wall_seconds=wall, ttft_seconds=ttft,
                         drafted=drafted, accepted=accepted)


def test_reports_rate_against_llama_server_with_decode_speed_and_acceptance():
    records = [_rec("plain", "a", 10, 1.0, 0.1), _rec("plain", "b", 10, 2.0, 0.2),
               _rec("llama-server", "a", 10, 0.5, 0.05), _rec("llama-server", "b", 10, 1.0, 0.1),
               _rec("llama-server-ngram", "a", 10, 0.25, 0.05, drafted=8, accepted=6),
               _rec("llama-server-ngram", "b", 10, 1.0, 0.1, drafted=4, accepted=0)]
    rows = {r.config: r for r in summarize(records)}
    assert rows["plain"].vs_server == pytest.approx(0.5)
    assert rows["llama-server-ngram"].vs_server == pytest.approx(1.5)  # median of 2.0 and 1.0
    assert rows["llama-server"].vs_server is None
    assert rows["llama-server-ngram"].acceptance_rate == pytest.approx(0.5)
    assert rows["plain"].acceptance_rate is None
    assert rows["plain"].decode_tok_s_median == pytest.approx((9 / 0.9 + 9 / 1.8) / 2)


# -- the load test ------------------------------------------------------------------------------------


def test_load_summaries_read_llama_servers_speculation_metrics():
    before = {"llamacpp:spec_decode_num_drafts_total": 2.0, "llamacpp:spec_decode_num_draft_tokens_total": 10.0,
              "llamacpp:spec_decode_num_accepted_tokens_total": 5.0}
    after = {"llamacpp:spec_decode_num_drafts_total": 6.0, "llamacpp:spec_decode_num_draft_tokens_total": 50.0,
             "llamacpp:spec_decode_num_accepted_tokens_total": 25.0}
    s = summarise(LoadConfig(), "m", [], 1.0, before, after, None, None)
    assert s["server"]["acceptance_rate"] == pytest.approx(0.5)
    assert s["server"]["mean_acceptance_length"] == pytest.approx(6.0)
    assert s["server"]["tokens_per_step"] is None


def test_compare_setups_are_checked_before_anything_starts():
    with pytest.raises(ValueError, match="unknown setup"):
        serving.check_setups(["plain", "vllm"], None)
    with pytest.raises(ValueError, match="draft-model"):
        serving.check_setups(["llama-server-draft"], None)
    assert serving.check_setups(["plain", "llama-server"], None) == ["plain", "llama-server"]


def test_compare_runs_each_setup_in_a_fresh_server_per_concurrency(fake_server, monkeypatch, tmp_path):
    monkeypatch.setattr("adaspec.bench.load.sharegpt_prompts", lambda n, seed, max_chars: [f"q{i}" for i in range(n)])
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    rows = serving.compare(["llama-server", "llama-server-ngram"], [1, 3], LoadConfig(requests=3, max_tokens=4),
                           passes=2, model=str(gguf), threads=2, log=lambda s: None)
    assert [(r["concurrency"], r["setup"], r["pass"]) for r in rows] == [
        (c, s, p) for c in (1, 3) for s in ("llama-server", "llama-server-ngram") for p in (1, 2)]
    assert all(r["ok"] == 3 and r["output_tokens"] == 12 for r in rows)
    started = [json.loads(line) for line in fake_server.read_text().splitlines()]
    assert [a[a.index("-np") + 1] for a in started] == ["1", "1", "3", "3"]  # one slot per client
    text = serving.table(rows)
    assert "| llama-server-ngram | 3 | 2 | 3/3 |" in text and "vs llama-server" in text


def test_compare_goes_on_without_a_llama_server_that_cannot_be_built(monkeypatch):
    def fail(*a, **k):
        raise llamacpp_build.BuildError("building llama-server needs 'cmake' on PATH")

    monkeypatch.delenv("ADASPEC_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llamacpp_build, "find_server", fail)
    logged: list[str] = []
    rows = serving.compare(["llama-server"], [1, 2], LoadConfig(requests=1), model="m.gguf", log=logged.append)
    assert rows == [] and sum("skipping llama-server: building llama-server needs 'cmake'" in s for s in logged) == 1


# -- the real llama-server ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_llama_server_peers_on_the_bundled_model(tmp_path):
    """Builds llama-server from the pinned sources (or finds the cached build), checks it holds no AMX code (and no
    AVX-512 code on a CPU without it), starts each setup on the bundled model and runs one benchmark request through each; the greedy outputs of llama-server plain and ngram-mod are
    compared with each other, and the load test runs through llama-server at two clients."""
    from adaspec.bench.peers import bundled_gguf

    from test_llama_cpp_build import assert_built_for_this_cpu

    assert_built_for_this_cpu(llamacpp_build.find_server())
    cfg = PeerConfig(gguf_path=str(bundled_gguf()), n_threads=int(os.environ.get("ADASPEC_THREADS", "2")))
    peers = make_peers(["llama-server", "llama-server-ngram", "llama-server-ngram-tuned"], cfg)
    try:
        assert not peers.skipped, peers.skipped
        ids = peers.peers["llama-server"].tokenize("<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n"
                                                   "<|im_start|>assistant\n")
        plain = peers.peers["llama-server"].generate(ids, 24)
        assert 0 < len(plain.tokens) <= 24 and plain.seconds > 0 and plain.drafted == 0
        for name in ("llama-server-ngram", "llama-server-ngram-tuned"):
            res = peers.peers[name].generate(ids, 24, reference=plain.tokens)
            assert res.tokens and res.common_prefix is not None
    finally:
        peers.close()
    # the draft-model setup, with the model as its own draft: it drafts, and nearly every draft token is accepted
    with LlamaServerPeer(replace(cfg, draft_model=cfg.gguf_path), "llama-server-draft") as peer:
        res = peer.generate(ids, 24)
    assert res.drafted > 0 and res.accepted >= 0.8 * res.drafted, (res.drafted, res.accepted)
    rows = serving.compare(["llama-server"], [2], LoadConfig(requests=2, max_tokens=8), log=lambda s: None)
    assert rows[0]["ok"] == 2 and rows[0]["output_tokens"] > 0
