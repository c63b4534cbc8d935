"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through ``APIError`` so clients see one
shape for all of them: bad input (400), a missing or wrong key (401), an
unknown model or route (404), a full queue (429), loading or draining (503).
Messages name the offending parameter and never carry paths or tracebacks;
unexpected exceptions become a generic 500 and are logged server-side only.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse


@dataclass
class APIError(Exception):
    """An error response; ``type`` and ``code`` follow the OpenAI API where it has a name for the case."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def context_length_exceeded(prompt_tokens: int, max_tokens: int, context: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {context} tokens; the request asks for "
                         f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} to generate). "
                         f"Shorten the prompt or lower max_tokens.",
                    "invalid_request_error", "max_tokens" if prompt_tokens < context else "messages",
                    "context_length_exceeded")


def unauthorized() -> APIError:
    return APIError(401, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.",
                    "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def model_not_found(name: str, served: str) -> APIError:
    shown = name if len(name) <= 100 else name[:100] + "..."
    return APIError(404, f"The model {shown!r} does not exist; this server serves {served!r}.",
                    "invalid_request_error", "model", "model_not_found")


def queue_full(limit: int) -> APIError:
    return APIError(429, f"The server is busy: {limit} requests are already waiting. Retry shortly.",
                    "rate_limit_exceeded", None, "queue_full", {"Retry-After": "1"})


def unavailable(state: str) -> APIError:
    return APIError(503, f"The server is {state}; retry shortly.", "service_unavailable", None, state,
                    {"Retry-After": "1"})


def internal_error() -> APIError:
    return APIError(500, "Internal server error.", "internal_error", None, "internal_error")
