"""API keys and the tenant namespace each key maps to.

With keys configured (``--api-key``, ``ADASPEC_API_KEYS``) every ``/v1`` route needs ``Authorization: Bearer <key>``,
compared in constant time. The server sets the engine namespace itself, from the key (an HMAC under a secret of
this server), so one tenant's learned state never shapes another tenant's drafts: speculation is a side channel
otherwise. The rules and the reasons are on :class:`KeyRing`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..store import StoreCorruptError, restore, save_blob

ENV_KEYS = "ADASPEC_API_KEYS"
ENV_METRICS_KEY = "ADASPEC_METRICS_KEY"
DEFAULT_NAMESPACE = "default"
SHARED_NAMESPACE = "shared"


def keys_from_env(environ: dict | None = None) -> list[str]:
    raw = (environ if environ is not None else os.environ).get(ENV_KEYS, "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def namespace_for_key(key: str, secret: bytes) -> str:
    """Stable tenant id of a key that reveals nothing about it without ``secret``: ``t-`` + 16 hex digits of
    HMAC-SHA256(secret, key)."""
    return "t-" + hmac.new(secret, b"adaspec-tenant\x00" + key.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


SECRET_FILE = "tenants.state"
_SECRET_KIND = "adaspec.tenant_secret"
_SECRET_BYTES = 32


def tenant_secret(state_dir: str | os.PathLike | None) -> bytes:
    """This server's secret for namespace ids: kept in ``state_dir`` (created on first use, atomically, in the
    checksummed container; a damaged file is moved aside and a new secret starts new namespaces), or a fresh
    random one when there is no state directory (nothing outlives the process then)."""
    if state_dir is None:
        return os.urandom(_SECRET_BYTES)
    path = Path(state_dir) / SECRET_FILE
    got: list[bytes] = []

    def apply(payload: bytes, meta: dict) -> None:
        if meta.get("kind") != _SECRET_KIND or len(payload) != _SECRET_BYTES:
            raise StoreCorruptError(f"not a tenant secret of {_SECRET_BYTES} bytes")
        got.append(payload)

    if restore(path, apply, "tenant namespaces"):
        return got[0]
    secret = os.urandom(_SECRET_BYTES)
    save_blob(path, secret, {"kind": _SECRET_KIND})
    os.chmod(path, 0o600)
    return secret


@dataclass(frozen=True)
class KeyRing:
    """The configured API keys and the namespace each one maps to.

    Keys come from ``--api-key`` (repeatable) and the ``ADASPEC_API_KEYS`` environment
    variable (comma-separated). With at least one key configured, every ``/v1``
    route needs ``Authorization: Bearer <key>``; the key is compared with
    ``hmac.compare_digest`` against every configured key (no early exit, so the
    comparison time does not reveal which key or how much of it matched).
    ``/health`` stays open for orchestrators. ``/metrics`` is open unless a
    metrics key is set (``--metrics-key`` or ``ADASPEC_METRICS_KEY``), which it then
    requires the same way. It shows aggregate counters and namespace ids, never
    prompt text.

    Tenant isolation. The learned speculator state is a cache of earlier traffic.
    A tenant whose next tokens are drafted from another tenant's text can measure
    it: per-step token counts and inter-token timing reveal whether a guessed
    continuation was in the cache, which is the side channel shown for speculative
    decoding in "When Speculation Spills Secrets" (2024) and for vLLM's shared
    prefix cache in CVE-2025-46570 (fixed there with a server-set ``cache_salt``).
    The server therefore sets the engine namespace itself, from the key, so one
    tenant's learned state never shapes another tenant's drafts. The id is an HMAC
    of the key under a secret of this server, kept in the state directory so a
    tenant's learned state survives restarts; it appears in ``/metrics`` and in
    the state files, and without the secret nobody can test a guessed key against
    it. Without keys all traffic is one tenant (``default``);
    ``--shared-namespace`` puts every key into one shared namespace on purpose
    (one organisation, several keys), trading that isolation for faster learning.
    """
    keys: tuple[bytes, ...]
    shared_namespace: bool = False
    secret: bytes = b""
    """Key of the HMAC that maps API keys to namespace ids (``tenant_secret``)."""

    @classmethod
    def build(cls, keys: Iterable[str], shared_namespace: bool = False, secret: bytes | None = None) -> "KeyRing":
        uniq = tuple(dict.fromkeys(k for k in keys if k))
        return cls(tuple(k.encode("utf-8") for k in uniq), shared_namespace,
                   secret if secret is not None else os.urandom(_SECRET_BYTES))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> str | None:
        """The namespace for an ``Authorization`` header value, or None when it is missing or wrong."""
        if not self.enabled:
            return SHARED_NAMESPACE if self.shared_namespace else DEFAULT_NAMESPACE
        if not bearer_matches(authorization, self.keys):
            return None
        return SHARED_NAMESPACE if self.shared_namespace else namespace_for_key(_bearer(authorization), self.secret)


def matches(token: str, keys: Sequence[bytes]) -> bool:
    """Whether ``token`` is one of ``keys``, compared with every key so the time does not depend on which one
    matched."""
    given = token.encode("utf-8")
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return ok


def bearer_matches(authorization: str | None, keys: Sequence[bytes]) -> bool:
    """Whether an ``Authorization`` header value carries one of ``keys`` as a bearer token."""
    token = _bearer(authorization)
    return token is not None and matches(token, keys)


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
