"""Standard two-model speculative decoding: a smaller causal LM with the same tokenizer drafts a chain.

The draft model keeps its own KV cache per request, synchronised with the request's tokens before each proposal
(rejected draft tokens roll back for free). Greedy drafting gives argmax tokens; sampled drafting returns the draft
distribution so the verifier can accept with min(1, p/q). Details on :class:`DraftModelSpeculator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .base import DecodeContext, Draft, SpeculatorBase, StepOutcome


@dataclass
class DraftModelConfig:
    """How the draft model proposes."""

    max_depth: int = 8
    """Longest chain (the budget may cut it shorter)."""
    min_prob: float = 0.0
    """Stop once the chain's cumulative draft probability falls below this (greedy mode)."""
    sample: bool = False
    """Sample draft tokens from q and return q in ``Draft.dist`` (for sampled requests); else greedy."""
    temperature: float = 1.0
    """Temperature of q when sampling."""
    seed: int = 0
    """Seed of the sampling generator."""


@dataclass
class _Seq:
    cache: Any
    tokens: list[int] = field(default_factory=list)  # what the cache has committed


class DraftModelSpeculator(SpeculatorBase):
    """Any model with the target protocol (``new_cache``/``prefill``/``forward``) as a chain drafter.

    The draft model keeps its own KV cache per request. Before each proposal the
    cache is synchronised with the request's tokens: the longest common prefix of
    what the cache holds and ``ctx.tokens`` stays, the rest is truncated (rejected
    draft tokens roll back for free), and the missing tokens (the accepted ones
    and the pending token) are run and committed. Worked example, cache holds
    ``[p0 p1 p2 | d1 d2 d3]`` (prompt, then last step's draft), the target accepted
    ``d1`` and emitted ``y``: ``ctx.tokens = [p0 p1 p2 d1 y]``, so the cache is cut
    to 4 positions and ``[y]`` is run.

    Greedy drafting (``sample=False``) proposes argmax tokens with their draft
    probabilities as confidences and no ``Draft.dist``: greedy verification
    needs none, and sampled verification treats the tokens as one-hot proposals,
    which is lossless for any draft. Sampled drafting (``sample=True``) draws each
    token from the draft distribution ``q`` and returns ``q`` in ``Draft.dist``
    ([n, vocab]) so the verifier accepts with min(1, p/q) (Leviathan et al. 2023).
    A draft token must be sampled from ``q`` for that rule to be lossless, which is
    why a greedy draft never carries ``dist``.
    """

    name = "draft_model"

    def __init__(self, draft: Any, config: DraftModelConfig | None = None, target_vocab_size: int | None = None,
                 name: str | None = None):
        self.draft = draft
        self.config = config or DraftModelConfig()
        if self.config.sample and self.config.temperature <= 0:
            raise ValueError("sampling needs a positive temperature")
        self.vocab_size = int(draft.vocab_size)
        self.target_vocab_size = self.vocab_size if target_vocab_size is None else int(target_vocab_size)
        if self.target_vocab_size < self.vocab_size:
            raise ValueError(f"the draft vocabulary ({self.vocab_size}) is larger than the target's "
                             f"({self.target_vocab_size}): they cannot share a tokenizer")
        if name:
            self.name = name
        self._seqs: dict[str, _Seq] = {}
        self._gen = torch.Generator().manual_seed(self.config.seed)

    # -- per-request cache -------------------------------------------------------------------

    def _sync(self, ctx: DecodeContext) -> torch.Tensor:
        """Make the cache hold ``ctx.tokens``; returns the draft's logits for the next token [vocab]."""
        seq = self._seqs.get(ctx.request_id)
        if seq is None:
            seq = self._seqs[ctx.request_id] = _Seq(self.draft.new_cache())
        want = ctx.tokens
        common = 0
        limit = min(len(seq.tokens), len(want) - 1)  # always re-run at least the last token for its logits
        while common < limit and seq.tokens[common] == want[common]:
            common += 1
        seq.cache.truncate(common)
        out = self.draft.prefill(seq.cache, want[common:])
        seq.tokens = list(want)
        return out.logits[-1]

    def _step(self, ctx: DecodeContext, token: int) -> torch.Tensor:
        seq = self._seqs[ctx.request_id]
        out = self.draft.forward(seq.cache, [token])
        seq.cache.commit([0])
        seq.tokens.append(token)
        return out.logits[-1]

    # -- speculator hooks --------------------------------------------------------------------

    def begin(self, ctx: DecodeContext) -> None:
        self._seqs.pop(ctx.request_id, None)

    @torch.inference_mode()
    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        cfg = self.config
        n = min(budget, cfg.max_depth, self.draft.max_context - len(ctx.tokens) - 1)
        if n <= 0:
            return Draft.empty(self.name)
        logits = self._sync(ctx).float()
        tokens: list[int] = []
        probs: list[float] = []
        dists: list[torch.Tensor] = []
        path = 1.0
        for i in range(n):
            if cfg.sample:
                q = torch.softmax(logits / cfg.temperature, dim=-1)  # [vocab]
                tok = int(torch.multinomial(q, 1, generator=self._gen))
                dists.append(q)
            else:
                q = torch.softmax(logits, dim=-1)
                tok = int(q.argmax())
            p = float(q[tok])
            if not cfg.sample and path * p < cfg.min_prob and tokens:
                break
            path *= p
            tokens.append(tok)
            probs.append(p)
            if i + 1 < n:
                logits = self._step(ctx, tok).float()
        dist = None
        if cfg.sample:
            dist = torch.stack(dists[: len(tokens)])  # [n, vocab]
            if self.target_vocab_size > self.vocab_size:  # tokens the draft cannot produce get q = 0
                dist = torch.nn.functional.pad(dist, (0, self.target_vocab_size - self.vocab_size))
        return Draft(np.asarray(tokens, dtype=np.int64), np.arange(-1, len(tokens) - 1, dtype=np.int64),
                     np.asarray(probs, dtype=np.float64), self.name, 0, dist)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        pass  # the next proposal's sync rolls the cache back to the accepted prefix

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        self._seqs.pop(ctx.request_id, None)
