"""A lone UTF-16 surrogate escape is answered as TGI answers it (axum: 400, serde's message), never by a crash.

Python's ``json`` reads ``"\\ud800"`` into a string no encoder can write; the simulator used to take it and crash
mid-response when it tokenized the prompt (the client saw a broken stream). serde_json refuses it while parsing, a
syntax error, which axum answers with HTTP 400 ``Failed to parse the request body as JSON: <path>: <message> at line
L column C``.
"""

from __future__ import annotations

import aiohttp
import pytest

from sim.server import SimTGI
from sim.validation import BodyRejection, read_json

PREFIX = "Failed to parse the request body as JSON: "


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs":"hi\\ud800"}', "inputs: unexpected end of hex escape at line 1 column 20"),
        (b'{"inputs":"hi\\udc00"}', "inputs: lone leading surrogate in hex escape at line 1 column 19"),
        (b'{"inputs":"hi\\ud800\\n"}', "inputs: unexpected end of hex escape at line 1 column 21"),
        (b'{"inputs":"hi\\ud800\\u0041"}', "inputs: lone leading surrogate in hex escape at line 1 column 25"),
        (
            b'{"inputs":"x",\n"parameters":{"stop":["a","\\uDBFFx"]}}',
            "parameters.stop[1]: unexpected end of hex escape at line 2 column 34",
        ),
    ],
)
def test_lone_surrogates_are_serdes_syntax_errors(body: bytes, message: str) -> None:
    with pytest.raises(BodyRejection) as err:
        read_json(body, "application/json")
    assert (err.value.status, err.value.message) == (400, PREFIX + message)


@pytest.mark.parametrize("body", [b'{"inputs":"hi \\ud83d\\ude00"}', b'{"inputs":"\\\\ud800 is six characters"}'])
def test_pairs_and_escaped_backslashes_are_text(body: bytes) -> None:
    assert read_json(body, "application/json")["inputs"] in ("hi \U0001f600", "\\ud800 is six characters")


async def test_every_route_answers_400_and_keeps_serving(sim: SimTGI, http: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/json"}
    for path, body in (
        ("/generate_stream", b'{"inputs":"hi\\ud800","parameters":{"max_new_tokens":3}}'),
        ("/generate", b'{"inputs":"hi\\ud800","parameters":{"max_new_tokens":3}}'),
        ("/", b'{"inputs":"hi\\ud800","stream":true}'),
        ("/tokenize", b'{"inputs":"hi\\ud800"}'),
        ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"\\udfff"}],"max_tokens":3}'),
    ):
        async with http.post(f"{sim.url}{path}", data=body, headers=headers) as resp:
            assert resp.status == 400, (path, await resp.text())
            assert (await resp.text()).startswith(PREFIX)
    async with http.post(f"{sim.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}) as resp:
        assert resp.status == 200 and (await resp.json())["generated_text"]
