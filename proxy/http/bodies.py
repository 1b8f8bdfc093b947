"""Request bodies: checked for shape the way TGI's axum ``Json`` extractor checks them, then forwarded untouched.

The gateway reads only what it needs (inputs, stream flag, max_new_tokens, model) and leaves every range check to
TGI, whose messages clients already know. But a body of the wrong *shape* is refused here, with the field named,
rather than costing a backend round trip (TGI would answer it with axum's plain-text 422, which the gateway passes on
as ``BodyRejected``). Unknown fields are allowed (serde ignores them too). The body forwarded to TGI is the client's
own dict, not a re-serialised model, so nothing is lost.

What is not JSON to TGI's parser is refused with 400 naming the field even though Python's ``json`` reads it:
``NaN``/``Infinity``, lone UTF-16 surrogates, nesting past serde's recursion limit (``common.inputs.check_json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import InvalidArgument
from common.inputs import InputRefused, check_json, clip, may_hold_surrogates
from proxy.http.errors import MalformedBody

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class _Shape(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Grammar(_Shape):
    type: str
    value: Any


class _Parameters(_Shape):
    adapter_id: str | None = None
    best_of: U32 | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: _Grammar | None = None
    max_new_tokens: U32 | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: U64 | None = None
    stop: list[str] = []
    temperature: float | None = None
    top_k: I32 | None = None
    top_n_tokens: U32 | None = None
    top_p: float | None = None
    truncate: U32 | None = None
    typical_p: float | None = None
    watermark: bool = False


class _GenerateRequest(_Shape):
    inputs: str
    parameters: _Parameters = _Parameters()
    stream: bool = False
    add_special_tokens: bool = True


class _StreamOptions(_Shape):
    include_usage: bool = False


class _ChatRequest(_Shape):
    messages: list[dict[str, Any]]
    model: str | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: U32 | None = None
    max_completion_tokens: U32 | None = None
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    seed: U64 | None = None
    stop: list[str] | None = None


class _CompletionRequest(_Shape):
    prompt: str | list[str]
    model: str | None = None
    stream: bool = False
    max_tokens: U32 | None = None
    seed: U64 | None = None
    stop: list[str] | None = None


@dataclass(frozen=True, slots=True)
class GenerateBody:
    """A /generate, /generate_stream, / or /tokenize body."""

    doc: dict[str, Any]  # as the client sent it
    inputs: str
    parameters: dict[str, Any]  # the client's parameters object ({} when absent)
    stream: bool  # the compat route's flag (False elsewhere)
    max_new_tokens: int | None


@dataclass(frozen=True, slots=True)
class ChatBody:
    doc: dict[str, Any]
    model: str | None
    stream: bool
    include_usage: bool
    max_tokens: int | None
    text: str  # the messages' text, for the gateway's token estimate only (TGI applies the real chat template)


@dataclass(frozen=True, slots=True)
class CompletionBody:
    doc: dict[str, Any]
    model: str | None
    stream: bool
    prompts: list[str]
    max_tokens: int | None


def read_json(raw: bytes) -> Any:
    """Parse a body (any Content-Type: curl's ``-d`` sends form encoding, and TGI's 415 helps nobody)."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"Failed to parse the request body as JSON: {clip(str(exc), 200)}") from None
    except RecursionError:
        raise MalformedBody("Failed to parse the request body as JSON: recursion limit exceeded") from None
    try:
        check_json(doc, surrogates=may_hold_surrogates(raw))
    except InputRefused as exc:
        raise MalformedBody(f"Failed to parse the request body as JSON: {exc}") from None
    return doc


def _check(model: type[_Shape], doc: Any) -> Any:
    if not isinstance(doc, dict):
        raise InvalidArgument("Failed to deserialize the JSON body into the target type: expected a JSON object")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidArgument(
            f"Failed to deserialize the JSON body into the target type: {where}: {first['msg']}"
        ) from None


def parse_generate(raw: bytes) -> GenerateBody:
    doc = read_json(raw)
    req: _GenerateRequest = _check(_GenerateRequest, doc)
    parameters = doc.get("parameters") or {}
    return GenerateBody(
        doc=doc,
        inputs=req.inputs,
        parameters=dict(parameters),
        stream=req.stream,
        max_new_tokens=req.parameters.max_new_tokens,
    )


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") for c in content if isinstance(c, dict) and isinstance(c.get("text"), str))
    return ""


def parse_chat(raw: bytes) -> ChatBody:
    doc = read_json(raw)
    req: _ChatRequest = _check(_ChatRequest, doc)
    return ChatBody(
        doc=doc,
        model=req.model,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        max_tokens=req.max_tokens if req.max_tokens is not None else req.max_completion_tokens,
        text="\n".join(_message_text(m) for m in req.messages),
    )


def parse_completion(raw: bytes) -> CompletionBody:
    doc = read_json(raw)
    req: _CompletionRequest = _check(_CompletionRequest, doc)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise InvalidArgument("prompt: Empty array detected. Do not use an empty array for the prompt.")
    return CompletionBody(doc=doc, model=req.model, stream=req.stream, prompts=prompts, max_tokens=req.max_tokens)
