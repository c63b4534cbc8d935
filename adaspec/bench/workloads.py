"""Benchmark scenarios: deterministic streams of requests drawn from real data (:mod:`.corpus`).

Every scenario returns a list of ``WorkItem`` and takes a ``seed``: ``drift`` (phases of one domain each),
``steady`` (one domain), ``adversarial`` (random strings where speculation should switch off), ``multi_turn``
(turn by turn, see ``turn_messages``), ``rl_rollouts`` (groups of samples of the same prompts over several steps)
and ``code_editing`` (modify a real source file: the answer repeats much of the prompt).
"""

from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .corpus import STDLIB_MODULES, Corpus, HumanEvalTask, default_corpus, stdlib_functions

DRIFT_PHASES = ("python", "rust+c_cpp", "chat", "python")

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": ...}


@dataclass
class WorkItem:
    """One request of a workload (for ``multi_turn``: one whole conversation, see ``turn_messages``).

    Exactly one of ``messages`` (to be chat-templated) and ``prompt`` (raw text) is set.
    """

    id: str  # unique within the workload
    scenario: str
    domain: str  # one of DOMAINS
    phase: int  # 0-based phase index (drift phases; the step for rl_rollouts; else 0)
    phase_name: str
    source: str  # prompt origin: "sharegpt:<id>", "humaneval:<task>", "stdlib:<module>:<func>", "random:<kind>"
    messages: list[Message] | None = None  # the first request's chat messages
    prompt: str | None = None  # raw completion prompt, used instead of messages
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0  # sampling seed of this request
    group: str = ""  # items with the same group share a prompt (rl_rollouts) or a conversation (multi_turn)
    step: int = 0  # rl_rollouts: the training step
    sample: int = 0  # rl_rollouts: index within the group
    user_turns: list[str] = field(default_factory=list)  # multi_turn: the human turns, replayed in order

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"work item {self.id}: set exactly one of messages and prompt")

    @property
    def n_turns(self) -> int:
        return max(1, len(self.user_turns))

    def to_dict(self) -> dict:
        return asdict(self)


def turn_messages(item: WorkItem, answers: Sequence[str]) -> list[Message]:
    """Chat messages for turn ``len(answers)`` of a multi-turn item.

    ``answers`` are the model's own outputs of the earlier turns, so the replay
    follows what the served model said, not what ShareGPT's model said::

        turn_messages(item, [])            -> [user0]
        turn_messages(item, ["a0"])        -> [user0, assistant a0, user1]
    """
    turns = item.user_turns or [m["content"] for m in (item.messages or []) if m["role"] == "user"]
    k = len(answers)
    if k >= len(turns):
        raise ValueError(f"work item {item.id} has {len(turns)} turns; {k} answers leave no turn to ask")
    msgs: list[Message] = []
    for i in range(k):
        msgs += [{"role": "user", "content": turns[i]}, {"role": "assistant", "content": answers[i]}]
    return msgs + [{"role": "user", "content": turns[k]}]


@dataclass(frozen=True)
class PromptBudget:
    """Keeps prompts inside the model's context (2048 or 8192 tokens, less the answer)."""

    max_prompt_chars: int = 6000  # ~1500 tokens of English or code at ~4 characters per token
    count_tokens: Callable[[str], int] | None = None  # exact count, e.g. lambda s: len(tok.encode(s))
    max_prompt_tokens: int | None = None  # checked with count_tokens when both are given

    def fits(self, text: str) -> bool:
        if len(text) > self.max_prompt_chars:
            return False
        if self.count_tokens is not None and self.max_prompt_tokens is not None:
            return self.count_tokens(text) <= self.max_prompt_tokens
        return True


def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def _seed(rng: random.Random) -> int:
    return rng.randrange(2**31)


def _humaneval_message(task: HumanEvalTask) -> str:
    return f"Complete the following Python function.\n\n```python\n{task.prompt}```"


def _draw(corpus: Corpus, source: str, n: int, rng: random.Random, budget: PromptBudget, used: set[str],
          scenario: str, phase: int, max_tokens: int, temperature: float, raw: bool = False) -> list[WorkItem]:
    """``n`` items of one source (a domain, domains joined by "+", or "humaneval") not drawn before.

    ``raw`` (HumanEval only) gives completion prompts (the bare function head) instead of chat messages.
    """
    if raw and source != "humaneval":
        raise ValueError("raw prompts exist for the 'humaneval' source only")
    if source == "humaneval":
        pool = [(f"humaneval:{t.task_id}", "python", t.prompt if raw else _humaneval_message(t))
                for t in corpus.humaneval]
    else:
        pool = [(f"sharegpt:{c.id}", c.domain, c.prompt) for c in corpus.by_domain(source)]
    pool = [p for p in pool if p[0] not in used and budget.fits(p[2])]
    if len(pool) < n:
        raise ValueError(f"{scenario}: source {source!r} has {len(pool)} unused prompts within the budget, {n} wanted")
    items = []
    for src, domain, text in rng.sample(pool, n):
        used.add(src)
        items.append(WorkItem(f"{scenario}/{phase}/{len(items):04d}", scenario, domain, phase, source, src,
                              messages=None if raw else _user(text), prompt=text if raw else None,
                              max_tokens=max_tokens, temperature=temperature, seed=_seed(rng)))
    return items


