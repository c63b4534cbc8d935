"""``adaspec bench``'s driver on a tiny random target: every configuration sees every request, outputs stay
those of plain decoding, the oracle sets the ceiling, and the run is written out (traces, table, plots)."""

import json
from argparse import Namespace

import pytest
import torch

from adaspec.bench import drift
from adaspec.bench.report import ReportConfig, write_report
from adaspec.bench.workloads import WorkItem
from adaspec.model.llama import LlamaConfig, LlamaModel

CFG = LlamaConfig(vocab_size=260, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_context=1024)
CONFIGS = ["plain", "ngram", "suffix", "adaptive", "oracle"]


class ByteTokenizer:
    """Token i + 1 is byte i; 0 ends generation."""

    name = "bytes"
    eos_token_ids = {0}
    chat_template = "<role>content per message, then <assistant>"  # what apply_chat_template renders

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 1 for i in ids if 0 < i < 257).decode(errors="replace")

    def apply_chat_template(self, messages) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")


def _item(i: int, phase: int, **kw) -> WorkItem:
    base = dict(id=f"r{i}", scenario="test", domain="python" if phase == 0 else "chat", phase=phase,
                phase_name=f"{phase}:{'python' if phase == 0 else 'chat'}", source="test", max_tokens=20)
    if "user_turns" in kw:
        kw["messages"] = [{"role": "user", "content": kw["user_turns"][0]}]
    if "prompt" in kw or "messages" in kw:
        return WorkItem(**(base | kw))
    return WorkItem(messages=[{"role": "user", "content": f"def f{i}(x): return x + {i}  # repeat me"}], **(base | kw))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = LlamaModel.random(CFG, seed=3)
    with torch.no_grad():
        model.embed.mul_(0.2)
    items = [_item(0, 0), _item(1, 0), _item(2, 0, prompt="a b a b a b a b"),
             _item(3, 1, user_turns=["hello", "and again"]),
             _item(4, 1, temperature=1.0, seed=7)]
    out = tmp_path_factory.mktemp("bench")
    plan = drift.BenchPlan("test", items, CONFIGS, [], hf_every=1)
    return items, out, drift.run_bench(model, ByteTokenizer(), plan, out)


def test_every_configuration_serves_every_request_and_matches_plain_decoding(run):
    items, _, records = run
    ids = ["r0", "r1", "r2", "r3/t0", "r3/t1", "r4"]
    for config in CONFIGS:
        mine = [r for r in records if r.config == config]
        assert [r.request_id for r in mine] == ids
        assert [r.index for r in mine] == list(range(len(ids)))
        assert all(r.output_tokens > 0 and r.forwards > 0 and r.wall_seconds > 0 for r in mine)
    checked = [r for r in records if r.config != "plain"]
    # greedy and seeded sampling alike: speculation never changes the output
    assert checked and all(r.matches_reference is True for r in checked)
    assert all(r.matches_reference is None for r in records if r.config == "plain")
    assert {r.phase_name for r in records} == {"0:python", "1:chat"}


def test_oracle_is_the_ceiling_and_plain_takes_one_forward_per_token(run):
    _, _, records = run
    plain = {r.request_id: r for r in records if r.config == "plain"}
    for r in records:
        if r.config == "plain":
            assert r.forwards == r.output_tokens and r.drafted == 0
        elif r.config == "oracle" and plain[r.request_id].output_tokens > 2:
            assert r.forwards < plain[r.request_id].forwards
            assert r.accepted == r.output_tokens - r.forwards


def test_traces_hold_the_greedy_plain_outputs(run):
    _, out, records = run
    lines = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    plain = {r.request_id: r for r in records if r.config == "plain"}
    assert [t["id"] for t in lines] == ["r0", "r1", "r2", "r3/t0", "r3/t1"]  # the sampled request is not a trace
    for t in lines:
        assert len(t["output_ids"]) == plain[t["id"]].output_tokens and t["prompt_ids"]


def test_later_turns_carry_the_earlier_answers(run):
    _, _, records = run
    turns = {r.request_id: r for r in records if r.config == "plain" and r.request_id.startswith("r3")}
    assert turns["r3/t1"].prompt_tokens > turns["r3/t0"].prompt_tokens + turns["r3/t0"].output_tokens


def test_report_of_the_run(run, tmp_path):
    _, _, records = run
    files = write_report(records, tmp_path, ReportConfig(), meta={"scenario": "test"}, title="t")
    table = files.markdown.read_text()
    for config in CONFIGS:
        assert f"| {config} |" in table
    assert all(p.stat().st_size > 1000 for p in files.plots.values())
    saved = json.loads(files.json.read_text())
    assert len(saved["records"]) == len(records)


def test_unknown_configuration_is_refused_before_loading_a_model(tmp_path):
    args = Namespace(engine="adaspec", configs="adaspec,turbo", peers="", scenario="drift", out=str(tmp_path),
                     model="/nonexistent", full=False, seed=0, max_tokens=None, hf_every=None, no_costs=True, from_run=None)
    with pytest.raises(ValueError, match="turbo"):
        drift.run(args)
    args.configs, args.peers = "adaptive", "vllm"
    with pytest.raises(ValueError, match="vllm"):
        drift.run(args)


def test_a_saved_run_is_reported_again_without_running_anything(run, tmp_path):
    _, _, records = run
    first = write_report(records, tmp_path / "a", ReportConfig(window=5), meta={"scenario": "test", "full": False},
                         title="adaspec bench: test")
    assert drift.rewrite_report(first.json, tmp_path / "b") == 0
    assert (tmp_path / "b" / "summary.md").read_text() == first.markdown.read_text()
    assert (tmp_path / "b" / "stream_tok_s.png").stat().st_size > 1000
