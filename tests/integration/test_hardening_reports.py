"""EnergyReports against a client's mistakes and greed, on SQLite and PostgreSQL: strings the database cannot hold,
forged page tokens, what PERMISSION_DENIED reveals, and wait_final calls that used to starve other tenants."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from meter.pb.joulegate.v1 import energy_pb2 as pb
from meter.pb.joulegate.v1 import energy_pb2_grpc as pb_grpc
from meter.reports.requests import RequestFilter, encode_page_token
from meter.reports_api import MAX_WAITS_PER_TENANT
from meter.store.keys import create_key
from tests.waiting import wait_until_async

from ..test_reports import scenario
from ..test_reports_oracle import insert, seal
from .harness import Stack, running_stack


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def stack(tmp_path: Path, db_url: str) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path, db_url=db_url) as s:
        insert(s.app.engine, *scenario())
        seal(s.app.engine, "ABC")  # final, as the engine makes them once attributed past their ends
        yield s


async def _error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


@pytest.mark.parametrize("value", ["a\x00b", "\x00", "tab\there", "x" * 300])
async def test_strings_the_database_cannot_compare_are_invalid_argument_naming_the_field(
    stack: Stack, value: str
) -> None:
    """Before (PostgreSQL): a NUL was UNKNOWN, with the SQL statement in the message."""
    reports = pb_grpc.EnergyReportsStub(stack.channel)
    admin = md(stack.admin_key)
    calls = {
        "request_id": reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id=value), metadata=admin),
        "tenant": reports.ListRequests(pb.ListRequestsRequest(tenant=value), metadata=admin),
        "model_id": reports.ListRequests(pb.ListRequestsRequest(model_id=value), metadata=admin),
        "backend": reports.ListRequests(pb.ListRequestsRequest(backend=value), metadata=admin),
        "status": reports.ListRequests(pb.ListRequestsRequest(status=value), metadata=admin),
        "tenant ": reports.GetUsage(pb.GetUsageRequest(tenant=value), metadata=admin),
    }
    for field, call in calls.items():
        err = await _error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.details())
        assert err.details().startswith(field.strip() + ":") and "SELECT" not in err.details()


@pytest.mark.parametrize(("received_ns", "request_id"), [(2**70, "A"), (-(2**64), "A"), (5, "a\x00b")])
async def test_a_forged_page_token_is_invalid_argument(stack: Stack, received_ns: int, request_id: str) -> None:
    """Page tokens are not signed: one forged with the right fingerprint but a cursor out of BIGINT range (or a NUL)
    used to reach the database: UNKNOWN (PostgreSQL) or an OverflowError (SQLite)."""
    reports = pb_grpc.EnergyReportsStub(stack.channel)
    token = encode_page_token(received_ns, request_id, RequestFilter(tenant="tenant-a"))
    err = await _error(reports.ListRequests(pb.ListRequestsRequest(page_token=token), metadata=md(stack.key)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "page_token: not a token from a previous ListRequests response"


async def test_permission_denied_never_names_the_other_tenant(stack: Stack) -> None:
    """Before: ``key ... of tenant 'tenant-a' cannot read tenant 'tenant-b'`` told whose request B was."""
    reports = pb_grpc.EnergyReportsStub(stack.channel)
    for call in (
        reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id="B"), metadata=md(stack.key)),
        reports.ListRequests(pb.ListRequestsRequest(tenant="tenant-b"), metadata=md(stack.key)),
        reports.GetUsage(pb.GetUsageRequest(tenant="tenant-b"), metadata=md(stack.key)),
    ):
        err = await _error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tenant-b" not in err.details() and "its own tenant's energy only" in err.details()


def _count_statements(engine: sa.Engine) -> list[int]:
    counter = [0]

    def count(*_: object) -> None:
        counter[0] += 1

    sa.event.listen(engine, "before_cursor_execute", count)
    return counter


async def test_wait_final_is_bounded_per_tenant_and_backs_off(stack: Stack) -> None:
    """Before: 500 waits on unknown ids each polled the database every 100 ms for 30 s, on the worker threads every
    other report needs (another tenant's report went from 8 ms to 1.9 s). Now a tenant holds at most
    MAX_WAITS_PER_TENANT waits (the next is RESOURCE_EXHAUSTED with a retry hint), polls back off, and another
    tenant's reports and waits go on."""
    reports = pb_grpc.EnergyReportsStub(stack.channel)
    tenant_a = md(stack.key)
    tenant_b = md(await asyncio.to_thread(lambda: create_key(stack.app.engine, "tenant-b").key))
    await reports.GetUsage(pb.GetUsageRequest(), metadata=tenant_b)  # tenant-b's key is looked up and cached
    counter = _count_statements(stack.app.engine)
    await _error(reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id="no-such-request"), metadata=tenant_a))
    per_query = counter[0]  # the statements of one poll for an unknown id
    assert per_query >= 1

    wait_s = 3.0
    counter[0] = 0
    waits = [
        asyncio.ensure_future(
            reports.GetRequestEnergy(
                pb.GetRequestEnergyRequest(
                    request_id=f"no-such-request-{i}", wait_final=True, wait_timeout_ms=int(wait_s * 1000)
                ),
                metadata=tenant_a,
            )
        )
        for i in range(MAX_WAITS_PER_TENANT)
    ]
    # every wait has made its first query: all hold a slot
    await wait_until_async(lambda: counter[0] >= MAX_WAITS_PER_TENANT * per_query, 10.0, what="the waits to start")

    one_more = reports.GetRequestEnergy(
        pb.GetRequestEnergyRequest(request_id="A", wait_final=True, wait_timeout_ms=1000), metadata=tenant_a
    )
    err = await _error(one_more)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.trailing_metadata())["retry-after-ms"] == "1000"

    other = await reports.GetRequestEnergy(
        pb.GetRequestEnergyRequest(request_id="B", wait_final=True, wait_timeout_ms=1000), metadata=tenant_b
    )
    assert other.request_id == "B" and other.final
    usage = await reports.GetUsage(pb.GetUsageRequest(), metadata=tenant_b)
    assert usage.total.requests >= 1

    for wait in waits:
        assert (await _error(wait)).code() == grpc.StatusCode.NOT_FOUND
    # Polls back off from 100 ms to 1 s: 7 queries per wait in 3 s, against 31 at a fixed 100 ms (a loaded machine
    # makes fewer, never more). The slack covers tenant-b's two calls.
    polls_per_wait = 1 + sum(1 for t in _backoff_times(0.1, 1.5, 1.0) if t < wait_s)
    assert counter[0] <= MAX_WAITS_PER_TENANT * polls_per_wait * per_query + 100  # measured: 392 (SQLite), 522 (PG)
    assert counter[0] < MAX_WAITS_PER_TENANT * (wait_s / 0.1) * per_query / 2


def _backoff_times(first_s: float, factor: float, cap_s: float) -> list[float]:
    """When the polls of one wait happen (seconds after it started), for the first minute."""
    times, t, interval = [], 0.0, first_s
    while t < 60:
        t += interval
        times.append(t)
        interval = min(interval * factor, cap_s)
    return times