def drift(n_per_phase: int = 20, phases: Sequence[str] = DRIFT_PHASES, *, seed: int = 0, max_tokens: int = 128,
          temperature: float = 0.0, budget: PromptBudget = PromptBudget(),
          corpus: Corpus | None = None) -> list[WorkItem]:
    """Phases of one source each, in order (default python -> rust/C/C++ -> chat -> python).

    A source is a domain, domains joined by "+", or "humaneval". No prompt is
    used twice, so a returning domain brings new prompts of the same kind.
    """
    corpus = corpus or default_corpus()
    rng, used = random.Random(f"drift:{seed}"), set()
    return [it for i, src in enumerate(phases)
            for it in _draw(corpus, src, n_per_phase, rng, budget, used, "drift", i, max_tokens, temperature)]


def steady(domain: str = "python", n: int = 40, *, seed: int = 0, max_tokens: int = 128, temperature: float = 0.0,
           budget: PromptBudget = PromptBudget(), corpus: Corpus | None = None, raw: bool = False) -> list[WorkItem]:
    """``n`` prompts of one source (a domain, "a+b", or "humaneval"); ``raw``: HumanEval as completion prompts."""
    return _draw(corpus or default_corpus(), domain, n, random.Random(f"steady:{seed}"), budget, set(), "steady", 0,
                 max_tokens, temperature, raw)


def _pseudo_word(rng: random.Random) -> str:
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    return "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(1, 3)))


def adversarial(n: int = 20, *, seed: int = 0, max_tokens: int = 128, temperature: float = 1.0,
                detokenize: Callable[[list[int]], str] | None = None, vocab_size: int = 0) -> list[WorkItem]:
    """Prompts whose answers nothing can predict; a good controller switches speculation off.

    Kinds, in rotation: random characters, pseudo-words, random numbers, and
    (when ``detokenize`` and ``vocab_size`` are given) random token ids. The
    prompt asks for *new* random material, not a copy, so the prompt itself is
    no draft source either. The default temperature is 1.0: greedy decoding of a
    small model falls into loops that speculation predicts well, which would
    defeat the purpose.
    """
    rng = random.Random(f"adversarial:{seed}")
    kinds = ["chars", "words", "numbers"] + (["tokens"] if detokenize is not None and vocab_size > 0 else [])
    alphabet = string.ascii_letters + string.digits + "!#$%&()*+-./:;<=>?@[]^_{|}~"
    items = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "chars":
            sample = "".join(rng.choice(alphabet) for _ in range(rng.randint(80, 200)))
            text = (f"Here is a random string:\n\n{sample}\n\n"
                    "Write 200 new random characters of the same kind. Do not repeat the string.")
        elif kind == "words":
            sample = " ".join(_pseudo_word(rng) for _ in range(rng.randint(20, 50)))
            text = f"Invent 60 new nonsense words like these, in random order, without repeating any:\n\n{sample}"
        elif kind == "numbers":
            sample = ", ".join(str(rng.randrange(1000)) for _ in range(rng.randint(20, 50)))
            text = f"Continue this list of random numbers between 0 and 999 with 80 more, with no pattern:\n\n{sample}"
        else:
            sample = detokenize([rng.randrange(vocab_size) for _ in range(rng.randint(20, 60))])  # type: ignore[misc]
            text = f"Continue this text:\n\n{sample}"
        items.append(WorkItem(f"adversarial/0/{i:04d}", "adversarial", "chat", 0, "adversarial", f"random:{kind}",
                              messages=_user(text), max_tokens=max_tokens, temperature=temperature, seed=_seed(rng)))
    return items


