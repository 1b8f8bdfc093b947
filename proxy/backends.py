"""Backends (TGI, vLLM, SGLang): pooled connections each (``proxy.upstream`` for the generation streams, an aiohttp
session for the small calls), health polling, the engine found by probing (``proxy.engines``), and per-model pools
that hand out slots.

A backend never gets more requests in flight than its ``max_concurrent_requests`` (TGI answers 429 at once past
it): callers take a ``Lease`` from the pool before they send anything and give it back when the stream ends. Among
healthy backends with a free slot, the pool picks by the ``[routing]`` policy (``common.placement``): ``spread``, the
one with the fewest outstanding tokens (prompt plus tokens still to generate), the best cheap proxy for how long its
queue is; or ``pack``, the busiest below a target of requests in flight, so that at low load the others go quiet.

Who takes a backend out of service. Only connection-level evidence does: a connection that cannot be opened
(refused, unreachable, connect timeout) or a failed ``/health`` check. One stream that breaks, one pooled connection
that the backend had closed, one slow answer is not evidence about the backend: one tenant's poisoned input can
crash one request, and taking the backend out for everybody on that evidence let it fail other tenants' calls.
Such a failure only asks for a ``/health`` probe now (``Backend.suspect``), which takes the backend out if it is
really gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import structlog

from common import parking, placement
from common.config import BackendConfig, BackendPoolConfig, RoutingConfig
from common.errors import BackendError, GatewayError
from proxy.engines import Engine, engine, probe
from proxy.engines.tgi import Tgi
from proxy.metrics import BACKEND_HEALTHY, BACKEND_IN_FLIGHT, BACKENDS_NEEDED
from proxy.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamResponse

log = structlog.get_logger(__name__)

DEFAULT_MAX_CONCURRENT = 128  # TGI's default --max-concurrent-requests
PROBE_MIN_INTERVAL_S = 1.0  # suspicion probes /health at most this often per backend
MAX_ERROR_BODY_BYTES = 64 * 1024  # of a backend's error answer: enough for any TGI message
DEFAULT_ENGINE = Tgi()  # what a backend that no probe has identified yet is spoken to as


class BackendUnreachable(GatewayError):
    """Nothing came back from the backend (refused, reset, timed out before the first byte): safe to retry."""


class Backend:
    """One engine server (TGI, vLLM or SGLang: ``engine``, configured or found by probing)."""

    def __init__(self, cfg: BackendConfig, model_id: str, pool_cfg: BackendPoolConfig) -> None:
        self.name = cfg.name
        self.url = cfg.url
        self.gpus = cfg.gpus
        self.node = cfg.node
        self.model_id = model_id
        self._pool_cfg = pool_cfg
        self._session: aiohttp.ClientSession | None = None  # the small calls: /health, /info, /tokenize
        self._upstream: UpstreamPool | None = None  # the generation streams
        self.healthy = False
        self._checked = False  # a first check logs the state it finds, up or down
        self.info: dict[str, Any] | None = None  # TGI's /info, or the engine's answers in its shape
        self._reprobe = False  # it went down since its info was found: what answers when it is back may differ
        self._configured_engine = cfg.engine if cfg.engine != "auto" else None
        self.engine: Engine | None = engine(self._configured_engine) if self._configured_engine else None
        self.in_flight = 0
        self.outstanding_tokens = 0
        self.starting = 0  # leases whose first token has not come back (their prefill is pending)
        self.draining = False  # an operator asked that no new request go here (scale-in); in-flight ones finish
        self.last_error: str | None = None
        self.on_health_change: Callable[[], None] | None = None  # set by the pool: a probe changed ``healthy``
        self._probe: asyncio.Task[None] | None = None
        self._last_probe_s = float("-inf")
        BACKEND_IN_FLIGHT.labels(self.name).set_function(lambda: self.in_flight)
        BACKEND_HEALTHY.labels(self.name).set_function(lambda: 1.0 if self.healthy else 0.0)

    @property
    def max_concurrent(self) -> int:
        if self._pool_cfg.max_concurrent_requests is not None:
            limit = self._pool_cfg.max_concurrent_requests
            if self.info and self.info.get("max_concurrent_requests"):
                limit = min(limit, int(self.info["max_concurrent_requests"]))
            return limit
        if self.info and self.info.get("max_concurrent_requests"):
            return int(self.info["max_concurrent_requests"])
        return DEFAULT_MAX_CONCURRENT

    @property
    def free_slots(self) -> int:
        return max(0, self.max_concurrent - self.in_flight)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._pool_cfg.max_connections, keepalive_timeout=60, enable_cleanup_closed=True
            )
            self._session = aiohttp.ClientSession(
                self.url,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._pool_cfg.connect_timeout_s),
                skip_auto_headers=("User-Agent",),
                auto_decompress=False,
            )
        return self._session

    @property
    def upstream(self) -> UpstreamPool:
        if self._upstream is None:
            self._upstream = UpstreamPool(
                self.url,
                max_connections=self._pool_cfg.max_connections,
                connect_timeout_s=self._pool_cfg.connect_timeout_s,
                read_timeout_s=self._pool_cfg.request_timeout_s,
            )
        return self._upstream

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None

    @property
    def adapter(self) -> Engine:
        """The engine's adapter: the one found (or configured), TGI until a probe found one."""
        return self.engine or DEFAULT_ENGINE

    async def get_json(self, path: str) -> tuple[int, Any]:
        """(status, parsed JSON body or None) of a small GET; raises on connection errors and timeouts."""
        timeout = aiohttp.ClientTimeout(total=self._pool_cfg.connect_timeout_s * 2)
        async with self.session.get(path, timeout=timeout) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return resp.status, None
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, None

    async def check(self) -> bool:
        """Poll the engine's /health (and probe the engine and its info when missing, or when it comes back after
        being down: a restart may bring another engine, model or limits to the same URL); update ``healthy``. Never
        raises."""
        timeout = aiohttp.ClientTimeout(total=self._pool_cfg.connect_timeout_s * 2)
        try:
            async with self.session.get(self.adapter.health_path, timeout=timeout) as resp:
                ok = resp.status == 200
                await resp.read()
            self.last_error = None if ok else f"/health answered {resp.status}"
            if ok and (self.info is None or self._reprobe):
                await self._probe_engine()
        except (aiohttp.ClientError, TimeoutError, ValueError, RuntimeError) as exc:  # RuntimeError: session closed
            ok = False
            self.last_error = f"{type(exc).__name__}: {exc}"
        self._set_health(ok, self.last_error)
        return ok

    async def _probe_engine(self) -> None:
        found = await probe(self, self._configured_engine)
        if found is None:
            return  # asked again at the next check
        engine_before, info_before = self.engine, self.info
        self.engine, self.info = found
        self._reprobe = False
        if info_before is not None and found == (engine_before, info_before):
            return
        log.info(
            "backend_engine",
            backend=self.name,
            url=self.url,
            engine=self.engine.name,
            version=self.info.get("version"),
            served_model=self.info.get("model_id"),
            configured=self._configured_engine is not None,
            changed=info_before is not None,  # the backend came back as something else
        )

    def mark_unreachable(self, reason: str) -> None:
        """Connection-level evidence (a connection could not be opened): out of service until a health check."""
        self.last_error = reason
        self._set_health(False, reason)

    def _set_health(self, ok: bool, error: str | None) -> None:
        """Log the first state found (``at_start``) and every change after it: ``backend_up`` / ``backend_down``."""
        if ok != self.healthy or not self._checked:
            fields = {"backend": self.name, "url": self.url, "model": self.model_id, "at_start": not self._checked}
            if ok:
                log.info("backend_up", **fields)
            else:
                log.warning("backend_down", **fields, error=error)
        self._checked = True
        self.healthy = ok
        if not ok and self.info is not None:
            self._reprobe = True

    def suspect(self, reason: str) -> None:
        """One call failed in a way that says nothing certain about the backend: probe ``/health`` now.

        At most one probe runs at a time and at most one starts per ``PROBE_MIN_INTERVAL_S``, so a client that
        breaks streams on purpose cannot turn the gateway into a /health flood either.
        """
        log.info("backend_suspect", backend=self.name, error=reason)
        now = time.monotonic()
        if (self._probe is not None and not self._probe.done()) or now - self._last_probe_s < PROBE_MIN_INTERVAL_S:
            return
        self._last_probe_s = now
        self._probe = asyncio.get_running_loop().create_task(self._run_probe())

    async def _run_probe(self) -> None:
        before = self.healthy
        await self.check()
        if self.healthy != before and self.on_health_change is not None:
            self.on_health_change()

    async def _error_of(self, resp: aiohttp.ClientResponse) -> GatewayError:
        """The mapped error of a non-200 answer to a small call."""
        raw = b""
        try:
            while len(raw) < MAX_ERROR_BODY_BYTES:
                chunk = await resp.content.read(MAX_ERROR_BODY_BYTES - len(raw))
                if not chunk:
                    break
                raw += chunk
        except (aiohttp.ClientError, TimeoutError):
            pass  # what arrived is what there is to say
        finally:
            resp.release()
        return self._error_from(resp.status, raw)

    async def _stream_error_of(self, resp: UpstreamResponse) -> GatewayError:
        """The mapped error of a non-200 answer to a stream's request."""
        try:
            raw = await resp.read(MAX_ERROR_BODY_BYTES)
        finally:
            resp.close()
        return self._error_from(resp.status, raw)

    def _error_from(self, status: int, raw: bytes) -> GatewayError:
        """A TGI error object, or axum's plain-text rejection, as the gateway's error."""
        body: object
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        return self.adapter.error(status, body, self.name)

    def _connect_failed(self, exc: BaseException) -> BackendUnreachable:
        """Nothing came back: take the backend out when no connection could be opened, else only suspect it."""
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ConnectFailed | aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            self.mark_unreachable(reason)
        else:  # a pooled connection the backend had closed, a read timeout: about this call, maybe not the backend
            self.suspect(reason)
        return BackendUnreachable(f"backend {self.name} unreachable: {type(exc).__name__}")

    async def open_stream(
        self, path: str, body: dict[str, Any], request_id: str, headers: Mapping[str, str] | None = None
    ) -> UpstreamResponse:
        """POST ``body`` to a streaming route and return the response once its status is 200.

        Raises ``BackendUnreachable`` when nothing came back (retryable), or the mapped TGI error for an error
        answer (422 -> InvalidArgument, 429 -> Overloaded, ...). ``headers``: more headers (the trace's).
        """
        sent = {**headers, "x-request-id": request_id, **_JSON} if headers else {"x-request-id": request_id, **_JSON}
        try:
            resp = await self.upstream.post(path, orjson.dumps(body), sent)
        except UpstreamError as exc:
            raise self._connect_failed(exc) from exc
        if resp.status == 200:
            return resp
        raise await self._stream_error_of(resp)

    async def tokenize(self, text: str, options: dict[str, Any]) -> list[dict[str, Any]]:
        """TGI's /tokenize answer, from whatever engine this is."""
        return await self.adapter.tokenize(self, text, options, self.info)

    async def count_chat(self, body: dict[str, Any]) -> int:
        """A chat request's prompt tokens, the engine's chat template applied."""
        return await self.adapter.count_chat(self, body, self.info)

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """A small non-streaming call (``/tokenize``); errors mapped like ``open_stream``."""
        timeout = aiohttp.ClientTimeout(total=self._pool_cfg.request_timeout_s)
        try:
            async with self.session.post(path, data=orjson.dumps(body), headers=_JSON, timeout=timeout) as resp:
                if resp.status != 200:
                    raise await self._error_of(resp)
                return orjson.loads(await resp.read())  # a /tokenize answer: a dict per token, orjson's speed
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise self._connect_failed(exc) from exc
        except ValueError as exc:
            raise BackendError(f"backend {self.name} answered {path} with invalid JSON") from exc


