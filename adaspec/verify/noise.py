"""The seeded Gumbel noise field behind seeded sampling, and the couplings drafts make with it.

Seeded sampling draws the token of output position ``t`` as ``argmax_x s(x) + G_t(x)``: ``s`` is the log of the
target distribution up to a constant (``logits / temperature``, or the log of the top-k / top-p distribution), and
``G_t(x)`` is Gumbel(0, 1) noise that depends on the request's seed, ``t`` and ``x`` only (the Gumbel-max trick: an
exact sample of the target distribution). A drafter that knows the seed can make its guess with the same noise,
``argmax_x log q(x) + G_t(x)`` for its own distribution ``q``: where ``q`` is close to the target the two argmaxes
agree with probability at least (1 - TV) / (1 + TV) (TV the total variation distance between them), far more often
than a fixed guess ``x`` is sampled (``p(x)``), and the output is still exactly the target's, whatever the draft.

The field, for one (seed, position) *key*: token ``x`` gets a uniform ``u(x)`` in (0, 1) from a 64-bit hash of the
key and ``x``, and ``G(x) = -log(-log u(x))``. Hashing the whole vocabulary at every position would cost as much as
the rest of a step, so the field is built in two parts. Which tokens have ``u(x) > U_HIGH`` (one in 128, the *high*
set) is an independent Bernoulli draw per token, generated as a run of geometric gaps (a few hundred hashes for a
vocabulary of 150k); the value of ``u(x)`` is then uniform in (U_HIGH, 1) for a high token and in (0, U_HIGH) for any
other, from the token's own hash. Every token's ``u`` is so an independent uniform, and every token outside the high
set has ``G(x) <= G_HIGH``.

That bound makes the argmax cheap and still exact (:func:`gumbel_argmax`): with ``m = max s``, a token with
``s(x) < m - MARGIN`` that is not high scores below ``m - MARGIN + G_HIGH``; so the argmax over the candidates (the
tokens within ``MARGIN`` of the best, and the high ones) is the argmax over the vocabulary whenever it scores above
that, and otherwise (a chance of about exp(-exp(MARGIN - G_HIGH)), ~1e-10) the whole vocabulary is scored.
Worked example: at temperature 1 with a 49,152-token vocabulary, a confident position has a handful of tokens within
8 nats of the best and ~384 high tokens, so ~390 tokens are scored instead of 49,152.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["EXCEED", "U_HIGH", "G_HIGH", "MARGIN", "noise_key", "gumbel", "gumbel_keys", "high_tokens",
           "gumbel_argmax", "coupled_choice"]

EXCEED = 2.0 ** -7
"""Share of the vocabulary in a key's high set."""
U_HIGH = 1.0 - EXCEED
MARGIN = 8.0
"""Tokens within this many nats of the best are always scored."""

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's multipliers
_HIGH_STREAM = 0x5851F42D4C957F2D  # the gaps of the high set
_LOW_STREAM = 0x14057B7EF767814F  # u of tokens outside it
_TOP_STREAM = 0x2545F4914F6CDD1D  # u of tokens in it
_GAP_LOG = math.log1p(-EXCEED)
_U_GOLDEN, _U_MIX1, _U_MIX2 = (np.full(1, c, dtype=np.uint64) for c in (_GOLDEN, _MIX1, _MIX2))
_S30, _S27, _S31, _S11 = (np.full(1, c, dtype=np.uint64) for c in (30, 27, 31, 11))
_STREAMS = {s: np.full(1, s, dtype=np.uint64) for s in (_HIGH_STREAM, _LOW_STREAM, _TOP_STREAM)}


def _splitmix(x: int) -> int:
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * _MIX1) & _M64
    x = ((x ^ (x >> 27)) * _MIX2) & _M64
    return x ^ (x >> 31)


def noise_key(seed: int, position: int) -> int:
    """The 64-bit key of the noise at sequence ``position`` of a request seeded with ``seed``."""
    return _splitmix(_splitmix(int(seed) & _M64) ^ (int(position) & _M64))


def _hash(key: int | np.ndarray, stream: int, x: np.ndarray) -> np.ndarray:
    """[n] uint64 hashes of the integers ``x`` under ``key`` (one, or one per element): splitmix64's finaliser
    over key + stream + x * golden."""
    # Array arithmetic wraps modulo 2**64 without a warning (only numpy scalars check), so the key is added as an
    # array too: an errstate block around this costs more than the hash itself.
    if isinstance(key, np.ndarray):
        k = key.astype(np.uint64) + _STREAMS[stream]
    else:
        k = np.full(1, (int(key) + stream) & _M64, dtype=np.uint64)
    z = x.astype(np.uint64)
    z *= _U_GOLDEN
    z += k
    z ^= z >> _S30
    z *= _U_MIX1
    z ^= z >> _S27
    z *= _U_MIX2
    z ^= z >> _S31
    return z


def _open_unit(h: np.ndarray) -> np.ndarray:
    """Hashes -> float64 uniforms in the open interval (0, 1) (53 bits, centred in their cell)."""
    return ((h >> _S11).astype(np.float64) + 0.5) * 2.0 ** -53


