"""The HTTP front door against a client's mistakes and malice, over raw sockets: every mistake is a 4xx.

Each test here reproduces a finding of an outside test of the running stack (it failed before the fix it names):
header bytes that poisoned the ledger, 500s for a wrong method / a body over the limit / a bad gzip body / deeply
nested JSON, NaN and lone surrogates forwarded to TGI, TGI's plain-text 422 turned into a 502, a gzip bomb inflated
and forwarded, no deadline on request heads, megabytes echoed back in an error.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from common.inputs import MAX_JSON_DEPTH
from meter.store.models import Request as RequestRow
from proxy.http.app import MAX_BODY_BYTES
from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig

from .harness import Stack
from .rawwire import grpc_raw, http_raw, request_bytes
from .threaded import stack_in_thread

GENERATE = json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}).encode()
GRPC_GENERATE = "/fmaas.GenerationService/Generate"
GRPC_REQUEST = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="Hello")]).SerializeToString()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_in_thread(tmp_path_factory.mktemp("hard-http"), http=True, sim_config=SimConfig(time_scale=0.0)) as s:
        yield s


def _auth(stack: Stack) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + stack.key.encode())


def _post(stack: Stack, path: bytes, body: bytes, *headers: tuple[bytes, bytes]) -> tuple[int | None, dict, bytes]:
    answer = http_raw(stack.app.http_port, request_bytes(b"POST", path, [_auth(stack), *headers], body))
    return answer.status, answer.headers, answer.body


def _error(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error", "error_type"}, doc
    return doc["error"]


def _rows(stack: Stack) -> list[dict]:
    assert stack.app.ledger.flush(10.0)
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(RequestRow.__table__)).mappings()]
    finally:
        engine.dispose()


# -- header bytes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [b"x-correlation-id", b"x-traffic-class", b"x-model-id", b"x-api-key"])
@pytest.mark.parametrize("value", [b"\xff", b"caf\xc3\xa9", b"a\xed\xa0\x80b", b"\x80" * 3])
def test_header_values_that_are_not_printable_ascii_are_400_naming_the_header(
    stack: Stack, header: bytes, value: bytes
) -> None:
    status, _, body = _post(stack, b"/generate", GENERATE, (header, value))
    assert status == 400
    assert _error(body).startswith(header.decode() + ": the header value must be printable ASCII")


def test_poison_over_either_front_door_never_reaches_the_ledger_on_either_database(tmp_path: Path, db_url: str) -> None:
    """Before: the lone surrogate that ``\\xff`` becomes over HTTP reached the ledger, which took the encoding error
    for a database outage and journaled every later record (SQLite and PostgreSQL alike); over gRPC the same bytes
    were INTERNAL ("Invalid metadata")."""
    with stack_in_thread(tmp_path, db_url=db_url, http=True, sim_config=SimConfig(time_scale=0.0)) as s:
        for value in (b"\xff", b"a\x00b", b"\xc3\xa9"):
            answer = grpc_raw(s.app.grpc_port, GRPC_GENERATE, GRPC_REQUEST, [_auth(s), (b"x-correlation-id", value)])
            assert answer.status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        for value in (b"\xff", b"\xfe\xff" * 10, b"ok\xc0"):
            assert _post(s, b"/generate", GENERATE, (b"x-correlation-id", value))[0] == 400
        status, headers, _ = _post(s, b"/generate", GENERATE, (b"x-correlation-id", b"after-the-poison"))
        assert status == 200
        rows = {r["request_id"]: r for r in _rows(s)}
        assert rows[headers["x-request-id"]]["correlation_id"] == "after-the-poison"
        assert all(r["correlation_id"] is None or r["correlation_id"].isprintable() for r in rows.values())
        stats = s.app.ledger.stats
        assert stats.db_available and stats.journaled == 0 and stats.last_error is None


def test_a_header_value_longer_than_the_limit_is_400_and_not_echoed(stack: Stack) -> None:
    status, headers, body = _post(stack, b"/generate", GENERATE, (b"x-correlation-id", b"c" * 300))
    assert status == 400 and "longer than 256 characters" in _error(body)
    assert "x-correlation-id" not in headers and len(body) < 200


# -- methods, sizes, encodings -----------------------------------------------------------------------------------------
def test_a_wrong_method_is_405_with_allow(stack: Stack) -> None:
    """Before: 500 (aiohttp's text Content-Type clashed with the JSON answer)."""
    for method in (b"PUT", b"DELETE", b"PATCH"):
        answer = http_raw(stack.app.http_port, request_bytes(method, b"/generate", [_auth(stack)], GENERATE))
        assert answer.status == 405 and answer.headers["allow"] == "POST"
        assert _error(answer.body) == "Method Not Allowed"


def test_a_body_over_the_limit_is_413(stack: Stack) -> None:
    """Before: 500."""
    big = json.dumps({"inputs": "x" * (MAX_BODY_BYTES + 10)}).encode()
    status, _, body = _post(stack, b"/generate", big)
    assert status == 413 and f"larger than {MAX_BODY_BYTES} bytes" in _error(body)


def test_a_gzip_bomb_is_413_not_inflated_and_forwarded(stack: Stack) -> None:
    """Before: a 58 KB gzip body inflated to 60 MB and went to the backend."""
    bomb = gzip.compress(json.dumps({"inputs": "a" * 60_000_000}).encode(), compresslevel=9)
    assert len(bomb) < 100_000
    status, _, body = _post(stack, b"/generate", bomb, (b"content-encoding", b"gzip"))
    assert status == 413, body[:200]


def test_compressed_bodies_within_the_limit_are_read(stack: Stack) -> None:
    for encoding, packed in ((b"gzip", gzip.compress(GENERATE)), (b"deflate", zlib.compress(GENERATE))):
        status, _, body = _post(stack, b"/generate", packed, (b"content-encoding", encoding))
        assert status == 200, body[:200]


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"br"])
def test_a_body_that_does_not_decompress_is_400(stack: Stack, encoding: bytes) -> None:
    """Before: 500. (Without the Brotli package installed aiohttp's parser refuses ``br`` itself: 400 too.)"""
    status, _, body = _post(stack, b"/generate", b"this is not compressed", (b"content-encoding", encoding))
    assert status == 400, body[:200]
    if encoding != b"br":
        assert _error(body).startswith("Failed to read the request body")


