"""Per-tenant rate limits — requests and tokens per UTC minute — shared by every gateway on one database and enforced
before the queue (``[rate_limits]``).

Why leases in the database: a limit that holds across replicas needs one shared count, and a write per request
would put the database on every request's path. A gateway instead leases a *slice* of a tenant's minute
(``meter.store.quota.lease``: one atomic conditional upsert) and admits from it locally, so the database sees one
statement per slice. Leases are atomic, so all gateways together never admit more than the limit. A slice is an
eighth of what the minute has left, at most a twentieth of the limit, so what one replica holds and cannot use (and
another replica's caller therefore cannot get) shrinks to a few units as the minute fills. Windows are UTC minutes:
every replica agrees on them without talking. Tokens count as the request's ``token_estimate`` (prompt, as
estimated before tokenizing, plus ``max_new_tokens``), the figure the shaping queue's token limits use too, and once
the backend has counted the prompt the difference is settled (``settle``): taken from (or given back to) the
replica's slice of the current minute, so a prompt that counts more than its estimate (CJK text, emoji: four to
eight times) is paid for; a slice run below zero leases its debt with the next call's share before admitting it.

When the database cannot be reached the limits are not enforced (fail open: they protect capacity, and refusing
every call during an outage would do more harm); that is logged once per outage and counted in
``joulegate_rate_limit_unchecked_total``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from prometheus_client import Counter

from common.config import RateLimitConfig
from common.errors import InvalidArgument, Overloaded
from meter.store import quota
from proxy.metrics import REGISTRY, tenant_label

log = structlog.get_logger(__name__)

WINDOW_NS = 60 * 10**9
UNCHECKED_RETRY_S = 5.0  # while the database is away, try it again this often (admitting meanwhile)
KINDS = ("requests", "tokens")

LIMITED = Counter(
    "joulegate_rate_limited",
    "Requests refused by a tenant's rate limit (RESOURCE_EXHAUSTED / 429), by the limit hit.",
    ["tenant", "limit"],
    registry=REGISTRY,
)
UNCHECKED = Counter(
    "joulegate_rate_limit_unchecked",
    "Requests admitted without their rate limit checked because the database could not be reached.",
    registry=REGISTRY,
)


class RateLimited(Overloaded):
    """A tenant is over its per-minute limit; ``retry_after_s`` is when its next minute starts."""


@dataclass(slots=True)
class _Slice:
    window_ns: int
    remaining: int  # leased here and not yet used
    left: int  # what the window had left in the database after the last lease
    exhausted: bool = False  # the database refused even the smallest lease in this window


class RateLimiter:
    def __init__(
        self, config: RateLimitConfig, engine: sa.Engine, *, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.config = config
        self.engine = engine
        self._clock_ns = clock_ns
        self._slices: dict[str, _Slice] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._unchecked_until = 0.0  # monotonic: admit without a check until then (the database is away)
        self._forgotten_before = 0
        self.leases = 0  # statements sent to the database (for tests and the bench)

    async def admit(self, tenant: str, tokens: int) -> None:
        """Take one request and ``tokens`` from ``tenant``'s minute, or raise ``RateLimited`` (nothing taken)."""
        limits = self.config.for_tenant(tenant)
        needs = [
            (kind, limit, amount)
            for kind, limit, amount in (
                ("requests", limits.requests_per_minute, 1),
                ("tokens", limits.tokens_per_minute, max(tokens, 1)),
            )
            if limit is not None
        ]
        if not needs:
            return
        for _kind, limit, amount in needs:
            if amount > limit:
                raise InvalidArgument(
                    f"this request counts {amount} tokens, more than tenant {tenant!r}'s tokens_per_minute ({limit}) "
                    "allows in any minute: ask for fewer max_new_tokens or a shorter prompt"
                )
        if self._take(tenant, needs, self._window(self._clock_ns())):
            return  # the common case: this replica's slices hold it, no await
        async with self._locks.setdefault(tenant, asyncio.Lock()):
            while True:  # calls on the fast path may use what a lease brought before this call takes it: lease again
                now_ns = self._clock_ns()
                window = self._window(now_ns)
                for kind, limit, amount in needs:
                    if not await self._ensure(f"{tenant}/{kind}", window, amount, limit):
                        retry_s = max(0.05, (window + WINDOW_NS - now_ns) / 1e9)
                        LIMITED.labels(tenant_label(tenant), f"{kind}_per_minute").inc()
                        raise RateLimited(
                            f"tenant {tenant!r} is over its {kind}_per_minute ({limit}); retry in {retry_s:.1f} s",
                            retry_after_s=retry_s,
                        )
                if self._take(tenant, needs, window):
                    return

    def settle(self, tenant: str, tokens: int) -> None:
        """A call admitted with an estimate counted ``tokens`` more (negative: fewer) once the backend counted its
        prompt: the difference is taken from (given back to) this replica's slice of ``tenant``'s current minute. A
        slice below zero is the tenant's debt: its next call leases it with its own share, or is refused. No I/O."""
        limit = self.config.for_tenant(tenant).tokens_per_minute
        if limit is None or tokens == 0:
            return
        window = self._window(self._clock_ns())
        scope = f"{tenant}/tokens"
        s = self._slices.get(scope)
        if s is None or s.window_ns != window:
            if tokens < 0:
                return  # nothing leased in this minute to give back to
            s = self._slices[scope] = _Slice(window, 0, limit)
        s.remaining -= tokens

    @staticmethod
    def _window(now_ns: int) -> int:
        return now_ns - now_ns % WINDOW_NS

    def _take(self, tenant: str, needs: list[tuple[str, int, int]], window: int) -> bool:
        """Take every amount from this replica's slices at once, if they all hold it (a slice missing because the
        database is away counts as holding it)."""
        taken = [(self._slices.get(f"{tenant}/{kind}"), amount) for kind, _, amount in needs]
        if any(s is not None and (s.window_ns != window or s.remaining < a) for s, a in taken):
            return False
        if any(s is None for s, _ in taken):
            if time.monotonic() >= self._unchecked_until:
                return False  # not leased yet (or the database may be back: try it)
            UNCHECKED.inc()
        for s, amount in taken:
            if s is not None:
                s.remaining -= amount
        return True

    async def _ensure(self, scope: str, window: int, amount: int, limit: int) -> bool:
        """A local slice of ``scope``'s current minute holds ``amount`` (leasing more if needed); False when the
        minute has no room left. No slice at all when the database is away (fail open)."""
        s = self._slices.get(scope)
        if s is not None and s.window_ns == window and (s.remaining >= amount or s.exhausted):
            return s.remaining >= amount
        carried = s.remaining if s is not None and s.window_ns == window else 0
        left = s.left if s is not None and s.window_ns == window else limit
        want = max(amount - carried, min(max(limit // 20, 1), left // 8))
        try:
            used, got = await asyncio.to_thread(self._lease, scope, window, want, amount - carried, limit)
        except sa.exc.SQLAlchemyError as exc:
            self._unchecked(exc)
            self._slices.pop(scope, None)
            return True
        if self._unchecked_until:
            log.info("rate_limits_checked_again")
            self._unchecked_until = 0.0
        # What the slice holds now: calls on the fast path and settlements may have changed it during the lease.
        live = self._slices.get(scope)
        carried = live.remaining if live is not None and live.window_ns == window else 0
        if used is None:
            self._slices[scope] = _Slice(window, carried, 0, exhausted=True)
            return carried >= amount
        self._slices[scope] = _Slice(window, carried + got, limit - used)
        return True

    def _lease(self, scope: str, window: int, want: int, need: int, limit: int) -> tuple[int | None, int]:
        """(the window's total after the lease or None, how much was leased): ``want``, else just ``need``."""
        with self.engine.begin() as conn:
            if window > self._forgotten_before:
                quota.forget_before(conn, window - WINDOW_NS)
                self._forgotten_before = window
            self.leases += 1
            used = quota.lease(conn, scope, window, want, limit)
            if used is None and want > need > 0:
                self.leases += 1
                return quota.lease(conn, scope, window, need, limit), need
            return used, want

    def _unchecked(self, exc: BaseException) -> None:
        if not self._unchecked_until:
            log.warning("rate_limits_unchecked", error=(str(exc).splitlines() or [""])[0][:300], admitted="all")
        self._unchecked_until = time.monotonic() + UNCHECKED_RETRY_S
