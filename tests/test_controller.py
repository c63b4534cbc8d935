"""Calibration, cost model and the adaptive controller, driven by scripted speculators without a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from adaspec.control.adaptive import (AdaptiveConfig, AdaptiveController, best_prefix, merge_drafts,
                                      normalise_siblings)
from adaspec.control.base import Controller, FixedController, StepFeedback
from adaspec.control.calibration import (Calibrator, isotonic_rows, label_nodes,
                                         pool_adjacent_violators)
from adaspec.control.costs import CostModel, Curve, load_cost_curve
from adaspec.speculators.base import DecodeContext, Draft, StepOutcome

VOCAB = 1000


# -- a model-free decode loop with the engine's call order ----------------------------------------


class Truth:
    """The target's greedy output: a fixed random token per position."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.seq: list[int] = []

    def __getitem__(self, pos: int) -> int:
        while len(self.seq) <= pos:
            self.seq.append(int(self.rng.integers(0, VOCAB)))
        return self.seq[pos]


@dataclass
class Scripted:
    """Proposes a chain whose node j is the true token with probability ``p`` given node j-1 was,
    and states confidence ``conf`` for every node."""

    name: str
    truth: Truth
    p: float
    conf: float
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def propose(self, pos: int, budget: int) -> Draft:
        toks = []
        right = True
        for j in range(budget):
            right = right and self.rng.random() < self.p
            t = self.truth[pos + j]
            toks.append(t if right else (t + 1 + int(self.rng.integers(0, 7))) % VOCAB)
        return Draft.chain(toks, [self.conf] * budget, source=self.name)


def greedy_verify(draft: Draft, truth: Truth, pos: int) -> StepOutcome:
    """Walk the draft tree along the true tokens; emit the accepted tokens and the bonus token."""
    kids = draft.children()
    node, accepted, d = -1, [], 0
    while True:
        nxt = [c for c in kids.get(node, []) if int(draft.tokens[c]) == truth[pos + d]]
        if not nxt:
            break
        node = nxt[0]
        accepted.append(node)
        d += 1
    emitted = [int(draft.tokens[i]) for i in accepted] + [truth[pos + d]]
    return StepOutcome(draft, accepted, emitted)


@dataclass
class Run:
    chosen: list[Draft] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # position of the first token each step emits
    emitted: int = 0
    seconds: float = 0.0
    plain_seconds: float = 0.0  # the same tokens at c(1) each


def drive(ctrl: Controller, specs: list[Scripted], truth: Truth, cost, steps: int, propose_s: float = 0.0,
          noise: float = 0.0, seed: int = 0) -> Run:
    """The engine's step: plan -> propose -> choose -> verify -> observe, with virtual time."""
    rng = np.random.default_rng(seed)
    run = Run()
    ctx = DecodeContext("req-0", "default", [truth[0]], 0)
    pos = 1  # position of the next token to emit
    for _ in range(steps):
        plan = ctrl.plan(ctx, [s.name for s in specs])
        proposals = {s.name: s.propose(pos, plan.budgets[s.name]) for s in specs if plan.budgets.get(s.name, 0) > 0}
        spent = {n: propose_s for n in proposals}
        if proposals:
            plan = ctrl.choose(ctx, plan, proposals, spent)
        draft = plan.draft
        outcome = greedy_verify(draft, truth, pos)
        verify_s = cost(1 + len(draft)) * float(np.exp(noise * rng.standard_normal()))
        ctx.tokens.extend(outcome.emitted)
        ctrl.observe(StepFeedback(ctx, plan, proposals, spent, outcome, verify_s))
        pos += len(outcome.emitted)
        run.chosen.append(draft)
        run.positions.append(pos - len(outcome.emitted))
        run.emitted += len(outcome.emitted)
        run.seconds += cost(1 + len(draft)) + sum(spent.values())
        run.plain_seconds += len(outcome.emitted) * cost(1)
    return run


def controller(**config) -> AdaptiveController:
    """An adaptive controller whose own work is not timed, so that runs are deterministic."""
    return AdaptiveController(AdaptiveConfig(**config), timer=lambda: 0.0)


