"""Arrival shaping: decides when each request reaches a backend, and with which others.

The request path calls ``Shaper.acquire(job, pool)`` and sends the request once it returns a ``Lease``. A shaper
may hold the job to release it together with others (so TGI batches them: one prefill, shared decode steps), must
give every job a slot on a backend that has room, and raises ``Overloaded`` (queue full), ``Unavailable`` (no
healthy backend, shutting down) or ``InvalidArgument`` (unknown traffic class) instead of releasing. Cancelling the
awaiting task takes the job out of the queue at once. ``drain()`` at shutdown releases what backends have room
for and fails the rest.

Layout: ``policies`` (pure release decisions), ``fairness`` (weighted fair queueing between tenants), ``core``
(classes, admission, release and placement as plain state), ``shaper`` (the asyncio layer: futures, timer, capacity
watcher), ``metrics``; the ``[models.shaping]`` section is ``common.shaping_config`` (the meter daemon validates it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from common.shaping_config import ClassConfig, Policy, ShapingConfig
from proxy.shaping.shaper import ArrivalShaper, build_shapers

if TYPE_CHECKING:
    from proxy.backends import BackendPool, Lease
    from proxy.job import Job


class Shaper(Protocol):
    async def acquire(self, job: Job, pool: BackendPool) -> Lease: ...

    async def drain(self) -> None: ...

    def resolve_class(self, name: str) -> str: ...

    @property
    def queued(self) -> int: ...


__all__ = ["ArrivalShaper", "ClassConfig", "Policy", "Shaper", "ShapingConfig", "build_shapers"]