_JSON = {"Content-Type": "application/json"}


@dataclass(eq=False, slots=True)
class Lease:
    """A slot on one backend, held from release to TGI until the stream ends."""

    backend: Backend
    tokens: int
    pool: BackendPool
    released: bool = field(default=False)
    started: bool = field(default=False)  # a token came back

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._start()
            self.pool._give_back(self)

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.backend.starting -= 1

    def consume(self, tokens: int) -> None:
        """Tokens that came back no longer count as outstanding."""
        if tokens > 0:
            self._start()
        tokens = min(tokens, self.tokens)
        self.tokens -= tokens
        self.backend.outstanding_tokens -= tokens


class BackendPool:
    """The backends that serve one model."""

    def __init__(self, model_id: str, backends: Iterable[Backend], routing: RoutingConfig | None = None) -> None:
        self.model_id = model_id
        self.backends = list(backends)
        self.routing = routing or RoutingConfig()
        self._in_flight_peak = parking.PeakHold(self.routing.scale_in_after_s)
        BACKENDS_NEEDED.labels(model_id).set_function(lambda: self.backends_needed)
        self._waiters: list[asyncio.Future[None]] = []
        self._health_listeners: list[Callable[[], Awaitable[None] | None]] = []
        self._notifying: set[asyncio.Task[None]] = set()
        for b in self.backends:
            b.on_health_change = self._backend_changed

    @property
    def healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    @property
    def free_slots(self) -> int:
        return sum(b.free_slots for b in self.backends if b.healthy)

    @property
    def info(self) -> dict[str, Any] | None:
        """The /info of a healthy backend (they serve the same model), else of any that answered once."""
        for b in sorted(self.backends, key=lambda b: not b.healthy):
            if b.info:
                return b.info
        return None

    @property
    def backends_needed(self) -> int:
        """How many backends the load needs packed at the target (peak over ``scale_in_after_s``): the parking
        signal an autoscaler acts on (``common.parking``)."""
        peak = self._in_flight_peak.peak(time.monotonic())
        return parking.backends_needed(peak, self.routing.pack_target, len(self.backends))

    def drain(self, name: str, on: bool = True) -> Backend:
        """Stop placing new requests on backend ``name`` (``on``), or place on it again; requests in flight finish.
        KeyError for a backend this pool does not have."""
        backend = next((b for b in self.backends if b.name == name), None)
        if backend is None:
            raise KeyError(name)
        if backend.draining != on:
            backend.draining = on
            if on:
                log.info("backend_drain", backend=name, model=self.model_id)
            else:
                log.info("backend_undrain", backend=name, model=self.model_id)
            self._wake()  # a waiter may now have (or lack) room
        return backend

    def _record_load(self) -> None:
        self._in_flight_peak.record(time.monotonic(), sum(b.in_flight for b in self.backends))

    def on_health_change(self, listener: Callable[[], Awaitable[None] | None]) -> None:
        self._health_listeners.append(listener)

    def _loads(self, exclude: frozenset[str]) -> list[placement.Load]:
        return [
            placement.Load(
                in_flight=b.in_flight,
                outstanding_tokens=b.outstanding_tokens,
                free_slots=b.free_slots,
                available=b.healthy and not b.draining and b.name not in exclude,
                starting=b.starting,
            )
            for b in self.backends
        ]

    def _pick(self, need: int, exclude: frozenset[str]) -> Backend | None:
        """The backend the routing policy chooses (``common.placement``), or None when none has room."""
        r = self.routing
        i = placement.choose(
            r.policy,
            self._loads(exclude),
            pack_target=r.pack_target,
            need=need,
            spill_on_prefill=r.pack_spill_on_prefill,
        )
        return None if i is None else self.backends[i]

    def try_acquire(self, tokens: int, *, exclude: frozenset[str] = frozenset()) -> Lease | None:
        """A slot on the healthy backend with room that the routing policy chooses, or None."""
        backend = self._pick(1, exclude)
        if backend is None:
            return None
        return self._lease(backend, tokens)

    def try_acquire_batch(self, token_counts: list[int], *, exclude: frozenset[str] = frozenset()) -> list[Lease]:
        """Slots for a released batch, all on ONE backend (so TGI prefills them together).

        Takes the backend ``common.placement.choose_batch`` picks (spread: the most free slots; pack: the one a single
        request would get); returns as many leases as it has room for (possibly fewer than asked, possibly none). The
        caller keeps the rest queued.
        """
        r = self.routing
        i = placement.choose_batch(
            r.policy, self._loads(exclude), pack_target=r.pack_target, spill_on_prefill=r.pack_spill_on_prefill
        )
        if i is None:
            return []
        backend = self.backends[i]
        return [self._lease(backend, t) for t in token_counts[: backend.free_slots]]

    def _lease(self, backend: Backend, tokens: int) -> Lease:
        backend.in_flight += 1
        backend.outstanding_tokens += tokens
        backend.starting += 1
        self._record_load()
        return Lease(backend=backend, tokens=tokens, pool=self)

    async def capacity_changed(self) -> None:
        """Wait until a slot is given back or a health check ran."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    def _give_back(self, lease: Lease) -> None:
        lease.backend.in_flight -= 1
        lease.backend.outstanding_tokens -= lease.tokens
        lease.tokens = 0
        self._record_load()
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def check_all(self) -> None:
        before = self.healthy
        await asyncio.gather(*(b.check() for b in self.backends))
        self._wake()
        if self.healthy != before:
            await self._notify()

    async def _notify(self) -> None:
        for listener in self._health_listeners:
            result = listener()
            if asyncio.iscoroutine(result):
                await result

    def _backend_changed(self) -> None:
        """A probe changed one backend's health: wake the waiters, tell the listeners (the gRPC health service)."""
        self._wake()
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends))


async def run_health_checks(pools: Iterable[BackendPool], interval_s: float, stop: asyncio.Event) -> None:
    """Poll every backend every ``interval_s`` until ``stop`` is set."""
    pools = list(pools)
    while not stop.is_set():
        started = time.monotonic()
        await asyncio.gather(*(p.check_all() for p in pools))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (time.monotonic() - started)))