def cpu_cost(n: int) -> float:
    """Rises fast with n, like llama.cpp on 2 CPU cores (REFERENCES): 13 ms at 1, ~57 ms at 8."""
    return 0.013 + 0.0063 * (n - 1)


def gpu_cost(n: int) -> float:
    """Nearly flat up to dozens of tokens."""
    return 0.010 + 0.00002 * (n - 1)


# -- calibration ----------------------------------------------------------------------------------


def test_label_nodes_chain_and_tree():
    idx, hit = label_nodes(Draft.chain([5, 6, 7, 8]), [5, 6, 9])
    assert idx.tolist() == [0, 1, 2] and hit.tolist() == [True, True, False]  # node 3 unknown
    # pending -> 5 -> {6, 7}, pending -> 4 ; node 4 under the rejected 7 is unknown
    tree = Draft(np.array([5, 6, 7, 4, 1]), np.array([-1, 0, 0, -1, 2]), np.full(5, 0.5))
    idx, hit = label_nodes(tree, [5, 6, 3])
    assert dict(zip(idx.tolist(), hit.tolist())) == {0: True, 1: True, 2: False, 3: False}


def test_pool_adjacent_violators_is_monotone_and_weighted():
    out = pool_adjacent_violators(np.array([0.2, 0.6, 0.4, 0.9]), np.ones(4))
    assert np.allclose(out, [0.2, 0.5, 0.5, 0.9])
    out = pool_adjacent_violators(np.array([0.8, 0.2]), np.array([3.0, 1.0]))
    assert np.allclose(out, [0.65, 0.65])
    rng = np.random.default_rng(0)
    y, w = rng.random((20, 9)), rng.random((20, 9)) + 0.1
    ref = np.stack([pool_adjacent_violators(a, b) for a, b in zip(y, w)])
    assert np.allclose(isotonic_rows(y, w), ref)


def _feed(cal: Calibrator, name: str, true_p, conf: float, steps: int, rng: np.random.Generator, length: int = 4):
    for _ in range(steps):
        toks, emitted = list(range(10, 10 + length)), []
        for t in toks:
            if rng.random() < true_p(conf):
                emitted.append(t)
            else:
                break
        emitted.append(999)
        cal.observe(name, Draft.chain(toks, [conf] * length, name), emitted)


def test_calibration_converges_to_true_acceptance():
    rng = np.random.default_rng(1)
    cal = Calibrator()
    truth = {0.95: 0.55, 0.25: 0.35}  # stated confidence -> true acceptance: overconfident, then underconfident
    for _ in range(1500):
        conf = 0.95 if rng.random() < 0.5 else 0.25
        _feed(cal, "s", truth.get, conf, 1, rng)
    for conf, p in truth.items():
        est = cal.probability("s", np.array([conf]), np.array([1]))[0]
        assert abs(est - p) < 0.06, (conf, est, p)
    assert cal.calibrate("s", Draft.chain([1], [0.95])).probs[0] == pytest.approx(
        cal.probability("s", np.array([0.95]), np.array([1]))[0])
    # prequential reliability: predicted ~ realised per bin, and far better than the raw confidences
    rows = cal.reliability("s")
    assert sum(r["n"] for r in rows) > 2000
    assert cal.expected_calibration_error("s") < 0.05
    raw = cal.raw_reliability("s")
    raw_err = sum(r["weight"] * abs(r["stated"] - r["realised"]) for r in raw) / sum(r["weight"] for r in raw)
    assert raw_err > 0.2 and cal.expected_calibration_error("s") < raw_err / 4


def test_calibration_is_monotone_in_confidence():
    rng = np.random.default_rng(2)
    cal = Calibrator()
    # acceptance falls with confidence (a badly broken speculator): the calibrated map must not
    _feed(cal, "s", lambda c: 0.9 - 0.6 * c, 0.2, 300, rng)
    _feed(cal, "s", lambda c: 0.9 - 0.6 * c, 0.8, 300, rng)
    grid = cal.probability("s", np.linspace(0, 1, 21), np.ones(21, dtype=int))
    assert np.all(np.diff(grid) >= -1e-12)


