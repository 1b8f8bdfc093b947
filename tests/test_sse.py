"""The SSE decoder returns the same events however the network splits the bytes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.sse import SSEDecoder

payloads = st.lists(
    st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), min_size=1),
    max_size=20,
)


def _encode(events: list[str], line_end: bytes) -> bytes:
    return b"".join(b"data:" + e.encode() + line_end + line_end for e in events)


@given(payloads, st.data(), st.sampled_from([b"\n", b"\r\n"]))
def test_any_chunking_gives_the_same_events(events: list[str], data: st.DataObject, line_end: bytes) -> None:
    raw = _encode(events, line_end)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    decoder = SSEDecoder()
    out: list[str] = []
    prev = 0
    for cut in [*cuts, len(raw)]:
        out.extend(decoder.feed(raw[prev:cut]))
        prev = cut
    out.extend(decoder.close())
    # a payload that begins with a space loses it: "data: x" and "data:x" are the same event in SSE
    assert out == [e[1:] if e.startswith(" ") else e for e in events]


def test_tgi_token_events_and_comments() -> None:
    ev = {"index": 1, "token": {"id": 5, "text": "é", "logprob": -0.1, "special": False}}
    raw = b": keep-alive\n\n" + b"data:" + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n"
    decoder = SSEDecoder()
    # split inside the two-byte UTF-8 character
    cut = raw.index("é".encode()) + 1
    assert decoder.feed(raw[:cut]) == []
    assert [json.loads(x) for x in decoder.feed(raw[cut:])] == [ev]


def test_multiline_data_joins_with_newline_and_unterminated_event_flushes_on_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: message\ndata: a\ndata: b\n\ndata: tail") == ["a\nb"]
    assert decoder.close() == ["tail"]
