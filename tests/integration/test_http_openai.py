"""TGI's OpenAI-compatible routes through the gateway: the ``openai`` client and raw HTTP, against the simulator.

The gateway always streams from the backend and always asks for the usage, so the ledger gets exact token
counts whether or not the client streams or asks for usage; the client gets only what it asked for.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import sqlalchemy as sa

from meter.store.models import Request as RequestRow
from sim.config import SimConfig

from .harness import Stack, running_stack

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path, http=True, sim_config=SimConfig(time_scale=0.0)) as s:
        yield s


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=stack.key, max_retries=0) as c:
        yield c


async def _rows(s: Stack) -> dict[str, dict]:
    await s.app.gateway.flush_records()  # timelines still asking their backend for the prompt count

    def read() -> dict[str, dict]:
        assert s.app.ledger.flush(10.0)
        engine = sa.create_engine(s.db_url)
        try:
            with engine.connect() as conn:
                return {r["request_id"]: dict(r) for r in conn.execute(sa.select(RequestRow.__table__)).mappings()}
        finally:
            engine.dispose()

    return await asyncio.to_thread(read)


def _sse(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n")
    frames = body[:-2].split(b"\n\n")
    assert all(f.startswith(b"data:") for f in frames), frames
    return [f[5:] for f in frames]


async def test_chat_unstreamed_and_streamed_agree_and_are_metered(stack: Stack, client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="sim-model", messages=MESSAGES, max_tokens=7, temperature=0
    )
    done = raw.parse()
    rid = raw.headers["x-request-id"]
    assert raw.headers["x-generated-tokens"] == "7" and raw.headers["x-prompt-tokens"] == str(done.usage.prompt_tokens)
    assert done.model == "sim-model" and done.object == "chat.completion"
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert done.usage.completion_tokens == 7 and done.usage.total_tokens == done.usage.prompt_tokens + 7

    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="tgi", messages=MESSAGES, max_tokens=7, temperature=0, stream=True
        )
    ]
    assert len(chunks) == 7 and all(c.usage is None for c in chunks)  # no usage asked, none passed on
    assert "".join(c.choices[0].delta.content for c in chunks) == choice.message.content
    assert {c.model for c in chunks} == {"sim-model"} and chunks[-1].choices[0].finish_reason == "length"

    with_usage = [
        c
        async for c in await client.chat.completions.create(
            messages=MESSAGES, model="", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    ]
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 3
    assert with_usage[-1].usage.prompt_tokens == done.usage.prompt_tokens

    rows = await _rows(stack)
    assert len(rows) == 3 and {r["api"] for r in rows.values()} == {"http"}
    assert {r["status"] for r in rows.values()} == {"OK"}
    assert rows[rid]["generated_tokens"] == 7 and rows[rid]["prompt_tokens"] == done.usage.prompt_tokens
    # the streamed call without include_usage is metered exactly all the same
    assert sorted(r["generated_tokens"] for r in rows.values()) == [3, 7, 7]
    assert {r["prompt_tokens"] for r in rows.values()} == {done.usage.prompt_tokens}
    for r in rows.values():
        assert r["received_ns"] <= r["released_ns"] <= r["first_token_ns"] <= r["done_ns"]


async def test_completions_one_and_many_prompts(stack: Stack, client: openai.AsyncOpenAI) -> None:
    raw = await client.completions.with_raw_response.create(
        model="sim-model", prompt=["Once upon", "a time there was"], max_tokens=4, temperature=0
    )
    done = raw.parse()
    rid = raw.headers["x-request-id"]
    assert [c.index for c in done.choices] == [0, 1] and all(c.text for c in done.choices)
    assert {c.finish_reason for c in done.choices} == {"length"}
    assert done.usage.completion_tokens == 8 and raw.headers["x-generated-tokens"] == "8"

    chunks = [
        c
        async for c in await client.completions.create(
            model="tgi", prompt=["a", "b c", "d e f"], max_tokens=3, stream=True
        )
    ]
    by_choice: dict[int, list[str]] = {}
    for c in chunks:
        for ch in c.choices:
            by_choice.setdefault(ch.index, []).append(ch.text)
    assert sorted(by_choice) == [0, 1, 2] and all(len(v) == 3 for v in by_choice.values())

    single = await client.completions.create(model="sim-model", prompt="Once upon", max_tokens=4, temperature=0)
    assert single.choices[0].text == done.choices[0].text  # greedy: the same text alone or in a batch

    rows = await _rows(stack)
    assert {f"{rid}-0", f"{rid}-1"} <= set(rows)  # one gateway request per prompt, as TGI runs them
    assert rows[f"{rid}-0"]["prompt_tokens"] < rows[f"{rid}-1"]["prompt_tokens"]
    assert len(rows) == 2 + 3 + 1 and {r["generated_tokens"] for r in rows.values()} == {3, 4}


async def test_errors_through_the_openai_client(stack: Stack, client: openai.AsyncOpenAI) -> None:
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="jg_nope_nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="sim-model", messages=MESSAGES)
    # TGI's error body {"error", "error_type"} (not OpenAI's nested one): the client keeps "error" as its body
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert not_found.value.response.json()["error_type"] == "not_found" and "gpt-4o" in not_found.value.body
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        await client.completions.create(model="sim-model", prompt="w " * 1100)
    assert "must have less than 1024 tokens" in invalid.value.body
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "x [[sim:error_after=2]]"}], max_tokens=5
        )
    assert err.value.status_code == 424 and "simulated failure" in err.value.body
    with pytest.raises(openai.APIError, match="simulated failure"):
        async for _ in await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "x [[sim:error_after=2]]"}], stream=True
        ):
            pass
    models = await client.models.list()
    assert [m.id for m in models.data] == ["sim-model"]


async def test_raw_streams_end_as_tgi_ends_them(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.key}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(
            f"{stack.http_url}/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 2, "stream": True},
        ) as r:
            assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
            frames = _sse(await r.read())
        assert frames[-1] == b"[DONE]" and len(frames) == 3
        assert json.loads(frames[0])["object"] == "chat.completion.chunk"

        # an error met mid-stream: OpenAI's error event, then [DONE]
        async with http.post(
            f"{stack.http_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x [[sim:error_after=2]]"}], "stream": True},
        ) as r:
            frames = _sse(await r.read())
        assert len(frames) == 4 and frames[-1] == b"[DONE]"
        error = json.loads(frames[-2])["error"]
        assert error["http_status_code"] == 422 and error["message"].startswith("Request failed during generation")

        # refused by the backend before the first token: still inside a 200 stream, as TGI does
        async with http.post(f"{stack.http_url}/v1/completions", json={"prompt": "w " * 1100, "stream": True}) as r:
            assert r.status == 200
            frames = _sse(await r.read())
        assert [json.loads(frames[0])["error"]["message"][:22], frames[1]] == ["Input validation error", b"[DONE]"]

        # refused by the gateway before any backend: a status and TGI's error body
        async with http.post(f"{stack.http_url}/v1/completions", json={"prompt": 5, "stream": True}) as r:
            assert r.status == 422 and (await r.json())["error_type"] == "validation"
        async with http.post(f"{stack.http_url}/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400 and (await r.json())["error"].startswith("Failed to parse the request body")

    rows = await _rows(stack)
    # every authenticated generation call has a row: the two the gateway refused too (no backend, 0 J)
    assert sorted(r["status"] for r in rows.values()) == [
        "INTERNAL", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "OK",
    ]  # fmt: skip
    assert sum(r["backend"] is None for r in rows.values()) == 2
    failed = next(r for r in rows.values() if r["status"] == "INTERNAL")
    assert failed["generated_tokens"] == 2 and failed["first_token_ns"] is not None
