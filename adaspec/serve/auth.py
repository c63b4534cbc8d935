"""API keys and the tenant namespace each key maps to.

Keys come from ``--api-key`` (repeatable) and the ``ADASPEC_API_KEYS`` environment
variable (comma-separated). With at least one key configured, every ``/v1``
route needs ``Authorization: Bearer <key>``; the key is compared with
``hmac.compare_digest`` against every configured key (no early exit, so the
comparison time does not reveal which key or how much of it matched).
``/health`` and ``/metrics`` stay open: orchestrators probe them without
credentials. ``/metrics`` shows aggregate counters and hashed namespace ids,
never prompt text; keep it on a private network if even aggregate traffic
figures are sensitive.

Tenant isolation. The learned speculator state is a cache of earlier traffic.
A tenant whose next tokens are drafted from another tenant's text can measure
it: per-step token counts and inter-token timing reveal whether a guessed
continuation was in the cache, which is the side channel shown for speculative
decoding in "When Speculation Spills Secrets" (2024) and for vLLM's shared
prefix cache in CVE-2025-46570 (fixed there with a server-set ``cache_salt``).
The server therefore sets the engine namespace itself, from the key: a stable
hash, so one tenant's learned state survives restarts and never shapes another
tenant's drafts. Without keys all traffic is one tenant (``default``);
``--shared-namespace`` puts every key into one shared namespace on purpose
(one organisation, several keys), trading that isolation for faster learning.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

ENV_KEYS = "ADASPEC_API_KEYS"
DEFAULT_NAMESPACE = "default"
SHARED_NAMESPACE = "shared"


def keys_from_env(environ: dict | None = None) -> list[str]:
    raw = (environ if environ is not None else os.environ).get(ENV_KEYS, "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def namespace_for_key(key: str) -> str:
    """Stable, non-reversible tenant id of a key: ``t-`` + 16 hex digits of SHA-256."""
    return "t-" + hashlib.sha256(b"adaspec-tenant\x00" + key.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[bytes, ...]
    shared_namespace: bool = False

    @classmethod
    def build(cls, keys: Iterable[str], shared_namespace: bool = False) -> "KeyRing":
        uniq = tuple(dict.fromkeys(k for k in keys if k))
        return cls(tuple(k.encode("utf-8") for k in uniq), shared_namespace)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> str | None:
        """The namespace for an ``Authorization`` header value, or None when it is missing or wrong."""
        if not self.enabled:
            return SHARED_NAMESPACE if self.shared_namespace else DEFAULT_NAMESPACE
        token = _bearer(authorization)
        if token is None:
            return None
        given = token.encode("utf-8")
        ok = False
        for k in self.keys:  # compare with every key so the time does not depend on which one matched
            ok |= hmac.compare_digest(given, k)
        if not ok:
            return None
        return SHARED_NAMESPACE if self.shared_namespace else namespace_for_key(token)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def describe(keys: Sequence[str]) -> str:
    return f"{len(keys)} API key(s)" if keys else "no API keys (open server)"