def test_calibration_follows_drift():
    rng = np.random.default_rng(3)
    cal = Calibrator()
    _feed(cal, "s", lambda c: 0.9, 0.5, 1000, rng)
    assert cal.probability("s", np.array([0.5]), np.array([1]))[0] > 0.85
    _feed(cal, "s", lambda c: 0.2, 0.5, 1000, rng)  # about four half-lives
    assert abs(cal.probability("s", np.array([0.5]), np.array([1]))[0] - 0.2) < 0.07


def test_calibration_deep_nodes_borrow_from_shallow_ones():
    rng = np.random.default_rng(4)
    cal = Calibrator()
    _feed(cal, "s", lambda c: 0.1, 1.0, 200, rng, length=2)  # depth 3+ never reached
    deep = cal.probability("s", np.array([1.0]), np.array([6]))[0]
    assert deep < 0.3  # the prior of an unseen depth follows depth 1-2, not the stated 1.0


def test_calibration_state_roundtrip_and_shape_check():
    rng = np.random.default_rng(5)
    cal = Calibrator(max_refit_interval=1)
    _feed(cal, "s", lambda c: 0.3, 0.9, 200, rng)
    other = Calibrator(max_refit_interval=1)
    other.load_state_dict(json.loads(json.dumps(cal.state_dict())))
    grid = np.linspace(0, 1, 11)
    ones = np.ones(11, dtype=int)
    assert np.allclose(other.probability("s", grid, ones), cal.probability("s", grid, ones))
    with pytest.raises(ValueError):
        other.load_state_dict({"s": {"hit": [[0.0]], "tried": [[0.0]], "conf": [[0.0]]}})


# -- costs ----------------------------------------------------------------------------------------


def test_cost_model_recovers_noisy_curve():
    rng = np.random.default_rng(6)
    cm = CostModel()
    sizes = [1, 2, 3, 4, 6, 8, 12, 16]
    for _ in range(600):
        n = int(rng.choice(sizes))
        t = cpu_cost(n) * float(np.exp(0.15 * rng.standard_normal()))
        if rng.random() < 0.1:
            t *= 6  # another process took the cores
        cm.observe_verify(n, t)
    chain, _ = cm.verify_costs(32)
    for n in sizes:
        assert abs(chain[n] / cpu_cost(n) - 1) < 0.1, (n, chain[n], cpu_cost(n))
    assert np.all(np.diff(chain[sizes]) >= 0)  # a monotone fit (unmeasured sizes carry a discount)
    # an unmeasured size between measured ones: interpolated, then discounted to invite one try
    assert 0.75 * cpu_cost(5) < chain[5] < cpu_cost(5)
    # beyond the largest measured size: grows, but not faster than the fitted slope
    assert cpu_cost(16) * 0.8 < chain[24] < cpu_cost(24)


def test_cost_model_discovers_flat_curve_and_seed_shape():
    rng = np.random.default_rng(7)
    cm = CostModel()
    for _ in range(300):
        n = int(rng.integers(1, 33))
        cm.observe_verify(n, gpu_cost(n) * float(np.exp(0.05 * rng.standard_normal())))
    chain, _ = cm.verify_costs(32)
    assert chain[32] / chain[1] < 1.15
    seeded = CostModel(seed={1: 0.013, 2: 0.024, 4: 0.033, 8: 0.057, 16: 0.089})
    for _ in range(5):
        seeded.observe_verify(1, 0.026)  # this machine is twice as slow as the recording
    c = seeded.verify_costs(16)[0]
    assert c[1] == pytest.approx(0.026)
    assert c[8] == pytest.approx(0.8 * 2 * 0.057)  # recorded shape, measured level, exploration discount


def test_curve_ignores_bad_timings_and_proposal_default(tmp_path):
    cur = Curve()
    cur.add(3, float("nan"))
    cur.add(3, -1.0)
    assert cur.count(3) == 0
    cm = CostModel()
    assert cm.propose_cost("x", 8) == 0.0
    cm.observe_propose("x", 8, 0.004)
    assert cm.propose_cost("x", 8) == pytest.approx(0.004)
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"verify": {"1": 0.01, "4": 0.02}}))
    assert load_cost_curve(p) == {1: 0.01, 4: 0.02}
    p.write_text(json.dumps({"1": "fast"}))
    with pytest.raises(ValueError, match="seconds"):
        load_cost_curve(p)


