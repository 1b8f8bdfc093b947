"""Request bodies in, valid requests out: axum's JSON rejections and TGI's own validation, with their messages.

Two layers, as in TGI:

1. Deserialization (axum's ``Json`` extractor with serde): a body that is not JSON is rejected with HTTP 400
   ``Failed to parse the request body as JSON: ...``; JSON of the wrong shape (missing ``inputs``, a string where a
   number goes, a negative ``max_new_tokens``) with HTTP 422 ``Failed to deserialize the JSON body into the target
   type: <path>: <serde message>``; a request without ``Content-Type: application/json`` with HTTP 415. All plain text.
   (serde's ``at line L column C`` suffix is left out of data errors.) A lone UTF-16 surrogate escape (``"\ud800"``),
   which Python's ``json`` reads but serde refuses when it reads a ``String``, is a syntax error (400) with serde's
   message and position, like TGI's.
2. Validation (``router/src/validation.rs``, ``Validation::validate``), in TGI's order and with TGI's messages;
   the HTTP layer prefixes ``Input validation error: `` and answers 422 ``{"error", "error_type": "validation"}``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import JoulegateError
from sim import tokenizer
from sim.config import SimConfig
from sim.generation import Markers, SequencePlan, parse_markers, rng_seed_for

DEFAULT_GENERATION_LENGTH = 1024  # validation.rs: a request generates at most this many tokens per pass

U32_MAX = 2**32 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
U64_MAX = 2**64 - 1


class BodyRejection(JoulegateError):
    """The body could not be deserialized (axum's rejection): ``status`` and the plain-text ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ValidationError(JoulegateError):
    """TGI's ``ValidationError``: the message without the ``Input validation error: `` prefix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- layer 1: serde-like deserialization ---


def _describe(value: Any) -> str:
    """How serde names an unexpected JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value!r}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def _invalid_type(value: Any, expected: str) -> str:
    return f"invalid type: {_describe(value)}, expected {expected}"


