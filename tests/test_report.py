"""Reports on a tiny fake run, the accelerator projection, and peers that cannot run here."""

import json
import math
import sys

import pytest

from adaspec.bench import peers as P
from adaspec.bench.report import (TABLE_COLUMNS, ReportConfig, RequestRecord, flat_cost, load_run, markdown_table,
                                  phase_boundaries, plot_cost_curve, project_speedup, rolling_median, save_run,
                                  summarize, write_report)

PNG = b"\x89PNG\r\n\x1a\n"
# tok/s of each configuration relative to adaspec plain, per phase
FACTORS = {"plain": (1.0, 1.0), "adaptive": (1.5, 3.0), "oracle": (4.0, 4.0), "llama.cpp": (2.0, 2.0)}


def fake_run(n_per_phase: int = 4) -> list[RequestRecord]:
    recs = []
    for config, factors in FACTORS.items():
        for phase, name in enumerate(("python", "chat")):
            for j in range(n_per_phase):
                i = phase * n_per_phase + j
                base = 10.0 + i  # plain tok/s varies by request; ratios are what the report pairs
                tokens = 64
                plain = config == "plain"
                forwards = 0 if config == "llama.cpp" else (tokens if plain else tokens // 2)
                mix = {} if config == "llama.cpp" else ({"none": tokens} if plain else {"suffix": 24, "none": 8})
                emitted, drafted = ([1] * tokens, [0] * tokens) if plain else ([3, 1] * 16, [8, 0] * 16)
                if config == "llama.cpp":
                    emitted, drafted = [], []
                recs.append(RequestRecord(config, f"req{i}", i, phase, name, name, "drift", prompt_tokens=20,
                                          output_tokens=tokens, wall_seconds=tokens / (base * factors[phase]),
                                          forwards=forwards, speculator_mix=mix, step_emitted=emitted,
                                          step_drafted=drafted, matches_reference=config != "llama.cpp" or i != 0))
    return recs


def _row(rows, config, phase):
    return next(r for r in rows if r.config == config and r.phase == phase)


def test_summary_ratios_pair_requests_across_configurations():
    rows = summarize(fake_run())
    assert _row(rows, "adaptive", "python").speedup == pytest.approx(1.5)
    assert _row(rows, "adaptive", "chat").speedup == pytest.approx(3.0)
    assert _row(rows, "adaptive", "chat").vs_peer == pytest.approx(1.5)
    assert _row(rows, "adaptive", "python").of_oracle == pytest.approx(1.5 / 4.0)
    assert _row(rows, "plain", "all").speedup is None  # no ratio of the baseline to itself
    assert _row(rows, "plain", "all").accepted_per_forward == pytest.approx(1.0)
    assert _row(rows, "adaptive", "all").accepted_per_forward == pytest.approx(2.0)
    assert _row(rows, "llama.cpp", "all").accepted_per_forward is None  # forwards unknown for a peer
    assert _row(rows, "adaptive", "all").mix == pytest.approx({"suffix": 0.75, "none": 0.25})
    assert _row(rows, "llama.cpp", "all").reference_matches == "7/8"
    plain_tok_s = [10.0 + i for i in range(8)]
    assert _row(rows, "plain", "all").tok_s_median == pytest.approx((plain_tok_s[3] + plain_tok_s[4]) / 2)


def test_summary_rejects_duplicates_and_empty_runs():
    recs = fake_run()
    with pytest.raises(ValueError, match="two records"):
        summarize(recs + [recs[0]])
    with pytest.raises(ValueError):
        summarize([])


def test_markdown_table_has_every_column_and_a_row_per_config_and_phase():
    rows = summarize(fake_run())
    table = markdown_table(rows)
    header = table.splitlines()[0]
    assert all(c in header for c in TABLE_COLUMNS) and "tok/s" in header and "of oracle" in header
    assert len(table.splitlines()) == 2 + len(FACTORS) * 3  # "all" + two phases per configuration


def test_projection_follows_the_flat_cost_formula():
    # docstring example: d = (8, 8, 0), e = (5, 3, 1) -> 9 / (3 + 2 delta)
    assert project_speedup([5, 3, 1], [8, 8, 0]) == pytest.approx(3.0)
    assert project_speedup([5, 3, 1], [8, 8, 0], draft_share=0.5) == pytest.approx(9 / 4)
    assert flat_cost(16) == 1.0 and flat_cost(32) == 2.0
    assert project_speedup([20], [31]) == pytest.approx(20 / 2)  # k = 32 costs two flat forwards
    assert project_speedup([1] * 5, [0] * 5) == pytest.approx(1.0)  # plain decoding projects to 1x
    assert math.isnan(project_speedup([], []))
    with pytest.raises(ValueError):
        project_speedup([1, 2], [0])
    rows = summarize(fake_run(), ReportConfig(draft_share=0.0))
    assert _row(rows, "adaptive", "all").projected_speedup == pytest.approx(4 / 2)  # steps (3, 1) over (8, 0)


def test_rolling_median_and_phase_boundaries():
    assert rolling_median([1, 5, 3, float("nan"), 9], 3).tolist() == [1, 3, 3, 4, 6]
    assert phase_boundaries(fake_run()) == [(0, 3, "python"), (4, 7, "chat")]


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


def test_write_report_makes_markdown_pngs_and_a_json_that_round_trips(tmp_path):
    recs = fake_run()
    costs = {"llama.cpp": {1: 0.013, 2: 0.024, 4: 0.033, 8: 0.057, 16: 0.089}, "torch": {1: 0.056, 4: 0.094, 16: 0.123}}
    files = write_report(recs, tmp_path / "out", costs=costs, meta={"machine": "test"})
    assert set(files.plots) == {"tok_s", "accepted_per_forward", "cost_curve"}
    assert all(_is_png(p) for p in files.plots.values())
    md = files.markdown.read_text()
    assert "| config | phase |" in md and "stream_tok_s.png" in md
    run = load_run(files.json)
    assert run.records == recs and run.meta["machine"] == "test"
    assert run.costs == costs
    phases = ("all", "python", "chat")
    assert {(s["config"], s["phase"]) for s in run.summary} == {(c, p) for c in FACTORS for p in phases}
    json.loads(files.json.read_text())  # strict JSON: NaN written as null


def test_load_run_refuses_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"records": []}))
    with pytest.raises(ValueError, match="adaspec run"):
        load_run(p)
    save_run(p, fake_run(1))
    assert len(load_run(p).records) == len(FACTORS) * 2


