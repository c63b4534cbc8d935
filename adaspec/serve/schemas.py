"""Request bodies of the OpenAI API subset the server implements, validated strictly.

Types are strict and every parameter the server cannot honour is rejected by name rather than silently ignored;
defaults follow the OpenAI API; ``top_k`` and the ``adaspec`` object are extensions. The rules are on
:func:`parse_body`.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..verify.sampling import MIN_TEMPERATURE
from .errors import APIError, bad_request

MAX_STOP = 16
"""Most stop strings per request (OpenAI allows 4; more are accepted here)."""
MAX_STOP_CHARS = 256
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with the token usage (and ``usage: null`` on every other chunk)."""


class AdaspecOptions(_Strict):
    """The ``adaspec`` extension object (openai client: ``extra_body={"adaspec": {...}}``)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    stats: bool = False
    """Return this request's speculation statistics under ``adaspec.stats`` in the response."""


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    adaspec: AdaspecOptions | None = None

    def check_common(self) -> None:
        """Reject what the server cannot honour; range-check the sampling parameters."""
        if self.n is not None and self.n != 1:
            raise bad_request("Only n=1 is supported; send several requests for several choices.", "n",
                              "unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported (only 0).", name, "unsupported_parameter")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported.", "logit_bias", "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        if self.temperature is not None and not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2):
            raise bad_request(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:.3g} and 2.",
                              "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad_request("top_p must be greater than 0 and at most 1.", "top_p")
        if self.top_k is not None and self.top_k < -1:
            raise bad_request("top_k must be -1 or 0 (off) or a positive integer.", "top_k")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise bad_request("seed is out of range (a 64-bit integer is expected).", "seed")
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise bad_request(f"At most {MAX_STOP} stop strings are allowed.", "stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise bad_request(f"Stop strings must be non-empty and at most {MAX_STOP_CHARS} characters.", "stop")

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def want_stats(self) -> bool:
        return bool(self.adaspec and self.adaspec.stats)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of token ids, or a one-element list of either."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.echo:
            raise bad_request("echo is not supported.", "echo", "unsupported_parameter")
        if self.logprobs is not None:
            raise bad_request("logprobs is not supported.", "logprobs", "unsupported_parameter")
        if self.best_of not in (None, 1):
            raise bad_request("Only best_of=1 is supported.", "best_of", "unsupported_value")
        if self.suffix:
            raise bad_request("suffix is not supported.", "suffix", "unsupported_parameter")

    def prompt_chars(self) -> int:
        """Characters of text in the prompt (0 for token ids): checked before the prompt is tokenized."""
        p = self.prompt
        return len(p) if isinstance(p, str) else sum(len(x) for x in p if isinstance(x, str))

    def prompt_value(self) -> str | list[int]:
        """The single prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise bad_request("Only one prompt per request is supported (n=1, a single prompt).", "prompt",
                                  "unsupported_value")
            p = p[0]
        if isinstance(p, list) and not p:
            raise bad_request("prompt must not be empty.", "prompt")
        if isinstance(p, str) and not p:
            raise bad_request("prompt must not be empty.", "prompt")
        return p


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ContentPart(_Strict):
    """Any content part; only ``text`` parts are accepted (checked in ``ChatMessage.text``)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def text(self, index: int) -> str:
        c = self.content
        if c is None:
            if self.role == "assistant":
                return ""
            raise bad_request(f"messages[{index}].content is required for role {self.role!r}.",
                              f"messages[{index}].content", "missing_required_parameter")
        if isinstance(c, str):
            return c
        out = []
        for j, part in enumerate(c):
            if part.type != "text" or part.text is None:
                raise bad_request(f"messages[{index}].content[{j}]: only text content parts are supported.",
                                  f"messages[{index}].content[{j}].type", "unsupported_value")
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs is not supported.", "logprobs", "unsupported_parameter")
        if self.tools or self.functions:
            raise bad_request("Tools and function calling are not supported.",
                              "tools" if self.tools else "functions", "unsupported_parameter")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise bad_request("Only response_format {'type': 'text'} is supported.", "response_format",
                              "unsupported_value")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt_chars(self) -> int:
        """Characters of text in the messages: checked before they are rendered and tokenized."""
        total = 0
        for m in self.messages:
            if isinstance(m.content, str):
                total += len(m.content)
            elif m.content is not None:
                total += sum(len(part.text or "") for part in m.content)
        return total

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as plain ``{"role", "content"}`` dicts for the chat template (``developer`` becomes ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]


def parse_body(model: type[_Strict], data: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its parameter.

    Types are strict (``"5"`` is not an integer, ``1`` is not a boolean) and every
    parameter the server cannot honour is rejected by name rather than silently
    ignored: ``n`` other than 1, ``logprobs``, ``echo``, ``best_of``, ``suffix``,
    penalties, ``logit_bias``, tools and non-text response formats. Fields the API
    defines as informational (``user``, ``metadata``, ``service_tier``...) and unknown
    fields are ignored, as the OpenAI API does.

    Defaults follow the OpenAI API: ``temperature`` 1, ``top_p`` 1, ``max_tokens`` 16
    for completions and "up to the context" for chat. ``top_k`` is an extension
    (0 or -1 = off); so is the ``adaspec`` object (``{"stats": true}`` returns the
    request's speculation statistics).
    """
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_type")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None
    req.check()
    return req


def validation_error(errors: list[dict]) -> APIError:
    """A 400 from pydantic/FastAPI error dicts: the first error, its location as ``param``, no input echoed."""
    if not errors:
        return bad_request("Invalid request.", None)
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    param = _dotted(loc) or None
    kind = str(err.get("type", ""))
    if kind == "missing":
        return bad_request(f"Missing required parameter: {param!r}.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized parameter: {param!r}.", param, "unknown_parameter")
    if kind == "too_short" and param == "messages":
        return bad_request("messages must contain at least one message.", param, "invalid_value")
    cut = next((i for i, p in enumerate(loc) if _is_type_tag(p)), None)
    if cut is not None:
        # A union field (prompt, stop, content): name what it accepts instead of the first member's complaint.
        head = loc[:cut]
        param = _dotted(head) or None
        tags = []
        for e in errors:
            e_loc = [p for p in e.get("loc", ()) if p != "body"]
            if e_loc[:cut] == head and len(e_loc) > cut and _is_type_tag(e_loc[cut]) and e_loc[cut] not in tags:
                tags.append(e_loc[cut])
        return bad_request(f"Invalid type for {param!r}: expected one of {', '.join(_readable(t) for t in tags)}.",
                           param, "invalid_type")
    msg = str(err.get("msg", "invalid value"))
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return bad_request(f"Invalid value for {param!r}: {msg}." if param else f"Invalid request: {msg}.", param, code)


def _dotted(loc: list) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_type_tag(p):
            continue  # pydantic names union members in the location ("list[int]"); the client never wrote those
        else:
            out += ("." if out else "") + str(p)
    return out


def _is_type_tag(p: object) -> bool:
    return isinstance(p, str) and (p in ("str", "int", "float", "bool", "none")
                                   or p.startswith(("list[", "dict[", "function-")))


_READABLE = {"str": "a string", "list[str]": "an array of strings", "list[int]": "an array of token ids",
             "list[list[int]]": "an array of token-id arrays", "list[ContentPart]": "an array of content parts"}


def _readable(tag: str) -> str:
    return _READABLE.get(tag, tag)
