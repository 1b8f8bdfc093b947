"""meter.auth.Authenticator without a server, over a real SQLite key store: the cache and its TTL, the negative cache,
revocation, one lookup for concurrent requests, and what a failing key store does (stale answers, backoff, 503).

Every lookup goes through ``meter.store.lookup_key`` on a real database; ``Lookups`` only counts them (and can move
the database file away, which makes every new connection fail as an unreachable server would).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from common.errors import Unauthenticated, Unavailable
from meter.auth import NEGATIVE_TTL_S, Authenticator, Principal
from meter.store import create_key, lookup_key, make_engine, revoke_key, upgrade
from meter.store.keys import KeyInfo

TTL_S = 0.3  # short enough to wait out; NEGATIVE_TTL_S (2 s) is longer, so unknown keys are cached for TTL_S


class Lookups:
    """``lookup_key`` on a SQLite file, counted; ``break_store()`` moves the file away (every connection fails)."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "keys.db"
        self.url = f"sqlite:///{self.path}"
        upgrade(self.url)
        self.engine = make_engine(self.url)
        self.calls = 0

    def __call__(self, key: str) -> KeyInfo | None:
        self.calls += 1
        return lookup_key(self.engine, key)

    def break_store(self) -> None:
        self.path.rename(self.path.with_suffix(".away"))
        self.path.mkdir()  # a directory where the file was: SQLite cannot open it
        self.engine.dispose()  # pooled connections would still read the moved file

    def restore_store(self) -> None:
        self.path.rmdir()
        self.path.with_suffix(".away").rename(self.path)
        self.engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Lookups]:
    s = Lookups(tmp_path)
    yield s
    s.engine.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def authenticator(store: Lookups, **kw: float) -> Authenticator:
    kw.setdefault("cache_ttl_s", TTL_S)
    return Authenticator(store, retry_initial_s=0.2, retry_max_s=0.4, **kw)


async def test_a_key_maps_to_its_principal_and_is_looked_up_once_per_ttl(store: Lookups) -> None:
    created = create_key(store.engine, "acme", admin=True, default_class="batch")
    auth = authenticator(store)
    expected = Principal(tenant="acme", admin=True, default_class="batch", key_id=created.key_id)
    assert await auth.authenticate(bearer(created.key)) == expected
    assert await auth.authenticate({"x-api-key": created.key}) == expected  # either header; the same entry
    assert store.calls == 1
    await asyncio.sleep(TTL_S + 0.05)  # the entry expires
    assert await auth.authenticate(bearer(created.key)) == expected
    assert store.calls == 2


async def test_concurrent_requests_for_one_key_share_one_lookup(store: Lookups) -> None:
    key = create_key(store.engine, "acme").key
    auth = authenticator(store)
    principals = await asyncio.gather(*(auth.authenticate(bearer(key)) for _ in range(20)))
    assert {p.tenant for p in principals} == {"acme"} and store.calls == 1


async def test_missing_and_malformed_keys_are_refused_without_a_lookup(store: Lookups) -> None:
    auth = authenticator(store)
    for headers in ({}, {"authorization": "Basic abc"}, bearer("not-a-key"), bearer("jg_short_x")):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(headers)
    assert store.calls == 0
    optional = Authenticator(store, required=False, anonymous_tenant="guest")
    assert await optional.authenticate({}) == Principal(tenant="guest")


async def test_an_unknown_key_is_cached_as_unknown_for_the_negative_ttl(store: Lookups) -> None:
    created = create_key(store.engine, "acme")
    assert revoke_key(store.engine, created.key_id)  # well-formed, and unknown to lookup_key
    auth = authenticator(store)
    for _ in range(3):
        with pytest.raises(Unauthenticated, match="invalid or revoked"):
            await auth.authenticate(bearer(created.key))
    assert store.calls == 1  # the refusal is cached too
    # Valid again behind the cache's back: still refused until the negative entry expires, then granted.
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE api_keys SET revoked_ns = NULL WHERE key_id = :k"), {"k": created.key_id})
    with pytest.raises(Unauthenticated):
        await auth.authenticate(bearer(created.key))
    await asyncio.sleep(min(TTL_S, NEGATIVE_TTL_S) + 0.05)
    assert (await auth.authenticate(bearer(created.key))).tenant == "acme"
    assert store.calls == 2


