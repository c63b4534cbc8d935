"""The trace-replay simulator: ReplayTarget semantics, the engine over it, cost projection, CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from adaspec.control.adaptive import AdaptiveController
from adaspec.control.base import FixedController
from adaspec.engine import Engine
from adaspec.sim import (ChargedSpeculator, CostCurve, ReplayTarget, Setup, Trace, VirtualClock, compact_vocabulary,
                         default_setups, format_table, load_traces, main, save_traces, simulate)
from adaspec.speculators.base import DecodeContext, Draft, SpeculatorBase
from adaspec.speculators.oracle import OracleSpeculator
from adaspec.verify import SamplingParams

CPU = {1: 0.013, 2: 0.024, 4: 0.033, 8: 0.057, 16: 0.089}
FLAT = {1: 0.010, 64: 0.011}


def make_traces(n: int = 6, length: int = 120, seed: int = 0) -> list[Trace]:
    """Outputs that reuse a shared phrase book, so history predicts part of every output."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, 200, int(rng.integers(4, 12))).tolist() for _ in range(12)]
    out = []
    for i in range(n):
        toks: list[int] = []
        while len(toks) < length:
            reuse = rng.random() < 0.7
            toks += phrases[int(rng.integers(0, len(phrases)))] if reuse else rng.integers(0, 200, 3).tolist()
        out.append(Trace(f"t{i}", "code" if i % 2 else "chat", tuple(rng.integers(0, 200, 8).tolist()),
                         tuple(toks[:length])))
    return out


@dataclass
class NoisyOracle(SpeculatorBase):
    """Proposes the recorded continuation with every token independently corrupted with probability ``q``."""

    name: str = "noisy"
    refs: dict | None = None
    q: float = 0.3
    conf: float = 0.8

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        ref = self.refs[tuple(ctx.tokens[: ctx.prompt_len])]
        done = len(ctx.generated)
        toks = []
        for j, t in enumerate(ref[done : done + budget]):
            rng = np.random.default_rng(hash((done + j, len(ref))) % (1 << 32))
            toks.append(t if rng.random() >= self.q else (t + 1) % 200)
        return Draft.chain(toks, [self.conf] * len(toks), self.name)


def refs_of(traces):
    return {t.prompt_ids: list(t.output_ids) for t in traces}


def oracle_of(traces) -> OracleSpeculator:
    o = OracleSpeculator()
    for t in traces:
        o.add(list(t.prompt_ids), list(t.output_ids))
    return o


# -- ReplayTarget ---------------------------------------------------------------------------------


def test_replay_target_argmax_follows_the_trace():
    tr = Trace("a", "d", (1, 2, 3), (10, 11, 12, 13))
    target = ReplayTarget([tr])
    cache = target.new_cache()
    out = target.prefill(cache, [1, 2, 3])
    assert out.logits.shape == (1, target.vocab_size)
    assert int(out.logits.argmax(-1)) == 10
    # pending 10 then a chain draft [11, 12, 99]: rows predict 11, 12, 13, and the filler after the wrong 99
    out = target.forward(cache, [10, 11, 12, 99])
    assert out.logits.argmax(-1).tolist() == [11, 12, 13, target.filler]
    cache.commit([0, 1, 2])
    assert cache.tokens == [1, 2, 3, 10, 11, 12] and cache.on_trace
    out = target.forward(cache, [13])
    assert out.logits.argmax(-1).tolist() == [target.filler]  # past the recorded end


def test_replay_target_tree_nodes_off_the_trace_are_not_accepted():
    tr = Trace("a", "d", (1,), (10, 11, 12, 13))
    target = ReplayTarget([tr])
    cache = target.new_cache()
    target.prefill(cache, [1])
    # pending 10 ─┬─ 11 ── 12     (on the trace)
    #             └─ 7  ── 12     (off: 12 under 7 is not the recorded position's path)
    toks, parents = [10, 11, 12, 7, 12], [-1, 0, 1, 0, 3]
    out = target.forward(cache, toks, parents)
    best = out.logits.argmax(-1).tolist()
    assert best[:3] == [11, 12, 13] and best[3] == best[4] == target.filler
    from adaspec.verify import verify_greedy

    draft = Draft(np.array(toks[1:]), np.array([-1, 0, -1, 2]), np.full(4, 0.5))
    verdict = verify_greedy(out.logits, draft)
    assert verdict.accepted == [0, 1] and verdict.emitted == [11, 12, 13]
    with pytest.raises(ValueError, match="root-first path"):
        cache.commit([0, 2])  # row 2 (12) hangs off row 1, not row 0
    cache.commit([0, 1, 2])
    assert cache.tokens == [1, 10, 11, 12] and cache.on_trace
    cache.truncate(2)
    assert cache.tokens == [1, 10] and cache.on_trace and cache.length == 2


