"""Continuous batching: one forward for every running request, one speculation budget, and outputs that never
depend on the batch (torch backend: bit for bit).

The model-level tests use tiny random models on both torch paths (the compiled kernels and op by op); the
engine and scheduler tests use the bundled SmolLM2-135M with the full adaptive system.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from adaspec.control.batch import trim_batch
from adaspec.control.costs import CostModel
from adaspec.engine import PREFILL_CHUNK, Engine
from adaspec.model.llama import LlamaConfig, LlamaModel
from adaspec.serve.metrics import ServerMetrics
from adaspec.serve.scheduler import Job, Scheduler, SchedulerConfig
from adaspec.speculators.base import Draft
from adaspec.verify import SamplingParams

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  qkv_bias=True)
ITEMS = [([1, 2, 3, 4, 5], [20, 21, 22], None), ([7, 8, 9], [30], None),
         ([10, 11, 12, 13, 14, 15, 16], [40, 41, 42, 43], [-1, 0, 0, 2]), ([5] * 40, [50, 51], None)]


# -- the model: a batched forward gives each sequence's rows bit for bit -------------------------------------------


@pytest.mark.parametrize("precision", ["q8", "fp32"])
def test_forward_batch_rows_equal_each_sequence_alone(precision):
    model = LlamaModel.random(CFG, seed=3, precision=precision)
    assert (model._decoder is not None) == (precision == "q8")  # both torch paths are covered

    def cache_after(prompt):
        c = model.new_cache()
        model.prefill(c, prompt)
        return c

    alone = [model.forward(cache_after(p), t, par) for p, t, par in ITEMS]
    for order in ([0, 1, 2, 3], [3, 1], [2, 0, 3]):
        caches = [cache_after(ITEMS[i][0]) for i in order]
        outs = model.forward_batch([(c, ITEMS[i][1], ITEMS[i][2]) for c, i in zip(caches, order)])
        for i, c, out in zip(order, caches, outs):
            assert torch.equal(out.logits, alone[i].logits) and torch.equal(out.hidden, alone[i].hidden)
        # each cache holds its own uncommitted rows: committing a path and going on matches the single forward
        c, i = caches[-1], order[-1]
        c.commit([0, 1])
        single = cache_after(ITEMS[i][0])
        model.forward(single, ITEMS[i][1], ITEMS[i][2])
        single.commit([0, 1])
        assert torch.equal(model.forward(c, [9]).logits, model.forward(single, [9]).logits)


def test_forward_batch_refuses_a_cache_twice():
    model = LlamaModel.random(CFG, seed=3, precision="q8")
    c = model.new_cache()
    model.prefill(c, [1, 2, 3])
    with pytest.raises(ValueError, match="twice"):
        model.forward_batch([(c, [4], None), (c, [5], None)])


# -- one speculation budget ---------------------------------------------------------------------------------------


def _costs(per_row: float, fixed: float = 0.02) -> CostModel:
    return CostModel(seed={n: fixed + per_row * n for n in range(1, 129)})


def test_batch_budget_drafts_like_one_request_on_a_flat_curve_and_little_on_a_steep_one():
    drafts = [Draft.chain([1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6]) for _ in range(8)]
    flat = trim_batch(drafts, _costs(per_row=1e-5))
    assert [len(d) for d in flat] == [4] * 8
    steep = trim_batch(drafts, _costs(per_row=0.02, fixed=0.0))  # a forward costs its rows: drafts never pay
    assert [len(d) for d in steep] == [0] * 8
    mixed = [Draft.chain([1, 2, 3], [0.99, 0.99, 0.99]), Draft.chain([5, 6, 7], [0.2, 0.2, 0.2]), Draft.empty()]
    kept = trim_batch(mixed, _costs(per_row=0.004))  # nodes that pay for everyone's step time, best first
    assert len(kept[0]) == 3 and len(kept[1]) == 0 and len(kept[2]) == 0


def test_batch_budget_keeps_ancestor_closed_trees():
    tree = Draft(np.array([1, 2, 3, 4]), np.array([-1, 0, 0, 1]), np.array([0.9, 0.6, 0.05, 0.9]), "t")
    (kept,) = trim_batch([tree], _costs(per_row=0.01))
    assert 0 < len(kept) < 4 and 3 not in kept.tokens.tolist()  # the unlikely sibling goes first
    for i, p in enumerate(kept.parents):  # every kept node's parent is kept, before it
        assert p < i


# -- the engine and the scheduler on the bundled model ----------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    from adaspec.model.loader import load_target

    return load_target(None, device="cpu")


def _engine(bundled):
    from adaspec.system import build_engine

    model, tok = bundled
    return build_engine(model, tok, "adaptive")


PROMPTS = ["Write a Python function that reverses a string.", "What is the capital of Italy?",
           "List three colours of the rainbow.", "def fibonacci(n):", "Explain what a compiler does.",
           "Translate 'good morning' into Spanish."]


def _params(i: int, max_tokens: int = 40) -> SamplingParams:
    if i % 2:  # seeded sampling, every other request
        return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=100 + i)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def _prompt_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}])


class _Run:
    """A scheduler over an engine, with every batch's request ids recorded."""

    def __init__(self, engine: Engine, **config):
        self.engine = engine
        self.batches: list[list[str]] = []
        self.prefills: list[str] = []
        step_batch, prefill_step = engine.step_batch, engine.prefill_step
        engine.step_batch = lambda reqs: (self.batches.append([r.id for r in reqs]), step_batch(reqs))[1]
        engine.prefill_step = lambda req: (self.prefills.append(req.id), prefill_step(req))[1]
        self.finals: dict[str, object] = {}
        self.done = threading.Condition()
        self.sched = Scheduler(engine, ServerMetrics(), SchedulerConfig(**config))

    def submit(self, jid: str, prompt: list[int], params: SamplingParams) -> Job:
        def deliver(update):
            if update.finished:
                with self.done:
                    self.finals[jid] = update
                    self.done.notify_all()

        job = Job(jid, prompt, params, "default", deliver)
        self.sched.submit(job)
        return job

    def wait(self, n: int, timeout: float = 300) -> dict:
        with self.done:
            assert self.done.wait_for(lambda: len(self.finals) >= n, timeout), self.finals.keys()
        return self.finals

    def close(self):
        self.sched.shutdown()