async def test_a_revoked_key_stops_working_once_its_entry_expires(store: Lookups) -> None:
    created = create_key(store.engine, "acme")
    auth = authenticator(store)
    assert (await auth.authenticate(bearer(created.key))).tenant == "acme"
    assert revoke_key(store.engine, created.key_id)
    assert (await auth.authenticate(bearer(created.key))).tenant == "acme"  # cached: at most TTL_S of grace
    await asyncio.sleep(TTL_S + 0.05)
    with pytest.raises(Unauthenticated, match="invalid or revoked"):
        await auth.authenticate(bearer(created.key))


async def test_a_failing_key_store_serves_known_keys_stale_backs_off_and_refuses_unknown_ones_with_503(
    store: Lookups,
) -> None:
    known = create_key(store.engine, "acme")
    never_seen = create_key(store.engine, "globex").key
    auth = authenticator(store)
    assert (await auth.authenticate(bearer(known.key))).tenant == "acme"
    store.break_store()
    await asyncio.sleep(TTL_S + 0.05)

    # The entry has expired and the lookup fails: the last answer is served, stale, and the failure is noticed.
    assert (await auth.authenticate(bearer(known.key))).tenant == "acme"
    assert auth.stale_served == 1 and auth.lookups_failed == 1 and not auth.key_store_available
    # Within the backoff no new lookup starts: stale answers come at once, unknown keys get 503 with a retry hint.
    calls = store.calls
    assert (await auth.authenticate(bearer(known.key))).tenant == "acme"
    with pytest.raises(Unavailable) as refused:
        await auth.authenticate(bearer(never_seen))
    assert refused.value.retry_after_s >= 1.0 and "key store" in str(refused.value)
    assert store.calls == calls and auth.stale_served == 2

    # Back: the next lookup after the backoff works, and a key never seen before is granted.
    store.restore_store()
    await asyncio.sleep(0.45)  # past retry_max_s
    assert (await auth.authenticate(bearer(never_seen))).tenant == "globex"
    assert auth.key_store_available and store.calls == calls + 1


async def test_a_cached_key_stops_working_at_its_expiry_not_at_the_cache_ttl(store: Lookups) -> None:
    import time

    created = create_key(store.engine, "acme", expires_ns=time.time_ns() + 300_000_000)
    auth = Authenticator(store, cache_ttl_s=60.0)
    assert (await auth.authenticate(bearer(created.key))).tenant == "acme"
    await asyncio.sleep(0.35)  # the scenario: the key's lifetime runs out while its answer is cached for a minute
    with pytest.raises(Unauthenticated, match="has expired"):
        await auth.authenticate(bearer(created.key))
    assert store.calls == 1  # refused from the cache, without a lookup
    # the same during an outage: a stale answer never outlives the key
    brief = create_key(store.engine, "acme", expires_ns=time.time_ns() + 400_000_000)
    short = Authenticator(store, cache_ttl_s=0.1)
    assert (await short.authenticate(bearer(brief.key))).tenant == "acme"
    store.break_store()
    await asyncio.sleep(0.15)  # the entry is past its TTL: the next answer is stale
    assert (await short.authenticate(bearer(brief.key))).tenant == "acme" and short.stale_served == 1
    await asyncio.sleep(0.3)  # and now past the key's expiry
    with pytest.raises(Unauthenticated, match="has expired"):
        await short.authenticate(bearer(brief.key))
    store.restore_store()


async def test_scopes_decide_which_calls_a_key_may_make(store: Lookups) -> None:
    from common.errors import PermissionDenied

    gen = create_key(store.engine, "acme", scopes=frozenset({"generate"}))
    rep = create_key(store.engine, "acme", scopes=frozenset({"reports"}))
    auth = Authenticator(store, cache_ttl_s=TTL_S)
    g, r = await auth.authenticate(bearer(gen.key)), await auth.authenticate(bearer(rep.key))
    g.require_scope("generate")
    r.require_scope("reports")
    with pytest.raises(PermissionDenied, match=r"may not call the reports APIs \(its scopes: generate\)"):
        g.require_scope("reports")
    with pytest.raises(PermissionDenied, match="may not call the generate APIs"):
        r.require_scope("generate")
