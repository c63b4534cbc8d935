"""``adaspec demo``: answer a few prompts on the bundled model with plain decoding and with adaspec, side by side.

The same prompts go through both engines in turn, so the adaptive one learns as
the demo goes; the table shows each answer's speed and that the outputs are
identical (greedy decoding is lossless).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

from rich.console import Console
from rich.table import Table

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain the difference between a process and a thread.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give me a short checklist for reviewing a pull request.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a process and a thread.",
    "Write a Python function that checks whether a number is prime.",
]


def results_table(title: str) -> Table:
    """The demo's table; two-line headers and a wrapping prompt column keep every figure whole at 80 columns
    (what rich assumes when stdout is a pipe or a log)."""
    table = Table(title=title)
    for col in ("#", "prompt", "tokens", "plain\ntok/s", "adaspec\ntok/s", "speedup", "tokens/\nforward", "identical"):
        if col == "prompt":
            table.add_column(col, justify="left", ratio=1, min_width=12, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    return table


def run(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple]) -> int:
    """The demo on the model ``load(args)`` returns (the command line passes its loader, which reports errors)."""
    from .system import build_engine
    from .verify import SamplingParams

    console = Console()
    with console.status("loading the model"):
        model, tok = load(args)
    plain = build_engine(model, tok, "plain")
    ada = build_engine(model, tok, "adaptive")
    params = SamplingParams(max_tokens=args.max_tokens)
    table = results_table(f"adaspec demo on {tok.name} ({model.device}), greedy, max {args.max_tokens} tokens")
    speedups = []
    for i, text in enumerate(PROMPTS, 1):
        ids = tok.apply_chat_template([{"role": "user", "content": text}])
        a = plain.generate(ids, params)
        b = ada.generate(ids, params)
        console.rule(f"[bold]{i}. {text}")
        console.print(b.text.strip())
        speedup = b.stats.tok_s / a.stats.tok_s if a.stats.tok_s else 0.0
        speedups.append(speedup)
        table.add_row(str(i), text, str(b.stats.output_tokens), f"{a.stats.tok_s:.1f}", f"{b.stats.tok_s:.1f}",
                      f"{speedup:.2f}x", f"{b.stats.mean_accepted:.2f}", "yes" if a.tokens == b.tokens else "NO")
    console.print(table)
    console.print(f"median speedup {statistics.median(speedups):.2f}x over plain decoding of the same model")
    ada.close()
    return 0
