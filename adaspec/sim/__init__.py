"""Trace replay: the production engine on recorded greedy outputs and a virtual clock, without the model.

``replay``: the model stand-in (traces, ``ReplayTarget``, ``VirtualClock``, cost curves); ``simulate``: speed
projections of whole setups (``adaspec simulate``); ``speculator``: one speculator's acceptance and confidence.
"""

from .replay import (ChargedSpeculator, CostCurve, ReplayCache, ReplayTarget, Trace, VirtualClock,
                     compact_vocabulary, load_traces, save_traces)
from .simulate import SimEnv, SimResult, Setup, add_parser, default_setups, format_table, main, simulate

__all__ = ["Trace", "load_traces", "save_traces", "VirtualClock", "ReplayCache", "ReplayTarget", "CostCurve",
           "ChargedSpeculator", "SimEnv", "Setup", "compact_vocabulary", "default_setups", "simulate", "SimResult",
           "format_table", "add_parser", "main"]
