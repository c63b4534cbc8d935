"""The target-model protocol: token ids in, logits (and hidden states) out.

A model holds weights only; every sequence owns a ``KVCache``, whose ``commit`` keeps the accepted rows of the last
forward and discards the rest, so rollback is cheap and explicit (:class:`KVCache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


class KVCacheFull(RuntimeError):
    """The backend's KV memory cannot hold a forward's rows now (other sequences hold it); the same request may
    fit later. Servers answer it with 503 and a retry hint, not as an internal error."""


@dataclass(frozen=True)
class Capabilities:
    """What a target backend can do; the engine and the speculators read these instead of guessing."""

    trees: bool = True  # forward() takes a token tree (parents), not only a chain
    hidden_states: bool = True  # ForwardOutput.hidden is filled (draft heads need it)
    rows_exact: bool = True  # a k-row forward gives bit-identical rows to one-token forwards


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [n, vocab] float32, row i predicts the token after input i
    hidden: torch.Tensor | None  # [n, d] last hidden state (after the final norm), if available


class KVCache(Protocol):
    """One sequence's keys and values. The cache holds ``length`` committed positions. ``forward`` writes new tokens
    at ``length .. length + n - 1`` without committing them; ``cache.commit(keep)`` then keeps the listed rows of
    that forward (an accepted root-first path) as the next committed positions and discards the rest. Rejected
    positions are simply overwritten by the next forward, so rollback costs nothing for a linear draft and a small
    gather for a tree."""

    @property
    def length(self) -> int:
        """Committed positions."""
        ...

    def commit(self, keep: Sequence[int]) -> None:
        """Keep rows ``keep`` (a root-first path) of the last forward as the next committed positions."""

    def truncate(self, length: int) -> None:
        """Drop committed positions from ``length`` on."""


class TargetModel(Protocol):
    vocab_size: int
    hidden_size: int
    max_context: int
    device: torch.device
    capabilities: Capabilities

    def new_cache(self) -> KVCache:
        ...

    def prefill(self, cache: KVCache, tokens: Sequence[int]) -> ForwardOutput:
        """Run ``tokens`` after the cache and commit all of them; outputs for the last position only ([1, vocab])."""
        ...

    def forward(self, cache: KVCache, tokens: Sequence[int], parents: Sequence[int] | None = None) -> ForwardOutput:
        """Run ``tokens`` after the committed cache without committing.

        ``parents[i]`` is the index of token i's parent within ``tokens``, or -1 for
        a child of the last committed position; ``None`` means a chain. Token i
        attends to the committed cache and to its ancestors (and itself) only, at
        position ``cache.length + depth(i) - 1``.
        """
        ...