def _gumbel_low(u: np.ndarray) -> np.ndarray:
    return -np.log(-np.log(u))


G_HIGH = float(_gumbel_low(np.array([U_HIGH]))[0])
"""The most noise a token outside the high set gets (about 4.85)."""
_G_BOUND = G_HIGH + 1e-9  # what the exactness check assumes, with room for the last bit of a logarithm


@lru_cache(maxsize=4096)
def high_tokens(key: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, g)``: the key's high tokens (``u > U_HIGH``, each token independently with probability ``EXCEED``,
    generated as geometric gaps between them), sorted, and their noise. Cached: the verifier and the drafters ask
    for the same keys."""
    out: list[np.ndarray] = []
    start, drawn = -1, 0
    chunk = int(vocab * EXCEED * 1.25) + 64
    while start < vocab - 1:
        v = _open_unit(_hash(key, _HIGH_STREAM, np.arange(drawn, drawn + chunk, dtype=np.int64)))
        gaps = np.floor(np.log(v) / _GAP_LOG).astype(np.int64) + 1  # [chunk] >= 1: geometric(EXCEED)
        pos = start + np.cumsum(gaps)
        out.append(pos[pos < vocab])
        start, drawn = int(pos[-1]), drawn + chunk
    ids = np.concatenate(out)
    # u = 1 - w with w in (0, EXCEED): log1p keeps the tail's precision
    g = -np.log(-np.log1p(-EXCEED * _open_unit(_hash(key, _TOP_STREAM, ids))))
    ids.flags.writeable = False
    g.flags.writeable = False
    return ids, g


def gumbel(key: int, tokens: np.ndarray, vocab: int) -> np.ndarray:
    """[n] float64 Gumbel noise ``G(x)`` of the key for each token id in ``tokens`` (any order, repeats allowed)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return gumbel_keys([key], np.zeros(len(tokens), dtype=np.int64), tokens, vocab)


def gumbel_keys(keys: list[int], which: np.ndarray, tokens: np.ndarray, vocab: int) -> np.ndarray:
    """[n] float64 noise of ``tokens[i]`` under ``keys[which[i]]``: several positions' noise in one pass (a
    draft's depths)."""
    highs = [high_tokens(k, vocab) for k in keys]
    if len(keys) == 1:
        ids, g_high, flat = highs[0][0], highs[0][1], tokens
    else:  # one sorted array over all keys: key i's tokens offset by i * vocab
        ids = np.concatenate([h[0] + i * vocab for i, h in enumerate(highs)])
        g_high = np.concatenate([h[1] for h in highs])
        flat = which * vocab + tokens
    at = np.minimum(np.searchsorted(ids, flat), max(len(ids) - 1, 0))
    is_high = ids[at] == flat if len(ids) else np.zeros(len(tokens), dtype=bool)
    g = np.empty(len(tokens), dtype=np.float64)
    g[is_high] = g_high[at[is_high]]
    low = ~is_high
    if low.any():
        key = np.asarray(keys, dtype=np.uint64)[which[low]] if len(keys) > 1 else keys[0]
        g[low] = _gumbel_low(U_HIGH * _open_unit(_hash(key, _LOW_STREAM, tokens[low])))
    return g


def gumbel_argmax(scores: torch.Tensor, key: int, scale: float = 1.0) -> int:
    """``argmax_x fl(s(x) + G(x))`` over the whole vocabulary, lowest id on a tie, where ``s = scores / scale`` in
    float64 (``scores``: [vocab] float32 or float64 on the CPU; -inf excludes a token); exact, and usually scoring
    only the candidates (module docstring)."""
    z = scores.numpy()
    vocab = len(z)
    top = z.max()
    if not np.isfinite(top):
        raise ValueError("scores have no finite maximum")
    edge = top - z.dtype.type(MARGIN * scale)  # in the scores' own precision
    near = np.flatnonzero(z >= edge)
    high, g_high = high_tokens(key, vocab)
    t_near = z[near].astype(np.float64) / scale + gumbel(key, near, vocab)
    t_high = z[high].astype(np.float64) / scale + g_high
    best = max(t_near.max(), t_high.max() if len(high) else -np.inf)
    # a token outside both sets has s < fl(edge / scale) and G <= G_HIGH
    if best > float(edge) / scale + _G_BOUND:
        return int(min(near[t_near == best].min(initial=vocab), high[t_high == best].min(initial=vocab)))
    everything = np.arange(vocab, dtype=np.int64)
    return int(np.argmax(z.astype(np.float64) / scale + gumbel(key, everything, vocab)))


def coupled_choice(tokens: np.ndarray, logq: np.ndarray, seed: int, position: int, vocab: int) -> int:
    """Index into ``tokens`` of a drafter's guess of position ``position``: ``argmax log q(x) + G(x)`` over its
    candidates, with the noise the seeded sampler will use there (module docstring)."""
    g = gumbel(noise_key(seed, position), tokens, vocab)
    return int(np.argmax(np.asarray(logq, dtype=np.float64) + g))
