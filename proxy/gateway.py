"""The request path both front doors share: shape, lease a backend slot, stream from TGI, record the timeline.

``Gateway.stream(job)`` yields TGI's stream events (parsed JSON dicts) as they arrive; the gRPC servicer turns them
into TGIS messages, the HTTP facade writes them back out as SSE. Whatever happens — success, a TGI error, a client
cancel, an expired deadline — the request's timeline reaches the ledger exactly once, from the ``finally`` here;
calls the front doors refuse before any stream starts are recorded through ``record_refused``.

What the timeline says (the meter bills by it, ``meter.timeline.did_gpu_work``):

- ``status`` is what the client saw. A stream that ends because its consumer went away is ``CANCELLED``, or
  ``DEADLINE_EXCEEDED`` when that happened at (or within ``DEADLINE_SLACK_S`` before) the call's deadline (a client's
  own deadline reaches the server as a cancellation a moment before the server's copy of it expires), or ``OK`` at
  a TGIS time limit, or ``UNAVAILABLE`` when the gateway's drain ran past its grace and cut it;
- ``prompt_tokens`` is the backend's own count: TGI's ``input_length``, or, for a stream that ended without it (an
  error, a cancel), the backend's ``/tokenize`` (``/chat_tokenize`` for chat), asked after the stream has ended, off
  the request's path, before the timeline goes to the ledger. Only when that fails too is it the gateway's estimate,
  flagged ``prompt_tokens_estimated``. A request the backend refused (no GPU work) records 0.

Retries (tenacity) happen only before the first byte of a stream and only on another backend: connection refused,
or TGI overloaded or not ready. After the first byte a failure is the client's to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Mapping
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import orjson
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from common.errors import (
    BackendError,
    Cancelled,
    DeadlineExceeded,
    GatewayError,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
)
from common.inputs import clip
from meter.timeline import Api, RequestStart, Timeline, did_gpu_work
from proxy.backends import Backend, BackendPool, BackendUnreachable, Lease
from proxy.budgets import Budgets
from proxy.engines import Engine, EventReader
from proxy.engines.base import CACHED_TOKENS
from proxy.job import Job
from proxy.metrics import GENERATED_TOKENS, LATENCY, PROMPT_TOKENS, REQUESTS, TTFT, Children, tenant_label
from proxy.prompt_scale import PromptScale
from proxy.rate_limits import RateLimiter
from proxy.request_log import log_request
from proxy.shaping import Shaper
from proxy.sse import EventScanner, ParsedRun, PlainRun, SSEDecoder, parse_run
from proxy.tgi_wire import OPENAI_ROUTES, stream_error
from proxy.tracing import RequestTrace, Tracing, backend_call, queued, recorded, stream_ended
from proxy.upstream import UpstreamError, UpstreamResponse

log = structlog.get_logger(__name__)
T = TypeVar("T")

_REQUESTS, _GENERATED_TOKENS, _PROMPT_TOKENS = Children(REQUESTS), Children(GENERATED_TOKENS), Children(PROMPT_TOKENS)
_TTFT, _LATENCY = Children(TTFT), Children(LATENCY)

UNKNOWN_CLASS = "(unknown)"  # the recorded class of a refused call that named a class no operator configured


class TimelineSink(Protocol):
    """Where timelines go (meter.ledger.Ledger); both calls must return at once."""

    def request_started(self, start: RequestStart) -> None: ...

    def request_finished(self, timeline: Timeline) -> None: ...


_RETRYABLE = (BackendUnreachable, Overloaded, Unavailable)

# A client's deadline reaches the server as a cancellation, a moment before the server's own copy of the deadline
# (set from the grpc-timeout header, a transit later) expires: a cancel this close to the deadline is the deadline.
DEADLINE_SLACK_S = 0.05
COUNT_TIMEOUT_S = 10.0  # how long the backend's /tokenize may take after a stream that did not report its count
MAX_RECORDED_ID_CHARS = 256  # a model id a client named, as it is recorded for a refused call


class GatewayState(StrEnum):
    """The gateway's life: it only moves forward."""

    STARTING = "starting"  # its database has not answered (or not at this version's schema): it refuses requests
    SERVING = "serving"
    DRAINING = "draining"  # refuses new requests; what runs finishes within the drain's grace


