"""TGIS parameters map onto TGI's; every bad parameter is an InvalidArgument that names its field."""

from __future__ import annotations

import contextlib
import math

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from text_generation.types import Parameters as TgiParameters

from common.errors import InvalidArgument
from proxy.params import DEFAULT_MAX_NEW_TOKENS, ModelLimits, to_tgi
from proxy.pb.fmaas import generation_pb2 as pb

LIMITS = ModelLimits(max_new_tokens=512, default_include_stop_sequence=True)

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, 0.04, 2.0]))
u32 = st.integers(0, 2**32 - 1)

sampling = st.builds(
    pb.SamplingParameters,
    temperature=st.one_of(st.none(), floats),
    top_k=u32,
    top_p=floats,
    typical_p=floats,
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
stopping = st.builds(
    pb.StoppingCriteria,
    max_new_tokens=st.one_of(u32, st.integers(0, 600)),
    min_new_tokens=st.one_of(u32, st.integers(0, 3)),
    time_limit_millis=u32,
    stop_sequences=st.lists(st.text(max_size=300), max_size=8),
    include_stop_sequence=st.one_of(st.none(), st.booleans()),
)
response = st.builds(
    pb.ResponseOptions,
    input_text=st.booleans(),
    generated_tokens=st.booleans(),
    input_tokens=st.booleans(),
    token_logprobs=st.booleans(),
    token_ranks=st.booleans(),
    top_n_tokens=st.one_of(st.integers(0, 7), u32),
)


@st.composite
def decoding(draw: st.DrawFn) -> pb.DecodingParameters:
    d = pb.DecodingParameters(repetition_penalty=draw(floats))
    if draw(st.booleans()):
        d.length_penalty.decay_factor = draw(floats)
    which = draw(st.sampled_from(["none", "format", "json_schema", "regex", "choice", "grammar"]))
    if which == "format":
        d.format = draw(st.sampled_from([0, 1]))
    elif which == "json_schema":
        d.json_schema = draw(st.one_of(st.text(max_size=20), st.just('{"type": "string"}')))
    elif which == "regex":
        d.regex = draw(st.text(max_size=10))
    elif which == "choice":
        d.choice.choices.extend(draw(st.lists(st.text(max_size=5), max_size=3)))
    elif which == "grammar":
        d.grammar = draw(st.text(max_size=10))
    return d


parameters = st.builds(
    pb.Parameters,
    method=st.sampled_from([0, 1, 7]),
    sampling=sampling,
    stopping=stopping,
    response=response,
    decoding=decoding(),
    truncate_input_tokens=u32,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(parameters)
def test_any_parameters_map_or_fail_with_a_named_field(params: pb.Parameters) -> None:
    try:
        opts = to_tgi(params, LIMITS)
    except InvalidArgument as exc:
        assert exc.message.startswith("params"), exc.message
        return
    tgi = opts.tgi_parameters
    TgiParameters(**{k: v for k, v in tgi.items() if k != "adapter_id"})  # TGI's own client accepts it
    assert tgi["details"] is True
    assert 1 <= tgi["max_new_tokens"] <= LIMITS.max_new_tokens
    if "temperature" in tgi:
        assert tgi["temperature"] >= 0.05 and math.isfinite(tgi["temperature"])
    for key in ("top_p", "typical_p"):
        if key in tgi:
            assert 0 < tgi[key] < 1
    assert len(tgi.get("stop", [])) <= 6
    if params.method == pb.GREEDY:
        assert not tgi.get("do_sample") and "temperature" not in tgi and "seed" not in tgi


def test_greedy_ignores_sampling_and_defaults_max_new_tokens() -> None:
    p = pb.Parameters(method=pb.GREEDY, sampling=pb.SamplingParameters(temperature=0.01, seed=4))
    opts = to_tgi(p, LIMITS)
    assert opts.tgi_parameters == {"details": True, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    assert not opts.sampling


def test_sample_with_zero_temperature_means_one_and_unit_top_p_is_unset() -> None:
    p = pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.0, top_p=1.0, top_k=5, seed=7))
    tgi = to_tgi(p, LIMITS).tgi_parameters
    assert tgi["do_sample"] and tgi["temperature"] == 1.0 and "top_p" not in tgi
    assert tgi["top_k"] == 5 and tgi["seed"] == 7


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.01)), "sampling.temperature"),
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_p=1.5)), "sampling.top_p"),
        (pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=513)), "stopping.max_new_tokens"),
        (pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=5, min_new_tokens=6)), "stopping.min_new_tokens"),
        (pb.Parameters(stopping=pb.StoppingCriteria(stop_sequences=[""])), "stopping.stop_sequences"),
        (pb.Parameters(stopping=pb.StoppingCriteria(stop_sequences=list("abcdefg"))), "stopping.stop_sequences"),
        (pb.Parameters(response=pb.ResponseOptions(token_logprobs=True)), "params.response"),
        (pb.Parameters(response=pb.ResponseOptions(generated_tokens=True, top_n_tokens=6)), "response.top_n_tokens"),
        (pb.Parameters(decoding=pb.DecodingParameters(repetition_penalty=-1)), "decoding.repetition_penalty"),
        (pb.Parameters(decoding=pb.DecodingParameters(json_schema="{")), "decoding.json_schema"),
        (pb.Parameters(decoding=pb.DecodingParameters(grammar="root ::= x")), "decoding.grammar"),
    ],
)
def test_errors_name_the_field(params: pb.Parameters, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        to_tgi(params, LIMITS)


def test_guided_decoding_maps_to_tgi_grammars() -> None:
    d = pb.DecodingParameters()
    d.choice.choices.extend(["yes", "no (maybe)"])
    tgi = to_tgi(pb.Parameters(decoding=d), LIMITS).tgi_parameters
    assert tgi["grammar"] == {"type": "regex", "value": r"(yes|no \(maybe\))"}
    d = pb.DecodingParameters(json_schema='{"type": "object", "properties": {"a": {"type": "integer"}}}')
    assert to_tgi(pb.Parameters(decoding=d), LIMITS).tgi_parameters["grammar"]["type"] == "json"


@given(st.binary(max_size=200))
def test_garbage_bytes_never_crash_the_mapping(raw: bytes) -> None:
    try:
        params = pb.Parameters.FromString(raw)
    except DecodeError:
        return
    with contextlib.suppress(InvalidArgument):
        to_tgi(params, LIMITS)
