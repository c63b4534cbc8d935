"""The adaptive speculator learns from traffic on the real model: a second pass over the same family of
prompts gets clearly more tokens per target forward than the first."""

from adaspec.system import build_engine
from adaspec.verify import SamplingParams

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the factorial of a number.",
    "Write a Python function that checks whether a string is a palindrome.",
]


def test_second_pass_over_the_same_prompts_is_accepted_more():
    from adaspec.model.loader import load_target

    model, tok = load_target(None)
    eng = build_engine(model, tok, "suffix")
    params = SamplingParams(max_tokens=48)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]

    def mean_accepted() -> float:
        gens = [eng.generate(x, params) for x in ids]
        return sum(g.stats.output_tokens for g in gens) / sum(g.stats.forwards for g in gens)

    cold, warm = mean_accepted(), mean_accepted()
    eng.close()
    # the second pass repeats outputs the index has seen: most of each answer is drafted and accepted
    assert warm > cold + 1.0, (cold, warm)
