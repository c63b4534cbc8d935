"""The vLLM proposer's logic against a scripted batch (no vLLM needed): learning across requests, namespaces,
the batch-wide draft trim, the learned state's round trip, and the runner reader on a fake runner."""

import numpy as np
import pytest

from adaspec.speculators.base import Draft
from adaspec.vllm.runner import RunnerLayoutError, read_batch
from adaspec.vllm.service import BatchCosts, BatchRow, BatchView, SpeculationService

STEP_S = (0.010, 0.004)  # a step over n tokens takes 10 ms + 4 ms per token (CPU-like)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_service(state_dir=None, room=8):
    clock = Clock()
    return SpeculationService.default(room, state_dir, clock), clock


def serve(service, clock, requests, room=8):
    """Run requests (rid, namespace, prompt, truth) concurrently the way vLLM does: the target's output is
    ``truth``; a draft is accepted up to its first mismatch. Returns {rid: (output, forwards)}."""
    live = {rid: {"ns": ns, "tokens": list(prompt), "prompt": len(prompt), "truth": truth, "out": [], "fw": 0,
                  "draft": [], "sampled": []} for rid, ns, prompt, truth in requests}
    done, finished = {}, set()
    step_tokens = 0
    while live:
        # the forward: every request verifies its pending token and its draft
        for r in live.values():
            pos = len(r["out"])
            if r["fw"] == 0:
                emitted = [r["truth"][0]]
            else:
                acc = 0
                for want, got in zip(r["draft"], r["truth"][pos:]):
                    if want != got:
                        break
                    acc += 1
                emitted = r["truth"][pos:pos + acc + 1]
            r["fw"] += 1
            r["out"] += emitted
            r["tokens"] += emitted
            r["sampled"] = emitted
        clock.t += STEP_S[0] + STEP_S[1] * step_tokens
        rows = [BatchRow(rid, r["ns"], np.asarray(r["tokens"]), r["prompt"], r["sampled"], room)
                for rid, r in live.items()]
        drafts = service.step(BatchView(rows, finished, step_tokens))
        finished = set()
        step_tokens = 0
        for row, d in zip(rows, drafts):
            r = live[row.request_id]
            r["draft"] = d
            step_tokens += 1 + len(d)
        for rid in [rid for rid, r in live.items() if len(r["out"]) >= len(r["truth"])]:
            r = live.pop(rid)
            done[rid] = (r["out"][:len(r["truth"])], r["fw"])
            finished.add(rid)
    service.step(BatchView([], finished, step_tokens))  # the step after: the finished requests are learned from
    return done


def text(seed, n=120, vocab=500):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, vocab, n)]


def test_output_is_the_targets_and_a_finished_request_is_proposed_on_a_repeat():
    service, clock = make_service()
    prompt, truth = text(1, 20), text(2)
    first = serve(service, clock, [("a", "default", prompt, truth)])
    again = serve(service, clock, [("b", "default", prompt, truth)])
    assert first["a"][0] == truth and again["b"][0] == truth
    per_forward_first = len(truth) / first["a"][1]
    per_forward_again = len(truth) / again["b"][1]
    assert per_forward_first < 1.5  # random tokens: nothing to copy yet
    assert per_forward_again > 3.0  # the first request's output is drafted back


def test_namespaces_do_not_learn_from_each_other():
    service, clock = make_service()
    prompt, truth = text(3, 20), text(4)
    serve(service, clock, [("a", "tenant-1", prompt, truth)])
    other = serve(service, clock, [("b", "tenant-2", prompt, truth)])
    same = serve(service, clock, [("c", "tenant-1", prompt, truth)])
    assert len(truth) / other["b"][1] < 1.5
    assert len(truth) / same["c"][1] > 3.0


def test_learned_state_survives_a_restart(tmp_path):
    service, clock = make_service(tmp_path)
    prompt, truth = text(5, 20), text(6)
    serve(service, clock, [("a", "default", prompt, truth)])
    service.close()
    assert (tmp_path / "suffix.state").is_file() and (tmp_path / "controller.state").is_file()
    restarted, clock2 = make_service(tmp_path)
    again = serve(restarted, clock2, [("b", "default", prompt, truth)])
    assert len(truth) / again["b"][1] > 3.0
    fresh, clock3 = make_service()
    cold = serve(fresh, clock3, [("c", "default", prompt, truth)])
    assert len(truth) / cold["c"][1] < 1.5