def test_replay_target_rejects_bad_inputs():
    target = ReplayTarget([Trace("a", "d", (1, 2), (3,))])
    with pytest.raises(ValueError, match="no recorded trace"):
        target.prefill(target.new_cache(), [9, 9])
    with pytest.raises(ValueError, match="differ in output"):
        ReplayTarget([Trace("a", "d", (1,), (2,)), Trace("b", "d", (1,), (3,))])
    cache = target.new_cache()
    target.prefill(cache, [1, 2])
    with pytest.raises(ValueError):
        target.forward(cache, [3, 4], [-1, 5])
    with pytest.raises(ValueError):
        ReplayTarget([Trace("a", "d", (1,), (300,))], vocab_size=100)


def test_virtual_clock_and_cost_curve():
    curve = CostCurve(CPU)
    assert curve(1) == pytest.approx(0.013) and curve(3) == pytest.approx(0.0285)
    assert curve(32) == pytest.approx(0.089 + 16 * (0.089 - 0.057) / 8)  # last-segment slope beyond
    clock = VirtualClock()
    target = ReplayTarget([Trace("a", "d", (1,), (2, 3, 4))], cost=curve, clock=clock)
    cache = target.new_cache()
    target.prefill(cache, [1])
    target.forward(cache, [2, 3, 4])
    assert clock() == pytest.approx(curve(1) + curve(3))
    spec = ChargedSpeculator(NoisyOracle(refs={(1,): [2, 3, 4]}), clock, 0.005)
    spec.propose(DecodeContext("r", "default", [1, 2], 1), 2)
    assert clock() == pytest.approx(curve(1) + curve(3) + 0.005)
    assert spec.name == "noisy"


# -- the engine over the replay target ----------------------------------------------------------------


@pytest.mark.parametrize("setup", ["plain", "oracle", "noisy", "adaptive"])
def test_engine_over_replay_reproduces_traces(setup):
    traces = make_traces(4, 80)
    clock = VirtualClock()
    target = ReplayTarget(traces, cost=CostCurve(CPU), clock=clock)
    specs = {"plain": [], "oracle": [oracle_of(traces)], "noisy": [NoisyOracle(refs=refs_of(traces))],
             "adaptive": [NoisyOracle(refs=refs_of(traces)), oracle_of(traces)]}[setup]
    ctrl = AdaptiveController(timer=clock) if setup == "adaptive" else FixedController(0 if setup == "plain" else 6)
    engine = Engine(target, None, specs, ctrl, clock=clock)
    for t in traces:
        g = engine.generate(list(t.prompt_ids), SamplingParams(max_tokens=len(t.output_ids), ignore_eos=True))
        assert g.tokens == list(t.output_ids)  # lossless: the simulated greedy output is the trace
        if setup == "plain":
            assert g.stats.forwards == len(t.output_ids)
            assert g.stats.wall_s - g.stats.prefill_s == pytest.approx((len(t.output_ids) - 1) * 0.013)
        if setup == "oracle":
            assert g.stats.accepted == g.stats.drafted  # every oracle node is accepted
            assert g.stats.mean_accepted > 5


def test_simulate_projects_speedups_deterministically():
    traces = make_traces(6, 100)
    setups = [Setup("plain", lambda env: ([], FixedController(0))),
              Setup("oracle@8", lambda env: ([oracle_of(env.traces)], FixedController(8))),
              Setup("noisy@8", lambda env: ([NoisyOracle(refs=refs_of(env.traces), q=0.5)], FixedController(8))),
              Setup("adaptive", lambda env: ([NoisyOracle(refs=refs_of(env.traces), q=0.5)],
                                             AdaptiveController(timer=env.clock)))]
    res = {r.setup: r for r in simulate(traces, CPU, setups)}
    again = {r.setup: r for r in simulate(traces, CPU, setups)}
    assert all(r.mismatches == 0 for r in res.values())
    assert res["plain"].speedup == pytest.approx(1.0) and res["plain"].mean_accepted == pytest.approx(1.0)
    assert res["oracle@8"].mean_accepted == pytest.approx(res["oracle@8"].output_tokens / res["oracle@8"].forwards)
    assert res["oracle@8"].speedup > 1.8  # 9 tokens per forward at c(9) = 4.6 c(1)
    # half the draft tokens wrong on a CPU-like curve: a fixed lookahead of 8 loses to plain decoding,
    # the adaptive controller learns to keep drafts short and does not
    assert res["noisy@8"].speedup < 0.9
    assert res["adaptive"].speedup > 0.95
    for name in res:
        assert res[name].to_dict() == again[name].to_dict()  # virtual time: deterministic
    assert set(res["plain"].by_domain) == {"chat", "code"}
    assert sum(q.traces for q in res["adaptive"].by_quarter) == 6
    table = format_table(list(res.values()))
    assert "oracle@8" in table and "speedup" in table


