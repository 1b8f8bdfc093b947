"""The engine loop of the live simulator: ``sim.batching``'s TGI rules driven in real time on the asyncio loop.

One asyncio task per server plays router and shard. ``sim.batching.BatchingCore`` decides every step (TGI v3's
continuous batching, clock-free); this driver gives it the wall clock (``time.time_ns()``, which the simulated GPU
integrates energy on), sleeps each step's duration on the loop clock, wakes the core when work arrives, and wakes
the handlers waiting for a request's tokens. ``sim.replay`` drives the same core on a virtual clock.

Steps are scheduled back to back on the loop clock: a step that overslept (asyncio timers have ~1 ms granularity)
shortens the next, so the average step rate is right. A request whose client goes away gets no more tokens; its
step runs to its end (``finish_step_on_cancel``), or, with that off, it leaves the step at once and a step left with
no request ends early.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import structlog

from sim.batching import BatchingCore, BatchRequest, State
from sim.config import SimConfig
from sim.generation import Sequence
from sim.gpu import SimGPU
from sim.ledger import EnergyAccount
from sim.prefix_cache import PrefixCache
from sim.validation import ValidRequest

if TYPE_CHECKING:
    from sim.metrics import SimMetrics

__all__ = ["Scheduler", "SimRequest", "State"]

log = structlog.get_logger(__name__)

# A late step shortens the next ones (so the average step rate is right despite timer granularity), but the engine
# never runs more than this far behind its schedule.
MAX_CATCH_UP_NS = 50_000_000
INSTANT_BURST_S = 0.001


class SimRequest(BatchRequest):
    """A request of the live server: the core's request plus what its HTTP handler reads (validated request, output
    buffer for streams) and a future to wait on."""

    __slots__ = ("_waiter", "outbox", "stream", "valid")

    def __init__(self, valid: ValidRequest, request_id: str, account: EnergyAccount, stream: bool) -> None:
        super().__init__(
            request_id, valid.input_length, valid.max_new_tokens, Sequence(valid.plan()), account, time.time_ns()
        )
        self.valid = valid
        self.stream = stream
        self.outbox: list[int] = []  # generated but not yet taken by the handler (streams only)
        self._waiter: asyncio.Future[None] | None = None

    def on_token(self, index: int) -> None:
        if self.stream:
            self.outbox.append(index)
            self._wake()

    def on_end(self) -> None:
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until there is output to take, the request is done, or someone nudges it (``_wake``)."""
        if self.outbox or self.state is State.DONE:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> list[int]:
        """The tokens generated since the last call (streams)."""
        out = self.outbox
        if out:
            self.outbox = []
        return out


class Scheduler:
    """The batching loop of one simulated TGI server, in real time."""

    def __init__(self, config: SimConfig, gpu: SimGPU, metrics: SimMetrics | None = None) -> None:
        self.config = config
        self.gpu = gpu
        self.metrics = metrics
        self.core = BatchingCore(config, gpu)
        self.prefix_cache = PrefixCache(config.prefix_block_tokens) if config.prefix_caching else None
        self._wakeup = asyncio.Event()
        self._step_waiter: asyncio.Future[None] | None = None
        self._deadline_s: float | None = None  # loop-clock end of the previous step, while busy
        self._burst_start_s = 0.0
        self._task: asyncio.Task[None] | None = None

    # --- life cycle ---

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="sim-scheduler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.gpu.idle()

    # --- what handlers call ---

    @property
    def queue_size(self) -> int:
        return self.core.queue_size

    @property
    def batch_size(self) -> int:
        return self.core.batch_size

    @property
    def kv_free_tokens(self) -> int:
        return self.core.kv_free_tokens

    @property
    def prefill_steps(self) -> int:
        return self.core.prefill_steps

    @property
    def decode_steps(self) -> int:
        return self.core.decode_steps

    def active(self) -> list[SimRequest]:
        """Every request queued or on the GPU."""
        return self.core.active()  # type: ignore[return-value]  # only SimRequests are submitted here

    def submit(self, valid: ValidRequest, request_id: str, stream: bool) -> SimRequest:
        """Queue a validated request (TGI's ``Backend::schedule``)."""
        account = self.gpu.open_account(request_id, valid.input_length)
        request = SimRequest(valid, request_id, account, stream)
        if self.prefix_cache is not None:
            request.cached_tokens = self.prefix_cache.admit([t.id for t in valid.prompt_tokens()])
        self.core.submit(request)
        self._wakeup.set()
        return request

    def cancel(self, request: SimRequest) -> None:
        """The client went away: the request leaves the queue or its batch now, and its step if one is running."""
        if self.core.cancel(request, time.time_ns()):
            waiter = self._step_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)  # nothing left to compute in this step: it ends now

    # --- the loop ---

    async def _loop(self) -> None:
        try:
            steps = self.core.steps(time.time_ns())
            step = next(steps)
            while True:
                if step is None:
                    self._deadline_s = None
                    self._wakeup.clear()
                    await self._wakeup.wait()
                else:
                    if self.metrics is not None:
                        self.metrics.batch_step(step.phase.value)
                    await self._sleep(step.duration_ns)
                step = steps.send(time.time_ns())
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here would silently hang every client: make it loud
            log.exception("sim_scheduler_crashed")
            raise

    async def _sleep(self, duration_ns: int) -> None:
        """Let a step's time pass. Steps are scheduled back to back on the loop clock, so a step that overslept
        (asyncio timers have ~1 ms granularity) makes the next one shorter; the wait ends early if the step's
        requests all went away."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if duration_ns <= 0:
            # Instantaneous steps (time_scale=0): run steps back to back for up to INSTANT_BURST_S, then let the
            # handlers stream what was generated, several tokens per write, as a busy server's socket would.
            self._deadline_s = None
            if now - self._burst_start_s >= INSTANT_BURST_S:
                await asyncio.sleep(0)
                self._burst_start_s = loop.time()
            return
        start = self._deadline_s if self._deadline_s is not None else now
        if now - start > MAX_CATCH_UP_NS / 1e9:
            start = now - MAX_CATCH_UP_NS / 1e9
        deadline = start + duration_ns / 1e9
        self._deadline_s = deadline
        if deadline <= now:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._step_waiter = waiter
        handle = loop.call_at(deadline, _resolve, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._step_waiter = None
        if loop.time() < deadline:  # ended early (its requests went away): the next step starts now
            self._deadline_s = loop.time()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
