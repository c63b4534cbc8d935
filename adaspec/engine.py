"""The decode loop: propose -> verify -> commit/rollback -> observe -> control.

One ``Engine`` serves many requests; each ``Request`` owns its KV cache, its
random generator and its statistics, so a scheduler may interleave ``step``
calls of different requests freely. Plain decoding is the same loop with
empty drafts (no speculators, or a controller that proposes nothing).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .control.base import Controller, FixedController, StepFeedback, StepPlan
from .control.batch import trim_batch
from .control.costs import CostModel
from .control.guard import SpeculationGuard
from .model.base import ForwardOutput, KVCache, TargetModel
from .model.tokenizer import IncrementalDetokenizer
from .speculators.base import DecodeContext, Draft, Speculator, StepOutcome
from .stats import StepCounts
from .store import Persistent
from .verify import SamplingParams, verify

_ids = itertools.count()

PREFILL_CHUNK = 256
"""Prompt tokens per prefill forward. A prompt is cut at the same places whether its request runs alone or
beside others, so its prefill (and so its output) does not depend on the batch; a scheduler runs one chunk
between decode steps, which bounds how long a long prompt holds up the requests already running."""


@dataclass
class RequestStats(StepCounts):
    """One request's step counts, with what only the engine sees: per-position acceptance, per-step sizes, times."""

    prompt_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted[i] = steps whose draft was accepted past depth i
    drafted_per_pos: list[int] = field(default_factory=list)
    step_emitted: list[int] = field(default_factory=list)  # per step: tokens emitted (accepted + 1)
    step_drafted: list[int] = field(default_factory=list)  # per step: draft nodes verified
    prefill_s: float = 0.0
    forward_s: float = 0.0  # target forwards alone (after the prefill)
    wall_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def overhead_share(self) -> float:
        """Share of the decoding time (after the prefill) not spent in target forwards: proposing, control,
        acceptance, bookkeeping, detokenizing and stop strings."""
        t = self.wall_s - self.prefill_s
        return max(0.0, t - self.forward_s) / t if t > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first token (excludes prefill)."""
        t = self.wall_s - self.prefill_s
        return (self.output_tokens - 1) / t if t > 0 and self.output_tokens > 1 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chosen"] = dict(self.chosen)
        del d["step_emitted"], d["step_drafted"]
        d.update(mean_accepted=self.mean_accepted, acceptance_rate=self.acceptance_rate, tok_s=self.tok_s,
                 decode_tok_s=self.decode_tok_s, overhead_share=self.overhead_share)
        return d


@dataclass
class Request:
    """A request in flight. ``output`` excludes the prompt and any stop token."""

    id: str
    namespace: str
    params: SamplingParams
    ctx: DecodeContext
    cache: object
    generator: torch.Generator
    stats: RequestStats
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    text: str = ""  # decoded output, cut before a stop string once one is seen
    started: float = 0.0
    ended: bool = False
    detok: IncrementalDetokenizer | None = None  # decodes ``output`` a few tokens at a time
    settled: str = ""  # the text ``detok`` has emitted (complete characters; never changes once emitted)
    prefilled: int = 0  # prompt tokens in the KV cache so far
    logprobs: list[float] = field(default_factory=list)  # with params.logprobs: one per token verified, in order
    # (the output's tokens first; past them, an end-of-sequence token and tokens the output was cut before)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """The prompt is not all in the KV cache yet (no token emitted)."""
        return self.prefilled < self.ctx.prompt_len


@dataclass
class PrefilledPrompt:
    """A prompt prefilled once (``Engine.prefill_prompt``) for several requests to start from."""

    tokens: list[int]
    cache: KVCache  # never decoded into: each request gets a copy
    out: ForwardOutput  # the prompt's last row
    prefill_s: float


_NO_PLAN = StepPlan({})
_NO_DRAFT = Draft.empty()


@dataclass
class _Step:
    """One request's part of a batched step, between proposing and settling."""

    req: Request
    plan: StepPlan
    proposals: dict[str, Draft]
    spent: dict[str, float]
    draft: Draft  # what the forward verifies: the plan's draft, cut to the room left and to the batch's budget

    @property
    def rows(self) -> int:
        return 1 + len(self.draft)


