"""TGI's HTTP API through the gateway: the unchanged ``text-generation`` clients, over loopback, against the simulator.

What a TGI user sees (answers, streams, errors as the client's own exception classes, x-* headers) and what the
meter sees (one ``requests`` row per call, api='http', with TGI's token counts) are both checked here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa
from text_generation import AsyncClient, Client
from text_generation import errors as tgi_errors

from meter.store.models import Request as RequestRow
from sim.config import SimConfig
from tests.waiting import wait_until_async

from .harness import Stack, running_stack
from .threaded import stack_in_thread

# text-generation 0.7 calls pydantic's deprecated .dict(): its warning, not ours
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")

X_HEADERS = (
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-prompt-tokens",
    "x-generated-tokens",
)


def _rows(stack: Stack) -> dict[str, dict]:
    assert stack.app.ledger.flush(10.0)
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            return {r["request_id"]: dict(r) for r in conn.execute(sa.select(RequestRow.__table__)).mappings()}
    finally:
        engine.dispose()


async def _arows(stack: Stack) -> dict[str, dict]:
    return await asyncio.to_thread(_rows, stack)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_in_thread(tmp_path_factory.mktemp("http"), http=True, sim_config=SimConfig(time_scale=0.0)) as s:
        yield s


# -- the synchronous client, unchanged ----------------------------------------------------------------------------
def test_client_generate_and_stream_agree(stack: Stack) -> None:
    client = Client(stack.http_url, headers=_bearer(stack.key))
    resp = client.generate("Why is the sky blue?", max_new_tokens=9, top_n_tokens=2)
    assert resp.details.generated_tokens == 9 == len(resp.details.tokens)
    assert resp.details.finish_reason == "length" and resp.details.prefill == []
    assert resp.generated_text == "".join(t.text for t in resp.details.tokens)
    assert resp.details.top_tokens is not None and all(len(t) == 2 for t in resp.details.top_tokens)

    events = list(client.generate_stream("Why is the sky blue?", max_new_tokens=9))
    assert len(events) == 9 and all(e.details is None for e in events[:-1])
    assert events[-1].details is not None and events[-1].details.generated_tokens == 9
    # the simulator is deterministic for greedy decoding: the same text both ways
    assert events[-1].generated_text == resp.generated_text == "".join(e.token.text for e in events)


def test_client_errors_are_its_own_classes(stack: Stack) -> None:
    client = Client(stack.http_url, headers=_bearer(stack.key))
    too_long = "w " * 1100  # TGI refuses it (max_input_tokens 1024); the client cannot know
    with pytest.raises(tgi_errors.ValidationError, match="must have less than 1024 tokens"):
        client.generate(too_long, max_new_tokens=2)
    with pytest.raises(tgi_errors.ValidationError, match="must have less than 1024 tokens"):
        list(client.generate_stream(too_long, max_new_tokens=2))  # refused inside a 200 stream, as TGI does
    with pytest.raises(tgi_errors.ValidationError, match="must be <= 1024"):
        client.generate("x", max_new_tokens=5000)  # the gateway's own cap (models.max_new_tokens)
    with pytest.raises(tgi_errors.GenerationError, match="simulated failure after 2 tokens"):
        client.generate("boom [[sim:error_after=2]]", max_new_tokens=5)
    with pytest.raises(tgi_errors.GenerationError, match="simulated failure after 2 tokens"):
        list(client.generate_stream("boom [[sim:error_after=2]]", max_new_tokens=5))
    with pytest.raises(tgi_errors.ValidationError, match="decoder_input_details"):
        client.generate("x", max_new_tokens=2, decoder_input_details=True)
    with pytest.raises(tgi_errors.NotFoundError, match="unknown model"):
        Client(stack.http_url, headers={**_bearer(stack.key), "x-model-id": "nope"}).generate("x", max_new_tokens=2)
    with pytest.raises(tgi_errors.UnknownError, match="missing API key"):
        Client(stack.http_url).generate("x", max_new_tokens=2)
    with pytest.raises(tgi_errors.UnknownError, match="invalid or revoked"):
        Client(stack.http_url, headers=_bearer("jg_nope_nope")).generate("x", max_new_tokens=2)


def test_x_headers_request_id_and_ledger_row(stack: Stack) -> None:
    import requests

    body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 6}}
    r = requests.post(
        f"{stack.http_url}/generate",
        json=body,
        headers={"x-api-key": stack.key, "x-correlation-id": "corr-h1"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"generated_text": r.json()["generated_text"]}  # no details asked, none given
    for name in X_HEADERS:
        assert name in r.headers, name
    assert r.headers["x-generated-tokens"] == "6" and int(r.headers["x-prompt-tokens"]) > 0
    assert r.headers["x-compute-characters"] == str(len("Hello there"))
    total_ms = int(r.headers["x-total-time"])
    parts = sum(int(r.headers[h]) for h in ("x-validation-time", "x-queue-time", "x-inference-time"))
    assert parts <= total_ms <= parts + 3  # truncated milliseconds of consecutive spans
    assert abs(float(r.headers["x-compute-time"]) * 1000 - total_ms) < 1.0
    assert r.headers["x-correlation-id"] == "corr-h1"
    rid = r.headers["x-request-id"]

    row = _rows(stack)[rid]
    assert row["api"] == "http" and row["status"] == "OK" and row["tenant"] == "tenant-a"
    assert row["generated_tokens"] == 6 and row["prompt_tokens"] == int(r.headers["x-prompt-tokens"])
    assert row["received_ns"] <= row["released_ns"] <= row["first_token_ns"] <= row["done_ns"]
    assert row["correlation_id"] == "corr-h1" and row["backend"]


def test_compat_route_stream_flag_and_full_text(stack: Stack) -> None:
    import requests

    url, headers = stack.http_url, _bearer(stack.key)
    r = requests.post(url, json={"inputs": "Prefix:", "parameters": {"max_new_tokens": 3}}, headers=headers, timeout=10)
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 1
    assert r.json()[0]["generated_text"].startswith("Prefix:")  # TGI's compat default for text-generation models
    r = requests.post(
        url,
        json={"inputs": "Prefix:", "parameters": {"max_new_tokens": 3, "return_full_text": False}},
        headers=headers,
        timeout=10,
    )
    assert not r.json()[0]["generated_text"].startswith("Prefix:")
    r = requests.post(
        url,
        json={"inputs": "Prefix:", "stream": True, "parameters": {"max_new_tokens": 3}},
        headers=headers,
        timeout=10,
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = r.content.split(b"\n\n")
    assert frames[-1] == b"" and all(f.startswith(b"data:{") for f in frames[:-1]) and len(frames) == 4
    assert json.loads(frames[-2][5:])["generated_text"].startswith("Prefix:")


def test_stream_details_only_when_asked(stack: Stack) -> None:
    import requests

    def last_event(details: bool) -> dict:
        r = requests.post(
            f"{stack.http_url}/generate_stream",
            json={"inputs": "abc", "parameters": {"max_new_tokens": 2, "details": details}},
            headers=_bearer(stack.key),
            timeout=10,
        )
        return json.loads(r.content.split(b"\n\n")[-2][5:])

    assert last_event(False)["details"] is None
    details = last_event(True)["details"]
    assert details["generated_tokens"] == 2 and details["input_length"] > 0 and details["finish_reason"] == "length"


def test_info_health_tokenize_metrics(stack: Stack) -> None:
    import requests

    url, headers = stack.http_url, _bearer(stack.key)
    assert requests.get(f"{url}/info", timeout=10).status_code == 401
    info = requests.get(f"{url}/info", headers=headers, timeout=10).json()
    assert info["model_id"] == "sim-model" and info["max_total_tokens"] == 2048
    assert requests.get(f"{url}/health", timeout=10).status_code == 200  # public
    tokens = requests.post(f"{url}/tokenize", json={"inputs": "one two"}, headers=headers, timeout=10).json()
    assert [t["text"] for t in tokens] == ["", "one", " two"]  # BOS first
    plain = requests.post(
        f"{url}/tokenize", json={"inputs": "one two", "add_special_tokens": False}, headers=headers, timeout=10
    ).json()
    assert plain == tokens[1:]
    metrics = requests.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'joulegate_http_requests_total{code="200",method="POST",route="/generate"}' in text
    assert 'api="http"' in text and "joulegate_time_to_first_token_seconds_bucket" in text
    assert 'joulegate_http_requests_total{code="401",method="GET",route="/info"}' in text


# -- the asynchronous client and the gateway's own refusals -------------------------------------------------------
async def test_async_client_generate_and_stream(tmp_path: Path) -> None:
    async with running_stack(tmp_path, http=True, sim_config=SimConfig(time_scale=0.0)) as s:
        client = AsyncClient(s.http_url, headers=_bearer(s.key))
        resp = await client.generate("abc", max_new_tokens=4, do_sample=True, seed=7)
        assert resp.details.seed == 7 and resp.details.generated_tokens == 4
        events = [e async for e in client.generate_stream("abc", max_new_tokens=4, do_sample=True, seed=7)]
        assert events[-1].generated_text == resp.generated_text and events[-1].details.seed == 7
        with pytest.raises(tgi_errors.ValidationError):
            await client.generate("w " * 1100, max_new_tokens=2)  # TGI: too many input tokens
        rows = await _arows(s)
        assert sorted(r["status"] for r in rows.values()) == ["INVALID_ARGUMENT", "OK", "OK"]
        assert {r["api"] for r in rows.values()} == {"http"}


async def test_overload_is_429_with_retry_after_and_overloaded_error(tmp_path: Path) -> None:
    sim = SimConfig(time_scale=1.0, max_concurrent_requests=1)
    async with running_stack(tmp_path, http=True, sim_config=sim, model={"shaping": {"max_queued_requests": 1}}) as s:
        client = AsyncClient(s.http_url, headers=_bearer(s.key))
        results = await asyncio.gather(
            *(client.generate("x", max_new_tokens=60) for _ in range(3)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, Exception)]
        assert len(errors) == 1 and isinstance(errors[0], tgi_errors.OverloadedError), results
        async with aiohttp.ClientSession(headers=_bearer(s.key)) as http:
            long = [asyncio.ensure_future(client.generate("x", max_new_tokens=60)) for _ in range(2)]
            # one on the backend's only slot, one in the gateway's queue (max_queued_requests = 1): it is full
            await wait_until_async(
                lambda: s.sims[0].scheduler.batch_size == 1 and s.app.shapers["sim-model"].queued == 1, 5.0
            )
            async with http.post(f"{s.http_url}/generate_stream", json={"inputs": "y"}) as r:
                assert r.status == 429  # the gateway's own queue refused it: a status, before any stream
                assert int(r.headers["Retry-After"]) >= 1 and r.headers["x-request-id"]
                assert (await r.json())["error_type"] == "overloaded"
            await asyncio.gather(*long)


async def test_client_disconnect_cancels_upstream(tmp_path: Path) -> None:
    async with running_stack(tmp_path, http=True, sim_config=SimConfig(time_scale=1.0)) as s:
        sim = s.sims[0]
        async with aiohttp.ClientSession(headers=_bearer(s.key)) as http:
            resp = await http.post(
                f"{s.http_url}/generate_stream", json={"inputs": "cancel me", "parameters": {"max_new_tokens": 500}}
            )
            rid = resp.headers["x-request-id"]
            got = 0
            async for line in resp.content:
                got += line.startswith(b"data:")
                if got == 3:
                    break
            assert sim.scheduler.batch_size == 1
            resp.close()  # the client goes away mid-stream

            # a non-streamed call whose client gives up
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await http.post(
                        f"{s.http_url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 500}}
                    )
        # TGI dropped both: the gateway closed its streams
        await wait_until_async(lambda: sim.scheduler.batch_size == 0, 2.0, what="TGI to drop both requests")

        async def both_rows() -> dict[str, dict] | None:  # written as the gateway's handlers unwind
            rows = await _arows(s)  # (a row can land open first, its status NULL until its timeline follows)
            return rows if len(rows) == 2 and all(r["status"] is not None for r in rows.values()) else None

        rows = await wait_until_async(both_rows, 5.0, poll_s=0.05)
        assert rows[rid]["status"] == "CANCELLED" and rows[rid]["generated_tokens"] >= 3
        assert sorted(r["status"] for r in rows.values()) == ["CANCELLED", "CANCELLED"]


async def test_drain_health_and_refusals(tmp_path: Path) -> None:
    async with (
        running_stack(tmp_path, http=True, sim_config=SimConfig(time_scale=0.5)) as s,
        aiohttp.ClientSession(headers=_bearer(s.key)) as http,
    ):
        if True:
            # the only backend goes unhealthy: /health 503 with TGI's body, generation 503 with Retry-After

            async def health(status: int) -> bool:
                async with http.get(f"{s.http_url}/health") as r:
                    if r.status == 503:
                        assert await r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
                    return r.status == status

            await http.post(f"{s.sims[0].url}/sim/health", json={"healthy": False})
            await wait_until_async(lambda: health(503), 2.5, what="/health 503", poll_s=0.05)
            async with http.post(f"{s.http_url}/generate", json={"inputs": "x"}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert (await r.json())["error_type"] == "unavailable"
            await http.post(f"{s.sims[0].url}/sim/health", json={"healthy": True})
            await wait_until_async(lambda: health(200), 2.5, what="/health 200", poll_s=0.05)

            # a call in flight when the gateway drains still finishes
            call = asyncio.ensure_future(
                http.post(f"{s.http_url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 20}})
            )
            await wait_until_async(lambda: s.sims[0].scheduler.batch_size == 1, 5.0, what="the call on the backend")
            await s.app.stop(5.0)
            resp = await call
            assert resp.status == 200 and (await resp.json())["generated_text"]


async def test_http_and_grpc_requests_are_metered_alike(tmp_path: Path, db_url: str) -> None:
    from proxy.pb.fmaas import generation_pb2 as pb

    async with running_stack(tmp_path, http=True, sim_config=SimConfig(time_scale=0.0), db_url=db_url) as s:
        text = "The same prompt through both doors"
        call = s.stub.Generate(
            pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text=text)],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=8)),
            ),
            metadata=(*s.auth, ("x-correlation-id", "same")),
        )
        await call
        grpc_id = dict(await call.initial_metadata())["x-request-id"]
        async with (
            aiohttp.ClientSession(headers={**_bearer(s.key), "x-correlation-id": "same"}) as http,
            http.post(f"{s.http_url}/generate", json={"inputs": text, "parameters": {"max_new_tokens": 8}}) as r,
        ):
            assert r.status == 200
            http_id = r.headers["x-request-id"]
        rows = await _arows(s)
        g, h = rows[grpc_id], rows[http_id]
        assert (g["api"], h["api"]) == ("grpc", "http")
        same = ("tenant", "model_id", "backend", "prompt_tokens", "generated_tokens", "status", "traffic_class")
        assert {k: g[k] for k in same} == {k: h[k] for k in same}
        assert g["correlation_id"] == h["correlation_id"] == "same"
        for row in (g, h):
            assert row["received_ns"] <= row["released_ns"] <= row["first_token_ns"] <= row["done_ns"]
