"""Arrival shaping: decides when each request reaches a backend, and with which others.

The request path calls ``Shaper.acquire(job, pool)`` and sends the request once it returns a ``Lease``. A shaper
may hold the job to release it together with others (so TGI batches them), must give every job a slot on a backend
that has room, and raises ``Overloaded`` (queue full), ``DeadlineExceeded`` or ``Unavailable`` instead of
releasing. Cancelling the awaiting task takes the job out of the queue at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from proxy.shaping.passthrough import Passthrough

if TYPE_CHECKING:
    from proxy.backends import BackendPool, Lease
    from proxy.job import Job


class Shaper(Protocol):
    async def acquire(self, job: Job, pool: BackendPool) -> Lease: ...

    @property
    def queued(self) -> int: ...


__all__ = ["Passthrough", "Shaper"]
