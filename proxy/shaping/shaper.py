"""The asyncio layer over ``ShapingCore``: one future per waiting request, one timer, one capacity watcher.

``ArrivalShaper.acquire(job, pool)`` queues the job and awaits its future; the core resolves it with a ``Lease``
when the job's class releases it and a backend has room, or with an error. Three things make the core step: an
arrival (in the arriving task, so a passthrough job with a free slot is placed without a context switch), the
timer for the earliest moment a policy asked to be asked again, and a watcher task that waits on
``pool.capacity_changed()`` while released jobs wait for a slot. A cancelled ``acquire`` (client gone, the
gateway's deadline) takes its job out of the queue before the cancellation propagates; a lease handed out in the
same instant is given straight back, so a cancelled job never reaches TGI.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from common.errors import Unavailable
from common.shaping_config import ShapingConfig
from proxy.shaping.core import Entry, Outcome, ShapingCore

if TYPE_CHECKING:
    from proxy.backends import BackendPool, Lease
    from proxy.job import Job

log = structlog.get_logger(__name__)

TIMER_SLACK_S = 0.0002  # fire just after a due time, so the wall clock read in the callback has passed it


def _entry(job: Job, traffic_class: str, now_s: float, waiter: asyncio.Future[Lease] | None) -> Entry:
    return Entry(
        tenant=job.tenant,
        traffic_class=traffic_class,
        cost_tokens=job.token_estimate,
        prompt_tokens=job.prompt_tokens_estimate,
        enqueued_s=now_s,
        deadline=job.deadline,
        job=job,
        waiter=waiter,
    )


class _PoolSink:
    """The core's view of a ``BackendPool``: slots, and futures resolved with leases or errors."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool

    def healthy(self) -> bool:
        return self.pool.healthy

    def free_slots(self) -> int:
        return self.pool.free_slots

    def alive(self, entry: Entry) -> bool:
        return not entry.waiter.done()

    def place(self, entries: list[Entry]) -> int:
        if len(entries) == 1:  # a lone job goes to the least-loaded backend, not the emptiest
            lease = self.pool.try_acquire(entries[0].cost_tokens)
            leases = [lease] if lease is not None else []
        else:
            leases = self.pool.try_acquire_batch([e.cost_tokens for e in entries])
        for entry, lease in zip(entries, leases, strict=False):
            entry.waiter.set_result(lease)
        return len(leases)

    def fail(self, entry: Entry, error: Exception) -> None:
        if not entry.waiter.done():
            entry.waiter.set_exception(error)


class ArrivalShaper:
    """A ``Shaper`` for one model, configured by ``[models.shaping]`` (defaults: passthrough, one class)."""

    def __init__(
        self, model_id: str, config: ShapingConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.model_id = model_id
        self.config = config if config is not None else ShapingConfig()
        self.core = ShapingCore(model_id, self.config)
        self._clock = clock
        self._sink: _PoolSink | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_s: float | None = None
        self._watcher: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return self.core.requests

    def resolve_class(self, name: str) -> str:
        """The configured class ``name`` means (``default`` or "": the default class); else InvalidArgument."""
        return self.core.resolve_class(name).name

    async def acquire(self, job: Job, pool: BackendPool) -> Lease:
        if self.core.draining:
            raise Unavailable("gateway is shutting down", retry_after_s=1.0)
        cq = self.core.resolve_class(job.traffic_class)  # raises InvalidArgument
        job.traffic_class = cq.name  # the resolved class, for the timeline and metrics
        now_s = self._clock()
        if self.core.can_skip_queue(cq):  # the fast path: same outcome as queueing and stepping, ~10x cheaper
            lease = pool.try_acquire(job.token_estimate)
            if lease is not None:
                self.core.placed_directly(cq, _entry(job, cq.name, now_s, None), now_s)
                return lease
        if self._sink is None or self._sink.pool is not pool:
            self._sink = _PoolSink(pool)
        loop = asyncio.get_running_loop()
        entry = _entry(job, cq.name, now_s, loop.create_future())
        self.core.admit(entry, now_s)  # raises Overloaded
        self._pump()
        try:
            return await entry.waiter
        except asyncio.CancelledError:
            self._abandon(entry, loop.time())
            raise

    def _abandon(self, entry: Entry, loop_now: float) -> None:
        waiter = entry.waiter
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            waiter.result().release()  # placed in the same instant the client left: give the slot back unused
            return
        expired = entry.deadline is not None and loop_now >= entry.deadline
        if self.core.remove(entry, Outcome.EXPIRED if expired else Outcome.CANCELLED):
            self._pump()  # one fewer held request can change a policy's decision

    async def drain(self) -> None:
        """Shutdown: release everything queued at once where backends have room; fail the rest (Unavailable)."""
        self._cancel_timer()
        if self._sink is None:
            self.core.close()
            return
        self.core.drain(self._clock(), self._sink, asyncio.get_running_loop().time())
        if self._watcher is not None:
            self._watcher.cancel()
        await asyncio.sleep(0)  # let the woken acquirers run before the caller goes on shutting down

    # -- stepping --------------------------------------------------------------------------------------------
    def _pump(self) -> None:
        sink = self._sink
        if sink is None or self.core.draining:
            return
        try:
            wake_s = self.core.step(self._clock(), sink, asyncio.get_running_loop().time())
        except Exception:  # a bug here must not strand the queue silently
            log.exception("shaping_step_failed", model=self.model_id)
            raise
        self._schedule(wake_s)
        if self.core.waiting_for_capacity and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(sink))

    def _schedule(self, wake_s: float | None) -> None:
        if wake_s == self._timer_at_s and self._timer is not None:
            return
        self._cancel_timer()
        if wake_s is None:
            return
        delay_s = max(0.0, wake_s - self._clock()) + TIMER_SLACK_S
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)
        self._timer_at_s = wake_s

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at_s = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at_s = None
        self._pump()

    async def _watch(self, sink: _PoolSink) -> None:
        try:
            while self.core.waiting_for_capacity and not self.core.draining:
                await sink.pool.capacity_changed()
                self._pump()
        finally:
            self._watcher = None


def build_shapers(models: dict[str, ShapingConfig]) -> dict[str, ArrivalShaper]:
    """One shaper per model id."""
    return {model_id: ArrivalShaper(model_id, cfg) for model_id, cfg in models.items()}


__all__ = ["ArrivalShaper", "build_shapers"]
