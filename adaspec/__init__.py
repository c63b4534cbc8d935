"""adaspec: adaptive speculative decoding that gets faster as it learns from the traffic it serves."""

__version__ = "0.1.0"
