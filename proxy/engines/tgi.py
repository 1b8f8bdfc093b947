"""TGI (text-generation-inference 3.x, router/src/server.rs): the gateway's native format, passed through unchanged.

``/info`` identifies it (its ``router`` and ``max_total_tokens``); requests go out as the front doors built them
(``/generate_stream`` with ``details``, or TGI's OpenAI routes); events come back as TGI sends them; errors are read by
``proxy.tgi_wire``, through the ``text-generation`` package's own parser.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from common.errors import BackendError, GatewayError
from proxy.engines.base import SSE_DONE, BackendLike, Engine, Event, EventReader
from proxy.sse import PlainShape
from proxy.tgi_wire import from_tgi, parse_event, token_limit

# TGI's plain stream events, proven by byte counts (``PlainShape``), one token each:
# /generate_stream: {"index","token":{...},"top_tokens"?,"generated_text":null,"details":null}; the last event (with
# the details: the counts) is parsed;
# /v1/chat/completions: chat.completion.chunk with one choice and "usage":null last; the usage chunk, [DONE], errors
# and chunks of several choices are parsed.
_PLAIN = {
    "/generate_stream": PlainShape(end=b',"details":null}', each=(b'"token":{',)),
    "/v1/chat/completions": PlainShape(end=b',"usage":null}', each=(b'"choices":[{', b'"finish_reason":')),
}


class TgiReader(EventReader):
    __slots__ = ("_backend",)

    def __init__(self, backend: str) -> None:
        self._backend = backend

    def feed(self, datas: Iterable[str]) -> list[Event]:
        return [parse_event(d, self._backend) for d in datas if d != SSE_DONE]


class Tgi(Engine):
    name = "tgi"

    async def describe(self, backend: BackendLike) -> dict[str, Any] | None:
        status, info = await backend.get_json("/info")
        if status != 200 or not isinstance(info, dict) or "max_total_tokens" not in info:
            return None
        return info

    def upstream(self, route: str, body: dict[str, Any], info: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        return route, body

    def reader(self, route: str, body: dict[str, Any], backend: str) -> EventReader:
        return TgiReader(backend)

    def plain_shape(self, route: str) -> PlainShape | None:
        return _PLAIN.get(route)

    def error(self, status: int, body: object, backend: str) -> GatewayError:
        return from_tgi(status, body, backend=backend)

    def token_limit(self, message: str) -> tuple[int, int] | None:
        return token_limit(message)

    async def tokenize(
        self, backend: BackendLike, text: str, options: dict[str, Any], info: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        tokens = await backend.post_json("/tokenize", {**options, "inputs": text})
        if not isinstance(tokens, list):
            raise BackendError("a backend answered /tokenize with something other than a list")
        return tokens

    async def count_chat(self, backend: BackendLike, body: dict[str, Any], info: dict[str, Any] | None) -> int:
        answer = await backend.post_json("/chat_tokenize", {**body, "stream": False})
        tokens = answer.get("tokenize_response") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise BackendError("a backend answered /chat_tokenize without tokenize_response")
        return len(tokens)
