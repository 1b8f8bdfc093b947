"""API keys -> tenants: who is calling, read from ``authorization: Bearer <key>`` or ``x-api-key``.

Keys live hashed in SQL (meter.store.keys). A lookup runs on a worker thread and its answer is cached for
``cache_ttl_s`` (unknown keys too, briefly), so the request path touches the database about once per key per
TTL. Revocation therefore takes effect within one TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.errors import PermissionDenied, Unauthenticated

NEGATIVE_TTL_S = 2.0


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool = False
    default_class: str | None = None
    key_id: str | None = None

    def require_tenant_access(self, tenant: str) -> None:
        """A tenant key sees its own tenant only; an admin key sees all."""
        if not self.admin and tenant != self.tenant:
            # never name the other tenant: a request id must not tell whose it is
            raise PermissionDenied(f"key {self.key_id} of tenant {self.tenant!r} may read its own tenant's energy only")


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The API key from lower-cased headers/metadata, or None."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class Authenticator:
    def __init__(
        self,
        lookup: Callable[[str], Any | None],
        *,
        required: bool = True,
        anonymous_tenant: str = "anonymous",
        cache_ttl_s: float = 30.0,
    ) -> None:
        """``lookup(key)`` returns an object with ``tenant``, ``admin``, ``default_class``, ``key_id`` or None."""
        self._lookup = lookup
        self.required = required
        self.anonymous = Principal(tenant=anonymous_tenant)
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        key = extract_key(headers)
        if key is None:
            if not self.required:
                return self.anonymous
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>` or `x-api-key: <key>`")
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            principal = hit[1]
        else:
            info = await asyncio.to_thread(self._lookup, key)
            principal = (
                None
                if info is None
                else Principal(
                    tenant=info.tenant, admin=info.admin, default_class=info.default_class, key_id=info.key_id
                )
            )
            ttl = self.cache_ttl_s if principal is not None else min(self.cache_ttl_s, NEGATIVE_TTL_S)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = (now + ttl, principal)
        if principal is None:
            raise Unauthenticated("invalid or revoked API key")
        return principal
