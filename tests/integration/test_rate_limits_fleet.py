"""Rate limits across two gateway processes (``joulegate serve``) on one PostgreSQL database, two tenants: the
limited tenant gets exactly its limit per minute whichever gateway it calls, over gRPC and HTTP, with a retry hint
pointing at the next minute; the other tenant is not touched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from meter.store import make_engine, upgrade
from meter.store.keys import create_key
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim.config import SimConfig
from sim.server import SimTGI
from tests.conftest import free_port

from .test_gateway_kill9 import serve

pytestmark = pytest.mark.slow

LIMIT = 10
REQUEST = pb.BatchedGenerationRequest(
    requests=[pb.GenerationRequest(text="limited")],
    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2)),
)


def _config(tmp_path: Path, name: str, db_url: str, sim_url: str, grpc_port: int, http_port: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[server]
grpc_listen = "127.0.0.1:{grpc_port}"
http_listen = "127.0.0.1:{http_port}"
drain_grace_s = 1.0
log_format = "console"

[db]
url = "{db_url}"

[meter]
source = "none"
journal_path = "{tmp_path / name / "journal.jsonl"}"

[rate_limits.tenants.tenant-a]
requests_per_minute = {LIMIT}

[[models]]
model_id = "sim-model"
backends = [{{ url = "{sim_url}" }}]
"""
    )
    return path


async def _wait_for_room_in_the_minute(seconds: float) -> None:
    """The scenario needs ``seconds`` inside one UTC minute (the limit's window): start in a fresh one if needed."""
    into = time.time() % 60
    if into > 60 - seconds:
        await asyncio.sleep(60 - into + 0.2)


async def test_a_tenant_gets_its_limit_across_two_gateways_and_no_more(tmp_path: Path, pg_url: str) -> None:
    upgrade(pg_url)
    engine = make_engine(pg_url)
    key_a, key_b = create_key(engine, "tenant-a").key, create_key(engine, "tenant-b").key
    engine.dispose()
    sim = SimTGI(SimConfig(time_scale=0.02))
    sim_url = await sim.start()
    ports = [(free_port(), free_port()) for _ in range(2)]
    configs = [_config(tmp_path, f"gw{i}", pg_url, sim_url, *ports[i]) for i in range(2)]
    try:
        async with (
            serve(configs[0], tmp_path / "gw0.log", ports[0][0]),
            serve(configs[1], tmp_path / "gw1.log", ports[1][0]),
        ):
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{g}") for g, _ in ports]
            stubs = [pbg.GenerationServiceStub(c) for c in channels]
            await _wait_for_room_in_the_minute(25)
            outcomes: dict[str, list[str]] = {"tenant-a": [], "tenant-b": []}
            hints: list[int] = []

            async def call(tenant: str, key: str, i: int) -> None:
                try:
                    await stubs[i % 2].Generate(REQUEST, metadata=(("authorization", f"Bearer {key}"),), timeout=20)
                    outcomes[tenant].append("OK")
                except grpc.aio.AioRpcError as exc:
                    outcomes[tenant].append(exc.code().name)
                    trailing = dict(exc.trailing_metadata() or ())
                    if "retry-after-ms" in trailing:
                        hints.append(int(trailing["retry-after-ms"]))

            await asyncio.gather(*(call("tenant-a", key_a, i) for i in range(16)))
            await asyncio.gather(*(call("tenant-b", key_b, i) for i in range(16)))
            assert outcomes["tenant-a"].count("OK") == LIMIT, outcomes
            assert outcomes["tenant-a"].count("RESOURCE_EXHAUSTED") == 16 - LIMIT
            assert outcomes["tenant-b"] == ["OK"] * 16  # the other tenant is not limited
            assert hints and all(0 < h <= 60_000 for h in hints)
            # over HTTP, on either gateway: 429 with Retry-After, and the message names the limit
            async with aiohttp.ClientSession() as http:
                for _, http_port in ports:
                    async with http.post(
                        f"http://127.0.0.1:{http_port}/generate",
                        json={"inputs": "limited", "parameters": {"max_new_tokens": 2}},
                        headers={"authorization": f"Bearer {key_a}"},
                    ) as resp:
                        assert resp.status == 429
                        assert "requests_per_minute (10)" in (await resp.json())["error"]
                        assert 1 <= int(resp.headers["Retry-After"]) <= 60
            for c in channels:
                await c.close()
    finally:
        await sim.stop()


async def test_prompts_that_count_more_than_their_estimate_do_not_stretch_a_token_limit(tmp_path: Path) -> None:
    """tenant-a's prompts are punctuation, one token a character, while the gateway admits at four characters a
    token: before settling, it got four times its tokens_per_minute. Now the backend's count is settled against the
    minute: the calls stop once the counted tokens reach the limit (plus the last call's difference)."""
    from .harness import running_stack

    tokens_per_minute = 6_000
    overrides = {"rate_limits": {"tenants": {"tenant-a": {"tokens_per_minute": tokens_per_minute}}}}
    request = pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text="," * 400)],  # estimated 100 tokens, counted 401
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2)),
    )
    async with running_stack(tmp_path, overrides=overrides) as s:
        await _wait_for_room_in_the_minute(30)
        counted = 0
        refused = None
        for _ in range(100):
            try:
                reply = await s.stub.Generate(request, metadata=s.auth, timeout=30)
            except grpc.aio.AioRpcError as exc:
                refused = exc
                break
            counted += reply.responses[0].input_token_count + 2  # as the limit counts: prompt + max_new_tokens
        assert refused is not None and refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens_per_minute (6000)" in (refused.details() or "")
        assert tokens_per_minute - 403 < counted <= tokens_per_minute + 301, counted  # before: ~58 calls, ~23,000


async def test_once_counted_a_tenants_prompts_are_estimated_at_what_they_count(tmp_path: Path) -> None:
    """1,000 commas are estimated at 250 tokens (four characters a token) and count 1,001: the first such call fits a
    1,000-token minute and is admitted; from then on the gateway estimates this tenant's prompts at what they count
    (``proxy.prompt_scale``), so the same call is refused as larger than any minute allows (INVALID_ARGUMENT, naming
    its count), while another tenant's English text is still estimated at four characters a token."""
    from .harness import running_stack

    overrides = {"rate_limits": {"tokens_per_minute": 1_000}}
    commas = pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text="," * 1000)],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2)),
    )
    async with running_stack(tmp_path, overrides=overrides) as s:
        await _wait_for_room_in_the_minute(20)
        reply = await s.stub.Generate(commas, metadata=s.auth, timeout=30)
        assert reply.responses[0].input_token_count == 1001
        assert s.app.gateway.prompt_scale.scale("tenant-a", "sim-model") == pytest.approx(1001 / 250)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await s.stub.Generate(commas, metadata=s.auth, timeout=30)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "this request counts 1003 tokens" in (refused.value.details() or "")
        key_b = create_key(s.app.engine, "tenant-b").key
        english = pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text="the " * 250)],  # 1,000 characters, about 250 tokens
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2)),
        )
        reply = await s.stub.Generate(english, metadata=(("authorization", f"Bearer {key_b}"),), timeout=30)
        counted = reply.responses[0].input_token_count
        assert counted < 275
        assert s.app.gateway.prompt_scale.scale("tenant-b", "sim-model") == pytest.approx(max(1.0, counted / 250))
