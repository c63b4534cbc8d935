"""Workloads: domain rules, recovery of a truncated ShareGPT file, determinism of every scenario."""

import io
import json
import random

import pytest

from adaspec.bench import corpus as C
from adaspec.bench import domains as D
from adaspec.bench import workloads as W
from adaspec.bench.corpus import Conversation, Corpus, HumanEvalTask, conversation_from_record, parse_sharegpt
from adaspec.bench.domains import classify
from adaspec.bench.workloads import PromptBudget, WorkItem, turn_messages
from adaspec.jsonstream import ArrayScan, iter_json_array

# (prompt, first answer, expected domain)
EXAMPLES = [
    ("Write a Python function that reverses a list.", "```python\ndef rev(xs):\n    return xs[::-1]\n```", "python"),
    ("Why does this fail?\n\nfor i, x in enumerate(items):\n    if x > 3:\n        print('big')", "", "python"),
    ("How do I read a file line by line in Rust?",
     "```rust\nuse std::fs::File;\nfn main() {\n    let mut s = String::new();\n}\n```", "rust"),
    ("Convert this Python code to Rust:\n\ndef add(a, b):\n    return a + b",
     "```rust\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n```", "rust"),
    ("Write a program in C that prints the first 10 primes.",
     "```c\n#include <stdio.h>\nint main() {\n    printf(\"2\\n\");\n}\n```", "c_cpp"),
    ("Explain move semantics in C++ with an example.", "```cpp\nstd::vector<int> v = std::move(w);\n```", "c_cpp"),
    ("How do I debounce an input in React?",
     "```javascript\nconst [q, setQ] = useState('');\nuseEffect(() => {}, [q]);\n```", "javascript"),
    ("Add types to this TypeScript interface",
     "```typescript\ninterface User {\n  name: string;\n}\n```", "javascript"),
    ("Write a SQL query for the top 5 customers by revenue.",
     "```sql\nSELECT name, SUM(total) FROM orders GROUP BY name ORDER BY 2 DESC LIMIT 5;\n```", "sql"),
    ("Write a Java class for a bank account.",
     "```java\npublic class Account {\n    private int balance;\n}\n```", "java"),
    ("Write a PHP script that connects to a server.", "```php\n<?php\n$conn = connect();\n```", "other_code"),
    ("Write a poem about the sea.", "The sea is wide,\nthe sea is deep...", "chat"),
    ("I saw a python in the garden, is it dangerous?", "Most pythons are not venomous...", "chat"),
    ("What's a good name for a rust-colored cat?", "How about Copper?", "chat"),
]


@pytest.mark.parametrize("prompt,answer,domain", EXAMPLES)
def test_classify_fixed_examples(prompt, answer, domain):
    assert classify(prompt, answer) == domain


def test_unreliable_fence_tag_loses_to_the_code_itself():
    # ShareGPT's highlighter often labels Python as "scss": the tag is ignored, the syntax decides
    answer = "```scss\nimport os\n\ndef main():\n    for name in os.listdir('.'):\n        print(name)\n```"
    assert classify("list the files in a folder", answer) == "python"
    assert D.domain_scores("list the files in a folder", answer)["other_code"] == 0


def _record(i: int, domain_text: str = "hello") -> dict:
    return {"id": f"c{i}_0", "conversations": [{"from": "human", "value": f"{domain_text} {i}"},
                                               {"from": "gpt", "value": f"answer {i} with \"quotes\" and [brackets]"}]}


def test_truncated_file_keeps_complete_conversations_and_drops_the_partial_one(tmp_path):
    full = json.dumps([_record(i) for i in range(4)], indent=2)
    cut = full[: full.index('"answer 3')]  # inside the last conversation
    path = tmp_path / "sharegpt.json"
    path.write_text(cut, encoding="utf-8")
    convs, scan = parse_sharegpt(path)
    assert [c.id for c in convs] == ["c0_0", "c1_0", "c2_0"]
    assert scan.truncated and scan.elements == 3 and scan.dropped_chars > 0
    assert convs[1].turns == (("user", "hello 1"), ("assistant", 'answer 1 with "quotes" and [brackets]'))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_stream_parser_agrees_with_json_loads_across_chunk_sizes(chunk):
    rng = random.Random(chunk)
    data = [_record(i) for i in range(5)] + [12345, -0.5, "s]t,r", [1, [2, {}]], None, True]
    rng.shuffle(data)
    scan = ArrayScan()
    got = list(iter_json_array(io.StringIO(json.dumps(data)), scan, chunk_chars=chunk))
    assert got == data and not scan.truncated and scan.elements == len(data)