def _alone(bundled, prompts, params) -> list[list[int]]:
    eng = _engine(bundled)
    return [eng.generate(p, q).tokens for p, q in zip(prompts, params)]


def test_outputs_do_not_depend_on_the_batch(bundled):
    """Each request alone, then all of them concurrently with staggered arrivals, greedy and seeded sampling
    mixed, the full adaptive system: identical tokens."""
    model, tok = bundled
    prompts = [_prompt_ids(tok, t) for t in PROMPTS]
    params = [_params(i) for i in range(len(prompts))]
    alone = _alone(bundled, prompts, params)
    run = _Run(_engine(bundled), max_active=8, max_queue=16)
    try:
        jobs = []
        for i, (p, q) in enumerate(zip(prompts, params)):
            jobs.append(run.submit(f"r{i}", p, q))
            time.sleep(0.05 * (i % 3))  # arrivals while others decode
        run.wait(len(prompts))
    finally:
        run.close()
    assert max(len(b) for b in run.batches) >= 3  # they really shared forwards
    assert [job.req.output for job in jobs] == alone


def test_long_prompt_prefills_in_chunks_between_decode_steps(bundled):
    model, tok = bundled
    short = _prompt_ids(tok, PROMPTS[0])
    long = _prompt_ids(tok, " ".join(["The quick brown fox jumps over the lazy dog."] * 80))
    assert len(long) > 2 * PREFILL_CHUNK
    params = SamplingParams(max_tokens=30)
    alone = _alone(bundled, [short, long], [params, params])
    run = _Run(_engine(bundled), max_active=4)
    try:
        jobs = [run.submit("short", short, params)]
        while not run.batches:
            time.sleep(0.01)
        jobs.append(run.submit("long", long, params))
        run.wait(2)
    finally:
        run.close()
    chunks = run.prefills.count("long")
    assert chunks == -(-len(long) // PREFILL_CHUNK)
    # the short request kept decoding while the long prompt went in: a step between consecutive chunks
    steps_of_short = sum("short" in b for b in run.batches)
    assert steps_of_short >= chunks - 1
    assert [job.req.output for job in jobs] == alone


def test_cancel_and_failure_mid_batch_leave_the_others_untouched(bundled):
    model, tok = bundled
    prompts = [_prompt_ids(tok, t) for t in PROMPTS[:4]]
    params = [SamplingParams(max_tokens=40) for _ in prompts]
    alone = _alone(bundled, prompts, params)
    engine = _engine(bundled)
    spec = engine.speculators[0]
    observe = spec.observe

    def failing(ctx, outcome):  # one request's speculator breaks mid-generation
        if ctx.request_id == "r2" and len(ctx.generated) > 5:
            raise RuntimeError("speculator failure")
        return observe(ctx, outcome)

    spec.observe = failing
    run = _Run(engine, max_active=8)
    try:
        jobs = [run.submit(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]
        while sum("r1" in b for b in run.batches) < 3:
            time.sleep(0.01)
        run.sched.cancel(jobs[1], "client disconnected")
        finals = run.wait(4)
    finally:
        run.close()
    assert finals["r1"].finish_reason == "cancelled"
    assert finals["r2"].finish_reason == "error" and finals["r2"].error == "internal"
    for i in (0, 3):
        assert finals[f"r{i}"].error is None and jobs[i].req.output == alone[i]


def test_a_forward_that_fails_for_the_batch_is_retried_request_by_request(bundled):
    model, tok = bundled
    prompts = [_prompt_ids(tok, t) for t in PROMPTS[:3]]
    params = SamplingParams(max_tokens=12)
    alone = _alone(bundled, prompts, [params] * 3)
    engine = _engine(bundled)
    reqs = [engine.start(p, params, f"r{i}") for i, p in enumerate(prompts)]
    bad = reqs[1].cache
    forward = model.forward

    class Broken:  # the model as the engine sees it: the batch fails, and so does one sequence alone
        def __getattr__(self, name):
            return getattr(model, name)

        def forward_batch(self, items):
            raise RuntimeError("batch failed")

        def forward(self, cache, tokens, parents=None):
            if cache is bad:
                raise RuntimeError("this sequence failed")
            return forward(cache, tokens, parents)

    engine.model = Broken()
    results = engine.step_batch(reqs)
    assert isinstance(results[1], RuntimeError) and "this sequence" in str(results[1])
    assert all(isinstance(r, list) and r for r in (results[0], results[2]))
    engine.model = model
    for i in (0, 2):
        while not reqs[i].finished:
            engine.step(reqs[i])
        assert reqs[i].output == alone[i]


def test_kv_pool_bounds_the_running_requests(bundled):
    model, tok = bundled
    prompt = _prompt_ids(tok, PROMPTS[1])
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    need = len(prompt) + params.max_tokens
    run = _Run(_engine(bundled), max_active=8, max_queue=8, kv_positions=2 * need)
    try:
        for i in range(5):
            run.submit(f"r{i}", prompt, params)
        finals = run.wait(5)
    finally:
        run.close()
    assert all(u.error is None and u.completion_tokens == 16 for u in finals.values())
    assert max(len(b) for b in run.batches) == 2  # never more running than the pool holds, and it fills
    assert run.sched._kv_used == 0  # every request gave its positions back


def test_a_full_kv_cache_ends_the_request_with_a_503_and_the_others_go_on(bundled):
    from adaspec.model.base import KVCacheFull
    from adaspec.serve.app import _raise_for_update
    from adaspec.serve.errors import APIError

    model, tok = bundled
    engine = _engine(bundled)
    step_batch = engine.step_batch

    def full_for_r1(reqs):  # what a backend whose KV memory ran out reports for one sequence
        out = step_batch(reqs)
        return [KVCacheFull("no free KV cells") if r.id == "r1" else o for r, o in zip(reqs, out)]

    engine.step_batch = full_for_r1
    run = _Run(engine, max_active=4)
    try:
        for i in range(3):
            run.submit(f"r{i}", _prompt_ids(tok, PROMPTS[i]), SamplingParams(max_tokens=8))
        finals = run.wait(3)
    finally:
        run.close()
    assert finals["r1"].finish_reason == "error" and finals["r1"].error.startswith("unavailable: ")
    with pytest.raises(APIError) as e:
        _raise_for_update(finals["r1"])
    assert e.value.status == 503 and e.value.code == "kv_cache_full"
    assert finals["r0"].error is None and finals["r2"].error is None
