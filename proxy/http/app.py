"""The HTTP server: one aiohttp application in the gateway process, beside the gRPC server.

A middleware gives every call its request id (``x-request-id`` on every answer, ``x-correlation-id`` echoed),
checks the API key (``authorization: Bearer <key>`` or ``x-api-key``) on every route but the public ones, turns a
``GatewayError`` into TGI's ``{"error", "error_type"}`` answer, and counts the call in ``/metrics``.

Public (no key): ``/health`` (``GET /``, ``/ping``), for load balancers and probes, and ``/metrics``, for Prometheus
(it names tenants — at most ``proxy.metrics.MAX_TENANT_LABELS`` of them — so keep the port off the internet or
scrape through a network policy). Everything else, ``/info`` and ``/v1/models`` included, needs a key unless
``auth.required`` is false.

Handlers are cancelled when their client disconnects (``handler_cancellation``), which closes the backend stream.
``stop(grace)`` stops listening, lets calls in flight finish for up to ``grace`` seconds, then cancels the rest.

A client's mistake is a 4xx, whatever it is: a header the gateway reads whose value is not printable ASCII (400,
naming the header: see ``common.inputs``), a wrong method (405), a body over ``max_body_bytes`` once decompressed
(413; compressed bodies are inflated chunk by chunk and stopped at the limit), a body that does not decompress
(400), a request head that does not arrive within ``head_timeout_s`` (408, ``proxy.http.deadline``). A 500 means a
bug of the gateway. Metric labels are bounded: route templates, a fixed set of methods, status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog
from aiohttp import http_exceptions, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.errors import Cancelled, GatewayError, MalformedRequest, NotFound, PayloadTooLarge
from common.ids import new_request_id
from common.inputs import InputRefused, clip, headers_of_interest
from common.net import bind_tcp
from common.tls import ReloadingContext
from meter.auth import Authenticator
from meter.timeline import Api
from proxy import tracing
from proxy.gateway import Gateway
from proxy.http import wire
from proxy.http.admin_routes import AdminRoutes
from proxy.http.context import CALL_KEY, Call, Services, call_of
from proxy.http.deadline import DEADLINES_KEY, HEAD_TIMEOUT_S, HeadDeadlines
from proxy.http.errors import error_response
from proxy.http.metrics import HTTP_DURATION, HTTP_REQUESTS, method_label
from proxy.http.openai_routes import OpenAIRoutes
from proxy.http.tgi_routes import MODEL_HEADER, TgiRoutes
from proxy.metrics import REGISTRY, Children
from proxy.params import ModelLimits
from proxy.traffic_class import requested_class

log = structlog.get_logger(__name__)

PUBLIC_ROUTES = frozenset({("GET", "/health"), ("GET", "/"), ("GET", "/ping"), ("GET", "/metrics")})
# TGI's default --payload-limit is 2 MB; twice that leaves room for a TGI configured higher
MAX_BODY_BYTES = 4 * 1024 * 1024
# The headers the gateway reads: each must be printable ASCII (``common.inputs``) before anything keeps or echoes it.
READ_HEADERS = ("authorization", "x-api-key", "x-correlation-id", "x-traffic-class", MODEL_HEADER)
# An HTTPException's own headers that describe its (text) body: the gateway writes a JSON body of its own.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})
_HTTP_REQUESTS, _HTTP_DURATION = Children(HTTP_REQUESTS), Children(HTTP_DURATION)  # route, method and status: bounded
# Generation calls: an authenticated one the gateway refuses before any job reaches a backend still gets a row
GENERATION_ROUTES = frozenset(
    {("POST", r) for r in ("/generate", "/generate_stream", "/", "/v1/chat/completions", "/v1/completions")}
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _why(exc: BaseException) -> str:
    """What was wrong with a body aiohttp could not read (its own exceptions wrap the parser's)."""
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) and exc.__cause__ is not None else exc
    if isinstance(cause, http_exceptions.ContentEncodingError):
        return "it does not decompress as its Content-Encoding says"
    if isinstance(cause, http_exceptions.HttpProcessingError) and cause.message:
        return clip(cause.message, 200)
    return type(cause).__name__


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class HttpFrontDoor:
    def __init__(
        self,
        gateway: Gateway,
        auth: Authenticator,
        limits: Mapping[str, ModelLimits],
        *,
        max_batch_requests: int,
        max_body_bytes: int = MAX_BODY_BYTES,
        head_timeout_s: float = HEAD_TIMEOUT_S,
    ) -> None:
        self.services = Services(gateway, auth, dict(limits), max_batch_requests)
        self.max_body_bytes = max_body_bytes
        self.deadlines = HeadDeadlines(head_timeout_s)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.max_body_bytes)
        app[DEADLINES_KEY] = self.deadlines
        TgiRoutes(self.services).add_to(app)
        OpenAIRoutes(self.services).add_to(app)
        app.router.add_get("/metrics", self._metrics)
        AdminRoutes(self.services).add_to(app)
        return app

    async def start(self, listen: str, tls: ReloadingContext | None = None) -> int:
        """Listen on ``HOST:PORT`` (port 0: any free port), over TLS when ``tls`` is given; the bound port."""
        host, port = parse_listen(listen)
        sock = bind_tcp(host, port)
        self.port = sock.getsockname()[1]
        runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        assert runner.server is not None
        loop = asyncio.get_running_loop()
        ssl_context = tls.context if tls is not None else None
        self._server = await loop.create_server(self.deadlines.factory(runner.server), sock=sock, ssl=ssl_context)
        self._runner = runner
        log.info("http_started", listen=listen, port=self.port, tls=tls is not None)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop listening, wait up to ``grace_s`` for calls in flight, cancel what is left."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        server, self._server = self._server, None
        if server is not None:
            server.close()  # stop listening; connections stay until the runner's cleanup
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.warning("http_drain_timeout", in_flight=self._in_flight, grace_s=grace_s)
        await runner.cleanup()
        if server is not None:
            await server.wait_closed()

    # -- the middleware ------------------------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        received_ns = time.time_ns()
        self.deadlines.head_arrived(request.transport)
        call = Call(request_id=new_request_id(), received_ns=received_ns)
        request[CALL_KEY] = call
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self._in_flight += 1
        self._idle.clear()
        status = 500
        try:
            response = await self._guarded(request, handler, call, route)
            status = response.status
            return response
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self.deadlines.request_done(request.transport)
            _HTTP_REQUESTS(route, method_label(request.method), str(status)).inc()
            _HTTP_DURATION(route).observe((time.time_ns() - received_ns) / 1e9)

    async def _guarded(self, request: web.Request, handler: Handler, call: Call, route: str) -> web.StreamResponse:
        structlog.contextvars.bind_contextvars(request_id=call.request_id)
        if (request.method, route) in GENERATION_ROUTES:  # traced (when tracing is on), under the client's trace
            call.span = self.services.gateway.tracing.server_span(f"{request.method} {route}", request.headers)
        status = "CANCELLED"  # unless it ends otherwise: the handler cancelled (its client went away)
        try:
            try:
                headers = headers_of_interest(request.headers, READ_HEADERS)
            except InputRefused as exc:
                raise MalformedRequest(str(exc)) from None
            call.correlation_id = headers.get("x-correlation-id")
            structlog.contextvars.bind_contextvars(correlation_id=call.correlation_id)
            if route != "unmatched" and (request.method, route) not in PUBLIC_ROUTES:
                with self.services.gateway.tracing.auth(call.span):
                    call.principal = await self.services.auth.authenticate(headers)
                    call.principal.require_scope("generate")
                call.traffic_class = requested_class(headers.get("x-traffic-class"), call.principal)
                call.budget = self.services.gateway.budget_note(call.principal.tenant)
                structlog.contextvars.bind_contextvars(tenant=call.principal.tenant)
            response = await handler(request)
            status = "OK" if response.status < 400 else f"HTTP_{response.status}"
            return response
        except GatewayError as exc:
            status = exc.grpc_code.name
            log.info("http_request_failed", route=route, status=exc.http_status, error=exc.message)
            self._record_refused(request, call, route, exc.grpc_code.name)
            return error_response(exc, call.headers())
        except web.HTTPException as exc:
            status = "NOT_FOUND" if exc.status == 404 else "INVALID_ARGUMENT" if exc.status < 500 else "INTERNAL"
            if exc.status != 404:
                self._record_refused(request, call, route, "INVALID_ARGUMENT" if exc.status < 500 else "INTERNAL")
            return self._http_exception(request, exc, call)
        except (web.RequestPayloadError, http_exceptions.HttpProcessingError) as exc:  # the body could not be read
            status = "INVALID_ARGUMENT"
            self._record_refused(request, call, route, "INVALID_ARGUMENT")
            return error_response(MalformedRequest(f"Failed to read the request body: {_why(exc)}"), call.headers())
        except ConnectionError:  # the client went away while we read its body: nobody to answer
            status = "CANCELLED"
            self._record_refused(request, call, route, "CANCELLED")
            return error_response(Cancelled("the client went away"), call.headers())
        except Exception:
            status = "INTERNAL"
            log.exception("http_request_crashed", route=route)
            self._record_refused(request, call, route, "INTERNAL")
            return wire.json_response(wire.error_body("internal error", "internal"), status=500, headers=call.headers())
        finally:
            if call.span is not None:
                tracing.set_call(call.span, request_id=call.request_id, tenant=call.tenant)
                tracing.end(call.span, status=status)
            structlog.contextvars.unbind_contextvars("request_id", "correlation_id", "tenant")

    def _http_exception(self, request: web.Request, exc: web.HTTPException, call: Call) -> web.StreamResponse:
        """aiohttp's own refusals (no route, wrong method, body too large) as TGI-style JSON errors."""
        if exc.status == 404:
            return error_response(NotFound(f"no route {clip(request.method)} {clip(request.path)}"), call.headers())
        if exc.status == 413:
            limit = f"{self.max_body_bytes} bytes"
            return error_response(PayloadTooLarge(f"the request body is larger than {limit}"), call.headers())
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}  # keeps Allow on a 405
        body = wire.error_body(exc.reason, "http")
        return wire.json_response(body, status=exc.status, headers={**headers, **call.headers()})

    def _record_refused(self, request: web.Request, call: Call, route: str, status: str) -> None:
        """An authenticated generation call refused before any job reached the gateway: a row with its status, so
        that its ``x-request-id`` answers ``GetRequestEnergy`` at once. Unauthenticated calls get none."""
        if call.principal is None or call.handed or (request.method, route) not in GENERATION_ROUTES:
            return
        call.handed = True
        self.services.gateway.record_refused(
            request_id=call.request_id,
            tenant=call.principal.tenant,
            model_id=call.model_id or request.headers.get("x-model-id", ""),
            api=Api.HTTP,
            status=status,
            received_ns=call.received_ns,
            traffic_class=call.traffic_class,
            correlation_id=call.correlation_id,
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        """Prometheus text of the gateway's registry (``proxy.metrics.REGISTRY``)."""
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST, **call_of(request).headers()}
        )