@pytest.mark.parametrize("text", ['{"a": 1}', '[{"a": 1} {"b": 2}]', ""])
def test_stream_parser_rejects_what_is_not_an_array(text):
    with pytest.raises(ValueError):
        list(iter_json_array(io.StringIO(text)))


def test_truncated_right_after_a_comma_or_a_number():
    for text, expect in (('[1, 2, ', [1, 2]), ('[{"a": 1}, 23', [{"a": 1}]), ("[", [])):
        scan = ArrayScan()
        assert list(iter_json_array(io.StringIO(text), scan, chunk_chars=2)) == expect
        assert scan.truncated


def test_conversation_starts_at_the_first_human_turn():
    rec = {"id": "x_3", "conversations": [{"from": "gpt", "value": "earlier answer"}, {"from": "system", "value": "s"},
                                          {"from": "human", "value": "next question"}, {"from": "gpt", "value": "a"},
                                          {"from": "human", "value": "q2"}]}
    c = conversation_from_record(rec)
    assert c.prompt == "next question" and c.user_turns == ("next question", "q2") and c.first_answer == "a"
    assert not c.opening  # a later part of a split conversation
    assert conversation_from_record({"id": "y_0", "conversations": [{"from": "gpt", "value": "only"}]}) is None
    assert conversation_from_record({"id": "z_0", "conversations": [{"from": "human", "value": "hi"}]}).opening


# --- a small synthetic corpus, so the scenario tests do not need the 125 MB file ---------------

def _corpus() -> Corpus:
    convs = []
    for d in D.DOMAINS:
        for i in range(30):
            turns = tuple((("user", f"{d} question {i} turn {t}"), ("assistant", f"{d} answer {i} turn {t}"))[k]
                          for t in range(1 + i % 4) for k in range(2))
            convs.append(Conversation(f"{d}-{i}_0", turns, d, opening=i % 5 != 4))
    tasks = [HumanEvalTask(f"HumanEval/{i}", f"def f{i}(x):\n    \"\"\"doc\"\"\"\n", f"f{i}", "    return x\n")
             for i in range(20)]
    return Corpus(convs, tasks)


SCENARIO_ARGS = {
    "drift": dict(n_per_phase=5),
    "steady": dict(domain="sql", n=6),
    "adversarial": dict(n=6),
    "multi_turn": dict(n=5),
    "rl_rollouts": dict(n_prompts=3, group_size=2, steps=2),
    "code_editing": dict(n=4, modules=("difflib", "csv", "heapq", "json.decoder", "textwrap", "gzip")),
}


def _build(name, seed, corpus):
    kw = dict(SCENARIO_ARGS[name], seed=seed)
    if name not in ("adversarial", "code_editing"):
        kw["corpus"] = corpus
    return W.build(name, **kw)


@pytest.mark.parametrize("name", sorted(SCENARIO_ARGS))
def test_scenarios_are_deterministic_given_the_seed(name):
    corpus = _corpus()
    a, b, c = _build(name, 1, corpus), _build(name, 1, corpus), _build(name, 2, corpus)
    assert a == b and len(a) > 0
    assert [x.seed for x in a] != [x.seed for x in c]
    if name != "adversarial":  # adversarial prompts are fresh random strings, always different
        assert len({x.id for x in a}) == len(a)


def test_drift_phases_in_order_without_reusing_prompts():
    items = W.drift(n_per_phase=5, corpus=_corpus(), seed=3)
    assert [it.phase for it in items] == [p for p in range(4) for _ in range(5)]
    assert [it.domain for it in items[:5]] == ["python"] * 5 and items[-1].domain == "python"
    assert {it.domain for it in items[5:10]} <= {"rust", "c_cpp"}
    assert {it.domain for it in items[10:15]} == {"chat"}
    assert len({it.source for it in items}) == len(items)
    assert all("turn 0" in it.messages[0]["content"] for it in items)  # the first human turn is the prompt
    assert all(not it.source.endswith("4_0") for it in items)  # only conversation openings are drawn (i % 5 != 4)


