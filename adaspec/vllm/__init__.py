"""adaspec's speculators and controller inside vLLM (``pip install 'adaspec[vllm]'``).

vLLM loads :class:`adaspec.vllm.proposer.AdaspecProposer` as a ``custom_class`` speculative proposer;
``adaspec vllm-serve`` and ``adaspec vllm-export`` are the user's commands. Only ``proposer`` and
``runner`` import vLLM; the decisions live in ``service`` and run without it.
"""

STATE_DIR_ENV = "ADASPEC_VLLM_STATE"
"""Directory of the learned state (suffix index, controller); unset = learn in memory only."""

NAMESPACE_FIELD = "adaspec_namespace"
"""Key in a request's ``SamplingParams.extra_args`` (``vllm_xargs`` in the OpenAI API) naming its namespace."""

PROPOSER_CLASS = "adaspec.vllm.proposer.AdaspecProposer"
