"""The gRPC gateway end to end: a real client over loopback, the gateway, the simulated TGI behind it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from meter.store.models import Request as RequestRow
from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig
from tests.waiting import wait_until_async

from .harness import running_stack


def _params(max_new_tokens: int = 5, **stopping) -> pb.Parameters:
    return pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, **stopping))


async def _rows(db_url: str, app) -> list:
    await app.gateway.flush_records()  # timelines still asking their backend for the prompt count
    assert await asyncio.to_thread(app.ledger.flush, 10.0)
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(RequestRow.__table__)).mappings())
    finally:
        engine.dispose()


async def test_generate_batch_stream_tokenize_modelinfo(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as s:
        call = s.stub.Generate(
            pb.BatchedGenerationRequest(
                model_id="sim-model",
                requests=[pb.GenerationRequest(text="Hello there"), pb.GenerationRequest(text="Second prompt, longer")],
                params=_params(7),
            ),
            metadata=(*s.auth, ("x-correlation-id", "corr-1")),
        )
        resp = await call
        md = dict(await call.initial_metadata())
        assert md["x-correlation-id"] == "corr-1"
        request_id = md["x-request-id"]
        assert len(resp.responses) == 2
        for r in resp.responses:
            assert r.generated_token_count == 7 and r.stop_reason == pb.MAX_TOKENS and r.text
            assert r.input_token_count > 0
        assert resp.responses[0].input_token_count < resp.responses[1].input_token_count

        msgs = [
            m
            async for m in s.stub.GenerateStream(
                pb.SingleGenerationRequest(request=pb.GenerationRequest(text="Stream me"), params=_params(4)),
                metadata=s.auth,
            )
        ]
        assert msgs[0].input_token_count > 0 and msgs[0].generated_token_count == 0
        counts = [m.generated_token_count for m in msgs[1:]]  # one message per batch of tokens that arrived together
        assert counts == sorted(set(counts)) and counts[-1] == 4
        assert msgs[-1].stop_reason == pb.MAX_TOKENS
        assert all(m.stop_reason == pb.NOT_FINISHED for m in msgs[:-1])

        tok = await s.stub.Tokenize(
            pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text="one two three")], return_tokens=True),
            metadata=s.auth,
        )
        assert tok.responses[0].token_count == len(tok.responses[0].tokens) > 0

        info = await s.stub.ModelInfo(pb.ModelInfoRequest(model_id="sim-model"), metadata=s.auth)
        assert info.max_sequence_length == 2048 and 0 < info.max_new_tokens <= 2047

        rows = {r["request_id"]: r for r in await _rows(s.db_url, s.app)}
        assert {f"{request_id}-0", f"{request_id}-1"} <= set(rows)
        row = rows[f"{request_id}-0"]
        assert row["status"] == "OK" and row["tenant"] == "tenant-a" and row["generated_tokens"] == 7
        assert row["received_ns"] <= row["released_ns"] <= row["first_token_ns"] <= row["done_ns"]
        assert row["correlation_id"] == "corr-1" and row["backend"]


async def test_unary_unaffected_by_token_details_and_options(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as s:
        params = _params(6, stop_sequences=["zzzz-never"])
        params.response.CopyFrom(
            pb.ResponseOptions(input_text=True, generated_tokens=True, token_logprobs=True, top_n_tokens=2)
        )
        params.method = pb.SAMPLE
        params.sampling.seed = 11
        resp = await s.stub.Generate(
            pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="Prefix:")], params=params),
            metadata=s.auth,
        )
        r = resp.responses[0]
        assert r.text.startswith("Prefix:")
        assert len(r.tokens) == 6 and all(len(t.top_tokens) <= 2 for t in r.tokens)
        assert r.seed == 11


@pytest.mark.parametrize(
    ("metadata", "request_kwargs", "code"),
    [
        ((), {}, grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer jg_nope_nope"),), {}, grpc.StatusCode.UNAUTHENTICATED),
        (None, {"model_id": "no-such-model"}, grpc.StatusCode.NOT_FOUND),
        (None, {"params": pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.01))},
         grpc.StatusCode.INVALID_ARGUMENT),
        (None, {"requests": [pb.GenerationRequest(text="word " * 3000)]}, grpc.StatusCode.INVALID_ARGUMENT),
        (None, {"requests": [pb.GenerationRequest(text="")]}, grpc.StatusCode.INVALID_ARGUMENT),
        (None, {"requests": [pb.GenerationRequest(text="boom [[sim:error_after=2]]")]}, grpc.StatusCode.INTERNAL),
    ],
)  # fmt: skip
async def test_errors_are_clean_statuses(tmp_path: Path, metadata, request_kwargs, code) -> None:
    async with running_stack(tmp_path) as s:
        kwargs = {"requests": [pb.GenerationRequest(text="hi")], "params": _params(5), **request_kwargs}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Generate(
                pb.BatchedGenerationRequest(**kwargs), metadata=s.auth if metadata is None else metadata
            )
        assert err.value.code() == code, err.value.details()
        assert err.value.details()


async def test_too_long_for_the_model_is_clamped_to_token_limit(tmp_path: Path) -> None:
    sim = SimConfig(time_scale=0.0, max_input_tokens=1000, max_total_tokens=1010)
    async with running_stack(tmp_path, sim_config=sim) as s:
        resp = await s.stub.Generate(
            pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="w " * 980)], params=_params(50)),
            metadata=s.auth,
        )
        r = resp.responses[0]
        assert r.stop_reason == pb.TOKEN_LIMIT, r
        assert r.input_token_count + r.generated_token_count == 1010 and r.generated_token_count < 50


async def test_stop_sequence_excluded_in_stream_and_unary(tmp_path: Path) -> None:
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=0.0)) as s:
        free = await s.stub.Generate(
            pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="abc")], params=_params(12)),
            metadata=s.auth,
        )
        text = free.responses[0].text
        words = text.split(" ")
        stop = " " + words[len(words) // 2]  # TGI matches stop sequences that end at a token boundary
        params = _params(12, stop_sequences=[stop], include_stop_sequence=False)
        unary = (
            await s.stub.Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="abc")], params=params), metadata=s.auth
            )
        ).responses[0]
        assert unary.stop_reason == pb.STOP_SEQUENCE and unary.stop_sequence == stop
        assert not unary.text.endswith(stop) and (unary.text + stop) in text
        msgs = [
            m
            async for m in s.stub.GenerateStream(
                pb.SingleGenerationRequest(request=pb.GenerationRequest(text="abc"), params=params), metadata=s.auth
            )
        ]
        assert "".join(m.text for m in msgs) == unary.text
        assert msgs[-1].stop_reason == pb.STOP_SEQUENCE


async def test_deadline_and_cancellation_reach_the_backend(tmp_path: Path) -> None:
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="slow")], params=_params(500)),
                metadata=s.auth,
                timeout=0.3,
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        call = s.stub.GenerateStream(
            pb.SingleGenerationRequest(request=pb.GenerationRequest(text="cancel me"), params=_params(500)),
            metadata=s.auth,
        )
        got = 0
        async for _message in call:
            got += 1
            if got == 3:
                break
        call.cancel()
        # the simulator must see the disconnect and drop the request from its batch
        await wait_until_async(lambda: s.sims[0].scheduler.batch_size == 0, 2.0, what="TGI to drop the request")

        async def both_rows() -> list[str] | None:  # the cancelled call's row is written as its handler unwinds
            statuses = sorted(r["status"] for r in await _rows(s.db_url, s.app))
            return statuses if len(statuses) == 2 else None

        assert await wait_until_async(both_rows, 5.0, poll_s=0.05) == ["CANCELLED", "DEADLINE_EXCEEDED"]


async def test_time_limit_ends_with_time_limit(tmp_path: Path) -> None:
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0)) as s:
        t0 = time.monotonic()
        resp = await s.stub.Generate(
            pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text="long")], params=_params(500, time_limit_millis=300)
            ),
            metadata=s.auth,
        )
        assert time.monotonic() - t0 < 2.0
        r = resp.responses[0]
        assert r.stop_reason == pb.TIME_LIMIT and 0 < r.generated_token_count < 500
        rows = await _rows(s.db_url, s.app)
        assert [row["status"] for row in rows] == ["OK"]


async def test_never_more_in_flight_than_the_backend_allows(tmp_path: Path) -> None:
    sim = SimConfig(time_scale=0.2, max_concurrent_requests=3)
    async with running_stack(tmp_path, sim_config=sim) as s:
        req = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")] * 10, params=_params(5))
        resp = await s.stub.Generate(req, metadata=s.auth)  # 10 texts, 3 slots: queued, not 429
        assert [r.stop_reason for r in resp.responses] == [pb.MAX_TOKENS] * 10


async def test_overload_is_resource_exhausted_with_retry_hint(tmp_path: Path) -> None:
    sim = SimConfig(time_scale=1.0, max_concurrent_requests=1)
    async with running_stack(tmp_path, sim_config=sim, model={"shaping": {"max_queued_requests": 1}}) as s:
        calls = [
            s.stub.Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")], params=_params(200)),
                metadata=s.auth,
            )
            for _ in range(3)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert [e.code() for e in errors] == [grpc.StatusCode.RESOURCE_EXHAUSTED]
        status = rpc_status.from_call(errors[0])
        assert status is not None and status.details
        assert dict(errors[0].trailing_metadata())["retry-after-ms"]


async def test_health_reflection_and_drain(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as s:
        health = health_pb2_grpc.HealthStub(s.channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="fmaas.GenerationService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        answers = [
            a
            async for a in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        ]
        names = {svc.name for svc in answers[0].list_services_response.service}
        assert {"fmaas.GenerationService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

        # the backend goes unhealthy -> NOT_SERVING within a couple of health intervals
        import aiohttp

        async with aiohttp.ClientSession() as http:
            await http.post(f"{s.sims[0].url}/sim/health", json={"healthy": False})

        async def not_serving() -> bool:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
            return resp.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await wait_until_async(not_serving, 2.5, what="NOT_SERVING", poll_s=0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")], params=_params(2)),
                metadata=s.auth,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_drain_finishes_in_flight_requests(tmp_path: Path) -> None:
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0)) as s:
        call = asyncio.ensure_future(
            s.stub.Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")], params=_params(20)),
                metadata=s.auth,
            )
        )
        await wait_until_async(lambda: s.sims[0].scheduler.batch_size == 1, 5.0, what="the call on the backend")
        await s.app.stop(5.0)
        resp = await call
        assert resp.responses[0].generated_token_count == 20


async def test_retries_on_another_backend_before_the_first_byte(tmp_path: Path) -> None:
    import aiohttp

    sim = SimConfig(time_scale=1.0, max_concurrent_requests=1)
    async with running_stack(
        tmp_path, sims=2, sim_config=sim, overrides={"backend_pool": {"health_interval_s": 30}}
    ) as s:
        busy, free = s.sims
        # Someone else fills `busy`'s only slot behind the gateway's back: TGI answers the gateway "overloaded"
        # inside an HTTP 200 stream, before any token. The gateway must move the request to the other backend.
        async with aiohttp.ClientSession() as http:
            hog = await http.post(
                f"{busy.url}/generate_stream", json={"inputs": "hog", "parameters": {"max_new_tokens": 400}}
            )
            for b in s.app.pools["sim-model"].backends:  # make `busy` the gateway's first choice
                b.outstanding_tokens = 0 if b.url == busy.url else 10**6
            resp = await s.stub.Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")], params=_params(3)),
                metadata=s.auth,
            )
            hog.close()
        assert resp.responses[0].generated_token_count == 3
        rows = await _rows(s.db_url, s.app)
        assert [r["backend"] for r in rows] == [free.url.removeprefix("http://")]

        # A backend that refuses connections (it died since the last health check) is skipped the same way.
        for b in s.app.pools["sim-model"].backends:
            b.outstanding_tokens = 0 if b.url == busy.url else 10**6
        await busy.stop()
        resp = await s.stub.Generate(
            pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="y")], params=_params(2)), metadata=s.auth
        )
        assert resp.responses[0].generated_token_count == 2
        dead = next(b for b in s.app.pools["sim-model"].backends if b.url == busy.url)
        assert not dead.healthy  # marked down at once, without waiting for the next health check


async def test_default_meter_is_auto_and_serves_unmetered_without_nvml(tmp_path: Path) -> None:
    from meter.sources.nvml import NvmlSource, NvmlUnavailableError

    try:
        NvmlSource().close()
        pytest.skip("this host has NVML energy counters: auto meters them")
    except NvmlUnavailableError:
        pass
    async with running_stack(tmp_path) as s:
        assert s.app.config.meter.source == "auto" and s.app.meter is None
        resp = await s.stub.Generate(
            pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")], params=_params(2)), metadata=s.auth
        )
        assert resp.responses[0].generated_token_count == 2
