"""A fuzz battery for the HTTP front door: whatever a client sends, the answer is never a 5xx.

Structured inputs come from hypothesis (JSON bodies with NaN, infinities, huge integers, lone surrogates, deep
nesting, wrong types, for every generation route); bytes that client libraries refuse to send go over raw sockets
(header values that are not UTF-8, broken framing, random request bytes, bodies that claim a compression they do not
have). A last test shows that a client cannot grow the metric label sets or store anything unbounded, whatever
distinct values it sends.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.store.models import Request as RequestRow
from proxy.gateway import UNKNOWN_CLASS
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim.config import SimConfig

from .harness import Stack
from .rawwire import HttpAnswer, http_raw, request_bytes
from .threaded import stack_in_thread

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLASSES = {"default", "batch"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    shaping = {"classes": {"default": {}, "batch": {"policy": "batch", "max_batch": 4, "hold_ms": 20}}}
    sim = SimConfig(time_scale=0.0, max_input_tokens=200, max_total_tokens=300)
    with stack_in_thread(
        tmp_path_factory.mktemp("fuzz-http"), http=True, sim_config=sim, model={"shaping": shaping}
    ) as s:
        yield s


def _auth(stack: Stack) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + stack.key.encode())


def _is_our_error(answer: HttpAnswer) -> bool:
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return False
    return isinstance(doc, dict) and set(doc) == {"error", "error_type"} and bool(doc["error"])


# -- JSON bodies -------------------------------------------------------------------------------------------------------
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
texts = st.one_of(
    st.text(max_size=24),
    st.tuples(st.text(max_size=8), surrogate, st.text(max_size=8)).map("".join),  # a lone surrogate inside
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
documents = st.recursive(leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3))
small_ints = st.integers(min_value=-3, max_value=12)
parameters = st.fixed_dictionaries(
    {},
    optional={
        name: st.one_of(values, leaves)
        for name, values in {
            "max_new_tokens": small_ints,
            "temperature": st.floats(-1, 3),
            "top_k": st.integers(-(2**40), 2**40),
            "top_p": st.floats(-0.5, 1.5),
            "typical_p": st.floats(-0.5, 1.5),
            "repetition_penalty": st.floats(-1, 3),
            "frequency_penalty": st.floats(-3, 3),
            "seed": st.integers(-1, 2**65),
            "stop": st.lists(texts, max_size=8),
            "truncate": small_ints,
            "top_n_tokens": small_ints,
            "best_of": small_ints,
            "details": st.booleans(),
            "decoder_input_details": st.booleans(),
            "return_full_text": st.booleans(),
            "watermark": st.booleans(),
            "do_sample": st.booleans(),
            "grammar": documents,
            "adapter_id": texts,
        }.items()
    },
)
generate_bodies = st.fixed_dictionaries(
    {"inputs": st.one_of(texts, leaves)},
    optional={"parameters": st.one_of(parameters, documents), "stream": leaves, "extra": documents},
)
chat_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(st.fixed_dictionaries({"role": texts, "content": texts}), max_size=3), documents)},
    optional={
        "max_tokens": st.one_of(small_ints, leaves),
        "stream": st.booleans(),
        "model": st.one_of(st.just("tgi"), texts),
        "temperature": leaves,
        "stop": st.one_of(st.lists(texts, max_size=3), leaves),
    },
)
completion_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(texts, st.lists(texts, max_size=3), leaves)},
    optional={"max_tokens": st.one_of(small_ints, leaves), "stream": st.booleans(), "seed": leaves},
)


def _not_json_to_tgi(doc: Any) -> bool:
    """Whether serde_json would refuse the document: a NaN/infinite number or a string with a lone surrogate."""
    if isinstance(doc, float):
        return doc != doc or doc in (float("inf"), float("-inf"))
    if isinstance(doc, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in doc)
    if isinstance(doc, list):
        return any(_not_json_to_tgi(v) for v in doc)
    if isinstance(doc, dict):
        return any(_not_json_to_tgi(k) or _not_json_to_tgi(v) for k, v in doc.items())
    return False


def _send_json(stack: Stack, path: str, doc: Any, truncate: bool) -> HttpAnswer:
    raw = json.dumps(doc).encode()  # ensure_ascii: surrogates travel as \\udXXX escapes, as a client would send them
    if truncate:
        raw = raw[: len(raw) // 2] + b"{"  # never JSON: an unfinished value, or a value with trailing bytes
    return http_raw(stack.app.http_port, request_bytes(b"POST", path.encode(), [_auth(stack)], raw), timeout_s=60)


def _check_json_answer(answer: HttpAnswer, doc: Any, truncate: bool) -> None:
    assert answer.status is not None and answer.status < 500, (answer.status, answer.body[:300])
    if answer.status >= 400:
        assert _is_our_error(answer), answer.body[:300]
    if truncate or _not_json_to_tgi(doc):
        assert answer.status == 400, (answer.status, answer.body[:300])  # refused at the door, never forwarded


@settings(FUZZ, max_examples=150)
@given(
    path=st.sampled_from(["/generate", "/generate_stream", "/", "/tokenize"]),
    doc=generate_bodies,
    truncate=st.booleans(),
)
def test_any_generate_body_gets_a_4xx_or_an_answer(stack: Stack, path: str, doc: Any, truncate: bool) -> None:
    _check_json_answer(_send_json(stack, path, doc, truncate), doc, truncate)


@settings(FUZZ, max_examples=80)
@given(chat=st.booleans(), doc=st.one_of(chat_bodies, completion_bodies, documents), truncate=st.booleans())
def test_any_openai_body_gets_a_4xx_or_an_answer(stack: Stack, chat: bool, doc: Any, truncate: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    _check_json_answer(_send_json(stack, path, doc, truncate), doc, truncate)


# -- bytes client libraries refuse to send -----------------------------------------------------------------------------
READ_HEADERS = [b"x-correlation-id", b"x-traffic-class", b"x-model-id", b"authorization", b"x-api-key"]
header_bytes = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


@settings(FUZZ, max_examples=120)
@given(name=st.sampled_from(READ_HEADERS), value=header_bytes)
def test_any_header_value_gets_a_clean_answer(stack: Stack, name: bytes, value: bytes) -> None:
    body = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 2}}).encode()
    headers = [(name, value)] if name in (b"authorization", b"x-api-key") else [_auth(stack), (name, value)]
    answer = http_raw(stack.app.http_port, request_bytes(b"POST", b"/generate", headers, body))
    assert answer.status is not None and answer.status < 500, (answer.status, answer.body[:200])
    kept = value.strip(b" \t")
    if not all(0x20 <= c <= 0x7E for c in kept):
        assert answer.status == 400  # the HTTP parser's own refusal, or ours naming the header


FRAMING = [
    b"",
    b"Content-Length: 5\r\n",
    b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 3\r\nContent-Length: 4\r\n",
    b"Content-Encoding: gzip\r\n",
]
request_lines = st.one_of(
    st.binary(max_size=300),
    st.tuples(
        st.sampled_from([b"GET", b"POST", b"PUT", b"BREW", b"", b"G\x00T", b"POST /generate"]),
        st.sampled_from([b"/generate", b"/", b"/metrics", b"*", b"/v1/chat/completions", b"//..%00", b"x" * 300]),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b""]),
        st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=5),
        st.sampled_from(FRAMING),
        st.binary(max_size=100),
    ).map(
        lambda t: (
            t[0]
            + b" "
            + t[1]
            + b" "
            + t[2]
            + b"\r\nHost: x\r\n"
            + b"".join(k + b": " + v + b"\r\n" for k, v in t[3])
            + t[4]
            + b"\r\n"
            + t[5]
        )
    ),
)


@settings(FUZZ, max_examples=150)
@given(data=request_lines)
def test_any_request_bytes_get_a_4xx_or_a_closed_connection(stack: Stack, data: bytes) -> None:
    answer = http_raw(stack.app.http_port, data, timeout_s=30, half_close=True)
    assert answer.status is None or answer.status < 500, (answer.status, answer.body[:200])


@settings(FUZZ, max_examples=60)
@given(
    body=st.one_of(st.binary(max_size=200), st.just(b"\x1f\x8b\x08\x00" + bytes(20))),
    encoding=st.sampled_from([b"gzip", b"deflate", b"br", b"zstd", b"identity", b"gzip, deflate", b"x"]),
)
def test_any_compressed_body_gets_a_4xx_or_an_answer(stack: Stack, body: bytes, encoding: bytes) -> None:
    headers = [_auth(stack), (b"content-encoding", encoding)]
    answer = http_raw(stack.app.http_port, request_bytes(b"POST", b"/generate", headers, body))
    assert answer.status is not None and 400 <= answer.status < 500, (answer.status, answer.body[:200])


def test_the_gateway_is_still_healthy_after_the_battery(stack: Stack) -> None:
    assert http_raw(stack.app.http_port, request_bytes(b"GET", b"/health", [])).status == 200
    assert stack.app.pools["sim-model"].healthy
    stats = stack.app.ledger.stats
    assert stats.db_available and stats.journaled == 0


# -- bounded metrics and ledger ----------------------------------------------------------------------------------------
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _metrics(conn: http.client.HTTPConnection) -> str:
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


def _labels(text: str, name: str) -> set[str]:
    return {v for line in text.splitlines() if not line.startswith("#") for k, v in _LABEL.findall(line) if k == name}


def test_distinct_client_values_cannot_grow_metrics_or_what_is_stored(stack: Stack) -> None:
    """Before: every unknown ``x-traffic-class`` became a label (and a ledger row's class): 3,000 distinct 2 KB
    classes took /metrics from 10 KB to 12.8 MB. Thousands of distinct values of every header and path a client
    controls now leave /metrics the size it was, give no label but configured ones, and store nothing unbounded."""
    n = 1500
    conn = http.client.HTTPConnection("127.0.0.1", stack.app.http_port, timeout=60)
    auth = {"Authorization": f"Bearer {stack.key}"}
    body = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 1}})

    def post(path: str, headers: dict[str, str]) -> int:
        conn.request("POST", path, body=body, headers={**auth, **headers})
        resp = conn.getresponse()
        resp.read()
        return resp.status

    # the registry is the process's: classes other tests configured are labels already (test_dashboard_metrics)
    earlier = _labels(_metrics(conn), "traffic_class")

    # one round of every kind first, so that every (route, method, code) series the rounds below touch exists
    def round_of(i: int) -> None:
        tag = f"{i:06d}" + "x" * 200
        assert post("/generate", {"x-traffic-class": f"class-{tag}"}) == 422
        assert post("/generate", {"x-model-id": f"model-{tag}"}) == 404
        assert post(f"/no/such/path/{tag}", {}) == 404
        assert post("/generate", {"Authorization": f"Bearer jg_{tag}"}) == 401
        assert post("/generate", {"x-correlation-id": f"corr-{tag}", "x-traffic-class": "default"}) == 200

    assert post("/generate", {"x-traffic-class": "batch"}) == 200  # a configured class is a label, as it should be
    with grpc.insecure_channel(f"127.0.0.1:{stack.app.grpc_port}") as channel:
        stub = pbg.GenerationServiceStub(channel)
        req = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="hi")])

        def grpc_round(i: int) -> None:
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(req, metadata=(*stack.auth, ("x-traffic-class", f"grpc-class-{i}")))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        round_of(0)
        grpc_round(0)
        before = _metrics(conn)
        for i in range(1, n // 5):
            round_of(i)
        for i in range(1, 300):
            grpc_round(i)
    after = _metrics(conn)
    conn.close()

    assert len(after) < len(before) + 2048, (len(before), len(after))  # histogram counts grow a digit, no series
    assert _labels(after, "traffic_class") - earlier <= CLASSES | {UNKNOWN_CLASS}
    assert not any("x" * 50 in v for v in _labels(after, "route") | _labels(after, "model"))
    assert stack.app.ledger.flush(10.0)
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as conn_db:
            rows = conn_db.execute(sa.select(RequestRow.traffic_class, RequestRow.correlation_id)).all()
    finally:
        engine.dispose()
    assert {r.traffic_class for r in rows} <= CLASSES | {UNKNOWN_CLASS, None}  # refused calls: '(unknown)'
    assert all(r.correlation_id is None or len(r.correlation_id) <= 256 for r in rows)
