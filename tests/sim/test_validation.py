"""TGI's validation rules and messages (router/src/validation.rs), and axum's JSON rejections."""

from __future__ import annotations

import pytest

from sim.config import SimConfig
from sim.tokenizer import count_tokens
from sim.validation import (
    BodyRejection,
    GenerateParameters,
    GenerateRequest,
    ValidationError,
    parse_generate_request,
    read_json,
    validate,
)

CONFIG = SimConfig(max_input_tokens=20, max_total_tokens=40, max_batch_prefill_tokens=64, max_batch_total_tokens=64)


def check(message: str, inputs: str = "Hello world", **parameters: object) -> None:
    with pytest.raises(ValidationError) as e:
        validate(GenerateRequest(inputs=inputs, parameters=GenerateParameters(**parameters)), CONFIG)
    assert e.value.message == message


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 0.0}, "`temperature` must be strictly positive"),
        ({"temperature": -1.0}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": -2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 3}, "`seed` must not be set when `best_of` > 1"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 20. Given: 0"),
        ({"truncate": 21}, "`truncate` must be strictly positive and less than 20. Given: 21"),
        (
            {"max_new_tokens": 38},
            "`inputs` tokens + `max_new_tokens` must be <= 40. Given: 5 `inputs` tokens and 38 `max_new_tokens`",
        ),
    ],
)
def test_parameter_errors(parameters: dict, message: str) -> None:
    check(message, **parameters)


def test_input_errors_and_their_order() -> None:
    check("`inputs` cannot be empty", inputs="")
    long = "word " * 12
    n = count_tokens(long)
    assert n == 25
    check(f"`inputs` must have less than 20 tokens. Given: {n}", inputs=long, max_new_tokens=1)
    # the total is checked before the input length, as TGI does
    check(
        f"`inputs` tokens + `max_new_tokens` must be <= 40. Given: {n} `inputs` tokens and 20 `max_new_tokens`",
        inputs=long,
        max_new_tokens=20,
    )
    # the first failing rule wins: temperature comes before max_new_tokens and inputs
    check("`temperature` must be strictly positive", inputs="", temperature=0.0, max_new_tokens=0)


def test_defaults_truncation_and_sampling() -> None:
    valid = validate(GenerateRequest(inputs="Hello world"), CONFIG)
    assert valid.input_length == 5  # <|begin_of_text|> "Hell" "o" " wor" "ld"
    assert valid.max_new_tokens == 40 - valid.input_length  # max_total_tokens - input, capped at 1024
    assert not valid.sampling
    # truncation keeps the last tokens
    long = "a " * 30 + "end"
    valid = validate(GenerateRequest(inputs=long, parameters=GenerateParameters(truncate=5)), CONFIG)
    assert valid.input_length == 5
    assert [t.text for t in valid.prompt_tokens()][-1] == " end"
    # sampling (and so a reported seed) when asked to or when a warper is active
    assert validate(GenerateRequest(inputs="x", parameters=GenerateParameters(do_sample=True)), CONFIG).sampling
    assert validate(GenerateRequest(inputs="x", parameters=GenerateParameters(top_k=5)), CONFIG).sampling
    assert not validate(GenerateRequest(inputs="x", parameters=GenerateParameters(temperature=1.0)), CONFIG).sampling
    seeded = validate(GenerateRequest(inputs="x", parameters=GenerateParameters(seed=42, do_sample=True)), CONFIG)
    assert seeded.seed == 42


def test_max_new_tokens_is_chunked_at_the_default_generation_length() -> None:
    big = SimConfig(max_input_tokens=100, max_total_tokens=4096, max_batch_total_tokens=8192)
    valid = validate(GenerateRequest(inputs="x", parameters=GenerateParameters(max_new_tokens=3000)), big)
    assert valid.max_new_tokens == 1024


def test_axum_json_rejections() -> None:
    with pytest.raises(BodyRejection) as e:
        read_json(b'{"inputs": "x"}', None)
    assert (e.value.status, e.value.message) == (415, "Expected request with `Content-Type: application/json`")
    with pytest.raises(BodyRejection) as e:
        read_json(b"{bad", "application/json")
    assert e.value.status == 400
    assert e.value.message.startswith("Failed to parse the request body as JSON: key must be a string at line 1")
    assert read_json(b'{"a": 1}', "application/json; charset=utf-8") == {"a": 1}
    cases = [
        ({}, "missing field `inputs`"),
        ({"inputs": 3}, "inputs: invalid type: integer `3`, expected a string"),
        ({"inputs": "x", "parameters": {"max_new_tokens": -1}}, "parameters.max_new_tokens: invalid value: integer"),
        ({"inputs": "x", "parameters": {"temperature": "hot"}}, 'parameters.temperature: invalid type: string "hot"'),
        ({"inputs": "x", "parameters": {"stop": None}}, "parameters.stop: invalid type: null, expected a sequence"),
        ({"inputs": "x", "parameters": {"details": 1}}, "parameters.details: invalid type: integer `1`"),
    ]
    for doc, message in cases:
        with pytest.raises(BodyRejection) as e:
            parse_generate_request(doc)
        assert e.value.status == 422
        assert e.value.message.startswith("Failed to deserialize the JSON body into the target type: " + message)
    # nulls are fine where TGI has an Option; unknown fields are ignored
    req = parse_generate_request({"inputs": "x", "parameters": {"temperature": None, "foo": 1}, "bar": 2})
    assert req.parameters.temperature is None
    assert parse_generate_request({"inputs": "x", "stream": True}, compat=True).stream
