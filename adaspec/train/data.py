"""Training sequences from ShareGPT: chat-templated token ids with an assistant mask.

Conversations are streamed from the (truncated) ShareGPT JSON in file order, so
a run reads only the megabytes it uses. A conversation is held out when
``crc32(id) % holdout_mod == 0``; that split does not depend on how many
conversations a run reads, so a bigger run keeps the same held-out set.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..jsonstream import iter_json_array
from ..sharegpt import sharegpt_path, sharegpt_turns


@dataclass
class DataConfig:
    """Which ShareGPT text becomes training sequences."""

    max_len: int = 512
    """Tokens per sequence (longer templated conversations are cut)."""
    max_user_chars: int = 800
    """A user turn is cut to this many characters (prompts are context, answers are what we learn)."""
    max_assistant_chars: int = 2400
    """An assistant turn is cut to this many characters."""
    min_len: int = 32
    """Shorter sequences are skipped."""
    holdout_mod: int = 20
    """Held-out conversations: crc32(id) % holdout_mod == 0 (5%)."""


@dataclass
class Sequence_:
    conv_id: str
    tokens: list[int]  # [n] chat-templated ids
    assistant: list[bool]  # [n] True where the token belongs to an assistant message


def is_heldout(conv_id: str, mod: int) -> bool:
    return zlib.crc32(conv_id.encode()) % mod == 0


class ChatEncoder:
    """Renders messages with the tokenizer's chat template and encodes them without extra special tokens."""

    def __init__(self, tokenizer: Any):
        if not hasattr(tokenizer, "apply_chat_template"):
            raise TypeError("the tokenizer has no chat template (apply_chat_template)")
        self.tok = tokenizer

    def encode(self, messages: Sequence[dict]) -> list[int]:
        text = self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
        ids = self.tok.encode(text, add_special_tokens=False)
        return list(ids)

    def encode_with_mask(self, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """Token ids and an assistant mask, from the token counts of growing message prefixes."""
        ids: list[int] = []
        mask: list[bool] = []
        for i, m in enumerate(messages):
            full = self.encode(messages[: i + 1])
            if full[: len(ids)] != ids:  # the template re-tokenised an earlier boundary: fall back to no mask
                ids = full
                mask = [False] * len(full)
                continue
            mask += [m["role"] == "assistant"] * (len(full) - len(ids))
            ids = full
        return ids, mask


def iter_conversations(path: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(id, messages) of every complete ShareGPT conversation, in file order."""
    with open(path or sharegpt_path(), encoding="utf-8") as fp:
        for rec in iter_json_array(fp):
            got = sharegpt_turns(rec)
            if got is None:
                continue
            cid, turns, _ = got
            yield cid, [{"role": r, "content": t} for r, t in turns]


def iter_sequences(tokenizer: Any, cfg: DataConfig, heldout: bool, path: str | None = None) -> Iterator[Sequence_]:
    """Training (``heldout=False``) or held-out sequences, templated, cut and masked."""
    enc = ChatEncoder(tokenizer)
    for cid, messages in iter_conversations(path):
        if is_heldout(cid, cfg.holdout_mod) != heldout:
            continue
        msgs, approx = [], 0
        for m in messages:
            limit = cfg.max_assistant_chars if m["role"] == "assistant" else cfg.max_user_chars
            text = m["content"][:limit]
            if not text.strip():
                continue
            msgs.append({"role": m["role"], "content": text})
            approx += len(text) // 3
            if approx > 2 * cfg.max_len:  # enough text for max_len tokens
                break
        if not any(m["role"] == "assistant" for m in msgs):
            continue
        ids, mask = enc.encode_with_mask(msgs)
        ids, mask = ids[: cfg.max_len], mask[: cfg.max_len]
        if len(ids) >= cfg.min_len and any(mask):
            yield Sequence_(cid, ids, mask)
