"""The baseline policy: no hold. A job goes to a backend as soon as one has a free slot.

Jobs that find every backend full wait in a bounded queue (``max_queued``); past it they are refused with
RESOURCE_EXHAUSTED and a retry hint, the gateway's answer to overload instead of TGI's 429.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.errors import Overloaded

if TYPE_CHECKING:
    from proxy.backends import BackendPool, Lease
    from proxy.job import Job


class Passthrough:
    def __init__(self, *, max_queued: int = 10_000, retry_after_s: float = 1.0) -> None:
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self._queued = 0

    @property
    def queued(self) -> int:
        return self._queued

    async def acquire(self, job: Job, pool: BackendPool) -> Lease:
        lease = pool.try_acquire(job.token_estimate)
        if lease is not None:
            return lease
        if self._queued >= self.max_queued:
            raise Overloaded(
                f"gateway queue for model {pool.model_id!r} is full ({self.max_queued} requests waiting)",
                retry_after_s=self.retry_after_s,
            )
        self._queued += 1
        try:
            return await pool.acquire(job.token_estimate)
        finally:
            self._queued -= 1