class StreamState(StrEnum):
    """Where a ``GenerationStream`` is in its life; it only moves forward."""

    CREATED = "created"  # not read yet
    QUEUED = "queued"  # in the shaping queue, waiting for a backend slot
    OPENING = "opening"  # released to a backend, whose first event has not come
    STREAMING = "streaming"  # the first token came (the end of prefill)
    ENDED = "ended"  # over, ``status`` says how; its timeline is recorded (or on its way to the ledger)


class GenerationStream:
    """One request's generation through the gateway, as a response with a lifecycle (the way httpx's
    ``client.stream()`` hands back a response): ``Gateway.generation(job)`` makes it, a front door reads it once with
    ``batches()`` or ``events()``, and it tells, while it runs and after: its ``state``, the backend it runs on, when
    it was released and when its first token came, its usage (``prompt_tokens``, ``generated_tokens``), whether
    TGIS's token limit shrank it (``token_limited``), the backend's compute type, and how it ended (``status``, the
    gRPC code name its client saw). Errors come out of the iteration as ``GatewayError``s."""

    __slots__ = (
        "_gateway",
        "backend",
        "cached_tokens",
        "compute_type",
        "first_token_ns",
        "generated_tokens",
        "job",
        "prompt_tokens",
        "released_ns",
        "state",
        "status",
        "token_limited",
        "trace",
    )

    def __init__(self, gateway: Gateway, job: Job) -> None:
        self._gateway = gateway
        self.job = job
        self.state = StreamState.CREATED
        self.status: str | None = None  # set when it ends
        self.backend: str | None = None
        self.released_ns: int | None = None
        self.first_token_ns: int | None = None
        self.generated_tokens = 0
        self.prompt_tokens: int | None = None  # the backend's count, once it told it
        self.cached_tokens: int | None = None  # of those, found in the engine's prefix cache (vLLM, SGLang report it)
        self.token_limited = False  # max_new_tokens was shrunk to fit the model (TGIS TOKEN_LIMIT)
        self.compute_type: str | None = None  # the backend's x-compute-type header (TGI's --compute-type)
        self.trace: RequestTrace | None = None  # its spans, when tracing is on

    @property
    def ended(self) -> bool:
        return self.state is StreamState.ENDED

    @property
    def last_stamp_ns(self) -> int:
        """The latest of its stamps so far (first token, else release, else receipt): where ``done`` may not be
        earlier."""
        return self.first_token_ns or self.released_ns or self.job.received_ns

    def batches(self) -> AsyncGenerator[list[dict[str, Any]], None]:
        """TGI's stream events in batches: every event that one network read delivered.

        A front door that writes one message per batch sends fewer, larger messages when tokens arrive faster than
        it can forward them, which is where per-message costs would otherwise cap throughput. Raises GatewayError
        subclasses; the timeline is recorded whatever happens. A stream is read once."""
        self._start_reading()
        return self._gateway._run(self, raw=False)

    def raw_batches(self) -> AsyncGenerator[list[Item], None]:
        """``batches``, except that runs of plain token events come as ``PlainRun``s: the backend's own SSE bytes,
        counted but not parsed, for a front door that relays them unchanged (its client speaks the wire format the
        backend sends: TGI's routes in front of TGI). Every other event (the last one with its details or usage,
        errors, anything the scan cannot prove plain) is a parsed event as ``batches`` gives it. Engines whose
        events the gateway translates give parsed events only."""
        self._start_reading()
        return self._gateway._run(self, raw=True)

    def _start_reading(self) -> None:
        if self.state is not StreamState.CREATED:
            raise RuntimeError(f"stream of {self.job.request_id} is {self.state.value}: a stream is read once")
        self.state = StreamState.QUEUED

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """TGI's stream events one by one (see ``batches``)."""
        async with contextlib.aclosing(self.batches()) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    def _end(self, status: str) -> None:
        self.state = StreamState.ENDED
        self.status = status