def multi_turn(n: int = 10, *, min_turns: int = 2, max_turns: int = 4, domain: str | None = None, seed: int = 0,
               max_tokens: int = 128, temperature: float = 0.0, budget: PromptBudget = PromptBudget(),
               corpus: Corpus | None = None) -> list[WorkItem]:
    """ShareGPT conversations replayed turn by turn with the model's own answers (``turn_messages``).

    Each item keeps up to ``max_turns`` human turns; the human turns together
    must fit the budget, so the prompt of the last turn is at most the budget
    plus the model's earlier answers (at most ``max_turns - 1`` x ``max_tokens``).
    """
    corpus = corpus or default_corpus()
    rng = random.Random(f"multi_turn:{seed}")
    pool = corpus.by_domain(domain) if domain else [c for c in corpus.conversations if c.opening]
    pool = [c for c in pool if len(c.user_turns) >= min_turns and budget.fits("\n".join(c.user_turns[:max_turns]))]
    if len(pool) < n:
        raise ValueError(f"multi_turn: {len(pool)} conversations with >= {min_turns} turns fit the budget, {n} wanted")
    items = []
    for i, c in enumerate(rng.sample(pool, n)):
        turns = list(c.user_turns[:max_turns])
        items.append(WorkItem(f"multi_turn/0/{i:04d}", "multi_turn", c.domain, 0, domain or "mixed", f"sharegpt:{c.id}",
                              messages=_user(turns[0]), max_tokens=max_tokens, temperature=temperature,
                              seed=_seed(rng), group=c.id, user_turns=turns))
    return items


def rl_rollouts(n_prompts: int = 8, group_size: int = 4, steps: int = 3, *, source: str = "humaneval", seed: int = 0,
                max_tokens: int = 128, temperature: float = 1.0, budget: PromptBudget = PromptBudget(),
                corpus: Corpus | None = None) -> list[WorkItem]:
    """RL-style rollouts: every step samples ``group_size`` answers to each of the same ``n_prompts``.

    Items are ordered step by step, prompt by prompt; the phase is the step.
    Every (step, prompt, sample) gets its own sampling seed.
    """
    corpus = corpus or default_corpus()
    rng = random.Random(f"rl_rollouts:{seed}")
    prompts = _draw(corpus, source, n_prompts, rng, budget, set(), "rl_rollouts", 0, max_tokens, temperature)
    items = []
    for s in range(steps):
        for p, base in enumerate(prompts):
            for g in range(group_size):
                items.append(WorkItem(f"rl_rollouts/{s}/{p:03d}/{g:02d}", "rl_rollouts", base.domain, s, f"step{s}",
                                      base.source, messages=base.messages, max_tokens=max_tokens,
                                      temperature=temperature, seed=_seed(rng), group=f"p{p:03d}", step=s, sample=g))
    return items


_EDITS = (
    "Add type hints to every parameter and to the return value. Reply with the complete modified function.",
    "Rename the variable `{var}` to `{var}_value` everywhere in this function. "
    "Reply with the complete modified function.",
    "Add a short comment above each loop and each `if` statement explaining what it does. "
    "Reply with the complete modified function.",
    "Add `logger.debug(...)` calls at the start of the function and before every `return`, "
    "assuming a module-level `logger`. Reply with the complete modified function.",
    "Rewrite the docstring in Google style (Args, Returns, Raises), or add one if there is none. "
    "Keep the code unchanged and reply with the complete modified function.",
)


def code_editing(n: int = 20, *, seed: int = 0, max_tokens: int = 256, temperature: float = 0.0,
                 budget: PromptBudget = PromptBudget(), min_lines: int = 40, max_lines: int = 120,
                 modules: Sequence[str] = STDLIB_MODULES) -> list[WorkItem]:
    """Modify a real stdlib function (type hints, a rename, comments, logging, docstring).

    The answer repeats most of the function, which is where prompt lookup and
    suffix speculation shine.
    """
    rng = random.Random(f"code_editing:{seed}")
    pool = []
    for f in stdlib_functions(min_lines, max_lines, tuple(modules)):
        text = (f"Here is a function from the Python standard library module `{f.module}`:\n\n"
                f"```python\n{f.source}```\n\n")
        if budget.fits(text + max(_EDITS, key=len)):
            pool.append((f, text))
    if len(pool) < n:
        raise ValueError(f"code_editing: {len(pool)} stdlib functions fit the budget, {n} wanted")
    items = []
    for i, (f, text) in enumerate(rng.sample(pool, n)):
        edits = [e for e in _EDITS if "{var}" not in e or f.variables]
        edit = rng.choice(edits).format(var=rng.choice(f.variables) if f.variables else "")
        items.append(WorkItem(f"code_editing/0/{i:04d}", "code_editing", "python", 0, "code_editing",
                              f"stdlib:{f.module}:{f.qualname}", messages=_user(text + edit), max_tokens=max_tokens,
                              temperature=temperature, seed=_seed(rng)))
    return items


SCENARIOS: dict[str, Callable[..., list[WorkItem]]] = {
    "drift": drift, "steady": steady, "adversarial": adversarial, "multi_turn": multi_turn,
    "rl_rollouts": rl_rollouts, "code_editing": code_editing,
}


def build(scenario: str, **kwargs: Any) -> list[WorkItem]:
    """``SCENARIOS[scenario](**kwargs)`` with a clear error for an unknown name."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")
    return SCENARIOS[scenario](**kwargs)
