"""Lossless verification: sampling parameters, greedy and speculative-sampling acceptance."""

from .accept import Verdict, verify, verify_chain_with_dist, verify_greedy, verify_seeded, verify_tree_sampled
from .sampling import SamplingParams, target_probs

__all__ = ["SamplingParams", "Verdict", "target_probs", "verify", "verify_greedy", "verify_tree_sampled",
           "verify_chain_with_dist", "verify_seeded"]
