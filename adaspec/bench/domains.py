"""The domain of a benchmark request: the language of the code its answer holds, or chat (:func:`classify`)."""

from __future__ import annotations

import re
from collections import Counter

CODE_LANGS = ("python", "javascript", "java", "c_cpp", "sql", "rust")  # also the tie-break order
DOMAINS = CODE_LANGS + ("other_code", "chat")
CLASSIFIER_VERSION = 3  # bump when the rules change: it keys the on-disk cache of classified conversations

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