@dataclass
class Generation:
    tokens: list[int]
    text: str
    finish_reason: str
    stats: RequestStats


class Engine:
    def __init__(self, model: TargetModel, tokenizer=None, speculators: Sequence[Speculator] = (),
                 controller: Controller | None = None, clock: Callable[[], float] = time.perf_counter):
        self.model = model
        self.tokenizer = tokenizer
        self.speculators = list(speculators)
        self.controller = controller if controller is not None else FixedController()
        self.clock = clock
        self.eos_ids: set[int] = set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.guard: SpeculationGuard | None = SpeculationGuard() if self.speculators else None
        """Measures whether speculating pays in batched steps and stops it where it does not (``control/guard.py``);
        None: batched steps always ask the controller."""
        self.on_close: list[Callable[[], None]] = []  # e.g. stop a speculator's learner thread
        self.state_files: list[tuple[Persistent, Path]] = []  # (component, its file): what ``snapshot`` saves
        self._closed = False

    @property
    def keeps_state(self) -> bool:
        """Whether ``snapshot`` saves anything (``system.build_engine`` was given a state directory)."""
        return bool(self.state_files)

    def snapshot(self) -> None:
        """Save every component's learned state to its file, each atomically."""
        for component, path in self.state_files:
            component.save(path)

    def close(self) -> None:
        """Save the learned state, then run the close hooks (idempotent)."""
        hooks, self.on_close = self.on_close, []
        if not self._closed:
            self._closed = True
            self.snapshot()
        for hook in hooks:
            hook()

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load new weights of the same architecture into the target without restarting (the torch backend:
        ``LlamaModel.update_weights``, which names the tensors it takes and checks them; ``ValueError`` for
        weights that do not fit, or a backend that takes no updates).

        Call it between steps, with no request in flight: a request begun before keeps the keys and values its
        prompt and output left under the old weights. The speculators keep what they learned (their drafts are
        verified against the new weights, so output stays exactly the new target's), and so does the controller:
        its calibration follows a change in acceptance by itself (``Calibrator``'s change detection), and the
        verify costs do not change with the weights' values.
        """
        update = getattr(self.model, "update_weights", None)
        if update is None:
            raise ValueError(f"the {getattr(self.model, 'backend', type(self.model).__name__)} backend takes no "
                             "weight updates; the torch backend does (--backend torch)")
        update(state_dict)

    # -- lifecycle -----------------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
              namespace: str = "default") -> Request:
        """Prefill the prompt and emit the first token."""
        req = self.begin(prompt_ids, params, request_id, namespace)
        while req.prefilling:
            self.prefill_step(req)
        return req

    def begin(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
              namespace: str = "default", _cache: KVCache | None = None) -> Request:
        """A request whose prompt is still to be prefilled (``prefill_step``, chunk by chunk); ``ValueError`` for a
        prompt the model cannot take."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.model.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.model.max_context}")
        bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.model.vocab_size}")
        gen = torch.Generator()
        gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        rid = request_id or f"req-{next(_ids)}"
        t0 = self.clock()
        ctx = DecodeContext(rid, namespace, prompt, len(prompt), temperature=params.temperature,
                            vocab=self.model.vocab_size)
        if not params.greedy:  # an unseeded request samples with a key of its own generator's seed
            ctx.seed = params.seed if params.seed is not None else gen.initial_seed() & ((1 << 63) - 1)
        req = Request(rid, namespace, params, ctx, self.model.new_cache() if _cache is None else _cache, gen,
                      RequestStats(prompt_tokens=len(prompt), forwards=1), started=t0)
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer)
        return req

    @torch.inference_mode()
    def prefill_step(self, req: Request) -> list[int]:
        """Prefill the next ``PREFILL_CHUNK`` prompt tokens; after the last chunk, emit the first token (returned)."""
        if not req.prefilling:
            return []
        ctx = req.ctx
        prompt = ctx.tokens
        part = prompt[req.prefilled : req.prefilled + PREFILL_CHUNK]
        out = self.model.prefill(req.cache, part)
        req.prefilled += len(part)
        if req.prefilling:
            return []
        return self._first_token(req, out)

    @torch.inference_mode()
    def prefill_prompt(self, prompt_ids: Sequence[int]) -> "PrefilledPrompt | None":
        """The prompt's KV cache and last row, computed once for several requests to start from (``start_from``:
        the samples of one prompt in a group); ``None`` where the backend's caches cannot be copied. Cut into the
        same chunks as ``prefill_step``, so a request started from it is bit for bit one that prefilled alone."""
        probe = self.model.new_cache()
        if not hasattr(probe, "fork"):
            return None
        req = self.begin(prompt_ids, SamplingParams(max_tokens=1), _cache=probe)
        t0 = self.clock()
        out = None
        while req.prefilling:
            part = req.ctx.tokens[req.prefilled : req.prefilled + PREFILL_CHUNK]
            out = self.model.prefill(req.cache, part)
            req.prefilled += len(part)
        return PrefilledPrompt(list(req.ctx.tokens), req.cache, out, self.clock() - t0)

    @torch.inference_mode()
    def start_from(self, pre: "PrefilledPrompt", params: SamplingParams, request_id: str | None = None,
                   namespace: str = "default") -> Request:
        """A request on ``pre``'s prompt, its KV cache a copy of ``pre``'s: only the first token is sampled (with
        the request's own generator), as ``start`` would after prefilling the prompt itself."""
        req = self.begin(pre.tokens, params, request_id, namespace, _cache=pre.cache.fork())
        req.prefilled = len(pre.tokens)
        self._first_token(req, pre.out)
        return req

    def _first_token(self, req: Request, out: ForwardOutput) -> list[int]:
        """After the prompt's last chunk: the first token from its last row, and the speculators' ``begin``."""
        ctx = req.ctx
        prompt = ctx.tokens
        first = verify(out.logits, Draft.empty(), req.params, req.generator, len(prompt), ctx.seed).emitted
        if req.params.logprobs:
            req.logprobs.extend(_logprobs(out.logits, [0], first))
        ctx.tokens = prompt + first
        ctx.hidden = _row(out, 0)
        req.stats.prefill_s = self.clock() - req.started
        added = self._emit(req, first)
        for s in self.speculators:
            s.begin(ctx)
        return added

    @torch.inference_mode()
    def step(self, req: Request) -> list[int]:
        """One speculative step; returns the tokens it added to ``req.output``."""
        added = self.step_batch([req])[0]
        if isinstance(added, BaseException):
            raise added
        return added

    @torch.inference_mode()
    def step_batch(self, reqs: Sequence[Request]) -> list[list[int] | Exception]:
        """One speculative step of each request, verified by one target forward over all of them.

        Per request: the controller plans, the speculators propose and the controller chooses, pricing a draft at
        what it adds to the whole step; then the drafts get one budget for the batch (``control/batch.py``), one
        forward verifies every request's pending token and kept draft, and each request verifies, commits and
        learns on its own. With two requests or more the speculation guard (``control/guard.py``) may have the
        step skip planning and proposing altogether (every request verifies its pending token alone; the
        speculators still learn), where it measured that speculating in batches of this size does not pay.
        The result for request i is the tokens the step added to its output, or the exception
        that stopped it (the other requests go on: a forward that fails for the batch is retried request by
        request). A request's tokens never depend on the batch: each row of the forward is computed as in a
        forward of that request alone on the row-exact backends, and acceptance uses the request's own
        generator (seeded sampling: its own seed and positions).
        """
        results: dict[int, list[int] | Exception] = {id(r): [] for r in reqs}
        live = [r for r in reqs if not r.finished and not r.prefilling]
        started = self.clock()
        speculate = self.guard is None or self.guard.allow(len(live))
        costs = getattr(self.controller, "costs", None)
        steps: list[_Step] = []
        if costs is not None:
            costs.others = len(live) - 1  # a draft is priced at what it adds to the batch's step
        try:
            for req in live:
                try:
                    steps.append(self._propose(req) if speculate else _Step(req, _NO_PLAN, {}, {}, _NO_DRAFT))
                except Exception as e:
                    results[id(req)] = e
        finally:
            if costs is not None:
                costs.others = 0
        if len(steps) > 1 and isinstance(costs, CostModel):
            kept = trim_batch([s.draft for s in steps], costs, sunk=sum(sum(s.spent.values()) for s in steps))
            for s, d in zip(steps, kept):
                s.draft = d
        if not steps:
            return [results[id(r)] for r in reqs]
        t = self.clock()
        outs = self._forward(steps)
        forward_s = self.clock() - t
        shared = len(steps) > 1
        if shared and isinstance(costs, CostModel) and all(isinstance(o, ForwardOutput) for o in outs):
            costs.observe_verify(sum(s.rows for s in steps), forward_s)
        emitted = 0
        for s, out in zip(steps, outs):
            try:
                if isinstance(out, Exception):
                    raise out
                results[id(s.req)] = self._settle(s, out, forward_s, shared)
                emitted += s.req.stats.step_emitted[-1]
            except Exception as e:
                results[id(s.req)] = e
        if self.guard is not None:
            self.guard.record(len(live), speculate, emitted, self.clock() - started)
        return [results[id(r)] for r in reqs]

    def _propose(self, req: Request) -> "_Step":
        ctx = req.ctx
        room = min(self.model.max_context - req.cache.length - 1, req.params.max_tokens - len(req.output) - 1)
        plan = self.controller.plan(ctx, [s.name for s in self.speculators])
        proposals: dict[str, Draft] = {}
        spent: dict[str, float] = {}
        for s in self.speculators:
            b = min(int(plan.budgets.get(s.name, 0)), room)
            if b > 0:
                t = self.clock()
                proposals[s.name] = s.propose(ctx, b)
                spent[s.name] = self.clock() - t
        if proposals:
            plan = self.controller.choose(ctx, plan, proposals, spent)
        return _Step(req, plan, proposals, spent, plan.draft.prefix(room))

    def _forward(self, steps: Sequence["_Step"]) -> list[ForwardOutput | Exception]:
        """The target forward of every step's pending token and draft: one batched forward when the backend has
        one, else (or when the batch fails) one forward per request, so a request that fails fails alone."""
        items = [(s.req.cache, [s.req.ctx.tokens[-1]] + s.draft.tokens.tolist(),
                  [-1] + (s.draft.parents + 1).tolist() if not s.draft.is_chain else None) for s in steps]
        batched = getattr(self.model, "forward_batch", None)
        if len(items) > 1 and batched is not None:
            try:
                return list(batched(items))
            except Exception:
                pass  # find out which request it was
        outs: list[ForwardOutput | Exception] = []
        for item in items:
            try:
                outs.append(self.model.forward(*item))
            except Exception as e:
                outs.append(e)
        return outs

    def _settle(self, s: "_Step", out: ForwardOutput, forward_s: float, shared: bool) -> list[int]:
        """Verify a step's draft against its rows of the forward, commit, emit, and let everyone learn."""
        req, draft, ctx = s.req, s.draft, s.req.ctx
        t = self.clock()
        verdict = verify(out.logits, draft, req.params, req.generator, len(ctx.tokens), ctx.seed)
        # commit the pending token and the accepted path; the rest is rolled back
        rows = [0] + [a + 1 for a in verdict.accepted]
        req.cache.commit(rows)
        if req.params.logprobs:
            req.logprobs.extend(_logprobs(out.logits, rows, verdict.emitted))
        verify_s = forward_s + self.clock() - t
        req.stats.forward_s += forward_s
        outcome = StepOutcome(draft, verdict.accepted, verdict.emitted,
                              None if out.hidden is None else out.hidden[rows])
        ctx.tokens.extend(verdict.emitted)
        ctx.hidden = _row(out, verdict.last_row)
        self._account(req.stats, draft, verdict.accepted, s.spent, verify_s)
        added = self._emit(req, verdict.emitted)
        for sp in self.speculators:
            sp.observe(ctx, outcome)
        self.controller.observe(StepFeedback(ctx, s.plan, s.proposals, s.spent, outcome, verify_s, shared))
        if req.cache.length + 1 >= self.model.max_context and not req.finished:
            req.finish_reason = "length"
        return added

    def finish(self, req: Request, cancelled: bool = False) -> None:
        """End the request (idempotent): speculators learn from it, stats are closed."""
        if req.ended:
            return
        req.ended = True
        if cancelled and not req.finished:
            req.finish_reason = "cancelled"
        req.stats.wall_s = self.clock() - req.started
        if req.prefilling:  # the speculators never saw it
            return
        for s in self.speculators:
            s.end(req.ctx, not cancelled)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                 namespace: str = "default") -> Generation:
        req = self.start(prompt_ids, params, request_id, namespace)
        while not req.finished:
            self.step(req)
        self.finish(req)
        return Generation(list(req.output), req.text, req.finish_reason or "stop", req.stats)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
               namespace: str = "default") -> Iterator[tuple[Request, list[int]]]:
        """Yields (request, new tokens) after the first token and after every step."""
        req = self.start(prompt_ids, params, request_id, namespace)
        try:
            yield req, list(req.output)
            while not req.finished:
                yield req, self.step(req)
        finally:
            self.finish(req, cancelled=not req.finished)

    # -- helpers -------------------------------------------------------------------------------

    def _emit(self, req: Request, tokens: list[int]) -> list[int]:
        """Append tokens to the output, applying EOS, max_tokens and stop strings."""
        added = []
        for t in tokens:
            if t in self.eos_ids and not req.params.ignore_eos:
                req.finish_reason = "stop"
                break
            req.output.append(t)
            added.append(t)
            if len(req.output) >= req.params.max_tokens:
                req.finish_reason = "length"
                break
        req.stats.output_tokens = len(req.output)
        if req.detok is not None:
            # only text that can hold a stop string not seen before is searched: one ending in the new text
            checked = len(req.settled)
            new, pending = req.detok.advance(req.output)
            req.settled += new
            req.text = req.settled + pending
            for s in req.params.stop:
                cut = req.text.find(s, max(0, checked - len(s) + 1))
                if cut >= 0:
                    req.text = req.text[:cut]
                    req.finish_reason = "stop"
        return added

    @staticmethod
    def _account(st: RequestStats, draft: Draft, accepted: list[int], spent: Mapping[str, float],
                 verify_s: float) -> None:
        st.count_step(draft.origin, len(draft), len(accepted), draft.score, sum(spent.values()), verify_s)
        st.step_emitted.append(len(accepted) + 1)
        st.step_drafted.append(len(draft))
        if not len(draft):
            return
        depth = int(draft.depths.max())
        for pos_list, upto in ((st.drafted_per_pos, depth), (st.accepted_per_pos, len(accepted))):
            while len(pos_list) < depth:
                pos_list.append(0)
            for i in range(upto):
                pos_list[i] += 1


def stable_text(req: Request) -> str:
    """Text safe to stream: holds back a tail that could still become a stop string or an unfinished character."""
    text = req.text
    if req.finished:
        return text
    hold = 0
    for s in req.params.stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return text[: len(text) - hold]


def _row(out: ForwardOutput, i: int) -> torch.Tensor | None:
    return None if out.hidden is None else out.hidden[i]


def _logprobs(logits: torch.Tensor, rows: Sequence[int], tokens: Sequence[int]) -> list[float]:
    """``log_softmax(logits[rows[k]])[tokens[k]]`` for each emitted token (float32, each row on its own)."""
    logp = torch.log_softmax(logits[list(rows[: len(tokens)])].float(), dim=-1)
    return logp.gather(1, torch.as_tensor(list(tokens), dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
