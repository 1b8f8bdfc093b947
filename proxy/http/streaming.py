"""Relaying a gateway stream to an HTTP client as Server-Sent Events, shared by the TGI and OpenAI routes.

The first event is awaited before anything is written, so a refusal can still become a status code (see
``proxy.http.errors.in_stream``). After that, a failure is an in-stream error event. A request that waits longer
than ``HEADERS_AFTER_S`` for its first event (held by a shaping policy, or queued behind a long prefill) gets its
HTTP 200 and SSE headers then, and a ``:`` comment every ``KEEPALIVE_S`` until its first token, so that clients and
proxies with idle timeouts do not drop it; from then on any refusal is an in-stream error event, as TGI sends them.

A client that goes away (reset connection, cancelled handler) is passed into the gateway's stream as ``Cancelled``:
the stream closes its backend connection (TGI drops the request) and the ledger records CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiohttp import web

from common.errors import Cancelled, GatewayError
from proxy.gateway import GenerationStream
from proxy.http import wire
from proxy.http.deadline import DEADLINES_KEY
from proxy.http.errors import in_stream

# GenerationStream.batches (or raw_batches: PlainRuns among the events): the events of one network read
Batches = AsyncGenerator[list[Any], None]

HEADERS_AFTER_S = 5.0  # commit the 200 + SSE headers if the first event has not come by then
KEEPALIVE_S = 5.0  # then an SSE comment this often until it comes
KEEPALIVE = b":\n\n"


async def abandon(events: Batches) -> None:
    """The client left: end the gateway's stream as a cancellation (it records CANCELLED, closes the backend)."""
    athrow = getattr(events, "athrow", None)
    if athrow is None:
        return
    with contextlib.suppress(Cancelled, StopAsyncIteration, RuntimeError):
        await athrow(Cancelled("the client went away"))


async def relay(
    request: web.Request,
    events: Batches,
    results: list[GenerationStream],
    *,
    headers: Callable[[], dict[str, str]],
    encode: Callable[[Any], bytes],
    error_event: Callable[[GatewayError], bytes],
    trailer: bytes = b"",
) -> web.StreamResponse:
    """Write ``events`` as SSE, one write per batch; ``headers()`` is called once the first batch (or refusal) is in."""
    async with contextlib.aclosing(events):
        return await _relay(request, events, results, headers, encode, error_event, trailer)


async def _relay(
    request: web.Request,
    events: Batches,
    results: list[GenerationStream],
    headers: Callable[[], dict[str, str]],
    encode: Callable[[Any], bytes],
    error_event: Callable[[GatewayError], bytes],
    trailer: bytes,
) -> web.StreamResponse:
    # The first step is awaited in this task (no task of its own, no asyncio.wait: two loop turns fewer per request);
    # a timer starts the keep-alive beside it only for a request still waiting after HEADERS_AFTER_S.
    hold = _Hold(request, headers)
    refusal: GatewayError | None = None
    try:
        try:
            first = await anext(events, None)
        except GatewayError as exc:
            first, refusal = None, exc
        finally:
            response = await hold.stop()
    except asyncio.CancelledError:
        if not hold.reset:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # the cancel was the keep-alive's, for a client that went away: not the server's
        raise ConnectionResetError("the client went away while its request was held") from None
    if refusal is not None:
        if response is None and not in_stream(refusal, released=any(r.released_ns is not None for r in results)):
            raise refusal
        response = response or await _prepare(request, headers())
        with contextlib.suppress(ConnectionResetError):
            await response.write(error_event(refusal) + trailer)
        return response
    response = response or await _prepare(request, headers())
    try:
        try:
            if first is not None:
                await _write(response, b"".join(map(encode, first)))
                async for batch in events:
                    await _write(response, b"".join(map(encode, batch)))
        except GatewayError as exc:
            await response.write(error_event(exc) + trailer)
        else:
            await _end(request, response, trailer)
    except ConnectionResetError:
        await abandon(events)
    except asyncio.CancelledError:
        await abandon(events)
        raise
    return response


class _Hold:
    """A request's 200 and SSE headers, committed once it has waited ``HEADERS_AFTER_S`` for its first event, then a
    keep-alive comment every ``KEEPALIVE_S`` until ``stop()``. Until the timer fires it is one timer handle; the
    keep-alive task exists only for a held request. A keep-alive write that finds the client gone cancels the
    waiting task (its stream then ends as CANCELLED) and sets ``reset``."""

    __slots__ = ("_headers", "_owner", "_request", "_stopping", "_task", "_timer", "reset", "response")

    def __init__(self, request: web.Request, headers: Callable[[], dict[str, str]]) -> None:
        self._request = request
        self._headers = headers
        self._owner = asyncio.current_task()
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self.reset = False
        self.response: web.StreamResponse | None = None
        self._timer = asyncio.get_running_loop().call_later(HEADERS_AFTER_S, self._start)

    def _start(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._keep_alive(self._stopping))

    async def _keep_alive(self, stopping: asyncio.Event) -> None:
        try:
            self.response = await _prepare(self._request, self._headers())
            while not stopping.is_set():
                await self.response.write(KEEPALIVE)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), KEEPALIVE_S)
        except ConnectionResetError:
            if not stopping.is_set() and self._owner is not None:
                self.reset = True
                self._owner.cancel()

    async def stop(self) -> web.StreamResponse | None:
        """No more keep-alives (one being written finishes first: never half a write): the response if committed."""
        self._timer.cancel()
        if self._task is not None and self._stopping is not None:
            self._stopping.set()
            await asyncio.shield(self._task)  # a cancel of the caller must not cut the keep-alive mid-write
        return self.response


async def _prepare(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**wire.SSE_HEADERS, **headers})
    await response.prepare(request)
    return response


async def _end(request: web.Request, response: web.StreamResponse, trailer: bytes) -> None:
    """The trailer and the end of the chunked body in one write, now rather than after the middleware's bookkeeping
    (the client is waiting for it); the head deadline told first, as the middleware does before aiohttp's end (the
    client may send its next request as soon as it sees the end)."""
    deadlines = request.app.get(DEADLINES_KEY)
    if deadlines is not None:
        deadlines.request_done(request.transport)
    await response.write_eof(trailer)


async def _write(response: web.StreamResponse, data: bytes) -> None:
    if data:
        await response.write(data)


async def merge(streams: list[Batches], tag: Callable[[int, dict[str, Any]], dict[str, Any]]) -> Batches:
    """Interleave several gateway streams as their events come (a multi-prompt /v1/completions call).

    ``tag(i, event)`` marks an event of the i-th stream. The first failure ends them all; closing or cancelling
    the merge cancels every stream still running (each records CANCELLED).
    """
    queue: asyncio.Queue[tuple[list[dict[str, Any]] | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: Batches) -> None:
        try:
            async for batch in stream:
                queue.put_nowait(([tag(i, event) for event in batch], None))
        except GatewayError as exc:
            queue.put_nowait((None, exc))
            return
        queue.put_nowait((None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            batch, exc = await queue.get()
            if exc is not None:
                raise exc
            if batch is None:
                remaining -= 1
            else:
                yield batch
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