def as_f32(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(_invalid_type(value, "f32"))
    return float(value)


def _uint(bits_max: int, name: str) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(_invalid_type(value, name))
        if value < 0 or value > bits_max:
            raise TypeError(f"invalid value: integer `{value}`, expected {name}")
        return value

    return parse


def as_i32(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(_invalid_type(value, "i32"))
    if not I32_MIN <= value <= I32_MAX:
        raise TypeError(f"invalid value: integer `{value}`, expected i32")
    return value


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(_invalid_type(value, "a boolean"))
    return value


def as_string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(_invalid_type(value, "a string"))
    return value


def as_strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(_invalid_type(value, "a sequence"))
    out = []
    for i, item in enumerate(value):
        try:
            out.append(as_string(item))
        except TypeError as e:
            raise TypeError(f"[{i}]: {e}") from None
    return tuple(out)


def as_any(value: Any) -> Any:
    return value


as_u32 = _uint(U32_MAX, "u32")
as_u64 = _uint(U64_MAX, "u64")
as_usize = _uint(U64_MAX, "usize")

# field -> (parser, nullable (an Option<...> in Rust), default)
_PARAMETER_FIELDS: dict[str, tuple[Callable[[Any], Any], bool, Any]] = {
    "best_of": (as_usize, True, None),
    "temperature": (as_f32, True, None),
    "repetition_penalty": (as_f32, True, None),
    "frequency_penalty": (as_f32, True, None),
    "top_k": (as_i32, True, None),
    "top_p": (as_f32, True, None),
    "typical_p": (as_f32, True, None),
    "do_sample": (as_bool, False, False),
    "max_new_tokens": (as_u32, True, None),
    "return_full_text": (as_bool, True, None),
    "stop": (as_strings, False, ()),
    "truncate": (as_usize, True, None),
    "watermark": (as_bool, False, False),
    "details": (as_bool, False, False),
    "decoder_input_details": (as_bool, False, False),
    "seed": (as_u64, True, None),
    "top_n_tokens": (as_u32, True, None),
    "grammar": (as_any, True, None),
    "adapter_id": (as_string, True, None),
}


@dataclass(frozen=True, slots=True)
class GenerateParameters:
    """``GenerateParameters`` as TGI deserializes it (router/src/lib.rs); None where the client left it out."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Any = None
    adapter_id: str | None = None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """``GenerateRequest`` / ``CompatGenerateRequest`` (``stream`` only means something on ``POST /``)."""

    inputs: str
    parameters: GenerateParameters = GenerateParameters()
    add_special_tokens: bool = True
    stream: bool = False


def read_json(body: bytes, content_type: str | None) -> Any:
    """Parse a request body the way axum's ``Json`` extractor does before serde sees the target type."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
        raise BodyRejection(415, "Expected request with `Content-Type: application/json`")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BodyRejection(400, f"Failed to parse the request body as JSON: {_serde_syntax_message(e)}") from None
    if _SURROGATE_ESCAPE.search(body):
        lone = _lone_surrogate(body)
        if lone is not None:
            path = _surrogate_path(doc)
            prefix = f"{path}: " if path else ""
            raise BodyRejection(400, f"Failed to parse the request body as JSON: {prefix}{lone}")
    return doc


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def _at(body: bytes, index: int) -> str:
    """serde's position of the byte ``index`` bytes into the body: ``at line L column C``."""
    line = body.count(b"\n", 0, index) + 1
    column = index - (body.rfind(b"\n", 0, index) + 1)
    return f"at line {line} column {column}"


def _lone_surrogate(body: bytes) -> str | None:
    """serde_json's error for the first unpaired surrogate escape in ``body`` (valid JSON), or None."""
    high_end: int | None = None  # where the escape of a leading surrogate waiting for its pair ended
    for m in _ESCAPE.finditer(body):
        unit = int(m.group(1), 16) if m.group(1) else None
        if high_end is not None:
            if m.start() != high_end:  # the next byte is no backslash: serde reads it, then gives up
                return f"unexpected end of hex escape {_at(body, high_end + 1)}"
            if unit is None:  # a backslash, but not \u
                return f"unexpected end of hex escape {_at(body, high_end + 2)}"
            if not 0xDC00 <= unit <= 0xDFFF:
                return f"lone leading surrogate in hex escape {_at(body, m.end())}"
            high_end = None
        elif unit is not None and 0xDC00 <= unit <= 0xDFFF:
            return f"lone leading surrogate in hex escape {_at(body, m.end())}"
        elif unit is not None and 0xD800 <= unit <= 0xDBFF:
            high_end = m.end()
    if high_end is not None:
        return f"unexpected end of hex escape {_at(body, high_end + 1)}"
    return None


def _surrogate_path(doc: Any, path: str = "") -> str | None:
    """The serde_path_to_error path of the first string (or key) holding a lone surrogate, in document order."""
    if isinstance(doc, str):
        return path if not doc.isascii() and _unencodable(doc) else None
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        here = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        if isinstance(key, str) and _unencodable(key):
            return path or "."
        found = _surrogate_path(value, here)
        if found is not None:
            return found
    return None


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_SERDE_SYNTAX = {
    "Expecting value": "expected value",
    "Expecting property name enclosed in double quotes": "key must be a string",
    "Expecting ':' delimiter": "expected `:`",
    "Expecting ',' delimiter": "expected `,` or `}`",
    "Extra data": "trailing characters",
}


def _serde_syntax_message(error: Exception) -> str:
    """Python's JSON error, worded like serde_json's (position as serde counts it: 1-based line and column)."""
    if isinstance(error, json.JSONDecodeError):
        if error.pos >= len(error.doc):
            return f"EOF while parsing a value at line {error.lineno} column {error.colno - 1}"
        message = _SERDE_SYNTAX.get(error.msg, error.msg[:1].lower() + error.msg[1:])
        return f"{message} at line {error.lineno} column {error.colno}"
    return "invalid unicode in the body"


def data_error(message: str) -> BodyRejection:
    return BodyRejection(422, f"Failed to deserialize the JSON body into the target type: {message}")


def parse_parameters(raw: Any, path: str = "parameters") -> GenerateParameters:
    if raw is None:
        raise data_error(f"{path}: invalid type: null, expected struct GenerateParameters")
    if not isinstance(raw, Mapping):
        raise data_error(f"{path}: {_invalid_type(raw, 'struct GenerateParameters')}")
    values: dict[str, Any] = {}
    for name, (parse, nullable, _default) in _PARAMETER_FIELDS.items():
        if name not in raw:
            continue
        value = raw[name]
        if value is None and nullable:
            continue
        try:
            values[name] = parse(value)
        except TypeError as e:
            raise data_error(f"{path}.{name}: {e}") from None
    return GenerateParameters(**values)


def parse_generate_request(doc: Any, compat: bool = False) -> GenerateRequest:
    """Deserialize a ``GenerateRequest`` (``compat``: a ``CompatGenerateRequest``, with ``stream``)."""
    target = "struct CompatGenerateRequest" if compat else "struct GenerateRequest"
    if not isinstance(doc, Mapping):
        raise data_error(_invalid_type(doc, target))
    if "inputs" not in doc:
        raise data_error("missing field `inputs`")
    try:
        inputs = as_string(doc["inputs"])
    except TypeError as e:
        raise data_error(f"inputs: {e}") from None
    parameters = parse_parameters(doc["parameters"]) if "parameters" in doc else GenerateParameters()
    add_special_tokens = True
    if "add_special_tokens" in doc:
        try:
            add_special_tokens = as_bool(doc["add_special_tokens"])
        except TypeError as e:
            raise data_error(f"add_special_tokens: {e}") from None
    stream = False
    if compat and "stream" in doc:
        try:
            stream = as_bool(doc["stream"])
        except TypeError as e:
            raise data_error(f"stream: {e}") from None
    return GenerateRequest(inputs=inputs, parameters=parameters, add_special_tokens=add_special_tokens, stream=stream)


# --- layer 2: TGI's validation ---


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request that passed validation: what the engine needs to run it."""

    inputs: str
    input_length: int  # prompt tokens after truncation (BOS included when added)
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int  # the seed used (TGI draws one when the client gave none)
    sampling: bool  # whether the seed shows in the answer (TGI reports it only when sampling)
    top_n_tokens: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    truncate: int | None
    add_special_tokens: bool
    markers: Markers

    def plan(self) -> SequencePlan:
        return SequencePlan(
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
            rng_seed=rng_seed_for(self.inputs, self.seed, self.sampling),
            top_n_tokens=self.top_n_tokens,
            markers=self.markers,
        )

    def prompt_tokens(self) -> list[tokenizer.TokenSpan]:
        """The prompt's tokens as the model sees them (left-truncated to ``input_length``)."""
        tokens = tokenizer.encode(self.inputs, self.add_special_tokens)
        return tokens[len(tokens) - self.input_length :]


def validate(request: GenerateRequest, config: SimConfig, rand: Callable[[], int] | None = None) -> ValidRequest:
    """TGI's ``Validation::validate``: the same checks, in the same order, with the same messages."""
    p = request.parameters
    best_of = 1 if p.best_of is None else p.best_of
    sampling = (
        p.do_sample
        or p.temperature is not None
        or p.top_k is not None
        or p.top_p is not None
        or p.typical_p is not None
    )
    if best_of > 1 and not sampling:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    temperature = 1.0 if p.temperature is None else p.temperature
    if temperature <= 0.0:
        raise ValidationError("`temperature` must be strictly positive")
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition_penalty <= 0.0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    top_p = 1.0
    if p.top_p is not None:
        if p.top_p <= 0.0 or p.top_p >= 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        top_p = p.top_p
    typical_p = 1.0
    if p.typical_p is not None:
        if p.typical_p <= 0.0 or p.typical_p >= 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        typical_p = p.typical_p
    top_k = 0
    if p.top_k is not None:
        if p.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        top_k = p.top_k
    if p.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > config.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {config.max_stop_sequences} stop sequences. Given: {len(p.stop)}")
    if p.seed is None:
        seed = (rand or _random_seed)()
    else:
        if best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        seed = p.seed
    top_n_tokens = 0
    if p.top_n_tokens is not None:
        if p.top_n_tokens > config.max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {config.max_top_n_tokens}. Given: {p.top_n_tokens}"
            )
        top_n_tokens = p.top_n_tokens
    if not request.inputs:
        raise ValidationError("`inputs` cannot be empty")
    if p.truncate is not None and (p.truncate == 0 or p.truncate > config.max_input_tokens):
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {config.max_input_tokens}. Given: {p.truncate}"
        )
    # validate_input
    n_tokens = tokenizer.count_tokens(request.inputs, request.add_special_tokens)
    input_length = n_tokens if p.truncate is None else min(n_tokens, p.truncate)
    if p.max_new_tokens is not None:
        max_new_tokens = min(p.max_new_tokens, DEFAULT_GENERATION_LENGTH)
    else:
        max_new_tokens = min(max(config.max_total_tokens - input_length, 0), DEFAULT_GENERATION_LENGTH)
    if input_length + max_new_tokens > config.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {config.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    if input_length > config.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {config.max_input_tokens} tokens. Given: {input_length}")
    # The python shard's NextTokenChooser samples when asked to or when any warper is active.
    warped = temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
    return ValidRequest(
        inputs=request.inputs,
        input_length=input_length,
        max_new_tokens=max_new_tokens,
        stop=p.stop,
        seed=seed,
        sampling=p.do_sample or warped,
        top_n_tokens=top_n_tokens,
        details=p.details,
        decoder_input_details=p.decoder_input_details,
        return_full_text=bool(p.return_full_text),
        truncate=p.truncate,
        add_special_tokens=request.add_special_tokens,
        markers=parse_markers(request.inputs),
    )


def validate_best_of(best_of: int, config: SimConfig) -> int:
    """``Validation::validate_best_of``, checked before a ``best_of`` > 1 request is fanned out."""
    if config.max_best_of == 1 and best_of != 1:
        raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
    if best_of > config.max_best_of:
        raise ValidationError(f"`best_of` must be > 0 and <= {config.max_best_of}. Given: {best_of}")
    return best_of


def _random_seed() -> int:
    return random.getrandbits(64)