def test_concurrent_requests_all_get_their_own_output():
    service, clock = make_service()
    reqs = [(f"r{i}", "default", text(10 + i, 15), text(20 + i, 60)) for i in range(6)]
    serve(service, clock, reqs)  # learn them
    reqs2 = [(f"s{i}", "default", p, t) for i, (_, _, p, t) in enumerate(reqs)]
    done = serve(service, clock, reqs2)
    for rid, _, _, truth in reqs2:
        assert done[rid][0] == truth
        assert len(truth) / done[rid][1] > 2.0


def _costs():
    costs = BatchCosts()
    for _ in range(3):
        for n in range(1, 80):
            costs.observe_step(n, STEP_S[0] + STEP_S[1] * n)
    return costs


@pytest.mark.parametrize("batch", [1, 4, 12])
def test_the_batch_trim_keeps_the_nodes_that_maximise_the_whole_batch_rate(batch):
    service, _ = make_service()
    service.costs = _costs()
    p = 0.8
    drafts = {f"r{i}": Draft.chain(list(range(8)), [p] * 8) for i in range(batch)}
    rows = [BatchRow(rid, "default", np.arange(5), 3, [1], 8) for rid in drafts]
    kept = service._trim(rows, drafts)
    lengths = sorted(len(d) for d in kept.values())
    # brute force: the same depth for all (symmetric), plus some requests one deeper
    best, best_total = -1.0, 0
    for total in range(0, 8 * batch + 1):
        depth, extra = divmod(total, batch)
        gain = batch * sum(p ** j for j in range(1, depth + 1)) + extra * (p ** (depth + 1) if depth < 8 else 0)
        rate = (batch + gain) / (STEP_S[0] + STEP_S[1] * (batch + total))
        if rate > best + 1e-12:
            best, best_total = rate, total
    assert sum(lengths) == best_total
    assert lengths[-1] - lengths[0] <= 1


def test_a_larger_batch_gets_shorter_drafts():
    service, _ = make_service()
    service.costs = _costs()
    per_request = []
    for batch in (1, 16):
        drafts = {f"r{i}": Draft.chain(list(range(8)), [0.8] * 8) for i in range(batch)}
        rows = [BatchRow(rid, "default", np.arange(5), 3, [1], 8) for rid in drafts]
        kept = service._trim(rows, drafts)
        per_request.append(np.mean([len(d) for d in kept.values()]))
    assert per_request[0] > per_request[1]


class _Sched:
    finished_req_ids = {"gone"}
    total_num_scheduled_tokens = 7


class _Params:
    def __init__(self, extra):
        self.extra_args = extra


class _State:
    def __init__(self, extra):
        self.sampling_params = _Params(extra)


class _Batch:
    req_ids = ["a", "b"]
    num_prompt_tokens = np.array([3, 2])


class FakeRunner:
    input_batch = _Batch()
    requests = {"a": _State({"adaspec_namespace": "team"}), "b": _State(None)}

    def propose_draft_token_ids(self, scheduler_output, sampled, num, table):
        return read_batch(sampled, num, table, room=4, max_model_len=7)


def test_the_runner_reader_reads_ids_namespaces_and_room_from_the_calling_runner():
    table = np.arange(20).reshape(2, 10)
    view = FakeRunner().propose_draft_token_ids(_Sched(), [[5], [6, 7]], np.array([4, 5]), table)
    assert view.finished == {"gone"} and view.step_tokens == 7
    a, b = view.rows
    assert (a.request_id, a.namespace, a.prompt_len, list(a.tokens), a.sampled, a.room) == \
        ("a", "team", 3, [0, 1, 2, 3], [5], 2)
    assert (b.request_id, b.namespace, list(b.tokens), b.room) == ("b", "default", [10, 11, 12, 13, 14], 1)


def test_the_runner_reader_refuses_a_caller_that_is_not_the_runner():
    with pytest.raises(RunnerLayoutError, match="not supported"):
        read_batch([[1]], np.array([1]), np.zeros((1, 4)), 4, 100)


def test_the_learned_state_is_saved_while_serving_once_requests_finish(tmp_path):
    from adaspec.vllm.service import SNAPSHOT_EVERY_S

    service, clock = make_service(tmp_path)
    serve(service, clock, [("a", "default", text(7, 20), text(8))])
    assert not (tmp_path / "suffix.state").exists()  # too soon after the start
    clock.t += SNAPSHOT_EVERY_S
    service.step(BatchView([], set(), 0))
    assert (tmp_path / "suffix.state").is_file()
    saved = (tmp_path / "suffix.state").stat().st_mtime_ns
    clock.t += SNAPSHOT_EVERY_S
    service.step(BatchView([], set(), 0))  # nothing finished since: nothing written
    assert (tmp_path / "suffix.state").stat().st_mtime_ns == saved
