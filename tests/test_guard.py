"""The speculation guard: batched steps speculate only where it measured faster than not speculating."""

from __future__ import annotations

import pytest

from adaspec.control.guard import BLOCK, EXPLORE_OFF, EXPLORE_ON, WARMUP_BLOCKS, SpeculationGuard


def _run(guard: SpeculationGuard, rows: int, blocks: int, rate_on: float, rate_off: float) -> list[bool]:
    """``blocks`` blocks of batched steps whose tokens per second are ``rate_on`` when speculating and
    ``rate_off`` when not; returns each block's arm."""
    arms = []
    for _ in range(blocks):
        arm = guard.allow(rows)
        arms.append(arm)
        for _ in range(BLOCK):
            assert guard.allow(rows) == arm  # one arm for the whole block
            tokens = rows * 2
            guard.record(rows, arm, tokens, tokens / (rate_on if arm else rate_off))
    return arms


def test_it_alternates_first_then_keeps_the_faster_arm_and_explores_the_other():
    g = SpeculationGuard()
    arms = _run(g, 8, 2 * WARMUP_BLOCKS + 4 * EXPLORE_OFF, rate_on=90.0, rate_off=100.0)
    assert arms[: 2 * WARMUP_BLOCKS] == [True, False] * WARMUP_BLOCKS
    later = arms[2 * WARMUP_BLOCKS:]
    assert later.count(True) == len(later) // EXPLORE_ON  # speculation, slower, explored every EXPLORE_ON blocks
    s = g.stats()["8-15"]
    assert s["rate_speculating"] == pytest.approx(90.0) and s["rate_plain"] == pytest.approx(100.0)

    g = SpeculationGuard()
    later = _run(g, 8, 2 * WARMUP_BLOCKS + 4 * EXPLORE_OFF, rate_on=110.0, rate_off=100.0)[2 * WARMUP_BLOCKS:]
    assert later.count(False) == len(later) // EXPLORE_OFF  # plain decoding, slower, every EXPLORE_OFF blocks


def test_a_workload_that_turns_is_followed_within_a_few_blocks():
    g = SpeculationGuard()
    _run(g, 8, 2 * WARMUP_BLOCKS + 8 * EXPLORE_ON, rate_on=60.0, rate_off=100.0)
    # speculation starts paying (say the requests repeat earlier ones): the next exploration finds it, and the
    # explored block beating plain decoding runs again until speculation's rate is the higher
    arms = _run(g, 8, 2 * EXPLORE_ON + 8, rate_on=200.0, rate_off=100.0)
    turned = arms.index(True)
    assert turned < EXPLORE_ON
    assert all(arms[turned: turned + 8])
    # and back: speculation stops paying, plain decoding takes over as fast
    arms = _run(g, 8, 16, rate_on=50.0, rate_off=100.0)
    assert arms[8:].count(True) <= 16 // EXPLORE_ON


def test_batch_sizes_are_guarded_apart_and_single_requests_not_at_all():
    g = SpeculationGuard()
    _run(g, 8, 2 * WARMUP_BLOCKS + 2 * EXPLORE_OFF, rate_on=50.0, rate_off=100.0)
    _run(g, 2, 2 * WARMUP_BLOCKS + 2 * EXPLORE_OFF, rate_on=200.0, rate_off=100.0)
    assert set(g.stats()) == {"2-3", "8-15"}
    assert g.stats()["8-15"]["blocks_plain"] > g.stats()["8-15"]["blocks_speculating"]
    assert g.stats()["2-3"]["blocks_speculating"] > g.stats()["2-3"]["blocks_plain"]
    for _ in range(100):
        assert g.allow(1)
        g.record(1, True, 1, 1.0)
    assert "1-1" not in g.stats()


def test_steps_of_another_arm_or_with_bad_times_are_not_counted():
    g = SpeculationGuard()
    arm = g.allow(4)
    g.record(4, not arm, 100, 0.001)  # not this block's arm
    g.record(4, arm, 100, float("nan"))
    g.record(4, arm, 100, -1.0)
    assert g.stats()["4-7"]["blocks_speculating"] == 0 and g.stats()["4-7"]["rate_speculating"] is None
    for _ in range(BLOCK):
        g.record(4, arm, 10, 0.1)
    assert g.stats()["4-7"]["rate_speculating"] == pytest.approx(100.0)


def test_the_engine_verifies_no_draft_where_the_guard_says_so_and_the_speculators_still_learn():
    from adaspec.model.loader import load_target
    from adaspec.system import build_engine
    from adaspec.verify import SamplingParams

    model, tok = load_target(None, device="cpu")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in ("Count from 1 to 20, separated by commas.", "Count from 1 to 20, separated by commas!")]
    params = SamplingParams(temperature=0.0, max_tokens=40)

    def run(allow: bool) -> tuple[list[list[int]], int, int]:
        eng = build_engine(model, tok, "adaptive")
        asked = []
        eng.guard.allow = lambda rows: asked.append(rows) or allow
        reqs = [eng.start(p, params) for p in prompts]
        while not all(r.finished for r in reqs):
            eng.step_batch(reqs)
        for r in reqs:
            eng.finish(r)
        suffix = next(s for s in eng.speculators if s.name == "suffix")
        return ([r.output for r in reqs], sum(r.stats.drafted for r in reqs),
                suffix.stats()["namespaces"]["default"]["tokens"])

    off, drafted_off, learned_off = run(False)
    on, drafted_on, learned_on = run(True)
    assert off == on  # greedy: the target's own tokens either way
    assert drafted_off == 0 and drafted_on > 0
    assert learned_off == learned_on > 0  # the suffix index learned every output either way


def test_server_metrics_report_what_the_guard_measured():
    from prometheus_client.parser import text_string_to_metric_families

    from adaspec.serve.metrics import ServerMetrics

    g = SpeculationGuard()
    _run(g, 8, 2 * WARMUP_BLOCKS, rate_on=90.0, rate_off=100.0)
    _run(g, 3, 1, rate_on=50.0, rate_off=100.0)  # one block, speculating only
    m = ServerMetrics()
    m.guard.watch(g.stats)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}
    on, rate = "adaspec:spec_guard_speculating", "adaspec:spec_guard_tokens_per_second"
    assert samples[(on, (("batch_requests", "8-15"),))] == 0.0  # the next block decodes plainly
    assert samples[(on, (("batch_requests", "2-3"),))] == 1.0
    assert samples[(rate, (("arm", "speculating"), ("batch_requests", "8-15")))] == pytest.approx(90.0)
    assert samples[(rate, (("arm", "plain"), ("batch_requests", "8-15")))] == pytest.approx(100.0)
    assert samples[(rate, (("arm", "speculating"), ("batch_requests", "2-3")))] == pytest.approx(50.0)
    assert (rate, (("arm", "plain"), ("batch_requests", "2-3"))) not in samples  # never measured