def test_drift_says_when_a_phase_has_too_few_prompts():
    with pytest.raises(ValueError, match="rust"):
        W.drift(n_per_phase=50, phases=("rust",), corpus=_corpus())
    with pytest.raises(ValueError, match="unknown domain"):
        W.steady("cobol", corpus=_corpus())


def test_budget_filters_long_prompts_with_a_token_counter():
    corpus = _corpus()
    words = PromptBudget(max_prompt_chars=10_000, count_tokens=lambda s: len(s.split()), max_prompt_tokens=4)
    items = W.steady("humaneval", n=5, corpus=corpus, budget=PromptBudget(max_prompt_chars=10_000))
    assert all(it.domain == "python" and it.source.startswith("humaneval:") for it in items)
    with pytest.raises(ValueError, match="budget"):
        W.steady("humaneval", n=1, corpus=corpus, budget=words)
    assert words.fits("a b c d") and not words.fits("a b c d e")


def test_humaneval_raw_completion_prompts():
    corpus = _corpus()
    items = W.steady("humaneval", n=3, corpus=corpus, raw=True)
    heads = {t.prompt for t in corpus.humaneval}
    assert all(it.messages is None and it.prompt in heads for it in items)
    with pytest.raises(ValueError, match="humaneval"):
        W.steady("python", n=1, corpus=corpus, raw=True)


def test_multi_turn_replays_the_models_own_answers():
    items = W.multi_turn(n=5, min_turns=3, corpus=_corpus(), seed=0)
    it = items[0]
    assert it.n_turns >= 3 and it.messages[0]["content"] == it.user_turns[0]
    msgs = turn_messages(it, ["mine 0", "mine 1"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in msgs[1::2]] == ["mine 0", "mine 1"] and msgs[-1]["content"] == it.user_turns[2]
    with pytest.raises(ValueError):
        turn_messages(it, ["x"] * it.n_turns)


def test_rl_rollouts_groups_share_a_prompt_and_steps_repeat_the_prompt_set():
    items = W.rl_rollouts(n_prompts=3, group_size=4, steps=2, corpus=_corpus(), seed=0)
    assert len(items) == 3 * 4 * 2 and all(it.temperature == 1.0 for it in items)
    by_group = {}
    for it in items:
        by_group.setdefault((it.step, it.group), set()).add(it.messages[0]["content"])
    assert all(len(v) == 1 for v in by_group.values())
    step0 = [by_group[(0, g)] for g in sorted({it.group for it in items})]
    assert step0 == [by_group[(1, g)] for g in sorted({it.group for it in items})]
    assert len({it.seed for it in items}) == len(items)


def test_code_editing_includes_real_stdlib_source():
    import importlib
    import inspect

    items = W.code_editing(n=3, seed=0, modules=SCENARIO_ARGS["code_editing"]["modules"])
    for it in items:
        _, module, qual = it.source.split(":")
        obj = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
        first_line = inspect.getsource(obj).strip().splitlines()[0].strip()
        assert first_line in it.messages[0]["content"]
        assert 40 <= len(inspect.getsource(obj).splitlines()) <= 121


def test_adversarial_prompts_rotate_kinds_and_use_random_tokens_when_given_a_detokenizer():
    items = W.adversarial(n=8, seed=0, detokenize=lambda ids: " ".join(f"<{i}>" for i in ids), vocab_size=50)
    assert [it.source for it in items[:4]] == ["random:chars", "random:words", "random:numbers", "random:tokens"]
    assert "<" in items[3].messages[0]["content"] and all(it.temperature == 1.0 for it in items)


def test_work_item_needs_exactly_one_prompt_form():
    with pytest.raises(ValueError):
        WorkItem("x", "s", "chat", 0, "p", "src")
    with pytest.raises(ValueError):
        WorkItem("x", "s", "chat", 0, "p", "src", messages=[], prompt="raw")


def test_humaneval_loads_from_the_installed_package():
    tasks = C.load_humaneval()
    assert len(tasks) == 164 and tasks[0].task_id == "HumanEval/0" and "def " in tasks[0].prompt


@pytest.mark.slow
def test_real_sharegpt_recovers_the_complete_conversations(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    convs, info = C.load_sharegpt()
    assert info.truncated and info.elements > 17_000 and not info.from_cache
    counts = Corpus(convs).domain_counts(openings_only=True)
    assert all(counts[d] >= 20 for d in D.DOMAINS), counts
    again, info2 = C.load_sharegpt()
    assert info2.from_cache and again == convs
