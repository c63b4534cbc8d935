"""Rollouts for reinforcement learning: groups of seeded samples per prompt, with the policy's log-probabilities.

:class:`Rollouts` runs every sample of every prompt through one :class:`~adaspec.engine.Engine` with continuous
batching (up to ``max_batch`` requests verified by one forward, a new sample joining as soon as another ends), with
whatever speculators and controller the engine has. Each sample is seeded on its own (:func:`sample_seed`), and a
seeded request's output does not depend on the batch, on speculation or on what the speculators learned, so a
rollout is a function of the weights, the prompt, the sampling settings and the seed only (on the torch backend bit
for bit).

Log-probabilities. ``Sample.logprobs[t]`` is ``log_softmax(z_t)[tokens[t]]``, where ``z_t`` is the float32 logit
row the target computed for that position while generating: the raw logits, before temperature, top-p or top-k
(so it is the log-probability of the policy at temperature 1, what GRPO and PPO ratios take, not of the tempered
distribution the token was drawn from). The engine records them as it verifies (``SamplingParams.logprobs``): the
row a token was drawn from, the first token's from the prompt's prefill and the others' from the verifying
forwards. On the torch backend every verified row is computed exactly as in a one-token forward, so they equal a
plain forward's of the same tokens bit for bit, and they cost one ``log_softmax`` per emitted token.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from dataclasses import dataclass, field, replace
from numbers import Integral
from typing import Mapping, Sequence, Union

import torch

from .engine import Engine, PrefilledPrompt, Request, RequestStats
from .verify import SamplingParams

__all__ = ["Prompt", "Rollouts", "Sample", "merge_lora", "prompt_seed", "sample_seed"]

Prompt = Union[Sequence[int], str, Sequence[dict]]
"""Token ids, a user message (``str``), or a list of chat messages (``{"role", "content"}``); text needs a
tokenizer with a chat template on the engine."""


def _mix(*parts: int) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") >> 1  # 63 bits: a valid torch seed


def prompt_seed(seed: int, i: int) -> int:
    """The seed of prompt ``i`` in a call with an integer ``seed`` (BLAKE2b of the pair, 63 bits)."""
    return _mix(seed, i)


def sample_seed(prompt_seed: int, j: int) -> int:
    """The seed of sample ``j`` of a prompt whose seed is ``prompt_seed`` (BLAKE2b of the pair, 63 bits)."""
    return _mix(prompt_seed, j)


@dataclass
class Sample:
    """One sampled continuation of a prompt.

    ``tokens`` are the generated tokens without the end-of-sequence token (as ``Engine.generate`` returns them);
    when the sample ended on one (``finish_reason == "stop"``), ``stop_token`` is that token and ``stop_logprob``
    its log-probability. ``response_tokens`` and ``response_logprobs`` append them, which is what a policy loss
    usually scores.
    """

    tokens: list[int]
    logprobs: torch.Tensor  # [len(tokens)] float32: log_softmax of the raw logits at each chosen token
    finish_reason: str  # "stop" (end-of-sequence token) | "length" (max_tokens or the context)
    seed: int  # the request's sampling seed
    text: str | None = None  # decoded ``tokens`` when the engine has a tokenizer
    stop_token: int | None = None
    stop_logprob: float | None = None
    stats: RequestStats | None = field(default=None, repr=False)

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens + ([] if self.stop_token is None else [self.stop_token])

    @property
    def response_logprobs(self) -> torch.Tensor:
        if self.stop_logprob is None:
            return self.logprobs
        return torch.cat([self.logprobs, torch.tensor([self.stop_logprob], dtype=self.logprobs.dtype)])


@dataclass
class _Job:
    i: int  # prompt index
    j: int  # sample index within the prompt's group
    req: Request


class Rollouts:
    """Groups of samples per prompt through ``engine`` (see the module docstring).

    The engine must not serve anything else while ``generate`` runs (it is not thread safe); its speculators and
    controller learn from the rollouts as from any traffic, in ``namespace``. With ``share_prefill`` (default) a
    prompt of several samples is prefilled once and each sample starts from a copy of its KV cache
    (``Engine.prefill_prompt``/``start_from``, where the backend's caches can be copied): the same tokens, bit for
    bit, for 1/n of the prefill.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, namespace: str = "default", share_prefill: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.namespace = namespace
        self.share_prefill = share_prefill

    def generate(self, prompts: Sequence[Prompt], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_tokens: int = 256, seed: int | Sequence[int] | None = None,
                 max_batch: int | None = None) -> list[list[Sample]]:
        """``n`` samples of each prompt: element ``i`` of the result is prompt ``i``'s group, sample ``j`` first.

        ``seed``: an integer gives prompt ``i`` the seed ``prompt_seed(seed, i)``; a sequence gives each prompt its
        own (e.g. derived from its index in a data set, so the samples do not depend on how prompts are grouped
        into calls); ``None`` draws a random integer seed. Sample ``j`` of a prompt with seed ``s`` is sampled with
        ``sample_seed(s, j)`` (``Sample.seed``). The result does not depend on ``max_batch`` or on the order in
        which samples run (on the torch backend bit for bit, log-probabilities included). ``temperature`` 0
        decodes greedily (every sample of a group is then the same).
        ``ValueError`` for a prompt the model cannot take, before anything runs.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        limit = self.max_batch if max_batch is None else max_batch
        if limit < 1:
            raise ValueError(f"max_batch must be at least 1, got {limit}")
        base = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              logprobs=True)
        ids = [self._prompt_ids(p) for p in prompts]
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, Integral):
            seeds = [prompt_seed(int(seed), i) for i in range(len(ids))]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != len(ids):
                raise ValueError(f"{len(seeds)} seeds for {len(ids)} prompts")
        model = self.engine.model
        for i, p in enumerate(ids):  # what ``Engine.begin`` refuses, refused before any request starts
            if not p or len(p) >= model.max_context or not all(0 <= t < model.vocab_size for t in p):
                raise ValueError(f"prompt {i} is empty, does not fit the context of {model.max_context}, or holds "
                                 f"a token id outside the vocabulary of {model.vocab_size}")
        waiting = deque((i, j) for i in range(len(ids)) for j in range(n))
        results: list[list[Sample | None]] = [[None] * n for _ in ids]
        running: list[_Job] = []
        shared: dict[int, PrefilledPrompt | None] = {}  # prompt -> its prefill, while samples of it wait
        left = [n] * len(ids)
        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    i, j = waiting.popleft()
                    params = replace(base, seed=sample_seed(seeds[i], j))
                    if i not in shared:
                        shared[i] = self.engine.prefill_prompt(ids[i]) if n > 1 and self.share_prefill else None
                    pre = shared[i]
                    left[i] -= 1
                    if not left[i]:
                        del shared[i]
                    if pre is not None:
                        req = self.engine.start_from(pre, params, namespace=self.namespace)
                    else:
                        req = self.engine.begin(ids[i], params, namespace=self.namespace)
                        while req.prefilling:
                            self.engine.prefill_step(req)
                    running.append(_Job(i, j, req))
                live = [job for job in running if not job.req.finished]
                if live:
                    for job, out in zip(live, self.engine.step_batch([job.req for job in live])):
                        if isinstance(out, BaseException):
                            raise out
                done = [job for job in running if job.req.finished]
                running = [job for job in running if not job.req.finished]
                for job in done:
                    self.engine.finish(job.req)
                for job in done:
                    results[job.i][job.j] = self._sample(job)
        finally:
            for job in running:
                self.engine.finish(job.req, cancelled=True)
        return [list(group) for group in results]  # type: ignore[arg-type]

    # -- helpers -------------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict)):
            tok = self.engine.tokenizer
            if tok is None or not hasattr(tok, "apply_chat_template"):
                raise ValueError("text prompts need an engine with a tokenizer that has a chat template")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return list(tok.apply_chat_template(messages))
        if isinstance(prompt, Integral):
            raise ValueError("prompts must be a list of prompts, each a list of token ids or a text")
        out = []
        for t in prompt:
            if isinstance(t, (list, tuple)):
                raise ValueError("each prompt must be a flat list of token ids")
            out.append(int(t))
        return out

    def _sample(self, job: _Job) -> Sample:
        """The finished job as a ``Sample``, with the log-probabilities the engine recorded."""
        req, ctx = job.req, job.req.ctx
        n = len(req.output)
        end = ctx.prompt_len + n
        stop = ctx.tokens[end] if req.finish_reason == "stop" and len(ctx.tokens) > end else None
        logprobs = torch.tensor(req.logprobs[: n + (stop is not None)], dtype=torch.float32)
        return Sample(tokens=list(req.output), logprobs=logprobs[:n].clone(),
                      finish_reason=req.finish_reason or "length", seed=int(req.params.seed),
                      text=req.text if self.engine.tokenizer is not None else None, stop_token=stop,
                      stop_logprob=None if stop is None else float(logprobs[n]), stats=req.stats)


_LORA_PREFIX = "base_model.model."  # PEFT's wrapper around a Hugging Face model


def merge_lora(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor],
               scale: float) -> dict[str, torch.Tensor]:
    """A full state dict for ``Engine.update_weights``: ``base`` with each LoRA pair merged into its weight,
    ``W + scale * B @ A``.

    ``adapters`` holds PEFT's names (``get_peft_model_state_dict``, or a PEFT model's ``state_dict()``):
    ``[base_model.model.]<module>.lora_A[.<adapter>].weight`` [r, in] and ``...lora_B...`` [out, r] for the
    weight ``<module>.weight`` of ``base``; other entries (a PEFT model's base weights) are ignored. ``scale``
    is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` for rsLoRA). Merge into the same ``base`` every step, not into
    the last merge: the product is computed in float64 and rounded once into the base weight's dtype, so a
    merge is a function of the base and the adapters only. ``ValueError`` listing every unpaired adapter, adapter
    without a base weight, or shape that does not fit; nothing is merged then.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in adapters.items():
        key = name[len(_LORA_PREFIX):] if name.startswith(_LORA_PREFIX) else name
        parts = key.split(".")
        side = next((i for i, p in enumerate(parts) if p in ("lora_A", "lora_B")), None)
        if side is None or parts[-1] != "weight":
            continue
        module = ".".join(parts[:side])
        pairs.setdefault(module, {})[parts[side][-1]] = t
    problems = []
    for module, ab in sorted(pairs.items()):
        w = base.get(f"{module}.weight")
        if set(ab) != {"A", "B"}:
            problems.append(f"{module} has lora_{next(iter(ab))} without its pair")
        elif w is None:
            problems.append(f"{module}.weight is not in the base state dict")
        elif ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["B"].shape[1] != ab["A"].shape[0] \
                or (ab["B"].shape[0], ab["A"].shape[1]) != tuple(w.shape):
            problems.append(f"{module}: lora_B {tuple(ab['B'].shape)} @ lora_A {tuple(ab['A'].shape)} does not "
                            f"fit the weight {tuple(w.shape)}")
    if not pairs:
        problems.append("no LoRA pairs (lora_A / lora_B weights) among the adapters")
    if problems:
        raise ValueError("cannot merge the LoRA adapters: " + "; ".join(problems))
    merged = dict(base)
    for module, ab in pairs.items():
        w = base[f"{module}.weight"]
        delta = ab["B"].detach().double().cpu() @ ab["A"].detach().double().cpu()
        merged[f"{module}.weight"] = (w.detach().double().cpu() + scale * delta).to(w.dtype)
    return merged
