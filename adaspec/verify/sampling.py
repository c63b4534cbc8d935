"""Sampling parameters and the target distribution they define.

The *target distribution* of a position is softmax(logits / temperature) restricted
to the top-k tokens and then to the smallest nucleus of mass >= top_p, renormalised.
Speculative sampling preserves exactly this distribution; greedy decoding
(temperature 0) takes its argmax and has a code path of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_TEMPERATURE = torch.finfo(torch.float32).max / torch.finfo(torch.float64).max
"""Smallest positive temperature the sampler computes with (about 1.9e-270): ``target_probs`` divides float32
logits by the temperature in float64, and below this a finite logit can overflow to infinity, which turns the
softmax into NaN. Temperatures this small already sample the argmax; 0 selects the greedy path."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    """Most tokens to generate (the stop token is not counted or returned)."""
    temperature: float = 0.0
    """0 means greedy decoding; otherwise logits are divided by it before softmax."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Seeded sampling: the same seed gives the same output, with or without speculation (Gumbel-max coupling,
    verify/accept.py). None: the engine draws a seed for the request (the same coupling, a different output each
    time)."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Strings that end generation; the returned text stops before the first one."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks use it for fixed lengths)."""
    logprobs: bool = False
    """Record every emitted token's log-probability, ``log_softmax`` of the raw logits (before temperature, top-p
    and top-k) of the row it was drawn from (``Request.logprobs``; RL rollouts take them)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be 0 or at least {MIN_TEMPERATURE:.3g}, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] logits -> [n, vocab] float64 probabilities of the target distribution (sampling only)."""
    if params.greedy:
        raise ValueError("greedy decoding has no sampling distribution; use the greedy verifier")
    x = logits.double() / params.temperature  # float64 keeps tiny residuals exact enough
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass before it is < top_p (so the most likely token is always kept)
        keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) < params.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
