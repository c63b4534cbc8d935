"""One speculation budget for a whole batch: which of the requests' draft nodes the batch's forward verifies.

In a batch every draft node lengthens everyone's step. Each request's controller has already chosen a draft
priced at the step's marginal cost (``CostModel.others``); :func:`trim_batch` then ranks the nodes of all those
drafts together by their calibrated probability of being accepted (a node's path probability: it counts only if
all its ancestors are accepted too) and keeps the best-first prefix with the highest expected tokens per second
of the whole step, under the measured time of a forward of that many rows. Each request emits one token without
any draft, so with a flat cost curve the batch drafts as a single request would, and where the curve is steep
(a big batch on a CPU) it drafts little or nothing. The engine's batched step and the vLLM proposer both use it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..speculators.base import Draft
from .adaptive import _subset, best_prefix
from .costs import CostModel

__all__ = ["forest", "trim_batch"]


def forest(drafts: Sequence[Draft]) -> Draft:
    """Several requests' drafts as one draft whose roots are each draft's roots (node order kept)."""
    tokens, parents, probs = [], [], []
    start = 0
    for d in drafts:
        tokens.append(d.tokens)
        parents.append(np.where(d.parents < 0, -1, d.parents + start))
        probs.append(d.probs)
        start += len(d)
    return Draft(np.concatenate(tokens), np.concatenate(parents), np.concatenate(probs), "batch")


def trim_batch(drafts: Sequence[Draft], costs: CostModel, sunk: float = 0.0) -> list[Draft]:
    """``drafts[i]`` is request i's draft (empty when it has none; every request of the step is listed, since
    each adds its pending token to the forward). Returns each draft cut to the nodes the batch keeps: an
    ancestor-closed subset, a prefix for a chain. ``sunk``: seconds already spent on the step (proposing)."""
    nodes = sum(len(d) for d in drafts)
    if nodes == 0 or not drafts:
        return [d if not len(d) else d.prefix(0) for d in drafts]
    base = len(drafts)
    step = costs.step_costs(base + nodes)  # step[n]: seconds of a forward of n rows
    shifted = step[base - 1:]  # shifted[1 + k]: the batch's pending tokens and k draft nodes
    all_nodes = forest(drafts)
    order, k, _, _ = best_prefix(all_nodes, shifted, shifted, sunk, base=float(base))
    keep = np.zeros(nodes, dtype=bool)
    keep[order[:k]] = True
    out, at = [], 0
    for d in drafts:
        mine = np.flatnonzero(keep[at:at + len(d)])
        out.append(d if len(mine) == len(d) else _subset(d, mine))
        at += len(d)
    return out
