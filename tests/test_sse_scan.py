"""The SSE scanner finds what a full parse finds, however the network splits the bytes.

``EventScanner`` keeps runs of plain token events as bytes (``PlainRun``) and hands every other event on as its
payload. Property: for arbitrary streams of TGI ``/generate_stream`` events and OpenAI chat chunks (token events,
final events with details or usage, errors, ``[DONE]``, comments, multi-line data, ``\\r\\n`` line ends, spaces after
``data:``, JSON with spaces, texts that contain the very byte patterns the scan counts), split at arbitrary byte
boundaries, every feed gives the same events as ``SSEDecoder`` + a JSON parse of each (a run parsed back event by
event), and what the gateway observes of a run (its tokens, no error, no details or usage, a first token) is what
it observes of those events parsed one by one.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import BackendError
from proxy.engines.tgi import Tgi
from proxy.gateway import _Scanned
from proxy.sse import EventScanner, PlainRun, SSEDecoder, parse_run

TRICKY = [
    '"details":null',
    '"details":{',
    '"token":{',
    '"error"',
    '"usage":null',
    '"usage":{',
    '"choices":[{',
    '"finish_reason":',
    '"model":"x"',
    "}\n\ndata:{",
    "data:{",
    "[DONE]",
    "\r\n",
    "é😀",
    "\\",
    '"',
]
texts = st.one_of(
    st.text(max_size=12), st.sampled_from(TRICKY), st.lists(st.sampled_from(TRICKY), max_size=4).map("".join)
)
tokens = st.fixed_dictionaries(
    {"id": st.integers(0, 200_000), "text": texts, "logprob": st.floats(-20, 0), "special": st.booleans()}
)


@st.composite
def tgi_event(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["token", "token", "token", "final", "error", "odd", "tokenless"]))
    if kind == "tokenless":  # ends as a plain event does, without a token
        return {"index": 1, "generated_text": None, "details": None}
    if kind == "error":
        return {"error": draw(texts), "error_type": draw(st.sampled_from(["validation", "generation", "overloaded"]))}
    if kind == "odd":  # objects that are not TGI's: a parse must see them as they are
        return draw(
            st.dictionaries(st.sampled_from(["token", "details", "index", "error", "x"]), st.none(), max_size=3)
        )
    event: dict[str, Any] = {"index": draw(st.integers(0, 9)), "token": draw(tokens)}
    if draw(st.booleans()):
        event["top_tokens"] = draw(st.lists(tokens, max_size=2))
    if kind == "final":
        event["generated_text"] = draw(texts)
        event["details"] = {
            "finish_reason": draw(st.sampled_from(["length", "eos_token", "stop_sequence"])),
            "generated_tokens": draw(st.integers(0, 99)),
            "seed": None,
            "input_length": draw(st.integers(0, 999)),
        }
    else:
        event["generated_text"] = None
        event["details"] = None
    return event


@st.composite
def chat_event(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["chunk", "chunk", "chunk", "usage", "error", "odd", "empty"]))
    if kind == "empty":  # ends as a plain chunk does, without a choice
        return {"object": "chat.completion.chunk", "choices": [], "usage": None}
    if kind == "error":
        return {"error": {"message": draw(texts)}}
    if kind == "odd":
        return draw(st.dictionaries(st.sampled_from(["choices", "usage", "error", "model"]), st.none(), max_size=3))
    choice = {
        "index": 0,
        "delta": {"role": "assistant", "content": draw(texts)},
        "logprobs": None,
        "finish_reason": draw(st.sampled_from([None, "length", "stop"])),
    }
    event: dict[str, Any] = {"object": "chat.completion.chunk", "id": "", "created": 1, "model": draw(texts)}
    if kind == "usage":
        event["choices"] = []
        event["usage"] = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    else:
        event["choices"] = [choice] * draw(st.sampled_from([1, 1, 1, 2]))
        event["usage"] = draw(st.sampled_from([None, None, "absent"]))
        if event["usage"] == "absent":
            del event["usage"]
    return event


def _frame(payload: str, *, space: bool, line_end: str, multiline: bool) -> str:
    # JSON has no raw line breaks; a multi-line event splits its payload over two data lines (joined with \n)
    lines = [payload[: len(payload) // 2], payload[len(payload) // 2 :]] if multiline else [payload]
    prefix = "data: " if space else "data:"
    return "".join(prefix + line + line_end for line in lines) + line_end


@st.composite
def streams(draw: st.DrawFn, event: st.SearchStrategy[Any]) -> tuple[bytes, list[int]]:
    line_end = draw(st.sampled_from(["\n", "\n", "\n", "\r\n"]))
    out = []
    for _ in range(draw(st.integers(0, 12))):
        what = draw(st.sampled_from(["event"] * 8 + ["done", "comment", "blank"]))
        if what == "done":
            out.append("data:[DONE]" + line_end + line_end)
        elif what == "comment":
            out.append(":" + line_end + line_end)
        elif what == "blank":
            out.append(line_end)
        else:
            doc = draw(event)
            spaced = draw(st.sampled_from([False, False, False, True]))
            payload = json.dumps(doc, ensure_ascii=draw(st.booleans())) if spaced else orjson.dumps(doc).decode()
            out.append(
                _frame(
                    payload,
                    space=draw(st.sampled_from([False, False, False, True])),
                    line_end=line_end,
                    multiline=draw(st.sampled_from([False, False, False, True])),
                )
            )
    raw = "".join(out).encode()
    if draw(st.booleans()) and raw:  # a stream cut short: an unterminated event at the end
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    return raw, cuts


def _parse(payload: str) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return ("not json", payload)


def _tgi_observed(event: Any) -> tuple[bool, int]:
    """(a first token, tokens) as ``Gateway._observe`` sees a plain event; it must not be an error nor the last."""
    assert isinstance(event, dict) and "error" not in event and not event.get("details")
    return True, int("token" in event)


def _chat_observed(event: Any) -> tuple[bool, int]:
    """The same for ``Gateway._observe_openai``."""
    assert isinstance(event, dict) and "error" not in event and not event.get("usage")
    choices = event.get("choices")
    return bool(choices), len(choices) if choices else 0


def _check(route: str, raw: bytes, cuts: list[int], observed: Any) -> None:
    shape = Tgi().plain_shape(route)
    assert shape is not None
    decoder, scanner = SSEDecoder(), EventScanner(shape)
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    for step, piece in enumerate([*pieces, None]):
        want = decoder.feed(piece) if piece is not None else decoder.close()
        got = scanner.feed(piece) if piece is not None else scanner.close()
        expanded: list[Any] = []
        for item in got:
            if isinstance(item, PlainRun):
                events = [orjson.loads(e[5:]) for e in item.data.split(b"\n\n") if e]
                assert item.data in raw  # the upstream's own bytes, relayed unchanged
                assert parse_run(item) == events  # parsed in one go, as one by one
                assert len(events) == item.events >= 1
                seen = [observed(e) for e in events]
                assert all(first for first, _ in seen)
                assert sum(n for _, n in seen) == item.tokens
                expanded.extend(events)
            else:
                expanded.append(_parse(item) if item != "[DONE]" else item)
        assert expanded == [_parse(p) if p != "[DONE]" else p for p in want], step


@settings(max_examples=400, deadline=None)  # no time bound: a loaded CI box stretched one example past 200 ms
@given(streams(tgi_event()))
def test_generate_stream_scan_finds_what_a_parse_finds(stream: tuple[bytes, list[int]]) -> None:
    _check("/generate_stream", *stream, _tgi_observed)


@settings(max_examples=400, deadline=None)  # no time bound: a loaded CI box stretched one example past 200 ms
@given(streams(chat_event()))
def test_chat_scan_finds_what_a_parse_finds(stream: tuple[bytes, list[int]]) -> None:
    _check("/v1/chat/completions", *stream, _chat_observed)


def test_a_stream_of_tgi_events_is_one_run_and_its_last_event() -> None:
    events = [{"index": i, "token": {"id": i, "text": "a"}, "generated_text": None, "details": None} for i in range(5)]
    last = {"index": 5, "token": {"id": 5, "text": "b"}, "generated_text": "ab", "details": {"input_length": 3}}
    raw = b"".join(b"data:" + orjson.dumps(e) + b"\n\n" for e in [*events, last])
    shape = Tgi().plain_shape("/generate_stream")
    assert shape is not None
    scanner = EventScanner(shape)
    got = scanner.feed(raw[:-3]) + scanner.feed(raw[-3:]) + scanner.close()
    assert isinstance(got[0], PlainRun) and got[0].events == got[0].tokens == 5
    assert got[0].data == raw[: raw.rindex(b"data:")]
    assert [orjson.loads(x) for x in got[1:] if isinstance(x, str)] == [last]


def test_a_run_that_is_not_json_fails_as_the_reader_fails() -> None:
    raw = b'data:{"token":{"id":1},"details":null}\n\ndata:{"token":{oops},"details":null}\n\n'
    shape = Tgi().plain_shape("/generate_stream")
    assert shape is not None
    (run,) = EventScanner(shape).feed(raw)
    assert isinstance(run, PlainRun) and run.events == 2
    with pytest.raises(orjson.JSONDecodeError):
        parse_run(run)
    events = _Scanned(Tgi().reader("/generate_stream", {}, "b0"), EventScanner(shape), raw=False)
    with pytest.raises(BackendError, match="not JSON"):
        events.feed(raw)
