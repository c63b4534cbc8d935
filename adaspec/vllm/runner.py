"""The one place that reads vLLM's model runner, which the proposer interface does not pass.

vLLM calls a ``custom_class`` proposer with the sampled tokens and the token table only; request ids,
prompt lengths, per-request ``extra_args`` and finished requests live on the runner that makes the call
(``GPUModelRunner.propose_draft_token_ids``: its ``self`` and ``scheduler_output``). ``read_batch`` finds
that frame and reads them; ``check_layout`` is what tests run to fail loudly when a vLLM upgrade moves them.
"""

from __future__ import annotations

import sys
from typing import Sequence

from . import NAMESPACE_FIELD
from .service import BatchRow, BatchView

CALLER = "propose_draft_token_ids"
"""The runner method that calls ``propose``."""

SUPPORTED = "0.32.0"
"""The vLLM version these attribute names were read from (the ``vllm`` extra pins it)."""


class RunnerLayoutError(RuntimeError):
    """vLLM's runner is not laid out as this module expects (another vLLM version)."""


def _caller(max_depth: int = 8):
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            break
        if frame.f_code.co_name == CALLER and "self" in frame.f_locals:
            return frame.f_locals["self"], frame.f_locals.get("scheduler_output")
        frame = frame.f_back
    raise RunnerLayoutError(f"adaspec's vLLM proposer was not called from vLLM's {CALLER}; "
                            f"this vLLM version is not supported (adaspec[vllm] pins {SUPPORTED})")


def read_batch(sampled: Sequence[Sequence[int]], num_tokens, token_ids, room: int, max_model_len: int) -> BatchView:
    """The batch of the step that just ran, one row per entry of ``sampled`` (vLLM's row order)."""
    runner, sched = _caller()
    try:
        batch = runner.input_batch
        req_ids = batch.req_ids
        prompt_lens = batch.num_prompt_tokens
        states = runner.requests
        finished = set(sched.finished_req_ids) if sched is not None else set()
        step_tokens = int(sched.total_num_scheduled_tokens) if sched is not None else 0
    except AttributeError as e:
        raise RunnerLayoutError(f"vLLM's runner has no {e.name!r}; this vLLM version is not supported "
                                f"(adaspec[vllm] pins {SUPPORTED})") from None
    rows = []
    for i, new in enumerate(sampled):
        rid = req_ids[i]
        n = int(num_tokens[i])
        params = getattr(states.get(rid), "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        rows.append(BatchRow(rid, str(extra.get(NAMESPACE_FIELD) or "default"), token_ids[i, :n], int(prompt_lens[i]),
                             list(new), max(0, min(room, max_model_len - n - 1))))
    return BatchView(rows, finished, step_tokens)


def check_layout() -> list[str]:
    """What this module reads that the installed vLLM lacks ([] = all present). Needs vLLM, not a model."""
    import dataclasses
    import inspect

    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    missing = []
    method = getattr(GPUModelRunner, CALLER, None)
    if method is None:
        missing.append(f"GPUModelRunner.{CALLER}")
    else:
        params = inspect.signature(method).parameters
        if "scheduler_output" not in params:
            missing.append(f"GPUModelRunner.{CALLER}(scheduler_output)")
        if "self.drafter).propose(" not in inspect.getsource(method).replace("cast(Any, ", ""):
            missing.append(f"GPUModelRunner.{CALLER} calls drafter.propose")
    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    missing += [f"SchedulerOutput.{a}" for a in ("finished_req_ids", "total_num_scheduled_tokens") if a not in fields]
    fields = {f.name for f in dataclasses.fields(CachedRequestState)}
    missing += [f"CachedRequestState.{a}" for a in ("sampling_params",) if a not in fields]
    init = inspect.getsource(InputBatch.__init__)
    missing += [f"InputBatch.{a}" for a in ("num_prompt_tokens", "_req_ids", "token_ids_cpu", "num_tokens_no_spec")
                if f"self.{a}" not in init]
    if not hasattr(InputBatch, "req_ids"):
        missing.append("InputBatch.req_ids")
    return missing
