"""A fuzz battery for the gRPC port: whatever a client sends, never UNKNOWN, and INTERNAL only from gRPC itself.

Structured inputs (every field of the TGIS messages) are fuzzed by tests/integration/test_bad_requests_over_the_wire;
here go the bytes no gRPC client library sends, over raw HTTP/2 (``rawwire``): metadata values that are not printable
ASCII, arbitrary metadata keys, message frames with any flag, length and payload, garbage after the connection
preface; and EnergyReports queries with arbitrary text and forged page tokens, on SQLite and PostgreSQL.

What gRPC's C core refuses before any of the gateway's code runs — an illegal metadata key, unparsable reserved
metadata (``grpc-timeout``, ``grpc-encoding``, ``te``, base64 of a ``-bin`` key), a frame marked compressed without
(or with a corrupt) encoding — it answers with INTERNAL itself; the gateway cannot change those answers. The battery
holds them apart (``CORE_REFUSALS``) and checks that the server goes on serving.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epb_grpc
from meter.reports.requests import RequestFilter, encode_page_token
from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig

from .harness import Stack
from .rawwire import grpc_raw, h2_garbage
from .threaded import stack_in_thread

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
Code = grpc.StatusCode
CLEAN = {
    c.value[0]
    for c in (
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.RESOURCE_EXHAUSTED,
        Code.UNAUTHENTICATED,
        Code.PERMISSION_DENIED,
        Code.UNIMPLEMENTED,
        Code.DEADLINE_EXCEEDED,  # a client may send any grpc-timeout, 1 ns included
    )
}
CORE_REFUSALS = (
    "Illegal header key",
    "Metadata keys cannot be zero length",
    "Error parsing '",
    "Compression bit set but no encoding configured",
    "Decompression failed",
)
GENERATE = "/fmaas.GenerationService/Generate"
METHODS = [
    "/fmaas.GenerationService/Generate",
    "/fmaas.GenerationService/GenerateStream",
    "/fmaas.GenerationService/Tokenize",
    "/fmaas.GenerationService/ModelInfo",
    "/joulegate.v1.EnergyReports/GetRequestEnergy",
    "/joulegate.v1.EnergyReports/ListRequests",
    "/joulegate.v1.EnergyReports/GetUsage",
    "/joulegate.v1.EnergyReports/GetBackendEnergy",
]
REQUEST = pb.BatchedGenerationRequest(
    requests=[pb.GenerationRequest(text="hi")], params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2))
).SerializeToString()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_in_thread(tmp_path_factory.mktemp("fuzz-grpc"), sim_config=SimConfig(time_scale=0.0)) as s:
        yield s


def _auth(stack: Stack) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + stack.key.encode())


def _clean_or_core(status: int | None, message: str) -> bool:
    """A status the gateway may give a client's mistake, or gRPC core's own refusal of a protocol violation (or the
    stream refused outright: no status at all)."""
    if status is None or status in CLEAN:
        return True
    return status == Code.INTERNAL.value[0] and message.startswith(CORE_REFUSALS)


def _still_serving(stack: Stack) -> None:
    answer = grpc_raw(stack.app.grpc_port, GENERATE, REQUEST, [_auth(stack)])
    assert answer.status == 0, answer.message


@settings(FUZZ, max_examples=100)
@given(
    key=st.sampled_from([b"x-correlation-id", b"x-traffic-class", b"authorization", b"x-api-key", b"x-model-id"]),
    value=st.binary(max_size=48),
)
def test_any_metadata_value_is_clean(stack: Stack, key: bytes, value: bytes) -> None:
    metadata = [(key, value)] if key in (b"authorization", b"x-api-key") else [_auth(stack), (key, value)]
    answer = grpc_raw(stack.app.grpc_port, GENERATE, REQUEST, metadata)
    assert answer.status in CLEAN, (answer.status, answer.message)
    if not all(0x20 <= c <= 0x7E for c in value) and key != b"x-model-id":  # x-model-id is HTTP's, not read here
        assert answer.status == Code.INVALID_ARGUMENT.value[0]
        assert answer.message.startswith(key.decode() + ": ")


@settings(FUZZ, max_examples=40)  # gRPC core takes ~0.5 s to refuse an illegal key: keep the count modest
@given(
    key=st.one_of(st.from_regex(rb"[a-z0-9_.-]{1,16}(-bin)?", fullmatch=True), st.binary(max_size=16)),
    value=st.binary(max_size=32),
    method=st.sampled_from(METHODS),
)
def test_any_metadata_key_is_clean_or_refused_by_grpc_itself(
    stack: Stack, key: bytes, value: bytes, method: str
) -> None:
    answer = grpc_raw(stack.app.grpc_port, method, b"", [_auth(stack), (key, value)])
    assert _clean_or_core(answer.status, answer.message), (answer.status, answer.message)


frames = st.tuples(
    st.integers(min_value=0, max_value=255),  # the compressed flag byte
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)),  # a length prefix (None: the true one)
    st.one_of(st.binary(max_size=64), st.just(REQUEST)),
    st.sampled_from([None, b"gzip", b"deflate", b"identity", b"snappy"]),
)


@settings(FUZZ, max_examples=80)
@given(frame=frames, method=st.sampled_from(METHODS))
def test_any_message_frame_is_clean_or_refused_by_grpc_itself(
    stack: Stack, frame: tuple[int, int | None, bytes, bytes | None], method: str
) -> None:
    flag, length, payload, encoding = frame
    raw = bytes([flag]) + struct.pack(">I", len(payload) if length is None else length) + payload
    # A frame shorter than its length prefix leaves the call waiting for the rest, as HTTP/2 allows: the client's
    # own deadline ends it (DEADLINE_EXCEEDED).
    metadata = [_auth(stack), (b"grpc-timeout", b"300m")] + ([(b"grpc-encoding", encoding)] if encoding else [])
    answer = grpc_raw(stack.app.grpc_port, method, b"", metadata, frame=raw, timeout_s=30)
    assert _clean_or_core(answer.status, answer.message), (answer.status, answer.message)


@settings(FUZZ, max_examples=40)
@given(payload=st.binary(max_size=400))
def test_garbage_after_the_preface_closes_that_connection_only(stack: Stack, payload: bytes) -> None:
    h2_garbage(stack.app.grpc_port, payload)
    _still_serving(stack)


def test_the_gateway_still_serves_after_the_battery(stack: Stack) -> None:
    _still_serving(stack)
    stats = stack.app.ledger.stats
    assert stats.db_available and stats.journaled == 0


# -- EnergyReports, on both databases ----------------------------------------------------------------------------------
report_text = st.one_of(
    st.text(max_size=12), st.text(st.sampled_from("a\x00\t\n\x7f-é"), max_size=6), st.just("x" * 300)
)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reports_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from ..conftest import _postgres_database

    tmp = tmp_path_factory.mktemp(f"fuzz-reports-{request.param}")
    urls = _postgres_database() if request.param == "postgres" else iter([f"sqlite:///{tmp / 'r.db'}"])
    url = next(urls)
    try:
        with stack_in_thread(tmp, db_url=url, sim_config=SimConfig(time_scale=0.0)) as s:
            yield s
    finally:
        for _ in urls:  # drops the PostgreSQL database
            pass


@settings(FUZZ, max_examples=60)
@given(
    request_id=report_text,
    tenant=report_text,
    model_id=report_text,
    backend=report_text,
    status=report_text,
    cursor=st.one_of(st.none(), st.tuples(st.integers(-(2**80), 2**80), report_text)),
    token=st.text(max_size=40),
    admin=st.booleans(),
)
def test_any_report_query_is_clean(
    reports_stack: Stack,
    request_id: str,
    tenant: str,
    model_id: str,
    backend: str,
    status: str,
    cursor: tuple[int, str] | None,
    token: str,
    admin: bool,
) -> None:
    s = reports_stack
    key = s.admin_key if admin else s.key
    md = (("authorization", f"Bearer {key}"),)
    flt = RequestFilter(tenant=(tenant or None) if admin else (tenant or "tenant-a"), model_id=model_id or None,
                        backend=backend or None, status=status or None)  # fmt: skip
    page_token = encode_page_token(cursor[0], cursor[1], flt) if cursor else token
    with grpc.insecure_channel(f"127.0.0.1:{s.app.grpc_port}") as channel:
        reports = epb_grpc.EnergyReportsStub(channel)
        calls = [
            lambda: reports.GetRequestEnergy(epb.GetRequestEnergyRequest(request_id=request_id), metadata=md),
            lambda: reports.ListRequests(
                epb.ListRequestsRequest(
                    tenant=tenant, model_id=model_id, backend=backend, status=status, page_token=page_token
                ),
                metadata=md,
            ),
            lambda: reports.GetUsage(epb.GetUsageRequest(tenant=tenant), metadata=md),
        ]
        for call in calls:
            try:
                call()
            except grpc.RpcError as exc:
                assert exc.code().value[0] in CLEAN, (exc.code(), exc.details())
                assert "SELECT" not in (exc.details() or "")
