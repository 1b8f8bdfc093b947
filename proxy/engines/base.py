"""What every engine adapter does for the gateway: one interface the request path streams through.

The gateway's own currency is TGI's: a Job carries a TGI body (``/generate_stream``'s ``{"inputs", "parameters"}``
or an OpenAI-route body as TGI's OpenAI routes take it), and the front doors read TGI's stream events
(``{"token", "generated_text", "details"}``, or ``chat.completion.chunk`` / ``text_completion`` chunks on the OpenAI
routes). An adapter turns one into the engine's request (``upstream``) and the engine's SSE payloads back into those
events (``reader``), maps the engine's error answers onto the errors the front doors promise (``error``), and answers
``describe`` (a TGI-shaped ``/info``), ``tokenize`` and ``count_chat``. In-stream errors come out of a reader as
TGI's own ``{"error", "error_type"}`` event, so the gateway has one path for them whatever the engine.

An adapter holds no connection: the ``Backend`` passes itself (``BackendLike``) for the few calls it makes.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol

from common.errors import GatewayError
from proxy.sse import PlainShape

# the key of a reader's last event that carries the engine's prefix-cache hit (the gateway takes it out before any
# front door sees the event)
CACHED_TOKENS = "_cached_tokens"
SSE_DONE = "[DONE]"  # the OpenAI routes' (and SGLang's /generate) last event: not JSON, nothing to observe

Event = dict[str, Any]


class BackendLike(Protocol):
    """What an adapter may ask of the backend it serves (``proxy.backends.Backend``)."""

    name: str

    async def get_json(self, path: str) -> tuple[int, Any]: ...

    async def post_json(self, path: str, body: dict[str, Any]) -> Any: ...


class EventReader(abc.ABC):
    """The engine's SSE ``data`` payloads in, the gateway's events out (see the module's docstring)."""

    @abc.abstractmethod
    def feed(self, datas: Iterable[str]) -> list[Event]: ...

    def close(self) -> list[Event]:
        """The stream ended: whatever the reader still held."""
        return []


class Engine(abc.ABC):
    """One engine's wire format. Stateless: one instance serves every backend that speaks it."""

    name: ClassVar[str]
    health_path: ClassVar[str] = "/health"

    @abc.abstractmethod
    async def describe(self, backend: BackendLike) -> dict[str, Any] | None:
        """A TGI-shaped ``/info`` of ``backend`` (``model_id``, ``max_total_tokens``, ``max_input_tokens``,
        ``max_concurrent_requests`` when the engine tells it, ``router``, ``version``), or None when the backend does
        not answer as this engine does (the probe then tries the next engine)."""

    @abc.abstractmethod
    def upstream(self, route: str, body: dict[str, Any], info: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) to POST for a job's ``route`` and TGI-shaped ``body``. InvalidArgument, naming the field,
        for what the engine cannot do."""

    @abc.abstractmethod
    def reader(self, route: str, body: dict[str, Any], backend: str) -> EventReader:
        """A reader of one stream of ``route`` (``body``: the job's TGI-shaped body; ``backend``: for messages)."""

    def plain_shape(self, route: str) -> PlainShape | None:
        """How to prove a stream's token events plain (``proxy.sse.PlainShape``), for engines whose events on
        ``route`` are the gateway's own, unchanged, so that the gateway may relay their bytes; None (the default):
        every event goes through ``reader``. An engine that gives a shape must have a reader that reads every
        event on its own (the scan hands it the events it cannot prove plain, one at a time)."""
        return None

    @abc.abstractmethod
    def error(self, status: int, body: object, backend: str) -> GatewayError:
        """The error a front door reports for an error answer (HTTP status, parsed JSON body or text)."""

    @abc.abstractmethod
    def token_limit(self, message: str) -> tuple[int, int] | None:
        """(the model's token limit, the prompt's tokens) from the engine's "too many tokens" message, else None:
        TGIS's TOKEN_LIMIT semantics (shrink max_new_tokens instead of failing)."""

    @abc.abstractmethod
    async def tokenize(
        self, backend: BackendLike, text: str, options: dict[str, Any], info: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        """TGI's ``/tokenize`` answer (``[{"id", "text", "start", "stop"}]``) from the engine's own tokenizer."""

    @abc.abstractmethod
    async def count_chat(self, backend: BackendLike, body: dict[str, Any], info: dict[str, Any] | None) -> int:
        """The prompt tokens of a chat request, chat template applied by the engine."""


def served_model(info: dict[str, Any] | None) -> str:
    """The model name the engine serves (its ``/v1/models`` id)."""
    return str((info or {}).get("model_id") or "")
