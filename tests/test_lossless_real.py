"""Lossless on the real bundled model: speculative greedy output equals plain greedy output.

Batched and single-token forwards may round differently, so a divergence is
allowed only where the target's top-2 logits are within 1e-4 (checked).
"""

import pytest

from adaspec.control.base import FixedController
from adaspec.engine import Engine
from adaspec.verify import SamplingParams

from lossless import ScriptedSpeculator, assert_greedy_equivalent, chat_prompts, plain_outputs

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Write a haiku about the sea.",
    "How do I read a file line by line in Rust?",
    "List the planets of the solar system.",
    "What does HTTP status code 404 mean?",
    "Write a SQL query that counts rows in a table named users.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a coffee shop.",
    "How many minutes are there in a day?",
    "Write a JavaScript function that adds two numbers.",
    "What are the primary colors?",
    "Describe a cat to someone who has never seen one.",
    "Explain recursion to a five year old.",
    "What is the boiling point of water in Fahrenheit?",
]
MAX_TOKENS = 20
MODES = ["all", "none", ("mismatch", 1), ("mismatch", 2), ("mismatch", 3), "tree"]


@pytest.fixture(scope="module")
def target():
    from adaspec.model.loader import load_target

    return load_target(None)


@pytest.fixture(scope="module")
def prompts(target):
    return chat_prompts(target[1], PROMPTS)


@pytest.fixture(scope="module")
def plain(target, prompts):
    return plain_outputs(*target, prompts, MAX_TOKENS)


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_real_model_greedy_equals_plain(target, prompts, plain, mode):
    model, tok = target
    spec = ScriptedSpeculator(plain, mode, model.vocab_size)
    eng = Engine(model, tok, [spec], FixedController(4))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    divergences = 0
    accepted = 0
    for p in prompts:
        g = eng.generate(p, params)
        divergences += assert_greedy_equivalent(model, p, plain[tuple(p)], g.tokens) is not None
        accepted += g.stats.accepted
    assert divergences <= 2  # rounding ties are rare; more would mean a real bug
    if mode == "none":
        assert accepted == 0
    else:
        assert accepted > len(prompts)