def test_runs_with_the_earlier_configuration_names_read_as_the_current_ones(tmp_path):
    old = {"adaspec-plain": "plain", "adaspec": "adaptive", "adaspec@llamacpp": "adaptive@llamacpp",
           "adaspec-plain@llamacpp": "plain@llamacpp", "suffix": "suffix", "llama.cpp-pld": "llama.cpp-pld"}
    recs = [RequestRecord(name, "r0", 0, 0, "p", "python") for name in old]
    p = tmp_path / "run.json"
    save_run(p, recs, meta={"configs": list(old)})
    run = load_run(p)
    assert [r.config for r in run.records] == list(old.values()) and run.meta["configs"] == list(old.values())


def test_cost_curve_needs_data(tmp_path):
    with pytest.raises(ValueError):
        plot_cost_curve({}, tmp_path / "c.png")
    assert _is_png(plot_cost_curve({"x": {1: 1.0, 8: 1.2}}, tmp_path / "c.png"))


# --- peers ----------------------------------------------------------------------------------

def test_peer_is_skipped_with_a_clear_message_when_its_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    assert not P.available("llama.cpp") and P.missing_packages("llama.cpp-pld") == ["llama_cpp"]
    with pytest.raises(P.PeerUnavailable, match="llama_cpp"):
        P.make_peer("llama.cpp")
    with pytest.raises(P.PeerUnavailable, match="pip install llama-cpp-python"):
        P.LlamaCppPeer()
    logged = []
    got = P.make_peers(["llama.cpp", "llama.cpp-pld"], log=logged.append)
    assert got.peers == {} and set(got.skipped) == {"llama.cpp", "llama.cpp-pld"}
    assert all("llama_cpp" in m for m in got.skipped.values()) and len(logged) == 2


def test_hf_peer_skipped_when_transformers_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(P.PeerUnavailable, match="transformers"):
        P.make_peer("hf-pld")
    with pytest.raises(ValueError, match="unknown peer"):
        P.make_peer("vllm")


def test_compare_reports_the_common_prefix():
    assert P.compare([1, 2, 3], [1, 2, 3]) == (True, 3)
    assert P.compare([1, 2, 4, 5], [1, 2, 3]) == (False, 2)
    assert P.compare([1, 2], [1, 2, 3]) == (False, 2)


@pytest.mark.slow
@pytest.mark.skipif(not P.available("llama.cpp"), reason="llama-cpp-python is not installed")
def test_llama_cpp_peers_generate_from_the_same_ids():
    ps = P.make_peers(["llama.cpp", "llama.cpp-pld"], P.PeerConfig(n_threads=1))  # 1 thread: robust on a busy machine
    try:
        plain, pld = ps.peers["llama.cpp"], ps.peers["llama.cpp-pld"]
        ids = plain.tokenize("<|im_start|>user\nRepeat: the cat sat on the mat.<|im_end|>\n<|im_start|>assistant\n")
        a, b = plain.generate(ids, 16), plain.generate(ids, 16)
        assert a.tokens == b.tokens and 0 < len(a.tokens) <= 16  # greedy and no state carried between calls
        c = pld.generate(ids, 16, reference=a.tokens)
        assert c.prompt_tokens == len(ids) and c.common_prefix is not None and c.seconds > 0
        assert a.ttft_seconds is not None and 0 < a.ttft_seconds <= a.seconds
    finally:
        ps.close()


def test_records_from_engine_stats_and_peer_results():
    from adaspec.bench.workloads import WorkItem
    from adaspec.engine import RequestStats

    item = WorkItem("drift/1/0003", "drift", "rust", 1, "rust+c_cpp", "sharegpt:x",
                    messages=[{"role": "user", "content": "q"}])
    st = RequestStats(prompt_tokens=12, output_tokens=30, forwards=10, drafted=40, accepted=20, wall_s=0.5,
                      prefill_s=0.1)
    st.chosen.update({"suffix": 7, "none": 2})
    r = RequestRecord.from_stats("adaptive", item, 7, st, step_emitted=[3] * 9, step_drafted=[4] * 9)
    assert (r.request_id, r.phase, r.domain, r.scenario) == ("drift/1/0003", 1, "rust", "drift")
    assert r.accepted_per_forward == pytest.approx(st.mean_accepted) and r.tok_s == pytest.approx(st.tok_s)
    assert r.speculator_mix == {"suffix": 7, "none": 2}
    res = P.PeerResult("llama.cpp", 12, [1, 2, 3], 0.3, 0.1, matches_reference=False, common_prefix=1)
    q = RequestRecord.from_peer(item, 7, res)
    assert q.config == "llama.cpp" and q.output_tokens == 3 and math.isnan(q.accepted_per_forward)
    assert q.matches_reference is False and q.tok_s == pytest.approx(10.0)
