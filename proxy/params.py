"""TGIS generation parameters -> TGI generation parameters, with TGIS's validation rules and messages.

A pure mapping: the gRPC servicer calls it once per call, before anything is queued, so a bad parameter costs no
backend round trip. Rules follow TGIS (IBM text-generation-inference, router/src/validation.rs and
grpc_server.rs): greedy ignores sampling parameters; SAMPLE with temperature 0 means temperature 1; 0 means
"unset" for top_k, top_p, typical_p and repetition_penalty; at most 6 non-empty stop sequences of at most 240
bytes; token detail options need generated or input tokens. Where TGI has no equivalent (min_new_tokens > 1,
length_penalty, context-free grammars) the request is refused with INVALID_ARGUMENT rather than served with
different semantics; so is what TGI could not read (a ``top_k`` past i32, a ``json_schema`` that is not JSON to
serde: NaN, lone surrogates, deeper than serde's recursion limit). Every error names the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from text_generation import errors as tgi_errors
from text_generation.types import Parameters as TgiParameters

from common.errors import InvalidArgument
from common.inputs import MAX_JSON_DEPTH, InputRefused, check_json, may_hold_surrogates
from proxy.pb.fmaas import generation_pb2 as pb

DEFAULT_MAX_NEW_TOKENS = 20  # TGIS: "Default (0) is currently 20"
MAX_STOP_SEQUENCES = 6
MAX_STOP_SEQUENCE_BYTES = 240
MAX_TOP_N_TOKENS = 5
MIN_TEMPERATURE = 0.05
MAX_TOP_K = 2**31 - 1  # TGI reads top_k as an i32
# TGI parses the whole body with serde's recursion limit; the schema sits three levels down (parameters.grammar.value)
MAX_SCHEMA_DEPTH = MAX_JSON_DEPTH - 3
_REGEX_META = set(".^$*+?()[]{}|\\/")


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What one model accepts; from config and the backends' /info."""

    max_new_tokens: int  # the most a request may ask for (``models[].max_new_tokens``)
    default_include_stop_sequence: bool  # ``models[].include_stop_sequence``


@dataclass(frozen=True, slots=True)
class ResponseOptions:
    input_text: bool = False
    generated_tokens: bool = False
    input_tokens: bool = False
    token_logprobs: bool = False
    token_ranks: bool = False
    top_n_tokens: int = 0


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """One call's parameters, ready for TGI, plus what the gateway itself enforces."""

    tgi_parameters: dict[str, Any]  # body["parameters"] for TGI's /generate_stream (details always on)
    max_new_tokens: int
    time_limit_ms: int  # 0: none; enforced by the gateway (TGI has no time limit)
    include_stop_sequence: bool
    sampling: bool
    response: ResponseOptions


def _f32(value: float) -> float:
    """Proto floats are float32: send TGI 0.9, not 0.8999999761581421."""
    return float(f"{value:.7g}")


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _grammar(decoding: pb.DecodingParameters) -> dict[str, Any] | None:
    which = decoding.WhichOneof("guided")
    if which is None:
        return None
    if which == "format":
        if decoding.format == pb.DecodingParameters.JSON:
            return {"type": "json", "value": {"type": "object"}}
        return None
    if which == "json_schema":
        try:
            schema = json.loads(decoding.json_schema)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"params.decoding.json_schema: not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise InvalidArgument(
                f"params.decoding.json_schema: nested deeper than {MAX_SCHEMA_DEPTH} arrays/objects"
            ) from None
        try:
            check_json(schema, surrogates=may_hold_surrogates(decoding.json_schema), max_depth=MAX_SCHEMA_DEPTH)
        except InputRefused as exc:
            where = f"params.decoding.json_schema{'.' + exc.where if exc.where else ''}"
            raise InvalidArgument(f"{where}: {exc.reason}") from None
        if not isinstance(schema, dict) or not schema:
            raise InvalidArgument("params.decoding.json_schema: must be a non-empty JSON object")
        return {"type": "json", "value": schema}
    if which == "regex":
        if not decoding.regex:
            raise InvalidArgument("params.decoding.regex: must not be empty")
        return {"type": "regex", "value": decoding.regex}
    if which == "choice":
        choices = list(decoding.choice.choices)
        if not choices or any(not c for c in choices):
            raise InvalidArgument("params.decoding.choice: needs at least one choice, none empty")
        return {"type": "regex", "value": "(" + "|".join(_regex_escape(c) for c in choices) + ")"}
    raise InvalidArgument(
        "params.decoding.grammar: context-free grammars are not supported by TGI backends (use json_schema or regex)"
    )