class Gateway:
    def __init__(
        self,
        pools: Mapping[str, BackendPool],
        shapers: Mapping[str, Shaper],
        ledger: TimelineSink,
        *,
        retries: int,
        rate_limiter: RateLimiter | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self.pools = dict(pools)
        self.rate_limiter = rate_limiter
        self.budgets = budgets
        self.prompt_scale = PromptScale()
        self._shapers = dict(shapers)  # one per model
        self.ledger = ledger
        self.retries = retries
        self.state = GatewayState.STARTING
        self._drain_cut_at: float | None = None  # loop time after which the drain cuts what is still running
        self._pending: set[asyncio.Task[None]] = set()  # timelines waiting for the backend's prompt count
        self.tracing = Tracing.off()  # app.server sets the configured one

    def mark_ready(self) -> None:
        """Serve: the key store answers (``app.server`` calls it once the database did). Never after a drain."""
        if self.state is GatewayState.STARTING:
            self.state = GatewayState.SERVING

    @property
    def ready(self) -> bool:
        """Past the start: it can authenticate (its database answered once)."""
        return self.state is not GatewayState.STARTING

    @property
    def draining(self) -> bool:
        return self.state is GatewayState.DRAINING

    def begin_drain(self, grace_s: float) -> None:
        """Refuse new requests; streams still running ``grace_s`` from now are cut by the server's stop, and record
        UNAVAILABLE, as their clients see. Call before the front doors start their own grace period."""
        self.state = GatewayState.DRAINING
        self._drain_cut_at = asyncio.get_running_loop().time() + grace_s

    async def flush_records(self, timeout_s: float = COUNT_TIMEOUT_S) -> None:
        """Wait for the timelines still waiting for a prompt count (before the ledger's last flush)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout_s)

    # -- lookups ---------------------------------------------------------------------------------------------
    def resolve_model(self, model_id: str) -> str:
        """The model a request names; an empty id means the only model, when there is only one."""
        if not model_id:
            if len(self.pools) == 1:
                return next(iter(self.pools))
            raise InvalidArgument(f"model_id: required (this gateway serves {sorted(self.pools)})")
        if model_id not in self.pools:
            raise NotFound(f"model_id: unknown model {clip(model_id)!r} (this gateway serves {sorted(self.pools)})")
        return model_id

    def pool(self, model_id: str) -> BackendPool:
        return self.pools[self.resolve_model(model_id)]

    def resolve_class(self, model_id: str, name: str) -> str:
        """The configured traffic class of ``model_id`` that ``name`` asks for; InvalidArgument for any other name.

        Front doors call this before they build a Job, so a class name that no operator configured never becomes a
        metric label or a ledger row (a client could otherwise grow both without bound).
        """
        return self._shapers[self.resolve_model(model_id)].resolve_class(name)

    def budget_note(self, tenant: str) -> str | None:
        """The ``x-joulegate-budget`` value for ``tenant``'s calls (``soft-exceeded``, ``hard-exceeded``), or None."""
        return self.budgets.note(tenant) if self.budgets is not None else None

    @property
    def healthy(self) -> bool:
        return self.state is GatewayState.SERVING and any(p.healthy for p in self.pools.values())

    async def tokenize(
        self, model_id: str, text: str, *, options: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """TGI's /tokenize on the least-loaded healthy backend (no generation slot needed).

        ``options``: the rest of TGI's request body (``add_special_tokens``, ``parameters``), passed through.
        """
        return await self._on_any(model_id, lambda backend: backend.tokenize(text, dict(options or {})))

    async def _on_any(self, model_id: str, call: Callable[[Backend], Awaitable[T]]) -> T:
        """A small call on the least-loaded healthy backend of the model, the next one if it is unreachable."""
        pool = self.pool(model_id)
        last: GatewayError = Unavailable(f"no healthy backend for model {pool.model_id!r}", retry_after_s=1.0)
        for backend in sorted((b for b in pool.backends if b.healthy), key=lambda b: b.outstanding_tokens):
            try:
                return await call(backend)
            except BackendUnreachable as exc:
                last = exc
                continue
        raise _as_final(last)

    async def model_info(self, model_id: str) -> dict[str, Any]:
        pool = self.pool(model_id)
        if pool.info is None:
            await pool.check_all()
        if pool.info is None:
            raise Unavailable(f"no backend of model {pool.model_id!r} has answered /info yet", retry_after_s=1.0)
        return pool.info

    # -- the stream ------------------------------------------------------------------------------------------
    def generation(self, job: Job) -> GenerationStream:
        """The stream of ``job``, not started: read it with ``batches()`` or ``events()`` (once)."""
        return GenerationStream(self, job)

    async def _run(self, stream: GenerationStream, *, raw: bool) -> AsyncGenerator[list[Any], None]:
        """The work behind ``GenerationStream.batches`` (``raw_batches``): shape, lease, open (with retries),
        relay, record."""
        job = stream.job
        status = "UNKNOWN"
        lease: Lease | None = None
        resp: UpstreamResponse | None = None
        try:
            if self.draining:
                raise Unavailable("gateway is shutting down", retry_after_s=1.0)
            if not self.ready:  # no record before its database's schema is known to take it
                raise Unavailable("gateway is starting: its database has not answered yet", retry_after_s=1.0)
            pool = self.pool(job.model_id)
            job.prompt_scale = self.prompt_scale.scale(job.tenant, job.model_id)
            stream.trace = self.tracing.request(job)
            with queued(stream.trace):
                lease = await self._admit(job, pool)
            stream.released_ns = _after(job.received_ns)
            stream.backend = lease.backend.name
            stream.state = StreamState.OPENING
            self.ledger.request_started(
                RequestStart(
                    request_id=job.request_id,
                    tenant=job.tenant,
                    model_id=job.model_id,
                    backend=lease.backend.name,
                    received_ns=job.received_ns,
                    released_ns=stream.released_ns,
                )
            )
            lease, resp, events, first = await self._open(job, pool, lease, stream, raw)
            stream.compute_type = resp.headers.get("x-compute-type")
            observe = self._observe_openai if job.route in OPENAI_ROUTES else self._observe
            # Tokens that arrived in the same read as an error event still reach the client, then the error.
            batch, error = _observe_batch(observe, first, lease, stream)
            if batch:
                yield batch
            if error is None:
                async for chunk in resp:
                    batch, error = _observe_batch(observe, events.feed(chunk), lease, stream)
                    if batch:
                        yield batch
                    if error is not None:
                        break
            if error is None:
                batch, error = _observe_batch(observe, events.close(), lease, stream)
                if batch:
                    yield batch
            if error is not None:
                raise error
            status = "OK"
        except Cancelled:  # the HTTP front door passes its client's leaving in as Cancelled
            status = self.ended_by_consumer(job)
            raise
        except GatewayError as exc:
            status = exc.grpc_code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled while waiting inside the stream, or closed by a consumer that stopped reading (a gRPC
            # client that left while its last message was being written, a time limit): the same question either way.
            status = self.ended_by_consumer(job)
            raise
        except UpstreamError as exc:
            status = "UNAVAILABLE"
            if lease is not None:  # one broken stream is no evidence against the backend: probe it, keep it
                lease.backend.suspect(f"{type(exc).__name__}: {exc}")
            raise BackendError(f"backend stream broke: {type(exc).__name__}") from exc
        finally:
            if resp is not None:
                resp.close()  # closes the connection: TGI drops a request whose client went away
            if lease is not None:
                lease.release()
            self._finish(job, stream, status)

    def ended_by_consumer(self, job: Job) -> str:
        """The status of a stream its consumer ended (cancelled or closed): what its client saw."""
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # closed by the garbage collector after the loop stopped
            return "CANCELLED"
        if job.stop_at is not None and now >= job.stop_at:
            return "OK"  # the front door's time limit: a normal end (TGIS TIME_LIMIT)
        if job.deadline is not None and now >= job.deadline - DEADLINE_SLACK_S:
            return "DEADLINE_EXCEEDED"
        if self._drain_cut_at is not None and now >= self._drain_cut_at:
            return "UNAVAILABLE"  # the drain ran past its grace: the server cut the call
        return "CANCELLED"

    @staticmethod
    def _observe(event: dict[str, Any], lease: Lease, stream: GenerationStream) -> dict[str, Any]:
        """Note what a stream event tells the meter; raise the mapped error for an in-stream error event."""
        if "error" in event:
            raise stream_error(event, lease.backend.name)
        if stream.first_token_ns is None:
            stream.first_token_ns = _after(stream.released_ns or 0)
            stream.state = StreamState.STREAMING
        if "token" in event:
            stream.generated_tokens += 1
            lease.consume(1)
        details = event.get("details")
        if details:
            stream.prompt_tokens = details.get("input_length")
            stream.cached_tokens = event.pop(CACHED_TOKENS, None)
            stream.generated_tokens = details.get("generated_tokens", stream.generated_tokens)
        return event

    @staticmethod
    def _observe_openai(event: dict[str, Any], lease: Lease, stream: GenerationStream) -> dict[str, Any]:
        """The same for a chat.completion(.chunk) / text_completion chunk: TGI sends one chunk per generated token.

        The final ``usage`` (TGI sends it when ``stream_options.include_usage``, and always on /v1/completions)
        gives the exact counts.
        """
        if "error" in event:
            raise stream_error(event, lease.backend.name)
        choices = event.get("choices")
        if choices:
            if stream.first_token_ns is None:
                stream.first_token_ns = _after(stream.released_ns or 0)
                stream.state = StreamState.STREAMING
            stream.generated_tokens += len(choices)
            lease.consume(len(choices))
        usage = event.get("usage")
        if usage:
            stream.prompt_tokens = usage.get("prompt_tokens", stream.prompt_tokens)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if isinstance(cached, int):
                stream.cached_tokens = cached
            stream.generated_tokens = usage.get("completion_tokens", stream.generated_tokens)
        return event

    async def _admit(self, job: Job, pool: BackendPool) -> Lease:
        shaper = self._shapers[pool.model_id]
        if not pool.healthy:
            raise Unavailable(f"no healthy backend for model {pool.model_id!r}", retry_after_s=1.0)
        if self.budgets is not None:  # before the rate limiter: a tenant out of energy takes none of its minute
            moved = self.budgets.admit(
                job.tenant, job.request_id, model_id=job.model_id,
                prompt_tokens=job.prompt_tokens_estimate, max_new_tokens=job.max_new_tokens,
            )  # fmt: skip
            job.traffic_class = moved or job.traffic_class
        if self.rate_limiter is not None:  # before the queue: a limited tenant never holds a place in it
            await self.rate_limiter.admit(job.tenant, job.token_estimate)
            job.rate_prompt_tokens = job.prompt_tokens_estimate
        if job.deadline is None:
            return await shaper.acquire(job, pool)
        try:
            async with asyncio.timeout_at(job.deadline):
                return await shaper.acquire(job, pool)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while queued; the request never reached a backend") from None

    async def _open(
        self, job: Job, pool: BackendPool, lease: Lease, stream: GenerationStream, raw: bool
    ) -> tuple[Lease, UpstreamResponse, _Events, list[_Found]]:
        """Send the request; on a retryable failure before the first byte, move to another backend.

        Returns the lease actually used (the caller's, or one on another backend) and the open response. On
        failure every lease taken here is given back.
        """
        tried: set[str] = set()
        current: Lease | None = lease
        last: GatewayError | None = None

        async def attempt_once() -> tuple[UpstreamResponse, _Events, list[_Found]]:
            nonlocal current, last
            if current is None:
                current = pool.try_acquire(job.token_estimate, exclude=frozenset(tried))
                if current is None:
                    assert last is not None
                    raise _GiveUp(last)
            tried.add(current.backend.name)
            stream.backend = current.backend.name
            try:
                return await self._send(job, current, stream, raw)
            except _RETRYABLE as exc:
                last = exc
                current.release()
                current = None
                raise

        try:
            try:
                opened = await attempt_once()  # the common case, without the retry machinery's cost
            except _RETRYABLE:
                if not self.retries:
                    raise
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.retries), retry=retry_if_exception_type(_RETRYABLE), reraise=True
                ):
                    with attempt:
                        opened = await attempt_once()
        except _RETRYABLE as exc:
            raise _as_final(exc) from exc
        except _GiveUp as exc:
            raise _as_final(exc.cause) from exc.cause
        except BaseException:
            if current is not None:
                current.release()
            raise
        assert current is not None
        return (current, *opened)

    async def _send(
        self, job: Job, lease: Lease, stream: GenerationStream, raw: bool
    ) -> tuple[UpstreamResponse, _Events, list[_Found]]:
        """Open the stream and read up to its first event.

        TGI answers /generate_stream with HTTP 200 even when it refuses the request (validation, overload): the
        refusal is the stream's first event. Until that first event the request is still safe to retry or to
        re-send with fewer new tokens (TGIS's token-limit semantics), so it is read here, before anything
        reaches the client.
        """
        body = job.body
        backend = lease.backend
        engine = backend.adapter  # the engine turns the job into its request, its stream into the gateway's events
        for clamp_round in (0, 1):
            try:
                headers = backend_call(stream.trace)
                path, payload = engine.upstream(job.route, body, backend.info)
                resp = await backend.open_stream(path, payload, job.request_id, headers)
            except InvalidArgument as exc:
                err: GatewayError = exc
            else:
                reader = engine.reader(job.route, body, backend.name)
                shape = engine.plain_shape(job.route)
                events: _Events = _Parsed(reader) if shape is None else _Scanned(reader, EventScanner(shape), raw)
                try:
                    first = await _first_events(resp, events)
                except BaseException:
                    resp.close()
                    raise
                head = first[0] if first else None
                if not isinstance(head, dict) or "error" not in head:
                    return resp, events, first
                resp.close()
                err = stream_error(head, backend.name)
            clamped = (
                self._clamp(job, body, err, engine) if clamp_round == 0 and isinstance(err, InvalidArgument) else None
            )
            if clamped is None:
                raise err
            body, stream.token_limited = clamped, True
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _clamp(job: Job, body: dict[str, Any], exc: InvalidArgument, engine: Engine) -> dict[str, Any] | None:
        """TGIS semantics: a request too long for the model gets fewer new tokens instead of an error."""
        if not job.clamp_to_token_limit:
            return None
        found = engine.token_limit(exc.message)
        if found is None:
            return None
        limit, input_tokens = found
        allowed = limit - input_tokens
        if allowed < 1:
            return None
        params = dict(body.get("parameters") or {})
        params["max_new_tokens"] = allowed
        return {**body, "parameters": params}

    def _finish(self, job: Job, stream: GenerationStream, status: str) -> None:
        """Record the stream's timeline, after asking the backend for the prompt count if the stream did not tell
        it and the backend worked on the request (a task of its own: the stream has ended already)."""
        stream._end(status)
        stream_ended(stream.trace, status, stream.backend, stream.first_token_ns, stream.generated_tokens)
        done_ns = _after(stream.last_stamp_ns)
        backend = stream.backend if stream.released_ns is not None else None
        if stream.prompt_tokens is None and did_gpu_work(backend, stream.released_ns, stream.first_token_ns, status):
            try:
                task = asyncio.get_running_loop().create_task(self._count_then_record(job, stream, status, done_ns))
            except RuntimeError:  # no running loop (a generator finalised at shutdown): the estimate, flagged
                self._record(job, stream, status, done_ns, job.prompt_tokens_estimate, estimated=True)
                return
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        self._record(job, stream, status, done_ns, stream.prompt_tokens or 0, estimated=False)

    async def _count_then_record(self, job: Job, stream: GenerationStream, status: str, done_ns: int) -> None:
        count: int | None = None
        try:
            async with asyncio.timeout(COUNT_TIMEOUT_S):
                count = await self._count_prompt(job)
        except Exception as exc:  # the backend is gone, or cannot count: the estimate, flagged as one
            log.warning("prompt_count_failed", request_id=job.request_id, error=f"{type(exc).__name__}: {exc}")
        finally:  # also when cancelled (shutdown): the timeline is never lost
            if count is None:
                self._record(job, stream, status, done_ns, job.prompt_tokens_estimate, estimated=True)
            else:
                self._record(job, stream, status, done_ns, count, estimated=False)

    async def _count_prompt(self, job: Job) -> int:
        """The prompt's length in tokens as the backend computes it (after truncation), for a stream that ended
        without TGI's ``input_length`` (or the OpenAI routes' ``usage``)."""
        if job.route == "/v1/chat/completions":  # the chat template is applied by the engine: ask it to apply it
            return await self._on_any(job.model_id, lambda backend: backend.count_chat(job.body))
        options: dict[str, Any] = {}
        if "add_special_tokens" in job.body:
            options["add_special_tokens"] = job.body["add_special_tokens"]
        tokens = await self.tokenize(job.model_id, job.inputs, options=options)
        params = job.body.get("parameters")
        truncate = params.get("truncate") if isinstance(params, dict) else None
        if isinstance(truncate, int) and 0 < truncate < len(tokens):
            return truncate  # TGI keeps the last `truncate` tokens
        return len(tokens)

    def record_refused(
        self,
        *,
        request_id: str,
        tenant: str,
        model_id: str,
        api: Api,
        status: str,
        received_ns: int,
        traffic_class: str = "default",
        correlation_id: str | None = None,
    ) -> None:
        """Record a call the gateway refused (or ended) before any backend saw it: a row with its status and 0 J, so
        that its request id answers at once. A class name no operator configured is recorded as ``(unknown)``: the
        raw name never becomes a row value or a label."""
        try:
            traffic_class = self.resolve_class(model_id, traffic_class)
        except GatewayError:
            traffic_class = UNKNOWN_CLASS
        job = Job(
            request_id=request_id,
            model_id=model_id[:MAX_RECORDED_ID_CHARS],
            tenant=tenant,
            inputs="",
            body={},
            traffic_class=traffic_class,
            api=api,
            correlation_id=correlation_id,
            received_ns=received_ns,
        )
        refused = GenerationStream(self, job)
        refused._end(status)
        self._record(job, refused, status, _after(received_ns), 0, estimated=False)

    @contextlib.contextmanager
    def recording(self, streams: Iterable[GenerationStream]) -> Iterator[None]:
        """Around a front door's handling of ``streams``: one that never started (its call failed, or its task was
        cancelled before it ran) still gets its row, with the status its client saw, and 0 J."""
        status: str | None = None
        try:
            yield
        except GatewayError as exc:
            status = exc.grpc_code.name
            raise
        finally:
            for stream in streams:
                if not stream.ended:
                    end = status or self.ended_by_consumer(stream.job)
                    stream._end(end)
                    done_ns = _after(stream.last_stamp_ns)
                    self._record(stream.job, stream, end, done_ns, 0, estimated=False)

    def _record(
        self, job: Job, stream: GenerationStream, status: str, done_ns: int, prompt_tokens: int, *, estimated: bool
    ) -> None:
        released = stream.released_ns is not None
        works = did_gpu_work(stream.backend if released else None, stream.released_ns, stream.first_token_ns, status)
        prompt_tokens = prompt_tokens if works else 0
        try:
            self.ledger.request_finished(
                Timeline(
                    request_id=job.request_id,
                    tenant=job.tenant,
                    model_id=job.model_id,
                    backend=stream.backend if released else None,
                    received_ns=job.received_ns,
                    released_ns=stream.released_ns,
                    first_token_ns=stream.first_token_ns,
                    done_ns=done_ns,
                    prompt_tokens=prompt_tokens,
                    generated_tokens=stream.generated_tokens,
                    status=status,
                    traffic_class=job.traffic_class,
                    api=job.api,
                    correlation_id=job.correlation_id,
                    prompt_tokens_estimated=estimated and works,
                    cached_tokens=min(stream.cached_tokens or 0, prompt_tokens) if works and not estimated else 0,
                )
            )
        except Exception:  # the meter must never break the request path
            log.exception("timeline_record_failed", request_id=job.request_id)
        if works and not estimated:  # the backend's count: this tenant's next estimates follow, its minute settles
            self.prompt_scale.observe(job.tenant, job.model_id, len(job.inputs), prompt_tokens)
            if self.rate_limiter is not None and job.rate_prompt_tokens is not None:
                self.rate_limiter.settle(job.tenant, prompt_tokens - job.rate_prompt_tokens)
        if self.budgets is not None:  # its reservation: now its tokens, until the ledger's figure holds them
            self.budgets.ended(
                job.request_id, stream.backend if released else None, done_ns,
                prompt_tokens=prompt_tokens, generated_tokens=stream.generated_tokens,
            )  # fmt: skip
        recorded(stream.trace, status, stream.backend if released else None, prompt_tokens, stream.generated_tokens)
        try:
            asyncio.get_running_loop().call_soon(self._account, job, stream, status, done_ns, prompt_tokens)
        except RuntimeError:  # no running loop (a generator finalised at shutdown)
            self._account(job, stream, status, done_ns, prompt_tokens)

    def _account(self, job: Job, stream: GenerationStream, status: str, done_ns: int, prompt_tokens: int) -> None:
        """A recorded request's metrics and request log line, at the loop's next turn: after its client has the end
        of its answer (the timeline, which is the bill, went to the ledger before it)."""
        tenant = tenant_label(job.tenant)
        model = job.model_id if job.model_id in self.pools else "(unknown)"  # a refused call may name anything
        _REQUESTS(model, job.api.value, job.traffic_class, tenant, status).inc()
        if stream.released_ns is not None:
            _GENERATED_TOKENS(job.model_id, tenant).inc(stream.generated_tokens)
            _PROMPT_TOKENS(job.model_id, tenant).inc(prompt_tokens)
        if stream.first_token_ns is not None:
            _TTFT(job.model_id, job.traffic_class).observe((stream.first_token_ns - job.received_ns) / 1e9)
            if status == "OK":
                _LATENCY(job.model_id, job.traffic_class).observe((done_ns - job.received_ns) / 1e9)
        log_request(job, stream, status, done_ns)


class _GiveUp(Exception):
    """No untried backend has room for a retry: the last failure stands."""

    def __init__(self, cause: GatewayError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _as_final(cause: GatewayError) -> GatewayError:
    """Every backend failed before the first byte: overload stays overload, anything else is unavailability."""
    if isinstance(cause, Overloaded):
        return Overloaded(f"all backends are overloaded ({cause.message})", retry_after_s=cause.retry_after_s or 1.0)
    if isinstance(cause, Unavailable):
        return cause
    return Unavailable(f"no backend reachable ({cause.message})", retry_after_s=1.0)


Item = dict[str, Any] | PlainRun  # what ``raw_batches`` gives: a parsed event, or a run of plain ones as bytes
_Found = Item | ParsedRun  # what the events readers find: also a run of plain ones parsed (``batches``)


class _Events(Protocol):
    """A response's bytes in, the gateway's events out."""

    def feed(self, chunk: bytes) -> list[_Found]: ...

    def close(self) -> list[_Found]: ...


class _Parsed:
    """Every event decoded and parsed (by the engine's reader)."""

    __slots__ = ("_decoder", "_reader")

    def __init__(self, reader: EventReader) -> None:
        self._decoder = SSEDecoder()
        self._reader = reader

    def feed(self, chunk: bytes) -> list[_Found]:
        return self._reader.feed(self._decoder.feed(chunk))  # type: ignore[return-value]

    def close(self) -> list[_Found]:
        return [*self._reader.feed(self._decoder.close()), *self._reader.close()]


class _Scanned:
    """Plain events scanned and kept as bytes (``PlainRun``), the others parsed by the engine's reader, which must
    read every event on its own (``Engine.plain_shape``). Not ``raw``: runs parsed too, each in one go."""

    __slots__ = ("_raw", "_reader", "_scanner")

    def __init__(self, reader: EventReader, scanner: EventScanner, raw: bool) -> None:
        self._reader = reader
        self._scanner = scanner
        self._raw = raw

    def feed(self, chunk: bytes) -> list[_Found]:
        return self._parse(self._scanner.feed(chunk))

    def close(self) -> list[_Found]:
        return [*self._parse(self._scanner.close()), *self._reader.close()]

    def _parse(self, found: list[PlainRun | str]) -> list[_Found]:
        out: list[_Found] = []
        for x in found:
            if x.__class__ is not PlainRun:
                out.extend(self._reader.feed((x,)))  # type: ignore[arg-type]
            elif self._raw:
                out.append(x)
            else:
                try:
                    out.append(parse_run(x))  # counted as a run, then handed on event by event
                except orjson.JSONDecodeError:  # not JSON after all: the reader says so as it always does
                    datas = [e[5:].decode("utf-8", "replace") for e in x.data.split(b"\n\n")[:-1]]
                    out.extend(self._reader.feed(datas))
        return out


async def _first_events(resp: UpstreamResponse, events: _Events) -> list[_Found]:
    """Read until at least one complete event (or the end of the stream)."""
    async for chunk in resp:
        found = events.feed(chunk)
        if found:
            return found
    return events.close()


Observer = Callable[[dict[str, Any], Lease, GenerationStream], dict[str, Any]]


def _after(earliest_ns: int) -> int:
    """The wall clock now, or ``earliest_ns`` where it reads earlier. A request's stamps (received, released, first
    token, done) come from ``time.time_ns()`` one after the other; a clock stepped back between two of them (NTP
    correcting a host) would order them backwards, and the timeline — the request's bill — would be refused."""
    return max(time.time_ns(), earliest_ns)


def _observe_run(run: PlainRun | ParsedRun, lease: Lease, stream: GenerationStream) -> None:
    """``Gateway._observe`` (``_observe_openai``) of a run of plain events at once: none is an error, each has a
    token (a choice), none has details or usage."""
    if stream.first_token_ns is None:
        stream.first_token_ns = _after(stream.released_ns or 0)
        stream.state = StreamState.STREAMING
    stream.generated_tokens += run.tokens
    lease.consume(run.tokens)


def _observe_batch(
    observe: Observer, events: Iterable[_Found], lease: Lease, stream: GenerationStream
) -> tuple[list[Item], GatewayError | None]:
    """Observe events up to the first in-stream error: (the events before it, the error or None). A parsed run is
    observed at once and handed on as its events."""
    batch: list[Item] = []
    try:
        for event in events:
            cls = event.__class__
            if cls is PlainRun:
                _observe_run(event, lease, stream)  # type: ignore[arg-type]
                batch.append(event)  # type: ignore[arg-type]
            elif cls is ParsedRun:
                _observe_run(event, lease, stream)  # type: ignore[arg-type]
                batch.extend(event)  # type: ignore[arg-type]
            else:
                batch.append(observe(event, lease, stream))  # type: ignore[arg-type]
    except GatewayError as exc:
        return batch, exc
    return batch, None