def test_adaptive_uses_long_drafts_when_verification_is_flat():
    traces = make_traces(4, 150)
    setups = [Setup("oracle@8", lambda env: ([oracle_of(env.traces)], FixedController(8))),
              Setup("adaptive", lambda env: ([oracle_of(env.traces)], AdaptiveController(timer=env.clock)))]
    res = {r.setup: r for r in simulate(traces, FLAT, setups)}
    assert res["adaptive"].mean_accepted > res["oracle@8"].mean_accepted
    assert res["adaptive"].speedup > res["oracle@8"].speedup


def test_default_setups_with_the_bundled_speculators():
    setups = default_setups(lookahead=6)
    names = [s.name for s in setups]
    assert names[0] == "plain" and "adaptive" in names
    traces = make_traces(6, 120)
    res = simulate(traces, CPU, setups)
    assert all(r.mismatches == 0 for r in res)
    by = {r.setup: r for r in res}
    assert by["adaptive"].speedup > 0.95
    with pytest.raises(ValueError, match="unknown setups"):
        default_setups(names=["nonesuch"])


def test_compact_vocabulary_is_a_renumbering():
    traces = [Trace("a", "d", (40000, 7), (7, 49151, 40000)), Trace("b", "d", (5,), (49151, 5))]
    small = compact_vocabulary(traces)
    assert small[0].prompt_ids == (0, 1) and small[0].output_ids == (1, 2, 0) and small[1].output_ids == (2, 3)
    assert ReplayTarget(small).vocab_size == 5  # four tokens and the filler
    res = simulate(traces, CPU, [s for s in default_setups(4, names=["oracle", "plain"])])
    assert [r.setup for r in res] == ["plain", "oracle@4"] and all(r.mismatches == 0 for r in res)
    assert res[1].mean_accepted > res[0].mean_accepted


# -- files and command line ------------------------------------------------------------------------


def test_traces_roundtrip_and_errors(tmp_path):
    traces = make_traces(3, 20)
    p = tmp_path / "t.jsonl"
    save_traces(p, traces)
    assert load_traces(p) == traces
    p.write_text('{"id": "a", "prompt_ids": [1], "output_ids": [2]}\n'
                 '{"id": "b", "prompt_ids": [1, -2], "output_ids": []}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: 'prompt_ids'"):
        load_traces(p)
    p.write_text("not json\n")
    with pytest.raises(ValueError, match=r":1: not JSON"):
        load_traces(p)
    p.write_text('{"prompt_ids": [1]}\n')
    with pytest.raises(ValueError, match="missing 'output_ids'"):
        load_traces(p)


def test_cli_simulate(tmp_path, capsys):
    traces = make_traces(3, 40)
    tp, cp, jp = tmp_path / "t.jsonl", tmp_path / "c.json", tmp_path / "r.json"
    save_traces(tp, traces)
    cp.write_text(json.dumps({"verify": {"1": 0.02, "8": 0.05}, "propose": {"suffix": 0.0001}}))
    assert main([str(tp), "--costs", str(cp), "--setups", "plain", "--json", str(jp)]) == 0
    out = json.loads(jp.read_text())
    assert out["results"][0]["setup"] == "plain" and out["results"][0]["traces"] == 3
    assert out["results"][0]["projected_decode_s"] == pytest.approx(sum(len(t.output_ids) - 1 for t in traces) * 0.02)
    assert "plain" in capsys.readouterr().out
    cp.write_text("{}")
    assert main([str(tp), "--costs", str(cp)]) == 2
    assert "error" in capsys.readouterr().err
