"""TGI v3's continuous-batching rules (backends/v3/src/backend.rs, queue.rs) as a clock-free core.

The rules follow ``batching_task``. On the path TGI takes for models without prefill chunking:

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

With ``prefill_chunking`` (TGI 3 for flash models) every forward may take in waiting requests up to the prefill budget
left by the batch's own tokens, the last one cut into a chunk; the ratio rule plays no part.

Why clock-free. The live simulator (``sim.scheduler``) runs these rules in real time on an asyncio loop; the replay
(``sim.replay``) runs them on a virtual clock, thousands of times, to compute ground truths such as Shapley values.
Both must schedule identically, so the rules live here once and neither reads a clock: ``BatchingCore.steps`` is a
generator that plays the loop of ``batching_task``. It yields each step it starts (a ``Step``: its phase, its
requests, how long it takes) or ``None`` when it has nothing to do, and is resumed with the time at which that step
ended (or work arrived). The driver owns time: it sleeps, or jumps its virtual clock, between yields.

Step durations and power come from ``sim.costmodel``; each step is announced to ``SimGPU`` as it starts, with the
time the driver gave, so energy integrates over the exact span of each step. A cancelled request gets no more tokens;
the step in progress runs to its end with it, its share of the step its own (``finish_step_on_cancel``, as an
engine's forward pass), or, with that off, it leaves the step at once (``SimGPU.drop``): from that instant it owns no
energy, and an emptied step ends early (``cancel`` says so).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

from sim import costmodel
from sim.config import SimConfig
from sim.generation import GenerationFailed, Sequence
from sim.gpu import SimGPU, context_tokens
from sim.ledger import EnergyAccount, Phase


class State(enum.Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    RUNNING = "running"
    DONE = "done"


class BatchRequest:
    """One request inside the engine: its generation, timings and energy account. Times are the driver's clock.

    ``on_token`` and ``on_end`` are hooks for a driver that hands tokens to someone (the server's handlers)."""

    __slots__ = (
        "account",
        "alloc_tokens",
        "cached_tokens",
        "cancelled",
        "chunk",
        "decode_steps_at_first_token",
        "decode_steps_at_queue",
        "done_ns",
        "error",
        "finish_reason",
        "first_token_ns",
        "input_length",
        "max_new_tokens",
        "prompt_done",
        "queued_ns",
        "request_id",
        "sequence",
        "start_ns",
        "state",
        "tokens",
    )

    def __init__(
        self,
        request_id: str,
        input_length: int,
        max_new_tokens: int,
        sequence: Sequence,
        account: EnergyAccount,
        queued_ns: int,
    ) -> None:
        self.request_id = request_id
        self.input_length = input_length
        self.max_new_tokens = max_new_tokens
        self.sequence = sequence
        self.account = account
        self.alloc_tokens = 0
        self.state = State.QUEUED
        self.queued_ns = queued_ns
        self.start_ns: int | None = None  # joined a batch (TGI's batch_time)
        self.first_token_ns: int | None = None
        self.done_ns: int | None = None
        # the engine's decode-step count when queued and when the first token came: how long it waited, in steps
        self.decode_steps_at_queue = 0
        self.decode_steps_at_first_token: int | None = None
        self.tokens: list[int] = []  # vocabulary indices of every generated token
        self.finish_reason: str | None = None  # length, eos_token or stop_sequence; None if cancelled or failed
        self.error: str | None = None
        self.cancelled = False
        self.prompt_done = 0  # prompt tokens prefilled so far (prefill chunking)
        self.chunk = 0  # prompt tokens in the current forward (prefill chunking)
        self.cached_tokens = 0  # prompt tokens found in the engine's prefix cache: not computed again

    @property
    def computed_tokens(self) -> int:
        """The prompt tokens its prefill computes (all but the prefix-cache hit)."""
        return self.input_length - self.cached_tokens

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def on_token(self, index: int) -> None:
        """A token was generated (``index`` is already in ``tokens``)."""

    def on_end(self) -> None:
        """The request is over (finished, failed or cancelled)."""


@dataclass(frozen=True, slots=True)
class Step:
    """A step the core just started: it lasts ``duration_ns`` unless all its requests leave before (``cancel``)."""

    phase: Phase  # PREFILL or DECODE
    requests: tuple[BatchRequest, ...]
    duration_ns: int


# What ``BatchingCore.steps`` yields (a step, or None: idle until work arrives) and is resumed with (the time).
Steps = Generator[Step | None, int, None]


class BatchingCore:
    """The router and shard of one simulated TGI server, without a clock. Not thread-safe."""

    def __init__(self, config: SimConfig, gpu: SimGPU) -> None:
        self.config = config
        self.gpu = gpu
        self._waiting: deque[BatchRequest] = deque()
        self._running: list[BatchRequest] = []
        self._prefilling: list[BatchRequest] = []
        self._batch: list[BatchRequest] = []  # the cached batch, with prefill chunking
        self._step: list[BatchRequest] = []  # the requests of the step now on the GPU
        self._kv_free_tokens = config.max_batch_total_tokens
        self.now_ns = 0  # the driver's time at the last resume
        self.prefill_steps = 0
        self.decode_steps = 0

    # --- state ---

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._batch) if self.config.prefill_chunking else len(self._running)

    @property
    def kv_free_tokens(self) -> int:
        return self._kv_free_tokens

    def active(self) -> list[BatchRequest]:
        """Every request queued or on the GPU."""
        return [*self._waiting, *self._prefilling, *self._running, *self._batch]

    # --- what the driver calls ---

    def submit(self, request: BatchRequest) -> None:
        """Queue a request (TGI's ``Backend::schedule``); a core waiting for work must then be resumed."""
        block = self.config.kv_block_size_tokens
        tokens = request.input_length + request.max_new_tokens - 1
        request.alloc_tokens = math.ceil(tokens / block) * block
        request.decode_steps_at_queue = self.decode_steps
        self._waiting.append(request)

    def cancel(self, request: BatchRequest, now_ns: int) -> bool:
        """The client went away at ``now_ns``: the request leaves the queue or its batch, and (``finish_step_on_cancel``
        off) its step if one is running. Returns True when that left the step in progress with no request: the step
        ends now."""
        if request.state is State.DONE:
            return False
        state = request.state
        request.cancelled = True
        self._finish(request, "cancelled", now_ns)
        if state is State.QUEUED:
            with contextlib.suppress(ValueError):
                self._waiting.remove(request)
            return False
        in_step = request in self._step
        seen: set[int] = set()
        for members in (self._prefilling, self._running, self._batch, self._step):
            if id(members) not in seen and request in members:
                members.remove(request)
            seen.add(id(members))
        if in_step and self.config.finish_step_on_cancel:
            return False  # a forward pass is not stopped: the request owns its share of the step until it ends
        self.gpu.drop(request.account, now_ns)
        return in_step and not self._step

    def steps(self, now_ns: int) -> Steps:
        """backend.rs ``batching_task``: yields each step as it starts, or None when there is nothing to do; resume it
        with ``send(time)``: when the step ended, or when work arrived."""
        self.now_ns = now_ns
        if self.config.prefill_chunking:
            yield from self._loop_chunked()
        else:
            yield from self._loop_classic()

    # --- the loop (backend.rs: batching_task) ---

    def _idle(self) -> Steps:
        self.gpu.idle(self.now_ns)
        self.now_ns = yield None

    def _loop_classic(self) -> Steps:
        """backend.rs ``batching_task`` for backends without prefill chunking."""
        config = self.config
        while True:
            if not self._waiting:
                yield from self._idle()
                continue
            batch = self._next_batch(None, config.max_batch_size)
            if batch is None:  # cannot happen with a validated config; never spin
                yield from self._idle()
                continue
            yield from self._prefill(batch)
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
                    yield from self._prefill(new_batch)
                    waiting_tokens = 1
                if self._running:
                    yield from self._decode()
                waiting_tokens += 1

    def _next_batch(self, min_size: int | None, max_size: int | None) -> list[BatchRequest] | None:
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
        batch: list[BatchRequest] = []
        prefill_tokens = 0
        while waiting:
            request = waiting[0]
            if request.alloc_tokens > self._kv_free_tokens:
                break  # over the KV budget: it stays first in line
            if prefill_tokens + request.input_length > prefill_budget:
                break
            waiting.popleft()
            self._kv_free_tokens -= request.alloc_tokens
            prefill_tokens += request.input_length
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
        for request in batch:
            request.start_ns = self.now_ns
            request.state = State.PREFILL
        return batch

    def _prefill(self, batch: list[BatchRequest]) -> Steps:
        """One prefill step over ``batch`` (the running batch waits); survivors join the running batch."""
        self._prefilling = batch
        self._step = batch
        self.prefill_steps += 1
        computed = [r.computed_tokens for r in batch]
        self.gpu.prefill([r.account for r in batch], self.now_ns, weights=computed)
        prompt_tokens = sum(computed)
        self.now_ns = yield Step(Phase.PREFILL, tuple(batch), costmodel.prefill_duration_ns(self.config, prompt_tokens))
        self._step = []
        now = self.now_ns
        for request in self._prefilling:  # requests cancelled meanwhile are gone from the list
            if self._emit(request, now):
                request.state = State.RUNNING
                self._running.append(request)
        self._prefilling = []

    def _decode(self) -> Steps:
        """One decode step: a token for every running request."""
        self.decode_steps += 1
        running = self._step = self._running
        accounts = [r.account for r in running]
        self.gpu.decode(accounts, self.now_ns)
        duration = costmodel.decode_duration_ns(self.config, len(running), context_tokens(accounts))
        self.now_ns = yield Step(Phase.DECODE, tuple(running), duration)
        self._step = []
        now = self.now_ns
        emit = self._emit
        self._running = [r for r in self._running if emit(r, now)]

    # --- with prefill chunking (backend.rs, support_chunking) ---

    def _loop_chunked(self) -> Steps:
        """backend.rs ``batching_task`` when the model supports prefill chunking (TGI 3's default with flashinfer):
        every forward may take in waiting requests up to the prefill budget left by the batch's own tokens, the last
        one possibly cut into a chunk; ``waiting_served_ratio`` and ``max_waiting_tokens`` play no part."""
        config = self.config
        while True:
            if not self._waiting:
                yield from self._idle()
                continue
            batch = self._next_batch_chunked(config.max_batch_size, config.max_batch_prefill_tokens)
            if batch is None:
                yield from self._idle()
                continue
            self._batch = batch
            yield from self._forward()
            while self._batch:
                current_tokens = sum(r.chunk if r.prompt_done < r.input_length else 1 for r in self._batch)
                budget = config.max_batch_prefill_tokens - current_tokens
                new_batch = self._next_batch_chunked(None, budget) if budget > 0 else None
                if new_batch is not None:
                    self._batch.extend(new_batch)
                yield from self._forward()

    def _next_batch_chunked(self, max_size: int | None, budget_tokens: int) -> list[BatchRequest] | None:
        """queue.rs ``State::next_batch`` with chunking: the request that overflows the budget gets the rest of it."""
        waiting = self._waiting
        if not waiting or budget_tokens <= 0 or max_size == 0:
            return None
        block = self.config.kv_block_size_tokens
        budget = math.ceil(budget_tokens / block) * block
        batch: list[BatchRequest] = []
        prefill_tokens = 0
        while waiting:
            request = waiting[0]
            if request.alloc_tokens > self._kv_free_tokens:
                break
            length = request.computed_tokens
            chunk = length if prefill_tokens + length <= budget else budget - prefill_tokens
            if chunk <= 0:
                break
            waiting.popleft()
            self._kv_free_tokens -= request.alloc_tokens
            request.chunk = chunk
            request.prompt_done = request.cached_tokens
            prefill_tokens += chunk
            batch.append(request)
            if chunk < length or (max_size is not None and len(batch) == max_size):
                break
        if not batch:
            return None
        for request in batch:
            request.start_ns = self.now_ns
            request.state = State.PREFILL
        return batch

    def _forward(self) -> Steps:
        """One forward over the cached batch: prompt chunks for the requests still prefilling, one token for the
        others. Costed as a prefill step over the chunks followed by a decode step over the rest; every token comes
        out at the end, when the forward completes."""
        config = self.config
        prefilling = [r for r in self._batch if r.prompt_done < r.input_length]
        if prefilling:
            self._step = prefilling
            self.prefill_steps += 1
            chunks = [r.chunk for r in prefilling]
            self.gpu.prefill([r.account for r in prefilling], self.now_ns, weights=chunks)
            duration = costmodel.prefill_duration_ns(config, sum(chunks))
            self.now_ns = yield Step(Phase.PREFILL, tuple(prefilling), duration)
        decoding = [r for r in self._batch if r.prompt_done >= r.input_length]
        if decoding:
            self._step = decoding
            self.decode_steps += 1
            accounts = [r.account for r in decoding]
            self.gpu.decode(accounts, self.now_ns)
            duration = costmodel.decode_duration_ns(config, len(decoding), context_tokens(accounts))
            self.now_ns = yield Step(Phase.DECODE, tuple(decoding), duration)
        self._step = []
        now = self.now_ns
        survivors = []
        for request in self._batch:  # requests cancelled meanwhile are gone
            if request.prompt_done < request.input_length:
                request.prompt_done += request.chunk
                if request.prompt_done < request.input_length:
                    survivors.append(request)  # more prompt to go: no token yet
                    continue
                request.state = State.RUNNING
            if self._emit(request, now):
                survivors.append(request)
        self._batch = survivors
        # flash_causal_lm.py: the next chunks share max_batch_prefill_tokens, less one token per other request
        budget = config.max_batch_prefill_tokens - (len(survivors) - 1)
        for request in survivors:  # oldest first
            remaining = request.input_length - request.prompt_done
            if remaining > 0:
                request.chunk = max(min(remaining, budget), 1)
                budget -= request.chunk

    def _emit(self, request: BatchRequest, now_ns: int) -> bool:
        """Give ``request`` its next token; False when it is finished (or failed) and leaves the batch."""
        try:
            index, finish_reason = request.sequence.step()
        except GenerationFailed as e:
            request.error = f"Request failed during generation: {e}"
            self._finish(request, "error", now_ns)
            return False
        request.tokens.append(index)
        request.account.generated_tokens += 1
        if request.first_token_ns is None:
            request.first_token_ns = now_ns
            request.decode_steps_at_first_token = self.decode_steps
        request.on_token(index)
        if finish_reason is not None:
            self._finish(request, finish_reason, now_ns)
            return False
        return True

    def _finish(self, request: BatchRequest, reason: str, now_ns: int) -> None:
        if request.state is not State.QUEUED:
            self._kv_free_tokens += request.alloc_tokens
        request.state = State.DONE
        request.done_ns = now_ns
        if reason in ("length", "eos_token", "stop_sequence"):
            request.finish_reason = reason
        request.account.finish_reason = reason
        self.gpu.close(request.account)
        request.on_end()
