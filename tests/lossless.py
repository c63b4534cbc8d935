"""Shared helpers for lossless checks: scripted proposers and greedy equivalence with a rounding allowance."""

from __future__ import annotations

import numpy as np
import torch

from adaspec.speculators.base import DecodeContext, Draft, SpeculatorBase

TOP2_TOLERANCE = 1e-4


class ScriptedSpeculator(SpeculatorBase):
    """Proposes the reference continuation (what plain decoding produced), corrupted as scripted.

    mode "all": the exact continuation; "none": every draft's first token wrong; ("mismatch", m): the
    first m tokens right, token m wrong; "tree": a tree whose first children are wrong siblings and whose
    correct chain sits deeper in the draft order, with a wrong sibling at every level.
    """

    def __init__(self, references: dict[tuple, list[int]], mode, vocab: int):
        super().__init__(name="scripted")
        self.references, self.mode, self.vocab = references, mode, vocab

    def _wrong(self, t: int) -> int:
        return (t + 1) % self.vocab

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        ref = self.references[tuple(ctx.tokens[: ctx.prompt_len])]
        nxt = ref[len(ctx.generated):][:budget]
        if not nxt:
            return Draft.empty(self.name)
        if self.mode == "all":
            return Draft.chain(nxt, source=self.name)
        if self.mode == "none":
            return Draft.chain([self._wrong(nxt[0])] + nxt[1:], source=self.name)
        if isinstance(self.mode, tuple):
            m = self.mode[1]
            toks = list(nxt)
            if m < len(toks):
                toks[m] = self._wrong(toks[m])
            return Draft.chain(toks, source=self.name)
        # tree: at each level a wrong sibling first, then the right token that continues the chain
        tokens, parents, parent = [], [], -1
        for t in nxt:
            if len(tokens) + 2 > budget:
                break
            tokens += [self._wrong(t), t]
            parents += [parent, parent]
            parent = len(tokens) - 1
        if not tokens:
            return Draft.empty(self.name)
        return Draft(np.array(tokens), np.array(parents), np.full(len(tokens), 0.5), self.name)


def chat_prompts(tok, texts: list[str]) -> list[list[int]]:
    """Each text as a one-message chat, through the model's chat template."""
    return [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


def plain_outputs(model, tok, prompts: list[list[int]], max_tokens: int) -> dict[tuple, list[int]]:
    """Plain greedy decoding of every prompt (``max_tokens`` each, past end of sequence), keyed by the prompt."""
    from adaspec.engine import Engine
    from adaspec.verify import SamplingParams

    eng = Engine(model, tok)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return {tuple(p): eng.generate(p, params).tokens for p in prompts}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_greedy_equivalent(model, prompt: list[int], plain: list[int], spec: list[int], ignore_eos: bool = True):
    """spec must equal plain, except a divergence where the target's top-2 logits are within TOP2_TOLERANCE.

    Returns the index of an allowed divergence (or None).
    """
    i = first_divergence(plain, spec)
    if i is None:
        return None
    assert i < min(len(plain), len(spec)), f"lengths differ without a token mismatch: {len(plain)} vs {len(spec)}"
    cache = model.new_cache()
    logits = model.prefill(cache, prompt + plain[:i]).logits[-1]
    top2 = torch.topk(logits.float(), 2).values
    gap = float(top2[0] - top2[1])
    assert gap < TOP2_TOLERANCE, f"greedy output diverged at token {i} where the top-2 gap is {gap:.2e}"
    return i
