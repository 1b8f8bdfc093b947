"""The HTTP front door's pure parts: answers assembled from stream events, x-* headers, body shapes, error routing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import BackendError, GenerationFailed, InvalidArgument, NotFound, Overloaded, Unavailable
from proxy.http import wire
from proxy.http.assemble import (
    ChatAssembler,
    CompletionAssembler,
    GenerateAssembler,
    Timing,
    client_stream_event,
    completion_response,
    timing_headers,
)
from proxy.http.bodies import parse_chat, parse_completion, parse_generate
from proxy.http.errors import MalformedBody, client_message, error_response, in_stream


def _token(i: int, text: str) -> dict:
    return {"id": i, "text": text, "logprob": -0.5, "special": False}


def test_generate_response_from_stream_events() -> None:
    events = [
        {
            "index": 1,
            "token": _token(1, " a"),
            "top_tokens": [_token(7, " z")],
            "generated_text": None,
            "details": None,
        },
        {
            "index": 2,
            "token": _token(2, " b"),
            "top_tokens": [_token(8, " y")],
            "generated_text": " a b",
            "details": {"finish_reason": "length", "generated_tokens": 2, "seed": 5, "input_length": 3},
        },
    ]
    asm = GenerateAssembler()
    for e in events:
        asm.feed(e)
    full = asm.response(details=True, top_n_tokens=True)
    assert full == {
        "generated_text": " a b",
        "details": {
            "finish_reason": "length",
            "generated_tokens": 2,
            "seed": 5,
            "prefill": [],
            "tokens": [_token(1, " a"), _token(2, " b")],
            "top_tokens": [[_token(7, " z")], [_token(8, " y")]],
        },
    }
    assert asm.response(details=False, top_n_tokens=True) == {"generated_text": " a b"}
    assert "top_tokens" not in asm.response(details=True, top_n_tokens=False)["details"]
    assert client_stream_event(dict(events[1]), details=False)["details"] is None
    assert client_stream_event(dict(events[1]), details=True)["details"]["input_length"] == 3
    with pytest.raises(BackendError):
        GenerateAssembler().response(details=True, top_n_tokens=False)  # the stream never finished


def _chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
    return {
        "object": "chat.completion.chunk",
        "id": "",
        "created": 17,
        "model": "tgi",
        "system_fingerprint": "fp",
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        "usage": None,
    }


def test_chat_completion_from_chunks_text_logprobs_and_usage() -> None:
    asm = ChatAssembler()
    lp = {"content": [{"token": " a", "logprob": -1.0, "top_logprobs": []}]}
    asm.feed(_chunk({"role": "assistant", "content": " a"}, logprobs=lp))
    asm.feed(_chunk({"role": "assistant", "content": " b"}, finish="eos_token", logprobs=lp))
    asm.feed({**_chunk({}), "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}})
    out = asm.completion("my-model")
    assert out["model"] == "my-model" and out["created"] == 17 and out["system_fingerprint"] == "fp"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": " a b"}
    assert choice["finish_reason"] == "stop"  # TGI's OpenAI spelling of eos_token
    assert len(choice["logprobs"]["content"]) == 2 and out["usage"]["total_tokens"] == 6


def test_chat_completion_from_tool_call_deltas() -> None:
    asm = ChatAssembler()
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    asm.feed(_chunk({"role": "assistant", "tool_calls": [call]}))
    for piece in ('{"loc', 'ation": ', '"Paris"}'):
        asm.feed(_chunk({"role": "assistant", "tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    asm.feed(_chunk({"role": "assistant", "content": ""}, finish="stop"))
    message = asm.completion("m")["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
            }
        ],
    }


def test_completion_response_sums_usage_in_prompt_order() -> None:
    parts = []
    for text, n in (("x", 1), ("yy", 2)):
        part = CompletionAssembler()
        for k in range(n):
            last = k == n - 1
            part.feed(
                {
                    "created": 3,
                    "system_fingerprint": "fp",
                    "choices": [{"index": 0, "text": text, "finish_reason": "length" if last else ""}],
                    **({"usage": {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": 2 + n}} if last else {}),
                }
            )
        parts.append(part)
    out = completion_response("m", parts)
    assert [c["text"] for c in out["choices"]] == ["x", "yyyy"] and [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


@settings(max_examples=200, deadline=None)
@given(
    spans=st.lists(st.integers(0, 10**10), min_size=4, max_size=4),
    generated=st.integers(0, 5000),
    prompt=st.integers(0, 5000),
)
def test_timing_headers_add_up(spans: list[int], generated: int, prompt: int) -> None:
    received = 1_700_000_000_000_000_000
    handed, released, first, done = (received + sum(spans[: i + 1]) for i in range(4))
    del first
    h = timing_headers(
        Timing(received, handed, released, done, prompt, generated), compute_type="gpu+optimized", inputs_chars=9
    )
    total = int(h["x-total-time"])
    parts = int(h["x-validation-time"]) + int(h["x-queue-time"]) + int(h["x-inference-time"])
    assert parts <= total <= parts + 2  # each part truncated to whole milliseconds
    assert int(h["x-time-per-token"]) == (done - released) // max(generated, 1) // 1_000_000
    assert float(h["x-compute-time"]) == pytest.approx((done - received) / 1e9, abs=1e-9)
    assert "e" not in h["x-compute-time"]
    assert (h["x-prompt-tokens"], h["x-generated-tokens"], h["x-compute-characters"]) == (
        str(prompt),
        str(generated),
        "9",
    )


def test_seconds_header_prints_like_rust() -> None:
    assert wire.seconds_header(1_000_000_000) == "1"
    assert wire.seconds_header(1_500) == "0.0000015"
    assert wire.seconds_header(12_345_678_901) == "12.345678901"


def test_bodies_are_checked_for_shape_only() -> None:
    body = parse_generate(b'{"inputs": "hi", "parameters": {"max_new_tokens": 5, "temperature": 1, "x": 1}}')
    assert body.max_new_tokens == 5 and body.parameters["x"] == 1  # unknown fields pass, as serde lets them
    assert parse_generate(b'{"inputs": "hi", "parameters": {"temperature": -3.0}}').inputs == "hi"  # TGI's call
    for raw in (
        b'{"parameters": {}}',
        b'{"inputs": 5}',
        b'{"inputs": "x", "parameters": {"max_new_tokens": 1.5}}',
        b'{"inputs": "x", "parameters": {"max_new_tokens": -1}}',
        b'{"inputs": "x", "parameters": {"details": "yes"}}',
        b'{"inputs": "x", "stream": 1}',
        b"[1, 2]",
    ):
        with pytest.raises(InvalidArgument) as err:
            parse_generate(raw)
        assert err.value.http_status == 422 and err.value.message.startswith("Failed to deserialize"), raw
    with pytest.raises(MalformedBody) as bad:
        parse_generate(b"{nope")
    assert bad.value.http_status == 400
    chat = parse_chat(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "max_tokens": 3}')
    assert chat.text == "a" and chat.max_tokens == 3 and not chat.stream and not chat.include_usage
    assert parse_completion(b'{"prompt": ["a", "b"]}').prompts == ["a", "b"]
    with pytest.raises(InvalidArgument, match="Empty array"):
        parse_completion(b'{"prompt": []}')


def test_which_errors_go_inside_the_stream() -> None:
    # what a backend refused goes in-stream (TGI's way); the gateway's own refusals keep their status
    for exc in (InvalidArgument("x"), Overloaded("x"), GenerationFailed("x")):
        assert in_stream(exc, released=True) and not in_stream(exc, released=False)
    for exc in (Unavailable("x"), BackendError("x"), NotFound("x")):
        assert not in_stream(exc, released=True)
    resp = error_response(Overloaded("backend 127.0.0.1:9: Model is overloaded", retry_after_s=2.5))
    assert resp.status == 429 and resp.headers["Retry-After"] == "3"
    assert resp.body == b'{"error":"Model is overloaded","error_type":"overloaded"}'
    assert client_message(GenerationFailed("backend h:1: Request failed")) == "Request failed"
    assert "Retry-After" not in error_response(InvalidArgument("bad")).headers
