"""proxy.rate_limits over a real database (SQLite, PostgreSQL): several limiters — replicas — sharing one database
never admit more than a tenant's limit in a minute, admit up to it (little stranded in slices), refuse with the time
to the next minute, and leave other tenants alone."""

from __future__ import annotations

import asyncio
import random

import pytest
import sqlalchemy as sa

from common.config import RateLimitConfig, TenantRateLimits
from common.errors import InvalidArgument
from meter.store import quota
from proxy.rate_limits import WINDOW_NS, RateLimited, RateLimiter

T0 = 1_800_000_000 * 10**9 // WINDOW_NS * WINDOW_NS  # the start of a UTC minute


class Clock:
    def __init__(self) -> None:
        self.now_ns = T0 + 5 * 10**9

    def __call__(self) -> int:
        return self.now_ns


async def _offer(limiters: list[RateLimiter], tenant: str, tokens: list[int], rnd: random.Random) -> tuple[int, int]:
    """Each call to a random replica, concurrently; (requests admitted, tokens admitted)."""
    admitted = [0, 0]

    async def one(n: int) -> None:
        try:
            await rnd.choice(limiters).admit(tenant, n)
        except RateLimited:
            return
        admitted[0] += 1
        admitted[1] += n

    await asyncio.gather(*(one(n) for n in tokens))
    return admitted[0], admitted[1]


@pytest.mark.parametrize("replicas", [1, 3])
async def test_replicas_together_admit_up_to_the_limit_and_never_past_it(db: sa.Engine, replicas: int) -> None:
    rnd = random.Random(replicas)
    clock = Clock()
    cfg = RateLimitConfig(requests_per_minute=100, tokens_per_minute=20_000)
    limiters = [RateLimiter(cfg, db, clock_ns=clock) for _ in range(replicas)]
    requests, tokens = await _offer(limiters, "acme", [rnd.randint(10, 150) for _ in range(300)], rnd)
    assert requests <= 100 and tokens <= 20_000
    # little is stranded: leases shrink as the minute fills (at most a few units per replica)
    assert requests >= 100 - 2 * replicas or tokens >= 20_000 - 150 * 2 * replicas
    leases = sum(limiter.leases for limiter in limiters)
    assert leases < requests  # slices: fewer statements than admitted requests
    # the next minute starts afresh
    clock.now_ns += WINDOW_NS
    again, _ = await _offer(limiters, "acme", [10] * 50, rnd)
    assert again == 50


async def test_a_refusal_names_the_limit_and_the_time_to_the_next_minute(db: sa.Engine) -> None:
    clock = Clock()  # 5 s into the minute
    limiter = RateLimiter(RateLimitConfig(requests_per_minute=2), db, clock_ns=clock)
    await limiter.admit("acme", 10)
    await limiter.admit("acme", 10)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("acme", 10)
    assert "requests_per_minute (2)" in refused.value.message and refused.value.retry_after_s == pytest.approx(55.0)
    assert refused.value.http_status == 429 and refused.value.grpc_code.name == "RESOURCE_EXHAUSTED"


async def test_tenants_have_their_own_limits_and_counts(db: sa.Engine) -> None:
    clock = Clock()
    cfg = RateLimitConfig(requests_per_minute=3, tenants={"big": TenantRateLimits(requests_per_minute=30)})
    limiter = RateLimiter(cfg, db, clock_ns=clock)
    rnd = random.Random(1)
    assert await _offer([limiter], "small", [1] * 10, rnd) == (3, 3)
    assert await _offer([limiter], "big", [1] * 40, rnd) == (30, 30)
    assert await _offer([limiter], "other", [1] * 10, rnd) == (3, 3)  # the defaults apply to any other tenant


async def test_a_request_larger_than_a_whole_minute_is_a_client_error(db: sa.Engine) -> None:
    limiter = RateLimiter(RateLimitConfig(tokens_per_minute=1000), db, clock_ns=Clock())
    with pytest.raises(InvalidArgument, match="more than tenant 'acme''s tokens_per_minute"):
        await limiter.admit("acme", 1001)


async def test_an_unreachable_database_admits_and_says_so(tmp_path) -> None:
    from meter.store import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")  # the directory does not exist
    limiter = RateLimiter(RateLimitConfig(requests_per_minute=1), engine, clock_ns=Clock())
    for _ in range(3):
        await limiter.admit("acme", 1)  # fail open: the limit is not enforced while the database is away
    engine.dispose()


def test_the_lease_statement_is_atomic_under_threads(db: sa.Engine) -> None:
    """Many threads leasing from one window at once (each its own connection): the total never passes the limit."""
    from concurrent.futures import ThreadPoolExecutor

    def take(_: int) -> int:
        with db.begin() as conn:
            return 3 if quota.lease(conn, "acme/tokens", T0, 3, 100) is not None else 0

    with ThreadPoolExecutor(8) as pool:
        taken = sum(pool.map(take, range(60)))
    assert taken == 99  # 33 leases of 3 fit in 100; the 34th would pass it


@pytest.mark.parametrize("replicas", [1, 3])
async def test_prompts_that_count_more_than_estimated_pay_the_difference(db: sa.Engine, replicas: int) -> None:
    """The gateway admits a call at its prompt's estimate (four characters a token), and CJK text or emoji count
    four to eight times that: a tenant writing them got that many times its tokens_per_minute. Once the backend has
    counted, the difference is settled against the tenant's minute: calls of 100 estimated and 400 counted tokens
    stop after 10,000 counted tokens (plus the last call's difference), not after 10,000 estimated ones; and a
    prompt that counts fewer gives the difference back."""
    rnd = random.Random(replicas)
    clock = Clock()
    limiters = [RateLimiter(RateLimitConfig(tokens_per_minute=10_000), db, clock_ns=clock) for _ in range(replicas)]
    counted = 0
    for _ in range(200):
        limiter = rnd.choice(limiters)
        try:
            await limiter.admit("acme", 100)
        except RateLimited:
            break
        limiter.settle("acme", 300)
        counted += 400
    # before: 200 calls admitted, 80,000 counted. Past the limit by at most each replica's last call's difference
    # (a replica's debt reaches the database with its next lease)
    assert 10_000 - 400 * replicas <= counted <= 10_000 + 300 * replicas, counted

    clock.now_ns += WINDOW_NS  # a new minute: English text, counting half its estimate
    limiter = limiters[0]
    admitted = 0
    for _ in range(400):
        try:
            await limiter.admit("globex", 100)
        except RateLimited:
            break
        limiter.settle("globex", -50)
        admitted += 1
    assert admitted >= 190  # ~10,000 counted tokens, not 10,000 estimated ones
