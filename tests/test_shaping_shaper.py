"""ArrivalShaper on a real event loop and a real BackendPool (slots only: nothing is sent to a backend here)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from app.config import BackendConfig, BackendPoolConfig
from common.errors import InvalidArgument, Unavailable
from proxy.backends import Backend, BackendPool, Lease
from proxy.job import Job
from proxy.metrics import REGISTRY
from proxy.shaping import ArrivalShaper, ShapingConfig
from tests.waiting import wait_until_async


def pool_of(model: str, *slots: int) -> BackendPool:
    backends = []
    for i, n in enumerate(slots):
        cfg = BackendConfig(url=f"http://127.0.0.1:{10 + i}", name=f"{model}-b{i}")
        b = Backend(cfg, model, BackendPoolConfig(max_concurrent_requests=n))
        b.healthy = True  # as after a successful /health poll
        backends.append(b)
    return BackendPool(model, backends)


def job(model: str, tenant: str = "t", cls: str = "default", deadline: float | None = None) -> Job:
    return Job(request_id=uuid.uuid4().hex, model_id=model, tenant=tenant, inputs="x" * 400, body={},
               max_new_tokens=20, traffic_class=cls, deadline=deadline)  # fmt: skip


def shaper(model: str, **shaping: object) -> ArrivalShaper:
    return ArrivalShaper(model, ShapingConfig.model_validate(shaping))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_passthrough_places_at_once_and_waiters_get_freed_slots_in_order() -> None:
    pool = pool_of("s-pass", 2)
    s = ArrivalShaper("s-pass", ShapingConfig())  # the default: one class, passthrough
    a = await s.acquire(job("s-pass"), pool)
    b = await s.acquire(job("s-pass"), pool)
    waiting = [asyncio.create_task(s.acquire(job("s-pass"), pool)) for _ in range(2)]
    await wait_until_async(lambda: s.queued == 2, 1.0)
    assert not any(t.done() for t in waiting)
    a.release()
    first = await asyncio.wait_for(waiting[0], 1)
    assert not waiting[1].done()
    b.release()
    await asyncio.wait_for(waiting[1], 1)
    assert first.backend.in_flight == 2 and s.queued == 0


async def test_batch_class_releases_concurrent_requests_together_on_one_backend() -> None:
    model = "s-batch"
    pool = pool_of(model, 8, 8)
    s = shaper(model, classes={"default": {"policy": "batch", "max_batch": 8, "hold_ms": 5000}})
    events: list[tuple[str, int]] = []

    async def one(i: int) -> Lease:
        await asyncio.sleep(0.005 * i)  # staggered arrivals
        events.append(("arrived", i))
        lease = await s.acquire(job(model), pool)
        events.append(("leased", i))
        return lease

    leases = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 2)
    # Held together: no request got its lease before the last one arrived (whatever the machine's load).
    assert [kind for kind, _ in events] == ["arrived"] * 8 + ["leased"] * 8, events
    assert len({lease.backend.name for lease in leases}) == 1  # one backend: TGI prefills them together
    assert metric("joulegate_shaping_release_size_requests_count", model=model, traffic_class="default") == 1
    assert metric("joulegate_shaping_release_size_requests_sum", model=model, traffic_class="default") == 8


async def test_batch_class_releases_on_timeout_of_the_oldest() -> None:
    model = "s-batch-t"
    pool = pool_of(model, 8)
    s = shaper(model, classes={"default": {"policy": "batch", "max_batch": 8, "hold_ms": 150}})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    leases = await asyncio.wait_for(asyncio.gather(*(s.acquire(job(model), pool) for _ in range(3))), 2)
    held_s = loop.time() - t0
    assert 0.15 <= held_s < 0.25 and len(leases) == 3
    assert metric("joulegate_shaping_hold_seconds_count", model=model, traffic_class="default") == 3


async def test_window_releases_at_the_wall_clock_boundary() -> None:
    model = "s-window"
    pool = pool_of(model, 8)
    s = shaper(model, classes={"default": {"policy": "window", "window_ms": 100}})
    arrived_ms = time.time() * 1000
    await s.acquire(job(model), pool)
    released_ms = time.time() * 1000
    boundary_ms = (arrived_ms // 100 + 1) * 100  # the first multiple of 100 ms since the Unix epoch after arrival
    # Held until that boundary (never released on arrival), and released at it, not at a later one.
    assert boundary_ms <= released_ms < boundary_ms + 100, (arrived_ms, released_ms)


async def test_deadline_while_held_never_takes_a_slot() -> None:
    model = "s-deadline"
    pool = pool_of(model, 8)
    s = shaper(model, classes={"default": {"policy": "batch", "max_batch": 8, "hold_ms": 300}})
    loop = asyncio.get_running_loop()
    j = job(model, deadline=loop.time() + 0.05)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout_at(j.deadline):  # as Gateway._admit does
            await s.acquire(j, pool)
    assert s.queued == 0
    await asyncio.sleep(0.35)  # past the hold: nothing is released for it
    assert pool.backends[0].in_flight == 0
    assert metric("joulegate_shaping_expired_total", model=model, traffic_class="default") == 1


async def test_cancellation_leaves_the_queue_at_once() -> None:
    model = "s-cancel"
    pool = pool_of(model, 8)
    s = shaper(model, classes={"default": {"policy": "batch", "max_batch": 2, "hold_ms": 10_000}})
    gone = asyncio.create_task(s.acquire(job(model), pool))
    await wait_until_async(lambda: s.queued == 1, 1.0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert s.queued == 0
    stays = asyncio.create_task(s.acquire(job(model), pool))
    await wait_until_async(lambda: s.queued == 1, 1.0)
    assert not stays.done()  # one held, not two: the cancelled request does not complete the batch
    partner = await asyncio.wait_for(s.acquire(job(model), pool), 1)
    assert (await asyncio.wait_for(stays, 1)).backend is partner.backend
    assert metric("joulegate_shaping_cancelled_total", model=model, traffic_class="default") == 1


async def test_a_lease_handed_out_as_the_client_leaves_is_given_back() -> None:
    model = "s-race"
    pool = pool_of(model, 8)
    s = shaper(model, classes={"default": {"policy": "batch", "max_batch": 2, "hold_ms": 10_000}})
    first = asyncio.create_task(s.acquire(job(model), pool))
    await wait_until_async(lambda: s.queued == 1, 1.0)
    second = asyncio.create_task(s.acquire(job(model), pool))
    await asyncio.sleep(0)  # `second` runs: the batch is complete and both futures get leases
    assert pool.backends[0].in_flight == 2 and not first.done()
    first.cancel()  # ... before `first` has resumed with its lease
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert pool.backends[0].in_flight == 1


async def test_released_requests_wait_for_capacity_and_go_as_it_frees() -> None:
    model = "s-capacity"
    pool = pool_of(model, 2)
    s = shaper(model, classes={"default": {"policy": "batch", "max_batch": 4, "hold_ms": 10_000}})
    tasks = [asyncio.create_task(s.acquire(job(model), pool)) for _ in range(4)]
    await wait_until_async(lambda: sum(t.done() for t in tasks) >= 2, 1.0)
    done = [t for t in tasks if t.done()]
    assert [tasks.index(t) for t in done] == [0, 1]  # never past the backend's free slots, in order
    assert pool.backends[0].in_flight == 2
    done[0].result().release()
    await asyncio.wait_for(tasks[2], 1)
    assert not tasks[3].done()
    done[1].result().release()
    await asyncio.wait_for(tasks[3], 1)
    assert s.queued == 0


async def test_unknown_class_is_refused_and_the_default_class_resolved() -> None:
    model = "s-classes"
    pool = pool_of(model, 4)
    s = shaper(model, default_class="interactive", classes={"interactive": {}, "batch": {"policy": "batch"}})
    with pytest.raises(InvalidArgument, match="x-traffic-class: unknown class 'nope'"):
        await s.acquire(job(model, cls="nope"), pool)
    j = job(model)
    await s.acquire(j, pool)
    assert j.traffic_class == "interactive"  # the timeline and the request metrics see the class used


async def test_drain_releases_what_fits_and_fails_the_rest() -> None:
    model = "s-drain"
    pool = pool_of(model, 3)
    s = shaper(model, classes={"default": {"policy": "batch", "max_batch": 100, "hold_ms": 60_000}})
    tasks = [asyncio.create_task(s.acquire(job(model), pool)) for _ in range(5)]
    await wait_until_async(lambda: s.queued == 5, 1.0)
    await s.drain()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [isinstance(r, Lease) for r in results] == [True, True, True, False, False]
    assert all(isinstance(r, Unavailable) and r.message == "gateway is shutting down" for r in results[3:])
    with pytest.raises(Unavailable):
        await s.acquire(job(model), pool)
