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
    first_step: asyncio.Future[list[Any] | None] = asyncio.ensure_future(anext(events, None))
    response: web.StreamResponse | None = None
    try:
        await asyncio.wait({first_step}, timeout=HEADERS_AFTER_S)
        if not first_step.done():  # held: answer now and keep the connection alive until the first token
            response = await _prepare(request, headers())
            while not first_step.done():
                await response.write(KEEPALIVE)
                await asyncio.wait({first_step}, timeout=KEEPALIVE_S)
    except (asyncio.CancelledError, ConnectionResetError):
        first_step.cancel()
        with contextlib.suppress(BaseException):
            await first_step  # the stream's first step ends (it records CANCELLED) before the stream is closed
        raise
    try:
        first = first_step.result()
    except GatewayError as exc:
        if response is None and not in_stream(exc, released=any(r.released_ns is not None for r in results)):
            raise
        response = response or await _prepare(request, headers())
        with contextlib.suppress(ConnectionResetError):
            await response.write(error_event(exc) + trailer)
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
