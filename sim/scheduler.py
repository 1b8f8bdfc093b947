"""The engine loop: TGI v3's router batching (backends/v3/src/backend.rs, queue.rs) driving the simulated GPU.

One asyncio task per server plays router and shard. It follows ``batching_task`` on the path TGI takes for models
without prefill chunking:

- Requests wait in a FIFO queue. ``next_batch`` pops them in order while each fits the KV-cache budget
  (``max_batch_total_tokens``; a request reserves ``input_length + max_new_tokens - 1`` tokens, rounded up to the
  block size) and the prefill budget (``max_batch_prefill_tokens``, summed prompt tokens), and stops at the first
  one that does not fit.
- A *prefill step* runs the new batch's prompts (one forward; it yields each request's first token) while the running
  batch is paused. The new requests then join the running batch.
- Each *decode step* yields one token for every running request.
- Before each decode step, waiting requests may interrupt the running batch only if enough of them are waiting:
  ``min_size = floor(batch_size * waiting_served_ratio)``, unless ``max_waiting_tokens`` decode steps have passed
  since the last prefill, after which any waiting request may join. This rule is why arrival timing changes energy:
  requests that arrive together share prefill and decode steps; stragglers pay for their own.

Step durations and power come from ``sim.costmodel``; each step is announced to ``SimGPU`` as it starts, so energy
integrates over the real wall-clock span of each step. A request whose client goes away leaves its step at once
(``SimGPU.drop``): from that instant it owns no energy, and an emptied step ends early.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import deque
from typing import TYPE_CHECKING

import structlog

from sim import costmodel
from sim.config import SimConfig
from sim.generation import GenerationFailed, Sequence
from sim.gpu import SimGPU
from sim.ledger import EnergyAccount
from sim.validation import ValidRequest

if TYPE_CHECKING:
    from sim.metrics import SimMetrics

log = structlog.get_logger(__name__)

# A late step shortens the next ones (so the average step rate is right despite timer granularity), but the engine
# never runs more than this far behind its schedule.
MAX_CATCH_UP_NS = 50_000_000
INSTANT_BURST_S = 0.001


class State(enum.Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    RUNNING = "running"
    DONE = "done"


class SimRequest:
    """One request inside the engine: its generation, timings, output buffer and energy account."""

    __slots__ = (
        "_waiter",
        "account",
        "alloc_tokens",
        "cancelled",
        "chunk",
        "decode_steps_at_first_token",
        "decode_steps_at_queue",
        "done_ns",
        "error",
        "finish_reason",
        "first_token_ns",
        "outbox",
        "prompt_done",
        "queued_ns",
        "request_id",
        "sequence",
        "start_ns",
        "state",
        "stream",
        "tokens",
        "valid",
    )

    def __init__(self, valid: ValidRequest, request_id: str, account: EnergyAccount, stream: bool) -> None:
        self.valid = valid
        self.request_id = request_id
        self.account = account
        self.stream = stream
        self.sequence = Sequence(valid.plan())
        self.alloc_tokens = 0
        self.state = State.QUEUED
        self.queued_ns = time.time_ns()
        self.start_ns: int | None = None  # joined a batch (TGI's batch_time)
        self.first_token_ns: int | None = None
        self.done_ns: int | None = None
        # the engine's decode-step count when queued and when the first token came: how long it waited, in steps
        self.decode_steps_at_queue = 0
        self.decode_steps_at_first_token: int | None = None
        self.tokens: list[int] = []  # vocabulary indices of every generated token
        self.outbox: list[int] = []  # generated but not yet taken by the handler (streams only)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.prompt_done = 0  # prompt tokens prefilled so far (prefill chunking)
        self.chunk = 0  # prompt tokens in the current forward (prefill chunking)
        self._waiter: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self.state is State.DONE

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
    """The batching loop of one simulated TGI server."""

    def __init__(self, config: SimConfig, gpu: SimGPU, metrics: SimMetrics | None = None) -> None:
        self.config = config
        self.gpu = gpu
        self.metrics = metrics
        self._waiting: deque[SimRequest] = deque()
        self._running: list[SimRequest] = []
        self._prefilling: list[SimRequest] = []
        self._batch: list[SimRequest] = []  # the cached batch, with prefill chunking
        self._step: list[SimRequest] = []  # the requests of the step now on the GPU
        self._kv_free_tokens = config.max_batch_total_tokens
        self._wakeup = asyncio.Event()
        self._step_waiter: asyncio.Future[None] | None = None
        self._deadline_s: float | None = None  # loop-clock end of the previous step, while busy
        self._burst_start_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self.prefill_steps = 0
        self.decode_steps = 0

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
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._batch) if self.config.prefill_chunking else len(self._running)

    @property
    def kv_free_tokens(self) -> int:
        return self._kv_free_tokens

    def active(self) -> list[SimRequest]:
        """Every request queued or on the GPU."""
        return [*self._waiting, *self._prefilling, *self._running, *self._batch]

    def submit(self, valid: ValidRequest, request_id: str, stream: bool) -> SimRequest:
        """Queue a validated request (TGI's ``Backend::schedule``)."""
        account = self.gpu.open_account(request_id, valid.input_length)
        request = SimRequest(valid, request_id, account, stream)
        block = self.config.kv_block_size_tokens
        tokens = valid.input_length + valid.max_new_tokens - 1
        request.alloc_tokens = math.ceil(tokens / block) * block
        request.decode_steps_at_queue = self.decode_steps
        self._waiting.append(request)
        self._wakeup.set()
        return request

    def cancel(self, request: SimRequest) -> None:
        """The client went away: the request leaves the queue or its batch now, and its step if one is running."""
        if request.state is State.DONE:
            return
        state = request.state
        request.cancelled = True
        self._finish(request, "cancelled")
        if state is State.QUEUED:
            with contextlib.suppress(ValueError):
                self._waiting.remove(request)
            return
        seen: set[int] = set()
        for members in (self._prefilling, self._running, self._batch, self._step):
            if id(members) not in seen and request in members:
                members.remove(request)
            seen.add(id(members))
        self.gpu.drop(request.account)
        if not self._step and self._step_waiter is not None and not self._step_waiter.done():
            self._step_waiter.set_result(None)  # nothing left to compute in this step: it ends now

    # --- the loop (backend.rs: batching_task) ---

    async def _loop(self) -> None:
        try:
            if self.config.prefill_chunking:
                await self._loop_chunked()
            else:
                await self._loop_classic()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here would silently hang every client: make it loud
            log.exception("sim_scheduler_crashed")
            raise

    async def _idle_until_work(self) -> None:
        self._deadline_s = None
        self.gpu.idle()
        self._wakeup.clear()
        await self._wakeup.wait()

    async def _loop_classic(self) -> None:
        """backend.rs ``batching_task`` for backends without prefill chunking."""
        config = self.config
        while True:
            if not self._waiting:
                await self._idle_until_work()
                continue
            batch = self._next_batch(None, config.max_batch_size)
            if batch is None:  # cannot happen with a validated config; never spin
                await self._idle_until_work()
                continue
            await self._prefill(batch)
            waiting_tokens = 1
            while self._running:
                batch_size = len(self._running)
                if waiting_tokens >= config.max_waiting_tokens:
                    min_size = None  # nothing joined for too long: let even a small batch in
                else:
                    min_size = math.floor(batch_size * config.waiting_served_ratio)
                max_size = None if config.max_batch_size is None else max(config.max_batch_size - batch_size, 0)
                new_batch = self._next_batch(min_size, max_size)
                if new_batch is not None:
                    await self._prefill(new_batch)
                    waiting_tokens = 1
                if self._running:
                    await self._decode()
                waiting_tokens += 1

    def _next_batch(self, min_size: int | None, max_size: int | None) -> list[SimRequest] | None:
        """queue.rs ``State::next_batch`` (block allocator, no prefill chunking)."""
        waiting = self._waiting
        if not waiting:
            return None
        if min_size is not None and len(waiting) < min_size:
            return None
        if max_size is not None and max_size == 0:
            return None
        block = self.config.kv_block_size_tokens
        prefill_budget = math.ceil(self.config.max_batch_prefill_tokens / block) * block
        batch: list[SimRequest] = []
        prefill_tokens = 0
        while waiting:
            request = waiting[0]
            if request.alloc_tokens > self._kv_free_tokens:
                break  # over the KV budget: it stays first in line
            if prefill_tokens + request.valid.input_length > prefill_budget:
                break
            waiting.popleft()
            self._kv_free_tokens -= request.alloc_tokens
            prefill_tokens += request.valid.input_length
            batch.append(request)
            if max_size is not None and len(batch) == max_size:
                break
        if not batch:
            return None
        if min_size is not None and len(batch) < min_size:
            for request in reversed(batch):  # too small to be worth pausing the running batch
                self._kv_free_tokens += request.alloc_tokens
                waiting.appendleft(request)
            return None
        now = time.time_ns()
        for request in batch:
            request.start_ns = now
            request.state = State.PREFILL
        return batch

    async def _prefill(self, batch: list[SimRequest]) -> None:
        """One prefill step over ``batch`` (the running batch waits); survivors join the running batch."""
        self._prefilling = batch
        self._step = batch
        self.prefill_steps += 1
        if self.metrics is not None:
            self.metrics.batch_step("prefill")
        self.gpu.prefill([r.account for r in batch])
        prompt_tokens = sum(r.valid.input_length for r in batch)
        await self._sleep(costmodel.prefill_duration_ns(self.config, prompt_tokens))
        self._step = []
        now = time.time_ns()
        for request in self._prefilling:  # requests cancelled meanwhile are gone from the list
            if self._emit(request, now):
                request.state = State.RUNNING
                self._running.append(request)
        self._prefilling = []

    async def _decode(self) -> None:
        """One decode step: a token for every running request."""
        self.decode_steps += 1
        if self.metrics is not None:
            self.metrics.batch_step("decode")
        running = self._step = self._running
        self.gpu.decode([r.account for r in running])
        await self._sleep(costmodel.decode_duration_ns(self.config, len(running)))
        self._step = []
        now = time.time_ns()
        emit = self._emit
        self._running = [r for r in self._running if emit(r, now)]

    # --- with prefill chunking (backend.rs, support_chunking) ---

    async def _loop_chunked(self) -> None:
        """backend.rs ``batching_task`` when the model supports prefill chunking (TGI 3's default with flashinfer):
        every forward may take in waiting requests up to the prefill budget left by the batch's own tokens, the last
        one possibly cut into a chunk; ``waiting_served_ratio`` and ``max_waiting_tokens`` play no part."""
        config = self.config
        while True:
            if not self._waiting:
                await self._idle_until_work()
                continue
            batch = self._next_batch_chunked(config.max_batch_size, config.max_batch_prefill_tokens)
            if batch is None:
                await self._idle_until_work()
                continue
            self._batch = batch
            await self._forward()
            while self._batch:
                current_tokens = sum(r.chunk if r.prompt_done < r.valid.input_length else 1 for r in self._batch)
                budget = config.max_batch_prefill_tokens - current_tokens
                new_batch = self._next_batch_chunked(None, budget) if budget > 0 else None
                if new_batch is not None:
                    self._batch.extend(new_batch)
                await self._forward()

    def _next_batch_chunked(self, max_size: int | None, budget_tokens: int) -> list[SimRequest] | None:
        """queue.rs ``State::next_batch`` with chunking: the request that overflows the budget gets the rest of it."""
        waiting = self._waiting
        if not waiting or budget_tokens <= 0 or max_size == 0:
            return None
        block = self.config.kv_block_size_tokens
        budget = math.ceil(budget_tokens / block) * block
        batch: list[SimRequest] = []
        prefill_tokens = 0
        while waiting:
            request = waiting[0]
            if request.alloc_tokens > self._kv_free_tokens:
                break
            length = request.valid.input_length
            chunk = length if prefill_tokens + length <= budget else budget - prefill_tokens
            if chunk <= 0:
                break
            waiting.popleft()
            self._kv_free_tokens -= request.alloc_tokens
            request.chunk = chunk
            request.prompt_done = 0
            prefill_tokens += chunk
            batch.append(request)
            if chunk < length or (max_size is not None and len(batch) == max_size):
                break
        if not batch:
            return None
        now = time.time_ns()
        for request in batch:
            request.start_ns = now
            request.state = State.PREFILL
        return batch

    async def _forward(self) -> None:
        """One forward over the cached batch: prompt chunks for the requests still prefilling, one token for the
        others. Costed as a prefill step over the chunks followed by a decode step over the rest; every token comes
        out at the end, when the forward completes."""
        config = self.config
        prefilling = [r for r in self._batch if r.prompt_done < r.valid.input_length]
        if prefilling:
            self._step = prefilling
            self.prefill_steps += 1
            if self.metrics is not None:
                self.metrics.batch_step("prefill")
            chunks = [r.chunk for r in prefilling]
            self.gpu.prefill([r.account for r in prefilling], weights=chunks)
            await self._sleep(costmodel.prefill_duration_ns(config, sum(chunks)))
        decoding = [r for r in self._batch if r.prompt_done >= r.valid.input_length]
        if decoding:
            self._step = decoding
            self.decode_steps += 1
            if self.metrics is not None:
                self.metrics.batch_step("decode")
            self.gpu.decode([r.account for r in decoding])
            await self._sleep(costmodel.decode_duration_ns(config, len(decoding)))
        self._step = []
        now = time.time_ns()
        survivors = []
        for request in self._batch:  # requests cancelled meanwhile are gone
            if request.prompt_done < request.valid.input_length:
                request.prompt_done += request.chunk
                if request.prompt_done < request.valid.input_length:
                    survivors.append(request)  # more prompt to go: no token yet
                    continue
                request.state = State.RUNNING
            if self._emit(request, now):
                survivors.append(request)
        self._batch = survivors
        # flash_causal_lm.py: the next chunks share max_batch_prefill_tokens, less one token per other request
        budget = config.max_batch_prefill_tokens - (len(survivors) - 1)
        for request in survivors:  # oldest first
            remaining = request.valid.input_length - request.prompt_done
            if remaining > 0:
                request.chunk = max(min(remaining, budget), 1)
                budget -= request.chunk

    def _emit(self, request: SimRequest, now_ns: int) -> bool:
        """Give ``request`` its next token; False when it is finished (or failed) and leaves the batch."""
        try:
            index, finish_reason = request.sequence.step()
        except GenerationFailed as e:
            request.error = f"Request failed during generation: {e}"
            self._finish(request, "error")
            return False
        request.tokens.append(index)
        request.account.generated_tokens += 1
        if request.first_token_ns is None:
            request.first_token_ns = now_ns
            request.decode_steps_at_first_token = self.decode_steps
        if request.stream:
            request.outbox.append(index)
        if finish_reason is not None:
            self._finish(request, finish_reason)
            return False
        if request.stream:
            request._wake()
        return True

    def _finish(self, request: SimRequest, reason: str) -> None:
        if request.state is not State.QUEUED:
            self._kv_free_tokens += request.alloc_tokens
        request.state = State.DONE
        request.done_ns = time.time_ns()
        if reason in ("length", "eos_token", "stop_sequence"):
            request.finish_reason = reason
        request.account.finish_reason = reason
        self.gpu.close(request.account)
        request._wake()

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
