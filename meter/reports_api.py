"""``joulegate.v1.EnergyReports`` over grpc.aio: auth, tenant isolation and proto conversion around meter.reports.

Every call needs an API key (``authorization: Bearer <key>`` or ``x-api-key``). Access rules:

- A tenant key sees only its own tenant. ``GetRequestEnergy`` of another tenant's request is PERMISSION_DENIED
  (not NOT_FOUND: request ids are random 128-bit values, so saying that one exists tells nothing useful, and a
  clear "not yours" beats a misleading "no such request"). ``ListRequests``/``GetUsage`` with ``tenant`` naming
  another tenant are PERMISSION_DENIED; without ``tenant`` they return the caller's own rows only.
- ``GetBackendEnergy`` is admin-only: backends are shared by every tenant, and their counters and idle buckets
  reveal the load of all of them.
- An admin key sees everything.

A PERMISSION_DENIED message never names the other tenant (a request id must not reveal whose it is).

Unknown request id: NOT_FOUND. A malformed query (bad timestamp, ``start >= end``, unknown ``group_by``, page size
over 1000, a page token that is not ours or out of range, a string that is not printable text of at most
``MAX_FIELD_CHARS`` characters: a NUL, which PostgreSQL cannot hold) is INVALID_ARGUMENT naming the field, checked
before any SQL runs. A database that cannot be reached is UNAVAILABLE with a retry hint; any other database error is
INTERNAL without the SQL text.

``GetRequestEnergy`` with ``wait_final`` polls (and asks an in-process metering engine for a pass) until the request
is final, for up to ``wait_timeout_ms`` (0: 30 s; at most 600 s) and never past the call's own deadline; on timeout
it answers the provisional figures (``final: false``), not an error. While waiting it also waits for a request the
ledger has not written yet (a client usually asks right after its generation returned); NOT_FOUND comes only at the
timeout. Waits are kept cheap and bounded, so that one tenant's waits cannot starve another tenant's reports: a
tenant may hold ``MAX_WAITS_PER_TENANT`` waits at once (more: RESOURCE_EXHAUSTED with a retry hint), polls back off
from ``poll_interval_s`` to ``MAX_POLL_INTERVAL_S``, and at most ``WAIT_QUERY_SLOTS`` polls of all waits run at
once, leaving the other worker threads to one-shot queries.

Queries run on worker threads (``asyncio.to_thread``) against the synchronous engine, so the event loop that
serves generation is never blocked by SQL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import sqlalchemy as sa
import structlog
from google.protobuf import timestamp_pb2

from common.errors import Internal, InvalidArgument, NotFound, Overloaded, PermissionDenied, Unavailable
from common.grpc_calls import abort_with, as_status_error, metadata_dict
from common.grpc_handlers import add_servicer, bind_grpc
from common.grpc_introspection import Health, add_introspection
from common.inputs import clip
from common.tls import TlsFiles, grpc_server_credentials
from meter.auth import Authenticator, Principal
from meter.pb.joulegate.v1 import energy_pb2 as pb
from meter.pb.joulegate.v1 import energy_pb2_grpc as pb_grpc
from meter.reports import (
    BackendReport,
    BillingSettings,
    GroupBy,
    IdlePolicy,
    ReportError,
    ReportOptions,
    RequestFilter,
    RequestReport,
    UsageReport,
    UsageRow,
    get_backend_energy,
    get_request_energy,
    get_usage,
    list_requests,
)
from meter.reports.requests import decode_page_token
from meter.store import audit

log = structlog.get_logger(__name__)
T = TypeVar("T")

# The metadata this service reads: the key (and the ids a client sends with every call, checked as the generation
# service checks them)
READ_METADATA = ("authorization", "x-api-key", "x-correlation-id", "x-traffic-class")
SERVICE = pb.DESCRIPTOR.services_by_name["EnergyReports"]
SERVICE_NAME = SERVICE.full_name
DEFAULT_WAIT_MS = 30_000
MAX_WAIT_MS = 600_000
MAX_TIMESTAMP_S = (2**63 - 1) // 1_000_000_000  # 2262-04-11: the last second whose ns fit in a BIGINT
MAX_NS = 2**63 - 1  # a BIGINT
MAX_FIELD_CHARS = 256  # of a request id, tenant, model, backend or status named in a query
MAX_WAITS_PER_TENANT = 16
MAX_POLL_INTERVAL_S = 1.0
WAIT_QUERY_SLOTS = 2

IDLE_POLICY_PB = {
    IdlePolicy.NONE: pb.IDLE_POLICY_NONE,
    IdlePolicy.TIME: pb.IDLE_POLICY_TIME,
    IdlePolicy.TOKENS: pb.IDLE_POLICY_TOKENS,
}
IDLE_POLICY_OF_PB = {v: k for k, v in IDLE_POLICY_PB.items()}
GROUP_BY_PB = {
    pb.GetUsageRequest.TENANT: GroupBy.TENANT,
    pb.GetUsageRequest.MODEL: GroupBy.MODEL,
    pb.GetUsageRequest.BACKEND: GroupBy.BACKEND,
    pb.GetUsageRequest.HOUR: GroupBy.HOUR,
    pb.GetUsageRequest.DAY: GroupBy.DAY,
}


def asked_policy(message: Any) -> IdlePolicy | None:
    """The ``optional IdlePolicy idle_policy`` of a request message; INVALID_ARGUMENT for a value we do not know."""
    if not message.HasField("idle_policy"):
        return None
    policy = IDLE_POLICY_OF_PB.get(message.idle_policy)
    if policy is None:
        raise InvalidArgument(f"idle_policy: unknown value {message.idle_policy}")
    return policy


# -- proto conversion ----------------------------------------------------------------------------------------------


def ns_of(message: Any, field: str) -> int | None:
    """A Timestamp field as ns since the epoch; None when unset. INVALID_ARGUMENT names the field when it is out of
    range (before 1970, after 2262, or nanos outside [0, 1e9))."""
    if not message.HasField(field):
        return None
    ts = getattr(message, field)
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(f"{field}: nanos must be in [0, 999999999], got {ts.nanos}")
    if not 0 <= ts.seconds <= MAX_TIMESTAMP_S:
        raise InvalidArgument(f"{field}: must be between 1970-01-01T00:00:00Z and 2262-04-11T23:47:16Z")
    return ts.seconds * 1_000_000_000 + ts.nanos


def text_field(field: str, value: str) -> str:
    """A string of a query, as it may be compared with stored text: printable, at most MAX_FIELD_CHARS."""
    if len(value) > MAX_FIELD_CHARS:
        raise InvalidArgument(f"{field}: at most {MAX_FIELD_CHARS} characters, got {len(value)}")
    if not value.isprintable():
        raise InvalidArgument(f"{field}: must be printable text (no control characters such as NUL)")
    return value


def checked_page_token(token: str, flt: RequestFilter) -> str:
    """``token`` once it decodes to a cursor the database can compare (a forged one may hold any number)."""
    if token:
        try:
            received_ns, request_id = decode_page_token(token, flt)
        except ReportError as exc:
            raise InvalidArgument(exc.message) from None
        if not 0 <= received_ns <= MAX_NS or not request_id.isprintable() or len(request_id) > MAX_FIELD_CHARS:
            raise InvalidArgument("page_token: not a token from a previous ListRequests response")
    return token


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def request_pb(r: RequestReport) -> pb.RequestEnergy:
    msg = pb.RequestEnergy(
        request_id=r.request_id,
        tenant=r.tenant,
        model_id=r.model_id,
        backend=r.backend or "",
        traffic_class=r.traffic_class or "",
        status=r.status or "",
        correlation_id=r.correlation_id or "",
        api=r.api or "",
        prompt_tokens=r.prompt_tokens,
        prompt_tokens_estimated=r.prompt_tokens_estimated,
        generated_tokens=r.generated_tokens,
        received=timestamp(r.received_ns),
        queued_ms=r.queued_ms or 0.0,
        prefill_j=r.prefill_j,
        decode_j=r.decode_j,
        idle_j=r.idle_j,
        total_j=r.total_j,
        idle_policy=IDLE_POLICY_PB[r.idle_policy],
        co2e_g=r.co2e_g,
        idle_policy_asked=r.idle_policy_asked,
        final=r.final,
    )
    for field, ns in (("released", r.released_ns), ("first_token", r.first_token_ns), ("done", r.done_ns)):
        if ns is not None:
            getattr(msg, field).CopyFrom(timestamp(ns))
    return msg


def usage_row_pb(row: UsageRow) -> pb.UsageRow:
    return pb.UsageRow(
        key=row.key,
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        generated_tokens=row.generated_tokens,
        prefill_j=row.prefill_j,
        decode_j=row.decode_j,
        idle_j=row.idle_j,
        total_j=row.total_j,
        total_wh=row.total_wh,
        j_per_generated_token=row.j_per_generated_token,
        idle_share=row.idle_share,
        co2e_g=row.co2e_g,
        provisional_requests=row.provisional_requests,
        estimated_prompt_requests=row.estimated_prompt_requests,
    )


def usage_pb(report: UsageReport) -> pb.GetUsageResponse:
    at_end = report.settings.at(report.end_ns)
    msg = pb.GetUsageResponse(
        rows=[usage_row_pb(r) for r in report.rows],
        total=usage_row_pb(report.total),
        idle_policy=IDLE_POLICY_PB[report.idle_policy_asked or at_end.idle_policy],
        grid_g_co2e_per_kwh=at_end.grid_g_co2e_per_kwh,
        pue=at_end.pue,
        end=timestamp(report.end_ns),
        settings=[
            pb.BillingSettings(
                effective=timestamp(p.effective_ns),
                idle_policy=IDLE_POLICY_PB[p.idle_policy],
                grid_g_co2e_per_kwh=p.grid_g_co2e_per_kwh,
                pue=p.pue,
                source=p.source,
            )
            for p in report.periods
        ],
        settings_stored=report.settings.stored,
        idle_policy_asked=report.idle_policy_asked is not None,
    )
    if report.start_ns is not None:
        msg.start.CopyFrom(timestamp(report.start_ns))
    return msg


def backend_pb(b: BackendReport) -> pb.BackendEnergy:
    msg = pb.BackendEnergy(
        backend=b.backend,
        counter_j=b.counter_mj / 1000,
        attributed_j=b.attributed_mj / 1000,
        prefill_j=b.prefill_mj / 1000,
        decode_j=b.decode_mj / 1000,
        idle_j=b.idle_mj / 1000,
        conservation_error_mj=b.conservation_error_mj,
        requests=b.requests,
        samples=b.samples,
        gaps=b.gaps,
        adjustment_mj=b.adjustment_mj,
        adjusted_epochs=b.adjusted_epochs,
    )
    if b.attributed_until_ns is not None:
        msg.attributed_until.CopyFrom(timestamp(b.attributed_until_ns))
    return msg


# -- the service ---------------------------------------------------------------------------------------------------


def scoped_tenant(principal: Principal, tenant: str) -> str | None:
    """The tenant a query is limited to: the one asked for (if the key may read it), else the key's own for a
    tenant key, else None (an admin reading every tenant)."""
    if tenant:
        principal.require_tenant_access(text_field("tenant", tenant))
        return tenant
    return None if principal.admin else principal.tenant


class WaitSlots:
    """How many ``wait_final`` calls each tenant holds; past ``per_tenant``, RESOURCE_EXHAUSTED."""

    def __init__(self, per_tenant: int = MAX_WAITS_PER_TENANT) -> None:
        self.per_tenant = per_tenant
        self._held: dict[str, int] = {}

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def take(self, tenant: str) -> None:
        if self.held(tenant) >= self.per_tenant:
            raise Overloaded(
                f"wait_final: at most {self.per_tenant} waits at once per tenant; retry later or ask without waiting",
                retry_after_s=1.0,
            )
        self._held[tenant] = self.held(tenant) + 1

    def give_back(self, tenant: str) -> None:
        left = self.held(tenant) - 1
        if left > 0:
            self._held[tenant] = left
        else:
            self._held.pop(tenant, None)


class EnergyReportsServicer(pb_grpc.EnergyReportsServicer):
    def __init__(
        self,
        engine: sa.Engine,
        auth: Authenticator,
        fallback: BillingSettings,
        *,
        poll_interval_s: float = 0.1,
        nudge: Callable[[], None] | None = None,
        nudge_interval_s: float = 0.5,
    ) -> None:
        """``fallback``: the billing settings of this process's config, which bill only while the database holds
        none (``meter.reports.settings``). ``nudge`` asks the metering engine for a pass now
        (``MeterService.run_soon``); ``wait_final`` calls it, at most every ``nudge_interval_s``, while the request
        it waits for is provisional."""
        self.engine = engine
        self.auth = auth
        self.fallback = fallback
        self.poll_interval_s = poll_interval_s
        self._nudge = nudge
        self._nudge_interval_s = nudge_interval_s
        self._last_nudge = 0.0
        self.waits = WaitSlots()
        self._poll_slots = asyncio.Semaphore(WAIT_QUERY_SLOTS)

    def _options(self, message: Any) -> ReportOptions:
        return ReportOptions(idle_policy=asked_policy(message), fallback=self.fallback)

    def _nudge_engine(self) -> None:
        now = time.monotonic()
        if self._nudge is not None and now - self._last_nudge >= self._nudge_interval_s:
            self._last_nudge = now
            self._nudge()

    async def _query(self, fn: Callable[[sa.Connection], T]) -> T:
        def run() -> T:
            with self.engine.connect() as conn:
                return fn(conn)

        try:
            return await asyncio.to_thread(run)
        except ReportError as exc:  # InvalidQuery: the message starts with the field
            raise InvalidArgument(exc.message) from None
        except sa.exc.OperationalError as exc:
            log.warning("report_db_unavailable", error=str(exc.orig or exc))
            raise Unavailable("the energy database is unavailable", retry_after_s=1.0) from None
        except sa.exc.SQLAlchemyError:  # not the caller's doing (inputs are checked first); the SQL stays in the log
            log.exception("report_query_failed")
            raise Internal("the energy database could not run the report query") from None

    async def _call(
        self, context: grpc.aio.ServicerContext, method: str, work: Callable[[Principal], Awaitable[T]]
    ) -> T:
        started = time.perf_counter()
        try:
            principal = await self.auth.authenticate(metadata_dict(context, READ_METADATA))
            principal.require_scope("reports")
            if principal.admin:  # an admin reads every tenant's energy: on the record, before the answer
                await asyncio.to_thread(self._audit_read, principal, method, context)
            result = await work(principal)
        except Exception as caught:
            exc = as_status_error(caught, method, None)
            log.info("report_failed", method=method, code=exc.grpc_code.name, error=exc.message)
            await abort_with(context, exc)
            raise AssertionError("unreachable") from None  # abort raises
        log.debug("report", method=method, tenant=principal.tenant, ms=round((time.perf_counter() - started) * 1e3, 1))
        return result

    def _audit_read(self, principal: Principal, method: str, context: grpc.aio.ServicerContext) -> None:
        with self.engine.begin() as conn:
            audit.record(conn, f"key:{principal.key_id}", "report.read", method, peer=context.peer())

    # -- GetRequestEnergy ----------------------------------------------------------------------------------------
    async def GetRequestEnergy(
        self, request: pb.GetRequestEnergyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestEnergy:
        async def work(principal: Principal) -> pb.RequestEnergy:
            if not request.request_id:
                raise InvalidArgument("request_id: missing")
            request_id = text_field("request_id", request.request_id)
            if request.wait_timeout_ms > MAX_WAIT_MS:
                raise InvalidArgument(f"wait_timeout_ms: at most {MAX_WAIT_MS}, got {request.wait_timeout_ms}")
            wait_s = (request.wait_timeout_ms or DEFAULT_WAIT_MS) / 1000 if request.wait_final else 0.0
            remaining = context.time_remaining()
            if remaining is not None:  # answer (provisionally) before the client gives up on us
                wait_s = min(wait_s, max(0.0, remaining - 0.2))
            options = self._options(request)
            if wait_s <= 0:
                report = await self._request_report(principal, request_id, options)
            else:
                self.waits.take(principal.tenant)
                try:
                    report = await self._wait_final(principal, request_id, options, wait_s)
                finally:
                    self.waits.give_back(principal.tenant)
            if report is None:
                raise NotFound(f"request_id: no request {clip(request_id)!r} has been recorded")
            return request_pb(report)

        return await self._call(context, "GetRequestEnergy", work)

    async def _request_report(
        self, principal: Principal, request_id: str, options: ReportOptions
    ) -> RequestReport | None:
        report = await self._query(lambda c: get_request_energy(c, request_id, options))
        if report is not None:
            principal.require_tenant_access(report.tenant)
        return report

    async def _wait_final(
        self, principal: Principal, request_id: str, options: ReportOptions, wait_s: float
    ) -> RequestReport | None:
        """Poll until the request is final or ``wait_s`` is over, backing off; polls share WAIT_QUERY_SLOTS."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s
        interval_s = self.poll_interval_s
        report = await self._request_report(principal, request_id, options)
        while report is None or not report.final:
            left = give_up - loop.time()
            if left <= 0:
                break
            self._nudge_engine()
            await asyncio.sleep(min(interval_s, left))
            interval_s = min(interval_s * 1.5, MAX_POLL_INTERVAL_S)
            async with self._poll_slots:
                report = await self._request_report(principal, request_id, options)
        return report

    # -- ListRequests --------------------------------------------------------------------------------------------
    async def ListRequests(
        self, request: pb.ListRequestsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRequestsResponse:
        async def work(principal: Principal) -> pb.ListRequestsResponse:
            flt = RequestFilter(
                tenant=scoped_tenant(principal, request.tenant),
                model_id=text_field("model_id", request.model_id) or None,
                backend=text_field("backend", request.backend) or None,
                status=text_field("status", request.status) or None,
                start_ns=ns_of(request, "start"),
                end_ns=ns_of(request, "end"),
            )
            if flt.start_ns is not None and flt.end_ns is not None and flt.start_ns >= flt.end_ns:
                raise InvalidArgument("end: must be after start")
            token = checked_page_token(request.page_token, flt)
            options = self._options(request)
            page = await self._query(
                lambda c: list_requests(c, flt, options, page_size=request.page_size, page_token=token)
            )
            return pb.ListRequestsResponse(
                requests=[request_pb(r) for r in page.requests], next_page_token=page.next_page_token
            )

        return await self._call(context, "ListRequests", work)

    # -- GetUsage ------------------------------------------------------------------------------------------------
    async def GetUsage(self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext) -> pb.GetUsageResponse:
        async def work(principal: Principal) -> pb.GetUsageResponse:
            group_by = GROUP_BY_PB.get(request.group_by)
            if group_by is None:
                raise InvalidArgument(f"group_by: unknown value {request.group_by}")
            tenant = scoped_tenant(principal, request.tenant)
            start_ns = ns_of(request, "start")
            end_ns = ns_of(request, "end")
            end_ns = time.time_ns() if end_ns is None else end_ns
            options = self._options(request)
            report = await self._query(
                lambda c: get_usage(c, options, start_ns=start_ns, end_ns=end_ns, group_by=group_by, tenant=tenant)
            )
            return usage_pb(report)

        return await self._call(context, "GetUsage", work)

    # -- GetBackendEnergy ----------------------------------------------------------------------------------------
    async def GetBackendEnergy(
        self, request: pb.GetBackendEnergyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBackendEnergyResponse:
        async def work(principal: Principal) -> pb.GetBackendEnergyResponse:
            if not principal.admin:
                raise PermissionDenied(
                    f"key {principal.key_id} of tenant {principal.tenant!r}: backend energy is shared by every "
                    "tenant; it needs an admin key"
                )
            start_ns = ns_of(request, "start")
            end_ns = ns_of(request, "end")
            end_ns = time.time_ns() if end_ns is None else end_ns
            backends = await self._query(lambda c: get_backend_energy(c, start_ns=start_ns, end_ns=end_ns))
            msg = pb.GetBackendEnergyResponse(backends=[backend_pb(b) for b in backends], end=timestamp(end_ns))
            if start_ns is not None:
                msg.start.CopyFrom(timestamp(start_ns))
            return msg

        return await self._call(context, "GetBackendEnergy", work)


# -- a server of its own (``joulegate meter``) ---------------------------------------------------------------------


@dataclass
class ReportsServer:
    """EnergyReports with health and reflection on a port of its own, for the meter daemon."""

    server: grpc.aio.Server
    health: Health
    port: int

    async def stop(self, grace_s: float) -> None:
        await self.health.shutdown()
        await self.server.stop(grace_s)


async def start_reports_server(
    engine: sa.Engine,
    auth: Authenticator,
    fallback: BillingSettings,
    listen: str,
    *,
    nudge: Callable[[], None] | None = None,
    tls: TlsFiles | None = None,
) -> ReportsServer:
    """Serve EnergyReports (keys checked by ``auth``; ``fallback``: the billing settings while the database holds
    none), the health service (SERVING) and reflection on ``listen`` (HOST:PORT; port 0 picks one)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_servicer(server, SERVICE, EnergyReportsServicer(engine, auth, fallback, nudge=nudge))
    health, names = add_introspection(server, [SERVICE_NAME])
    port = bind_grpc(server, listen, grpc_server_credentials(tls) if tls else None)
    await server.start()
    await health.set(("", *names), serving=True)
    log.info("reports_server_started", listen=listen, port=port, tls=tls is not None)
    return ReportsServer(server=server, health=health, port=port)
