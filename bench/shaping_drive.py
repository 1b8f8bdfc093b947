"""The I/O of the shaping benchmarks: send a trace through the gateway over gRPC, and read its energy back.

Requests go to ``fmaas.GenerationService/GenerateStream`` with ``x-traffic-class`` naming the policy's class, so the
gateway's own shaper holds and releases them. The client stamps, per request, when it sent it, when the first
message carrying a generated token arrived (client-side TTFT) and when the stream ended. Energy is read afterwards
from ``joulegate.v1.EnergyReports`` with an admin key: ``GetBackendEnergy{start, end}`` for the counter, attributed
and idle joules of the backend over a run's window (whole metering epochs), and ``ListRequests`` for each request's
attributed joules and gateway-side timestamps.

Windows are whole metering epochs: ``GetBackendEnergy`` sums the epochs that *start* in ``[start, end)``, so a run
starts on an epoch boundary and its window ends on one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from bench.shaping_trace import Trace
from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg

NS_PER_S = 1_000_000_000
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ClientResult:
    """One request as the client saw it (wall-clock ns)."""

    index: int  # position in the trace
    request_id: str  # the gateway's x-request-id ("" if none came back)
    sent_ns: int
    first_token_ns: int | None
    done_ns: int
    prompt_tokens: int  # as the gateway counted them (input_token_count), 0 if unknown
    generated_tokens: int
    error: str | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_ns is None else (self.first_token_ns - self.sent_ns) / 1e6

    @property
    def latency_ms(self) -> float:
        return (self.done_ns - self.sent_ns) / 1e6


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One request as the gateway's EnergyReports tell it."""

    request_id: str
    traffic_class: str
    status: str
    prefill_j: float
    decode_j: float
    final: bool
    received_ns: int
    released_ns: int | None
    first_token_ns: int | None
    done_ns: int | None
    generated_tokens: int

    @property
    def attributed_j(self) -> float:
        return self.prefill_j + self.decode_j

    @property
    def ttft_ms(self) -> float | None:
        """Gateway-side TTFT: received -> first token from the backend (shaping hold included)."""
        return None if self.first_token_ns is None else (self.first_token_ns - self.received_ns) / 1e6


@dataclass(frozen=True, slots=True)
class WindowEnergy:
    """A backend's energy over one window ``[start_ns, end_ns)`` (whole epochs) and the requests received in it."""

    start_ns: int
    end_ns: int
    counter_j: float
    attributed_j: float
    idle_j: float
    conservation_error_mj: int
    gaps: int
    requests: tuple[RequestRow, ...]


def epoch_ceil_ns(t_ns: int, epoch_ns: int) -> int:
    """The first epoch boundary at or after ``t_ns``."""
    return -(-t_ns // epoch_ns) * epoch_ns


async def sleep_until_ns(t_ns: int) -> None:
    delay_s = (t_ns - time.time_ns()) / NS_PER_S
    if delay_s > 0:
        await asyncio.sleep(delay_s)


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    s, n = divmod(ns, NS_PER_S)
    return timestamp_pb2.Timestamp(seconds=s, nanos=n)


def _ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * NS_PER_S + ts.nanos


async def one_request(
    stub: pbg.GenerationServiceStub,
    index: int,
    text: str,
    new_tokens: int,
    model_id: str,
    metadata: Metadata,
    timeout_s: float,
) -> ClientResult:
    req = pb.SingleGenerationRequest(
        model_id=model_id,
        request=pb.GenerationRequest(text=text),
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=new_tokens)),
    )
    sent_ns = time.time_ns()
    first_ns: int | None = None
    generated = prompt = 0
    request_id = ""
    error: str | None = None
    call = stub.GenerateStream(req, metadata=metadata, timeout=timeout_s)
    try:
        async for msg in call:
            if msg.input_token_count:
                prompt = msg.input_token_count
            if msg.generated_token_count:
                if first_ns is None:
                    first_ns = time.time_ns()
                generated = msg.generated_token_count  # cumulative
    except grpc.RpcError as exc:
        error = f"{exc.code().name}: {exc.details()}"
    done_ns = time.time_ns()
    with contextlib.suppress(grpc.RpcError):
        request_id = dict(await call.initial_metadata()).get("x-request-id", "")
    return ClientResult(index, str(request_id), sent_ns, first_ns, done_ns, prompt, generated, error)