# -- drafts: merge and best-first prefixes -------------------------------------------------------


def test_merge_and_best_prefix_on_tree():
    a = Draft.chain([5, 6], [0.9, 0.8], "a")
    b = Draft.chain([5, 7], [0.5, 0.6], "b")
    m, owners = merge_drafts([a, b])
    assert m.tokens.tolist() == [5, 6, 7] and m.parents.tolist() == [-1, 0, 0]
    assert owners == [0b11, 0b01, 0b10]
    assert m.probs[0] == pytest.approx(0.9)
    assert m.probs[1] + m.probs[2] == pytest.approx(1.0)  # siblings 0.8 + 0.6 scaled to sum 1
    flat = np.full(10, 0.01)
    order, k, e, rate = best_prefix(m, flat, flat, 0.0)
    assert k == 3 and e == pytest.approx(0.9 * 1.0 + 0.9)
    # with a steep cost only the root pays for itself
    steep = np.array([0.01, 0.01, 0.012, 0.03, 0.05])  # c(n) for n = 0..4
    order, k, e, rate = best_prefix(m, steep, steep, 0.0)
    assert k == 1 and order[0] == 0 and rate == pytest.approx(1.9 / 0.012)
    order, k, e, rate = best_prefix(m, steep, steep, sunk=0.5)  # a large sunk cost favours the whole tree
    assert k == 3
    assert normalise_siblings(Draft.chain([1], [0.7])).probs[0] == 0.7


def test_best_prefix_worked_example_from_the_docstring():
    costs = np.array([0.013, 0.013, 0.0193, 0.0256, 0.0319, 0.0382])  # c(n), n = 0..5
    chain = Draft.chain([1, 2, 3, 4], [0.9] * 4)
    order, k, e, rate = best_prefix(chain, costs, costs, 0.0)
    assert k == 3 and e == pytest.approx(0.9 + 0.81 + 0.729) and rate == pytest.approx(107.8, abs=0.1)
    flat = np.full(6, 0.010)
    assert best_prefix(chain, flat, flat, 0.0)[1] == 4


# -- the controller --------------------------------------------------------------------------------


def _fraction(chosen: list[Draft], pred) -> float:
    return sum(bool(pred(d)) for d in chosen) / len(chosen)


def test_controller_prefers_the_better_speculator():
    truth = Truth(10)
    good = Scripted("good", truth, 0.9, 0.5, seed=1)
    bad = Scripted("bad", truth, 0.2, 0.5, seed=2)  # the same stated confidence: only calibration tells them apart
    ctrl = controller()
    run = drive(ctrl, [good, bad], truth, cpu_cost, 600)
    late = run.chosen[100:]
    uses_good = _fraction(late, lambda d: "good" in d.source.split("+"))
    only_bad = _fraction(late, lambda d: d.source == "bad")
    assert uses_good > 0.85 and only_bad < 0.05, (uses_good, only_bad)
    st = ctrl.stats()["speculators"]
    assert st["good"]["gain"] > 3 * st["bad"]["gain"]


def test_controller_stops_speculating_on_unpredictable_text():
    truth = Truth(11)
    wrong = Scripted("wrong", truth, 0.0, 0.9, seed=3)  # confident and always wrong
    ctrl = controller()
    run = drive(ctrl, [wrong], truth, cpu_cost, 800, propose_s=0.002, noise=0.2)
    late = run.chosen[100:]
    assert _fraction(late, lambda d: len(d) == 0) > 0.97
    assert run.plain_seconds / run.seconds > 0.95  # throughput relative to plain decoding
    assert ctrl.stats()["speculators"]["wrong"]["queries"] < 100  # it stopped paying for proposals


