"""Acceptance counts: how often draft nodes of one kind were accepted, read as a rate shrunk toward a prior.

Every confidence adaspec learns from verified drafts is this estimate, ``(hits + s * prior) / (tried + s)``
(the mean of a Beta posterior whose prior is worth ``s`` observations): prompt lookup per match length, the suffix
speculator's correction per (evidence level, probability bin), and the controller's calibrator per (depth,
confidence bin), which layers a hierarchical prior, monotone fitting and drift detection on top.
"""

from __future__ import annotations

import numpy as np


def shrunk_rate(hits, tried, prior, strength: float):
    """``(hits + strength * prior) / (tried + strength)``, element-wise: ``prior`` without evidence, the observed
    rate ``hits / tried`` once ``tried`` outweighs ``strength``."""
    return (hits + strength * prior) / (tried + strength)


class AcceptanceCounts:
    """Decayable counts of accepted (``hits``) and tried nodes per cell of an array of any shape.

    ``tried`` may count expectations instead of nodes (the suffix speculator adds each node's stated probability),
    which makes ``rate(1.0)`` a correction factor, observed over expected.
    """

    def __init__(self, shape: int | tuple[int, ...], strength: float):
        self.hits = np.zeros(shape)
        self.tried = np.zeros(shape)
        self.strength = strength

    def add(self, cells, hits, tried=1.0) -> None:
        """Count ``hits`` out of ``tried`` in ``cells`` (an index, or index arrays; repeated cells add up)."""
        np.add.at(self.hits, cells, hits)
        np.add.at(self.tried, cells, tried)

    def scale(self, factor: float, where=None) -> None:
        """Multiply the counts (all, or the cells ``where`` selects) by ``factor``: forgetting."""
        if where is None:
            self.hits *= factor
            self.tried *= factor
        else:
            self.hits[where] *= factor
            self.tried[where] *= factor

    def rate(self, prior, cells=slice(None)):
        """The shrunk acceptance rate of ``cells`` (default: all) toward ``prior`` (:func:`shrunk_rate`)."""
        return shrunk_rate(self.hits[cells], self.tried[cells], prior, self.strength)
