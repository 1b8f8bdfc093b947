"""TGI's OpenAPI document held against the gateway's HTTP port: every route's real answers, and random valid bodies.

No schemathesis here (it would pull in a large dependency tree for what two small checks do): each answer is
validated with jsonschema against the schema that ``tests/reference/tgi_openapi.json`` gives for its path, method,
status and content type, SSE events one by one. A hypothesis property sends bodies drawn from the document's
``GenerateRequest`` ranges to /generate, /generate_stream and / and requires a documented answer every time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from sim.config import SimConfig
from tests.openapi import SPEC, SPEC_URI, as_json_schema, registry

from .harness import Stack
from .threaded import stack_in_thread

_REGISTRY = registry()


def _absolute(node: Any) -> Any:
    """A schema taken out of the document, its ``$ref``s pointing back into it."""
    if isinstance(node, list):
        return [_absolute(n) for n in node]
    if not isinstance(node, dict):
        return node
    return {k: (SPEC_URI + v if k == "$ref" else _absolute(v)) for k, v in node.items()}


def _validate(schema: dict[str, Any], instance: Any, what: str) -> None:
    validator = Draft202012Validator(_absolute(as_json_schema(schema)), registry=_REGISTRY)
    errors = sorted(validator.iter_errors(instance), key=str)
    assert not errors, f"{what}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def _schema(path: str, method: str, status: int, content_type: str) -> dict[str, Any]:
    responses = SPEC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path}: status {status} is not in TGI's document"
    return responses[str(status)]["content"][content_type]["schema"]


ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


def check(resp: requests.Response, path: str, method: str = "post", *, documented: bool = True) -> list[Any]:
    """Validate ``resp`` against the document; return its JSON body or its SSE events.

    ``documented=False``: a gateway status TGI's document does not list (401, 404, 503): TGI's error body still.
    """
    what = f"{method.upper()} {path} -> {resp.status_code}"
    ctype = resp.headers["content-type"].split(";")[0]
    assert resp.headers.get("x-request-id"), what
    if not documented:
        assert resp.status_code >= 400 and ctype == "application/json", what
        _validate(ERROR, resp.json(), what)
        return [resp.json()]
    if ctype == "text/event-stream":
        assert resp.status_code == 200, what
        body = resp.content
        assert body.endswith(b"\n\n"), what
        events = [json.loads(f[5:]) for f in body[:-2].split(b"\n\n") if f != b"data:[DONE]"]
        stream_schema = _schema(path, method, 200, ctype)
        for i, event in enumerate(events):
            if "error" in event and isinstance(event["error"], str):  # TGI's in-stream error event, last
                assert i == len(events) - 1, what
                _validate(ERROR, event, what)
            elif "error" in event:  # the OpenAI routes' {"error": {"message", "http_status_code"}}, last
                assert i == len(events) - 1 and set(event["error"]) == {"message", "http_status_code"}, what
            else:
                _validate(stream_schema, event, f"{what} event {i}")
        return events
    assert ctype == "application/json", what
    _validate(_schema(path, method, resp.status_code, ctype), resp.json(), what)
    return [resp.json()]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sim = SimConfig(time_scale=0.0, max_input_tokens=200, max_total_tokens=300)
    with stack_in_thread(tmp_path_factory.mktemp("schema"), http=True, sim_config=sim) as s:
        yield s


def _post(stack: Stack, path: str, body: Any, **headers: str) -> requests.Response:
    return requests.post(
        stack.http_url + path, json=body, headers={"authorization": f"Bearer {stack.key}", **headers}, timeout=20
    )


def _get(stack: Stack, path: str, auth: bool = True) -> requests.Response:
    headers = {"authorization": f"Bearer {stack.key}"} if auth else {}
    return requests.get(stack.http_url + path, headers=headers, timeout=20)


def test_every_route_answers_as_documented(stack: Stack) -> None:
    params = {"max_new_tokens": 4, "details": True, "top_n_tokens": 2, "do_sample": True, "seed": 3}
    (gen,) = check(_post(stack, "/generate", {"inputs": "Hello", "parameters": params}), "/generate")
    assert gen["details"]["seed"] == 3 and len(gen["details"]["top_tokens"]) == 4
    check(_post(stack, "/generate", {"inputs": "Hello"}), "/generate")
    events = check(_post(stack, "/generate_stream", {"inputs": "Hello", "parameters": params}), "/generate_stream")
    assert len(events) == 4 and events[-1]["details"]["input_length"] > 0
    (compat,) = check(_post(stack, "/", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}), "/")
    assert isinstance(compat, list)
    check(_post(stack, "/", {"inputs": "Hello", "stream": True, "parameters": {"max_new_tokens": 2}}), "/")
    check(_post(stack, "/tokenize", {"inputs": "Hello world"}), "/tokenize")
    check(_get(stack, "/info"), "/info", "get")
    models = _get(stack, "/v1/models").json()
    for model in models["data"]:  # TGI answers a list of them, its document one
        _validate({"$ref": "#/components/schemas/ModelInfo"}, model, "/v1/models")
    assert _get(stack, "/health", auth=False).status_code == 200
    metrics = _get(stack, "/metrics", auth=False)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")

    messages = [{"role": "user", "content": "Hi"}]
    chat = {"messages": messages, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    check(_post(stack, "/v1/chat/completions", chat), "/v1/chat/completions")
    streamed = check(
        _post(stack, "/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}),
        "/v1/chat/completions",
    )
    assert streamed[-1]["choices"] == [] and streamed[-1]["usage"]["completion_tokens"] == 3
    check(_post(stack, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3}), "/v1/completions")
    check(_post(stack, "/v1/completions", {"prompt": "a", "max_tokens": 3, "stream": True}), "/v1/completions")


def test_errors_answer_as_documented(stack: Stack) -> None:
    too_long = "w " * 300
    for path in ("/generate", "/"):
        check(_post(stack, path, {"inputs": too_long}), path)  # 422
        check(_post(stack, path, {"inputs": "x [[sim:error_after=1]]", "parameters": {"max_new_tokens": 3}}), path)
    (event,) = check(_post(stack, "/generate_stream", {"inputs": too_long}), "/generate_stream")
    assert event["error_type"] == "validation"
    events = check(_post(stack, "/generate_stream", {"inputs": "x [[sim:error_after=1]]"}), "/generate_stream")
    assert len(events) == 2 and events[-1]["error_type"] == "generation"
    check(_post(stack, "/v1/completions", {"prompt": too_long}), "/v1/completions")
    check(
        _post(stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]}),
        "/v1/chat/completions",
    )
    check(_post(stack, "/v1/chat/completions", {"messages": "nope"}), "/v1/chat/completions")  # wrong shape: 422
    # the gateway's own answers, not in TGI's document: still TGI's error body
    r = requests.post(stack.http_url + "/generate", json={"inputs": "x"}, timeout=20)
    assert r.status_code == 401
    check(r, "/generate", documented=False)
    r = _post(stack, "/generate", {"inputs": "x"}, **{"x-model-id": "nope"})
    assert r.status_code == 404
    check(r, "/generate", documented=False)


# -- any body the document allows gets a documented answer -------------------------------------------------------
def _opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


_floats = {"allow_nan": False, "allow_infinity": False, "width": 32}
parameters = st.fixed_dictionaries(
    {},
    optional={
        "best_of": _opt(st.integers(1, 3)),
        "decoder_input_details": st.booleans(),
        "details": st.booleans(),
        "do_sample": st.booleans(),
        "frequency_penalty": _opt(st.floats(-2.0, 2.0, exclude_min=True, **_floats)),
        "max_new_tokens": _opt(st.integers(0, 400)),
        "repetition_penalty": _opt(st.floats(0.0, 3.0, exclude_min=True, **_floats)),
        "return_full_text": _opt(st.booleans()),
        "seed": _opt(st.integers(1, 2**64 - 1)),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4),
        "temperature": _opt(st.floats(0.0, 3.0, exclude_min=True, **_floats)),
        "top_k": _opt(st.integers(1, 100)),
        "top_n_tokens": _opt(st.integers(1, 7)),
        "top_p": _opt(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True, **_floats)),
        "truncate": _opt(st.integers(0, 400)),
        "typical_p": _opt(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True, **_floats)),
        "watermark": st.booleans(),
    },
)
inputs = st.one_of(st.text(max_size=30), st.just("w " * 250), st.just("x [[sim:eos_after=2]]"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=inputs, params=parameters, route=st.sampled_from(["/generate", "/generate_stream", "/"]), stream=st.booleans()
)
def test_any_documented_body_gets_a_documented_answer(
    stack: Stack, text: str, params: dict, route: str, stream: bool
) -> None:
    body: dict[str, Any] = {"inputs": text, "parameters": params}
    if route == "/":
        body["stream"] = stream
    _validate({"$ref": "#/components/schemas/CompatGenerateRequest"}, body, "request")
    resp = _post(stack, route, body)
    assert resp.status_code in (200, 422, 424), (resp.status_code, resp.text)
    check(resp, route)