async def run_trace(
    stub: pbg.GenerationServiceStub,
    trace: Trace,
    *,
    model_id: str,
    traffic_class: str,
    start_ns: int,
    prompt_of: Callable[[int, int], str],
    metadata: Metadata = (),
    timeout_s: float = 600.0,
) -> list[ClientResult]:
    """Send every arrival of ``trace`` at ``start_ns + offset`` (open loop) and wait for all of them to end."""
    md = (*metadata, ("x-traffic-class", traffic_class))
    tasks: list[asyncio.Task[ClientResult]] = []
    for i, a in enumerate(trace.arrivals):
        await sleep_until_ns(start_ns + round(a.offset_s * NS_PER_S))
        text = prompt_of(a.prompt_tokens, a.salt)
        tasks.append(asyncio.create_task(one_request(stub, i, text, a.new_tokens, model_id, md, timeout_s)))
    return list(await asyncio.gather(*tasks))


async def wait_attributed(
    reports: epbg.EnergyReportsStub, metadata: Metadata, until_ns: dict[str, int], timeout_s: float = 120.0
) -> None:
    """Wait until each backend's epochs are attributed up to its ``until_ns`` (the engine runs in the gateway)."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await reports.GetBackendEnergy(epb.GetBackendEnergyRequest(), metadata=metadata)
        reached = {b.backend: _ns(b.attributed_until) for b in resp.backends if b.HasField("attributed_until")}
        missing = {name: t for name, t in until_ns.items() if reached.get(name, 0) < t}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"energy not attributed in {timeout_s:.0f} s: {missing} (reached {reached})")
        await asyncio.sleep(0.5)


async def read_window(
    reports: epbg.EnergyReportsStub,
    metadata: Metadata,
    *,
    backend: str,
    model_id: str,
    start_ns: int,
    end_ns: int,
) -> WindowEnergy:
    """The backend's counter/attributed/idle joules over the window's epochs and the requests received in it."""
    resp = await reports.GetBackendEnergy(
        epb.GetBackendEnergyRequest(start=_ts(start_ns), end=_ts(end_ns)), metadata=metadata
    )
    row = next((b for b in resp.backends if b.backend == backend), None)
    if row is None:
        raise LookupError(f"no epochs of backend {backend!r} in [{start_ns}, {end_ns})")
    rows: list[RequestRow] = []
    token = ""
    while True:
        page = await reports.ListRequests(
            epb.ListRequestsRequest(
                model_id=model_id, start=_ts(start_ns), end=_ts(end_ns), page_size=1000, page_token=token
            ),
            metadata=metadata,
        )
        for r in page.requests:
            rows.append(
                RequestRow(
                    request_id=r.request_id,
                    traffic_class=r.traffic_class,
                    status=r.status,
                    prefill_j=r.prefill_j,
                    decode_j=r.decode_j,
                    final=r.final,
                    received_ns=_ns(r.received),
                    released_ns=_ns(r.released) if r.HasField("released") else None,
                    first_token_ns=_ns(r.first_token) if r.HasField("first_token") else None,
                    done_ns=_ns(r.done) if r.HasField("done") else None,
                    generated_tokens=r.generated_tokens,
                )
            )
        token = page.next_page_token
        if not token:
            break
    return WindowEnergy(
        start_ns=start_ns,
        end_ns=end_ns,
        counter_j=row.counter_j,
        attributed_j=row.attributed_j,
        idle_j=row.idle_j,
        conservation_error_mj=row.conservation_error_mj,
        gaps=row.gaps,
        requests=tuple(sorted(rows, key=lambda r: r.received_ns)),
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    return xs[max(0, min(len(xs) - 1, math.ceil(q * len(xs)) - 1))]