# -- JSON that TGI would not take --------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 2_000, 100_000])
def test_deeply_nested_json_is_400(stack: Stack, depth: int) -> None:
    """Before: 500 (RecursionError) at 100k levels; forwarded to TGI (which refuses > 127) below Python's limit."""
    nested = b"[" * depth + b"]" * depth
    body = b'{"inputs":"x","parameters":{"max_new_tokens":2},"extra":' + nested + b"}"
    status, _, answer = _post(stack, b"/generate", body)
    assert status == 400
    message = _error(answer)
    assert message.startswith("Failed to parse the request body as JSON:")
    assert "recursion limit" in message or f"nested deeper than {MAX_JSON_DEPTH}" in message


def test_nesting_up_to_the_limit_is_accepted(stack: Stack) -> None:
    nested = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)  # the body object is one level itself
    status, _, answer = _post(
        stack, b"/generate", b'{"inputs":"x","parameters":{"max_new_tokens":2},"e":' + nested + b"}"
    )
    assert status == 200, answer[:200]


@pytest.mark.parametrize(
    ("fragment", "field"),
    [
        (b'"temperature":NaN', "parameters.temperature"),
        (b'"top_p":Infinity', "parameters.top_p"),
        (b'"repetition_penalty":-Infinity', "parameters.repetition_penalty"),
        (b'"typical_p":1e999', "parameters.typical_p"),
    ],
)
def test_nan_and_infinity_are_refused_naming_the_field(stack: Stack, fragment: bytes, field: str) -> None:
    """Before: forwarded (and served: 200)."""
    body = b'{"inputs":"x","parameters":{"max_new_tokens":2,' + fragment + b"}}"
    status, _, answer = _post(stack, b"/generate", body)
    assert status == 400
    assert f"{field}: must be a finite number" in _error(answer)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"inputs":"hi\\ud800","parameters":{"max_new_tokens":2}}', "inputs"),
        (b'{"inputs":"hi","parameters":{"max_new_tokens":2,"stop":["\\udfff"]}}', "parameters.stop[0]"),
        (b'{"inputs":"hi","parameters":{"max_new_tokens":2},"\\ud800":1}', "body"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(stack: Stack, body: bytes, field: str) -> None:
    """Before: forwarded; the simulator crashed mid-response (502) and the backend was marked unreachable."""
    status, _, answer = _post(stack, b"/generate_stream", body)
    assert status == 400
    message = _error(answer)
    assert "lone UTF-16 surrogate" in message
    if field != "body":
        assert f": {field}: holds a lone UTF-16 surrogate" in message
    assert stack.app.pools["sim-model"].healthy


def test_surrogate_pairs_are_text_like_any_other(stack: Stack) -> None:
    status, _, answer = _post(stack, b"/generate", b'{"inputs":"hi \\ud83d\\ude00","parameters":{"max_new_tokens":2}}')
    assert status == 200, answer[:200]


def test_top_k_past_i32_is_422_naming_the_field(stack: Stack) -> None:
    """Before: TGI's plain-text 422 became a 502 (and UNAVAILABLE over gRPC, which clients retry)."""
    body = json.dumps({"inputs": "x", "parameters": {"top_k": 2**31, "max_new_tokens": 2}}).encode()
    status, _, answer = _post(stack, b"/generate", body)
    assert status == 422 and "parameters.top_k" in _error(answer)


def test_tgis_plain_text_422_is_passed_on_as_422(stack: Stack) -> None:
    """A body the gateway lets through but TGI's serde refuses (a message without ``role``): axum answers plain-text
    422, which the gateway passes on with its text rather than as a 502."""
    for stream in (False, True):
        body = json.dumps({"messages": [{"content": "hi"}], "max_tokens": 2, "stream": stream}).encode()
        status, _, answer = _post(stack, b"/v1/chat/completions", body)
        assert status == 422, answer[:200]
        message = _error(answer)
        assert "Failed to deserialize the JSON body into the target type: messages[0]: missing field `role`" in message
    assert stack.app.pools["sim-model"].healthy


# -- echoes, deadlines -------------------------------------------------------------------------------------------------
def test_errors_never_echo_megabytes(stack: Stack) -> None:
    """Before: an unknown model of 2 MB came back whole in the 404."""
    body = json.dumps({"model": "m" * 2_000_000, "messages": [{"role": "user", "content": "x"}]}).encode()
    status, _, answer = _post(stack, b"/v1/chat/completions", body)
    assert status == 404 and len(answer) < 1200
    assert "(2000000 characters)" in _error(answer)


def test_a_request_head_that_trickles_in_is_cut_with_408(stack: Stack) -> None:
    """Before: no deadline on request heads (slowloris). A slow body after a whole head is not cut."""
    deadlines = stack.app.http.deadlines
    before_s, deadlines.timeout_s = deadlines.timeout_s, 1.0
    try:
        trickle = [(0.0, b"POST /generate HTTP/1.1\r\nHost: x\r\n")] + [(0.25, b"x-a: b\r\n")] * 40  # 10 s of it
        answer = http_raw(stack.app.http_port, trickle, timeout_s=20)
        assert answer.status == 408 and answer.seconds < 8.0

        length = (b"content-length", str(len(GENERATE)).encode())
        head = request_bytes(b"POST", b"/generate", [_auth(stack), length], length=False)
        slow_body = [(0.0, head)] + [(0.3, GENERATE[i : i + 8]) for i in range(0, len(GENERATE), 8)]
        answer = http_raw(stack.app.http_port, slow_body, timeout_s=20)
        assert answer.status == 200 and answer.seconds > 1.0
    finally:
        deadlines.timeout_s = before_s
