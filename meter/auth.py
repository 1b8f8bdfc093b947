"""API keys -> tenants: who is calling, read from ``authorization: Bearer <key>`` or ``x-api-key``; the generation
front doors (``proxy``) and EnergyReports (``meter.reports_api``) ask alike.

Keys live hashed in SQL (meter.store.keys). A lookup runs on a worker thread and its answer is cached for
``cache_ttl_s`` (unknown keys too, briefly), so the request path touches the database about once per key per
TTL; concurrent requests for one key share one lookup. A string that is not of a key's form is refused without a
lookup and never cached (random junk must not evict real keys).

Database outages. The key store failing is never the caller's fault, so it never reads as UNAUTHENTICATED or
UNKNOWN / 500, and no message names the database:

- a key known before the outage keeps working: when its entry has expired and the lookup fails (any error) or has
  not answered within ``stale_wait_s``, its last answer is served (*stale*), counted in ``stale_served``;
- after a failed lookup no new one starts for a backoff (``retry_initial_s`` doubling to ``retry_max_s``), so an
  outage costs one failed connection attempt per interval, not one per request, and stale answers come at once;
- a key with no answer on record (never seen, or last seen unknown: it may have been created since) gets
  UNAVAILABLE / 503 with a retry hint.

Revocation. While the database answers, a revoked key stops working within ``cache_ttl_s``. During an outage a
cached key keeps the standing it had; a revocation made meanwhile takes effect at the key's first lookup once the
database answers again, i.e. for requests arriving more than ``retry_max_s`` after it is back (plus one lookup).
A gateway started during an outage knows no key until the database answers (``app.server`` reports NOT_SERVING
meanwhile).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from common.errors import PermissionDenied, Unauthenticated, Unavailable
from meter.store.db import is_outage
from meter.store.keys import ALL_SCOPES, parse_key_id

log = structlog.get_logger(__name__)

NEGATIVE_TTL_S = 2.0
MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool = False
    default_class: str | None = None
    key_id: str | None = None
    scopes: frozenset[str] = ALL_SCOPES
    expires_ns: int | None = None

    def require_scope(self, scope: str) -> None:
        """The key may make this kind of call (``generate``: the generation APIs; ``reports``: energy reports)."""
        if scope not in self.scopes:
            granted = ", ".join(sorted(self.scopes))
            raise PermissionDenied(f"key {self.key_id} may not call the {scope} APIs (its scopes: {granted})")

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


@dataclass(frozen=True, slots=True)
class _Entry:
    fresh_until: float  # monotonic seconds
    principal: Principal | None  # None: the key is unknown or revoked


class _KeyStoreDownError(Exception):
    """The lookup failed (the key store is unreachable or broken)."""


class Authenticator:
    def __init__(
        self,
        lookup: Callable[[str], Any | None],
        *,
        required: bool = True,
        anonymous_tenant: str = "anonymous",
        cache_ttl_s: float = 30.0,
        stale_wait_s: float = 1.0,
        lookup_wait_s: float = 5.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 5.0,
    ) -> None:
        """``lookup(key)`` returns an object with ``tenant``, ``admin``, ``default_class``, ``key_id`` or None; it
        runs on a worker thread and may raise when the key store is unreachable."""
        self._lookup = lookup
        self.required = required
        self.anonymous = Principal(tenant=anonymous_tenant)
        self.cache_ttl_s = cache_ttl_s
        self._stale_wait_s = stale_wait_s
        self._lookup_wait_s = lookup_wait_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}
        self._backoff_s = 0.0
        self._retry_at = 0.0  # monotonic: no new lookup before this (the last one failed)
        self.stale_served = 0  # answers served from expired entries because the key store failed
        self.lookups_failed = 0

    @property
    def key_store_available(self) -> bool:
        """Whether the last lookup worked (True before any)."""
        return self._backoff_s == 0.0

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        key = extract_key(headers)
        if key is None:
            if not self.required:
                return self.anonymous
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>` or `x-api-key: <key>`")
        if parse_key_id(key) is None:
            raise Unauthenticated("invalid or revoked API key")  # not even of the form jg_<key id>_<secret>
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        entry = self._cache.get(digest)
        if entry is not None and entry.fresh_until > now:
            return _granted(entry.principal)
        pending = self._inflight.get(digest)
        if pending is None:
            if now < self._retry_at:
                return self._fallback(entry)
            pending = self._start_lookup(key, digest)
        known = entry is not None and entry.principal is not None
        try:
            principal = await asyncio.wait_for(
                asyncio.shield(pending), self._stale_wait_s if known else self._lookup_wait_s
            )
        except (TimeoutError, _KeyStoreDownError):
            return self._fallback(entry)
        return _granted(principal)

    def _fallback(self, entry: _Entry | None) -> Principal:
        """The key store did not answer: the last answer if it granted access, else come back later."""
        if entry is not None and entry.principal is not None:
            self.stale_served += 1
            return _granted(entry.principal)
        retry_s = max(1.0, self._retry_at - time.monotonic())
        raise Unavailable(
            "cannot check the API key now: the key store is unreachable; retry shortly", retry_after_s=retry_s
        )

    def _start_lookup(self, key: str, digest: str) -> asyncio.Future[Principal | None]:
        task = asyncio.ensure_future(self._lookup_and_cache(key, digest))
        self._inflight[digest] = task

        def done(t: asyncio.Future[Principal | None]) -> None:
            self._inflight.pop(digest, None)
            if not t.cancelled():
                t.exception()  # retrieved: every waiter may have timed out

        task.add_done_callback(done)
        return task

    async def _lookup_and_cache(self, key: str, digest: str) -> Principal | None:
        try:
            info = await asyncio.to_thread(self._lookup, key)
        except Exception as exc:
            self._failed(exc)
            raise _KeyStoreDownError from None
        if self._backoff_s:
            log.info("auth_key_store_available", stale_served=self.stale_served)
        self._backoff_s = self._retry_at = 0.0
        principal = (
            None
            if info is None
            else Principal(
                tenant=info.tenant,
                admin=info.admin,
                default_class=info.default_class,
                key_id=info.key_id,
                scopes=getattr(info, "scopes", ALL_SCOPES),
                expires_ns=getattr(info, "expires_ns", None),
            )
        )
        ttl = self.cache_ttl_s if principal is not None else min(self.cache_ttl_s, NEGATIVE_TTL_S)
        if len(self._cache) >= MAX_ENTRIES:
            self._evict()
        self._cache[digest] = _Entry(time.monotonic() + ttl, principal)
        return principal

    def _failed(self, exc: BaseException) -> None:
        self.lookups_failed += 1
        first = self._backoff_s == 0.0
        self._backoff_s = min(self._retry_max_s, max(self._retry_initial_s, 2 * self._backoff_s))
        self._retry_at = time.monotonic() + self._backoff_s
        error = (str(exc).splitlines() or [""])[0][:300]
        if first:
            if is_outage(exc):
                log.warning("auth_key_store_unavailable", error=error, serving="cached keys")
            else:
                log.error("auth_key_lookup_failed", error=error, serving="cached keys", exc_info=exc)

    def _evict(self) -> None:
        """Make room (after a lookup worked): unknown keys and expired entries go; all if that is not enough."""
        now = time.monotonic()
        self._cache = {d: e for d, e in self._cache.items() if e.principal is not None and e.fresh_until > now}
        if len(self._cache) >= MAX_ENTRIES:
            self._cache.clear()


def _granted(principal: Principal | None) -> Principal:
    if principal is None:
        raise Unauthenticated("invalid or revoked API key")
    if principal.expires_ns is not None and time.time_ns() >= principal.expires_ns:
        # the cached (or stale) answer outlived the key: expiry is checked on every call, not once per lookup
        raise Unauthenticated(f"API key {principal.key_id} has expired")
    return principal