def test_controller_keeps_speculating_when_verification_is_cheap():
    truth = Truth(12)
    spec = Scripted("s", truth, 0.6, 0.6, seed=4)
    gpu = drive(controller(), [spec], truth, gpu_cost, 600, noise=0.05)
    late = gpu.chosen[100:]
    assert _fraction(late, lambda d: len(d) == 0) < 0.05
    speedup = gpu.plain_seconds / gpu.seconds
    assert speedup > 1.8, speedup  # E[1 + accepted] ~ 2.4 at nearly no cost
    # on a CPU-like curve the same speculator earns shorter drafts
    truth2 = Truth(12)
    cpu = drive(controller(), [Scripted("s", truth2, 0.6, 0.6, seed=4)], truth2, cpu_cost, 600, noise=0.05)
    mean_len = lambda r: float(np.mean([len(d) for d in r.chosen[100:]]))
    assert mean_len(cpu) < mean_len(gpu) - 2
    assert cpu.plain_seconds / cpu.seconds > 0.95


@dataclass
class Blocky(Scripted):
    """Right with probability ``p`` inside blocks of 24 positions of one parity, always wrong in the others."""

    parity: int = 0

    def propose(self, pos: int, budget: int) -> Draft:
        d = super().propose(pos, budget)
        if (pos // 24) % 2 == self.parity:
            return d
        return Draft.chain([(t + 1) % VOCAB for t in d.tokens.tolist()], d.probs, self.name)


def test_controller_asks_complementary_speculators_together():
    truth = Truth(18)
    a = Blocky("a", truth, 0.9, 0.6, seed=10, parity=0)
    b = Blocky("b", truth, 0.9, 0.6, seed=11, parity=1)
    ctrl = controller()
    both = drive(ctrl, [a, b], truth, gpu_cost, 400, propose_s=0.001)
    st = ctrl.stats()["speculators"]
    assert st["a"]["queries"] > 330 and st["b"]["queries"] > 330  # each covers the other's blind spots
    truth2 = Truth(18)
    one = drive(controller(), [Blocky("a", truth2, 0.9, 0.6, seed=10, parity=0)], truth2, gpu_cost, 400,
                propose_s=0.001)
    tps = lambda r: r.emitted / r.seconds
    assert tps(both) > 1.3 * tps(one)


@dataclass
class Drifting(Scripted):
    """Right with probability ``p`` before position ``switch`` and ``p_after`` from there on."""

    switch: int = 0
    p_after: float = 0.0
    p_before: float = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.p_before = self.p

    def propose(self, pos: int, budget: int) -> Draft:
        self.p = self.p_before if pos < self.switch else self.p_after
        return super().propose(pos, budget)


@pytest.mark.parametrize("before,after,switch", [(0.9, 0.0, 1200), (0.0, 0.9, 300)])
def test_controller_follows_abrupt_drift(before, after, switch):
    truth = Truth(20)
    spec = Drifting("s", truth, before, 0.8, seed=3, switch=switch, p_after=after)
    run = drive(controller(), [spec], truth, cpu_cost, 900, propose_s=0.0005)
    at = next(i for i, p in enumerate(run.positions) if p >= switch)
    lens = np.array([len(d) for d in run.chosen])
    assert len(lens) - at > 400
    if after == 0.0:  # stops within a few dozen steps, not a calibration half-life (256 steps)
        assert lens[at + 40 :].mean() < 0.1 and lens[at - 100 : at].mean() > 2
    else:  # resumes once probes see the change
        assert lens[at + 200 :].mean() > 2.5 and lens[at - 100 : at].mean() < 0.1


def test_controller_grows_lookahead_with_a_reliable_speculator():
    truth = Truth(13)
    spec = Scripted("s", truth, 0.98, 0.9, seed=5)
    ctrl = controller()
    run = drive(ctrl, [spec], truth, gpu_cost, 300)
    assert ctrl.stats()["speculators"]["s"]["budget"] >= 24
    assert np.mean([len(d) for d in run.chosen[-50:]]) > 15


def test_controller_summary_predicted_vs_realised():
    truth = Truth(14)
    spec = Scripted("s", truth, 0.7, 0.7, seed=6)
    ctrl = controller()
    drive(ctrl, [spec], truth, gpu_cost, 400)
    s = ctrl.summary("req-0")
    assert s["steps"] == 400 and s["speculated_steps"] + s["empty_steps"] == 400
    assert sum(s["chosen"].values()) == 400
    assert s["realised_accepted"] > 0
    assert abs(s["predicted_accepted"] / s["realised_accepted"] - 1) < 0.15  # calibrated predictions
    assert ctrl.summary("unknown") == {}
    stats = json.loads(json.dumps(ctrl.stats()))  # plain JSON for the server's stats endpoint
    assert stats["speculators"]["s"]["queries"] == 400 and stats["costs"]["verify_chain"]


def test_controller_state_save_load(tmp_path):
    from adaspec.control.namespaced import NamespacedController

    truth = Truth(15)
    make = lambda costs: AdaptiveController(costs=costs, calibrator=Calibrator(max_refit_interval=1),  # noqa: E731
                                            timer=lambda: 0.0)  # refit every step: no stale fit to compare
    ctrl = NamespacedController(make)
    drive(ctrl, [Scripted("s", truth, 0.3, 0.9, seed=7)], truth, gpu_cost, 200)
    path = tmp_path / "state" / "controller.state"
    ctrl.save(path)
    assert not list(path.parent.glob(".*.tmp"))
    fresh = NamespacedController(make)
    assert fresh.load(path)
    d = Draft.chain([1, 2], [0.9, 0.9], "s")
    cal = lambda c: c.controller("default").calibrator.calibrate("s", d).probs  # noqa: E731
    assert np.allclose(cal(fresh), cal(ctrl))
    assert not np.allclose(cal(fresh), cal(NamespacedController(make)))
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert not NamespacedController(make).load(path)
    assert not path.exists() and list(path.parent.glob("controller.state.bad-*"))
    with pytest.raises(ValueError):
        AdaptiveController().load_state_dict({"version": 99})


def test_controller_without_trees_verifies_chains_only():
    truth = Truth(16)
    ctrl = controller(trees=False)
    run = drive(ctrl, [Scripted("a", truth, 0.7, 0.7, seed=8), Scripted("b", truth, 0.7, 0.7, seed=9)],
                truth, gpu_cost, 200)
    assert all(d.is_chain for d in run.chosen)
    assert any(len(d) for d in run.chosen)


def test_config_validation():
    with pytest.raises(ValueError):
        AdaptiveConfig(min_budget=10, initial_budget=4)
    with pytest.raises(ValueError):
        AdaptiveConfig(smoothing=0)


def test_fixed_controller_still_drives_the_loop():
    truth = Truth(17)
    run = drive(FixedController(4), [Scripted("s", truth, 1.0, 1.0)], truth, gpu_cost, 20)
    assert all(len(d) == 4 for d in run.chosen) and run.emitted == 100


def test_adaptive_controller_in_the_engine_is_lossless():
    """The real engine, a small random target, real timings: the adaptive controller changes speed only."""
    from adaspec.engine import Engine
    from adaspec.model.llama import LlamaConfig, LlamaModel
    from adaspec.speculators.ngram import PromptLookupSpeculator
    from adaspec.speculators.suffix import SuffixSpeculator
    from adaspec.verify import SamplingParams

    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_context=512)
    model = LlamaModel.random(cfg, seed=3)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9, 7, 8, 9, 7, 8], [1, 2, 3, 4, 5, 1, 2, 3]]
    plain = Engine(model, None, [], FixedController(0))
    ctrl = AdaptiveController()
    adaptive = Engine(model, None, [SuffixSpeculator(), PromptLookupSpeculator()], ctrl)
    for i, p in enumerate(prompts):
        g = adaptive.generate(p, params, request_id=f"r{i}")
        assert g.tokens == plain.generate(p, params).tokens
        s = ctrl.summary(f"r{i}")
        assert s["steps"] == g.stats.forwards - 1 and sum(s["chosen"].values()) == s["steps"]
    assert ctrl.costs.chain.count_sizes >= 1  # it measured the target
