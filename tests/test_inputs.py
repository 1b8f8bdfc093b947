"""common.inputs: header values and JSON documents as the gateway takes them, against a reference written plainly."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import GatewayError, InvalidArgument
from common.inputs import (
    MAX_HEADER_CHARS,
    MAX_JSON_DEPTH,
    InputRefused,
    check_json,
    clip,
    header_value,
    may_hold_surrogates,
)

surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
texts = st.one_of(st.text(max_size=6), st.tuples(st.text(max_size=3), surrogate).map("".join))
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), texts)
documents = st.recursive(leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3))


def depth(doc: Any) -> int:
    if isinstance(doc, dict):
        return 1 + max((depth(v) for v in doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max((depth(v) for v in doc), default=0)
    return 0


def serde_refuses(doc: Any) -> bool:
    """What serde_json refuses in a document: a non-finite number or a lone surrogate anywhere, keys included."""
    if isinstance(doc, float):
        return not math.isfinite(doc)
    if isinstance(doc, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in doc)
    if isinstance(doc, list):
        return any(serde_refuses(v) for v in doc)
    if isinstance(doc, dict):
        return any(serde_refuses(k) or serde_refuses(v) for k, v in doc.items())
    return False


@settings(max_examples=400)
@given(doc=documents, nest=st.integers(min_value=0, max_value=6))
def test_check_json_refuses_exactly_what_serde_refuses(doc: Any, nest: int) -> None:
    for _ in range(nest):
        doc = [doc]
    raw = json.dumps(doc)  # what a client sends: surrogates as \\udXXX escapes, NaN as NaN
    parsed = json.loads(raw)
    limit = 4
    refused = serde_refuses(parsed) or depth(parsed) > limit
    try:
        check_json(parsed, surrogates=may_hold_surrogates(raw), max_depth=limit)
    except InputRefused:
        assert refused
    else:
        assert not refused


def test_the_refusal_names_the_field() -> None:
    doc = json.loads('{"parameters":{"stop":["ok","\\ud800"],"temperature":1.0},"inputs":"x"}')
    with pytest.raises(InputRefused) as err:
        check_json(doc)
    assert err.value.where == "parameters.stop[1]"
    with pytest.raises(InputRefused) as err:
        check_json(json.loads('{"parameters":{"temperature":NaN}}'))
    assert err.value.where == "parameters.temperature"
    nested = json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(InputRefused):
        check_json(nested)
    check_json(json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH))


def test_surrogate_pairs_and_escaped_backslashes_are_not_suspects() -> None:
    assert not may_hold_surrogates(b'{"a":"\\\\u0041"}')
    check_json(json.loads('{"a":"\\ud83d\\ude00"}'), surrogates=True)


@given(value=st.text(max_size=300))
def test_header_values_are_printable_ascii_of_bounded_length(value: str) -> None:
    fit = all(0x20 <= ord(c) <= 0x7E for c in value) and len(value) <= MAX_HEADER_CHARS
    try:
        assert header_value("x-h", value) == value
    except InputRefused as exc:
        assert not fit and exc.where == "x-h"
    else:
        assert fit


@given(text=st.text(max_size=3000))
def test_clip_bounds_what_is_echoed(text: str) -> None:
    out = clip(text, 64)
    assert out == text if len(text) <= 64 else (out.startswith(text[:64]) and f"({len(text)} characters)" in out)
    assert len(out) <= 64 + 30


def test_every_error_message_is_clipped() -> None:
    err: GatewayError = InvalidArgument("x" * 10_000_000)
    assert len(err.message) < 1100 and str(err) == err.message