def to_tgi(params: pb.Parameters, limits: ModelLimits, *, adapter_id: str | None = None) -> GenerationOptions:
    """Validate TGIS ``params`` and build the TGI parameters; raise InvalidArgument naming the bad field."""
    out: dict[str, Any] = {"details": True}

    # Sampling: ignored in greedy mode (TGIS's non-strict behaviour).
    sampling = params.method == pb.SAMPLE
    if params.method not in (pb.GREEDY, pb.SAMPLE):
        raise InvalidArgument(f"params.method: unknown decoding method {params.method}")
    if sampling:
        s = params.sampling
        temperature = s.temperature if s.HasField("temperature") else 0.0
        if temperature == 0.0:
            temperature = 1.0  # TGIS: sampling with temperature 0 means "disabled", i.e. 1.0
        if not temperature >= MIN_TEMPERATURE:  # also catches NaN
            raise InvalidArgument(f"params.sampling.temperature: must be >= {MIN_TEMPERATURE}")
        if math.isinf(temperature):
            raise InvalidArgument("params.sampling.temperature: must be finite")
        out["do_sample"] = True
        out["temperature"] = _f32(temperature)
        if s.top_k:
            if s.top_k > MAX_TOP_K:
                raise InvalidArgument(f"params.sampling.top_k: must be <= {MAX_TOP_K}")
            out["top_k"] = s.top_k
        if s.top_p:
            if not 0.0 < s.top_p <= 1.0:
                raise InvalidArgument("params.sampling.top_p: must be > 0.0 and <= 1.0")
            if s.top_p < 1.0:
                out["top_p"] = _f32(s.top_p)
        if s.typical_p:
            if not 0.0 < s.typical_p <= 1.0:
                raise InvalidArgument("params.sampling.typical_p: must be > 0.0 and <= 1.0")
            if s.typical_p < 1.0:
                out["typical_p"] = _f32(s.typical_p)
        if s.HasField("seed"):
            if s.seed >= 2**63:
                raise InvalidArgument("params.sampling.seed: must be < 2**63")
            out["seed"] = s.seed

    # Decoding
    d = params.decoding
    if d.repetition_penalty:
        if not 0.0 < d.repetition_penalty < math.inf:
            raise InvalidArgument("params.decoding.repetition_penalty: must be > 0.0 and finite")
        out["repetition_penalty"] = _f32(d.repetition_penalty)
    if d.HasField("length_penalty"):
        if not 1.0 <= d.length_penalty.decay_factor <= 10.0:
            raise InvalidArgument("params.decoding.length_penalty.decay_factor: must be >= 1.0 and <= 10.0")
        raise InvalidArgument("params.decoding.length_penalty: not supported by TGI backends")
    grammar = _grammar(d)
    if grammar is not None:
        out["grammar"] = grammar

    # Stopping
    st = params.stopping
    max_new_tokens = st.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens > limits.max_new_tokens:
        raise InvalidArgument(f"params.stopping.max_new_tokens: must be <= {limits.max_new_tokens}")
    if st.min_new_tokens > max_new_tokens:
        raise InvalidArgument("params.stopping.min_new_tokens: must be <= max_new_tokens")
    if st.min_new_tokens > 1:
        raise InvalidArgument(
            "params.stopping.min_new_tokens: TGI backends cannot enforce a minimum above 1 (EOS may come first)"
        )
    out["max_new_tokens"] = max_new_tokens
    stops = list(st.stop_sequences)
    if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s.encode()) > MAX_STOP_SEQUENCE_BYTES for s in stops):
        raise InvalidArgument(
            f"params.stopping.stop_sequences: can specify at most {MAX_STOP_SEQUENCES} non-empty stop sequences, "
            f"each not more than {MAX_STOP_SEQUENCE_BYTES} UTF8 bytes"
        )
    if stops:
        out["stop"] = stops
    include_stop = (
        st.include_stop_sequence if st.HasField("include_stop_sequence") else limits.default_include_stop_sequence
    )

    # Response options
    r = params.response
    if (r.token_logprobs or r.token_ranks or r.top_n_tokens) and not (r.input_tokens or r.generated_tokens):
        raise InvalidArgument(
            "params.response: must request input and/or generated tokens to request extra token detail"
        )
    if r.top_n_tokens > MAX_TOP_N_TOKENS:
        raise InvalidArgument(f"params.response.top_n_tokens: must be <= {MAX_TOP_N_TOKENS}")
    if r.top_n_tokens and r.generated_tokens:
        out["top_n_tokens"] = r.top_n_tokens
    response = ResponseOptions(
        input_text=r.input_text,
        generated_tokens=r.generated_tokens,
        input_tokens=r.input_tokens,
        token_logprobs=r.token_logprobs,
        token_ranks=r.token_ranks,
        top_n_tokens=r.top_n_tokens,
    )

    if params.truncate_input_tokens:
        out["truncate"] = params.truncate_input_tokens
    if adapter_id:
        out["adapter_id"] = adapter_id

    # Last line of defence: TGI's own client-side rules, as the text-generation package states them.
    try:
        TgiParameters(**{k: v for k, v in out.items() if k != "adapter_id"})
    except tgi_errors.ValidationError as exc:
        raise InvalidArgument(f"params: {exc}") from None

    return GenerationOptions(
        tgi_parameters=out,
        max_new_tokens=max_new_tokens,
        time_limit_ms=st.time_limit_millis,
        include_stop_sequence=include_stop,
        sampling=sampling,
        response=response,
    )
