"""Text <-> token ids for a target: a thin wrapper over a Hugging Face fast tokenizer.

Chat templates come with the model, so they are untrusted code: they are
rendered in Jinja's ``ImmutableSandboxedEnvironment`` (template injection in
llama-cpp-python, CVE-2024-34359, came from rendering them unsandboxed).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Tokenizer", "IncrementalDetokenizer", "END_OF_TURN_TOKENS"]

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "</s>")
"""Special tokens that end generation when the vocabulary has them, besides the declared EOS (as llama.cpp does)."""


class Tokenizer:
    """``encode``/``decode``, the model's chat template, and the token ids that end generation."""

    def __init__(self, hf_tokenizer: Any, name: str, chat_template: str | None = None,
                 eos_token_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        self.name = name
        self.chat_template = chat_template if chat_template is not None else getattr(hf_tokenizer, "chat_template", None)
        ids = {int(i) for i in eos_token_ids}
        if getattr(hf_tokenizer, "eos_token_id", None) is not None:
            ids.add(int(hf_tokenizer.eos_token_id))
        special = set(getattr(hf_tokenizer, "all_special_tokens", ()) or ())
        vocab = hf_tokenizer.get_vocab()
        for t in END_OF_TURN_TOKENS:
            if t in vocab and (t in special or t in getattr(hf_tokenizer, "added_tokens_encoder", {})):
                ids.add(int(vocab[t]))
        self.eos_token_ids: set[int] = ids

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None, eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """Load ``tokenizer.json`` and friends from a model directory (``OSError``/``ValueError`` if absent)."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = Path(path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            hf = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        template = getattr(hf, "chat_template", None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(hf, name or path.name, template, eos_token_ids)

    # -- ids --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return len(self.hf)

    @property
    def bos_token(self) -> str | None:
        return getattr(self.hf, "bos_token", None)

    @property
    def eos_token(self) -> str | None:
        return getattr(self.hf, "eos_token", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the model's tokenizer adds (e.g. a BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """A fresh incremental detokenizer for one output stream."""
        return IncrementalDetokenizer(self, skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------

    @cached_property
    def _template(self) -> Any:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise ValueError(f"the model {self.name!r} has no chat template")

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            return env.from_string(self.chat_template)
        except TemplateError as e:
            raise ValueError(f"the chat template of {self.name!r} does not compile: {e}") from None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (dicts with ``role`` and ``content`` strings)."""
        from jinja2 import TemplateError

        _check_messages(messages)
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:  # includes the sandbox's SecurityError and raise_exception()
            raise ValueError(f"chat template error: {e}") from None

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """Token ids of the rendered chat (special tokens come from the template text, none are added)."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _check_messages(messages: Sequence[dict]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} needs a string 'role'")
        if not isinstance(m.get("content", ""), str):
            raise ValueError(f"message {i}: 'content' must be a string")


class IncrementalDetokenizer:
    """Streams text from growing token ids without splitting multi-byte characters.

    ``step(ids)`` takes *all* ids generated so far and returns the text they add
    since the previous call. Decoding a short window (from ``prefix`` on) keeps
    the cost per token constant; text is held back while the window decodes to a
    trailing U+FFFD (an incomplete UTF-8 sequence). ``finish(ids)`` returns
    whatever is still held back.

    Example: the emoji "😀" is four bytes that byte-level BPE may split over two
    tokens; after the first token ``step`` returns ``""``, after the second ``"😀"``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.prefix = 0  # start of the decoding window
        self.read = 0  # ids before this are already emitted

    def _text(self, ids: Sequence[int], lo: int, hi: int | None = None) -> str:
        if self.skip:  # the default of every decode(); any object with decode(ids) will do
            return self.tok.decode(ids[lo:hi])
        return self.tok.decode(ids[lo:hi], skip_special_tokens=False)

    def step(self, ids: Sequence[int]) -> str:
        return self.advance(ids)[0]

    def advance(self, ids: Sequence[int]) -> tuple[str, str]:
        """``(new, pending)``: the text ``step`` returns, and the text of the ids it still holds back (an
        unfinished character shows as U+FFFD there), so that everything emitted plus ``pending`` is the text of
        all of ``ids``."""
        if len(ids) <= self.read:
            return "", ""
        done = self._text(ids, self.prefix, self.read)
        full = self._text(ids, self.prefix)
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return "", full[len(done):]
        self.prefix, self.read = self.read, len(ids)
        return full[len(done):], ""

    def finish(self, ids: Sequence[int]) -> str:
        """The rest of the text, incomplete characters included (call once, at the end)."""
        if len(ids) <= self.read:
            return ""
        done = self._text(ids, self.prefix, self.read)
        full = self._text(ids, self.prefix)
        self.prefix = self.read = len(ids)
        return full[len(done):]
