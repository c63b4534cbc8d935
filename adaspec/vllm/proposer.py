"""The class vLLM loads: ``speculative_config={"method": "custom_class", "model": PROPOSER_CLASS, ...}``."""

from __future__ import annotations

import atexit
import logging
import os

from . import STATE_DIR_ENV
from .runner import read_batch
from .service import SpeculationService

log = logging.getLogger(__name__)


class AdaspecProposer:
    """adaspec's suffix speculator and prompt lookup under the confidence-aware controller, as a vLLM proposer.

    ``num_speculative_tokens`` is the most draft tokens a request gets in one step; the controller picks each
    request's length below it every step. Learned state is kept in ``$ADASPEC_VLLM_STATE`` when it is set.
    """

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.room = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        state_dir = os.environ.get(STATE_DIR_ENV) or None
        self.service = SpeculationService.default(self.room, state_dir)
        if state_dir:
            log.info("adaspec: learned state in %s", state_dir)
        atexit.register(self.service.close)

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        view = read_batch(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, self.room, self.max_model_len)
        return self.service.step(view)

    def load_model(self, *args, **kwargs) -> None:
        """Nothing to load: the speculators are model-free."""
