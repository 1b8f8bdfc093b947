"""The engine adapters' pure parts on the engines' own payloads: vLLM (v0.10) and SGLang (v0.5) streams as TGI's
events, their error bodies as the errors the front doors promise, TGI parameters as the engines' requests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.errors import BackendError, GenerationFailed, InvalidArgument, NotFound, Overloaded, Unavailable
from proxy.engines import engine
from proxy.engines.base import CACHED_TOKENS
from proxy.engines.openai_compat import OpenAIPassthrough
from proxy.engines.sglang import GenerateToTgi, generate_body
from proxy.engines.vllm import CompletionsToTgi, completion_body
from proxy.tgi_wire import stream_error

VLLM = engine("vllm")
SGLANG = engine("sglang")


def _chunk(text: str, finish: str | None = None, stop: Any = None, usage: Any = None) -> str:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop}
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice],
                       "usage": usage})  # fmt: skip


def _usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def test_vllm_completion_chunks_become_tgi_events_with_details_from_the_usage() -> None:
    body = {"inputs": "Say", "parameters": {"max_new_tokens": 3, "return_full_text": True, "seed": 7}}
    reader = CompletionsToTgi(body, "b")
    usage_only = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [],
                             "usage": _usage(4, 3, cached=2)})  # fmt: skip
    events = reader.feed([_chunk(" a"), _chunk(" b"), _chunk(" END", "stop", " END")])
    assert [e["token"]["text"] for e in events] == [" a", " b"]  # the last is held for the usage
    events += reader.feed([usage_only, "[DONE]"])
    assert [e["index"] for e in events] == [1, 2, 3]
    last = events[-1]
    assert last["generated_text"] == "Say a b END"
    assert last["details"] == {"finish_reason": "stop_sequence", "generated_tokens": 3, "seed": 7, "input_length": 4}
    assert last[CACHED_TOKENS] == 2
    assert reader.close() == []


@pytest.mark.parametrize(
    ("finish", "stop", "tgi"),
    [("stop", None, "eos_token"), ("stop", 128009, "eos_token"), ("stop", "\n", "stop_sequence"), ("length", None,
     "length")],
)  # fmt: skip
def test_vllm_finish_reasons(finish: str, stop: Any, tgi: str) -> None:
    reader = CompletionsToTgi({"inputs": "x"}, "b")
    events = reader.feed([_chunk("y", finish, stop, _usage(1, 1)), "[DONE]"])
    assert events[-1]["details"]["finish_reason"] == tgi


def test_vllm_in_stream_errors_are_tgi_error_events() -> None:
    reader = CompletionsToTgi({"inputs": "x"}, "b")
    error = json.dumps({"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}})
    events = reader.feed([_chunk("y"), error])
    assert events[0]["token"]["text"] == "y" and events[1] == {"error": "boom", "error_type": "generation"}
    assert isinstance(stream_error(events[1], "b"), GenerationFailed)
    bad = json.dumps({"object": "error", "message": "bad top_p", "type": "BadRequestError", "code": 400})  # v0.9
    (event,) = CompletionsToTgi({"inputs": "x"}, "b").feed([bad])
    assert isinstance(stream_error(event, "b"), InvalidArgument)


def test_vllm_error_answers() -> None:
    too_large = (
        "'max_tokens' or 'max_completion_tokens' is too large: 100. This model's maximum context length is 2048 "
        "tokens and your request has 2000 input tokens (100 > 2048 - 2000)."
    )
    err = VLLM.error(400, {"error": {"message": too_large, "type": "BadRequestError", "param": None, "code": 400}}, "b")
    assert isinstance(err, InvalidArgument) and err.message == too_large
    assert VLLM.token_limit(err.message) == (2048, 2000)
    assert VLLM.token_limit("something else") is None
    detail = {"detail": [{"loc": ["body", "max_tokens"], "msg": "Input should be a valid integer"}]}
    err = VLLM.error(422, detail, "b")
    assert isinstance(err, InvalidArgument) and "max_tokens" in err.message
    missing = {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}}
    assert isinstance(VLLM.error(404, missing, "b"), NotFound)
    assert isinstance(VLLM.error(429, {"error": {"message": "slow down"}}, "b"), Overloaded)
    assert isinstance(VLLM.error(503, "Service Unavailable", "b"), Unavailable)
    assert isinstance(VLLM.error(502, "<html>bad gateway</html>", "b"), BackendError)


def test_tgi_parameters_as_a_vllm_request() -> None:
    body = completion_body({"inputs": "hi", "parameters": {"max_new_tokens": 5, "details": True}}, "served")
    assert body["model"] == "served" and body["prompt"] == "hi" and body["temperature"] == 0.0  # greedy
    assert body["max_tokens"] == 5 and body["stream"] and body["include_stop_str_in_output"]
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    params = {"do_sample": True, "top_k": 5, "top_p": 0.9, "truncate": 10, "stop": ["\n"], "adapter_id": "lora-a",
              "grammar": {"type": "json", "value": {"type": "object"}}, "repetition_penalty": 1.1}  # fmt: skip
    body = completion_body({"inputs": "hi", "parameters": params}, "served")
    assert body["model"] == "lora-a" and body["temperature"] == 1.0 and body["top_k"] == 5 and body["top_p"] == 0.9
    assert body["truncate_prompt_tokens"] == 10 and body["stop"] == ["\n"] and body["guided_json"] == {"type": "object"}
    assert body["repetition_penalty"] == 1.1
    with pytest.raises(InvalidArgument, match="typical_p"):
        completion_body({"inputs": "hi", "parameters": {"typical_p": 0.5}}, "served")
    with pytest.raises(InvalidArgument, match="best_of"):
        completion_body({"inputs": "hi", "parameters": {"best_of": 2}}, "served")
    path, chat = VLLM.upstream("/v1/chat/completions", {"model": "tgi", "messages": []}, {"model_id": "served"})
    assert path == "/v1/chat/completions" and chat["model"] == "served" and chat["stream_options"]["include_usage"]


def _sglang(text: str, ids: list[int], finish: Any, completion: int, cached: int = 0) -> str:
    meta = {"id": "r", "finish_reason": finish, "prompt_tokens": 6, "completion_tokens": completion,
            "cached_tokens": cached, "e2e_latency": 0.1}  # fmt: skip
    return json.dumps({"text": text, "output_ids": ids, "meta_info": meta})


def test_sglang_generate_events_become_tgi_events() -> None:
    reader = GenerateToTgi({"inputs": "Q", "parameters": {}}, "b")
    events = reader.feed(
        [
            _sglang(" a", [11], None, 1, cached=4),
            _sglang(" a b", [11, 12], None, 2, cached=4),
            _sglang(" a b.", [11, 12, 13], {"type": "stop", "matched": "."}, 3, cached=4),
            "[DONE]",
        ]
    )
    assert [e["token"]["text"] for e in events] == [" a", " b", "."]
    assert [e["token"]["id"] for e in events] == [11, 12, 13]
    assert events[-1]["generated_text"] == " a b."
    assert events[-1]["details"] == {"finish_reason": "stop_sequence", "generated_tokens": 3, "seed": None,
                                     "input_length": 6}  # fmt: skip
    assert events[-1][CACHED_TOKENS] == 4
    eos = GenerateToTgi({"inputs": "Q"}, "b").feed([_sglang("x", [1], {"type": "stop", "matched": 128001}, 1)])
    assert eos[-1]["details"]["finish_reason"] == "eos_token"
    aborted = GenerateToTgi({"inputs": "Q"}, "b").feed([_sglang("", [], {"type": "abort", "message": "oom"}, 0)])
    assert aborted == [{"error": "Request failed during generation: oom", "error_type": "generation"}]


def test_sglang_errors_and_parameters() -> None:
    message = (
        "Requested token count exceeds the model's maximum context length of 2048 tokens. You requested a total of "
        "2100 tokens: 2000 tokens from the input messages and 100 tokens for the completion. Please reduce..."
    )
    err = SGLANG.error(400, {"error": {"message": message}}, "b")
    assert isinstance(err, InvalidArgument) and SGLANG.token_limit(err.message) == (2048, 2000)
    body = generate_body({"inputs": "hi", "parameters": {"max_new_tokens": 4, "seed": 3, "do_sample": True,
                                                         "grammar": {"type": "regex", "value": "a+"}}})  # fmt: skip
    assert body == {"text": "hi", "stream": True, "sampling_params": {"no_stop_trim": True, "temperature": 1.0,
                    "sampling_seed": 3, "max_new_tokens": 4, "regex": "a+"}}  # fmt: skip
    for name in ("truncate", "top_n_tokens"):
        with pytest.raises(InvalidArgument, match=name):
            generate_body({"inputs": "hi", "parameters": {name: 2}})


def test_openai_completions_get_their_usage_on_the_last_chunk_as_tgi_sends_it() -> None:
    reader = OpenAIPassthrough("/v1/completions", "b")
    usage_only = json.dumps({"object": "text_completion", "choices": [], "usage": _usage(2, 2)})
    events = reader.feed([_chunk("a"), _chunk("b", "length"), usage_only, "[DONE]"])
    assert len(events) == 2 and events[-1]["usage"] == _usage(2, 2) and events[-1]["choices"][0]["text"] == "b"
    chat = OpenAIPassthrough("/v1/chat/completions", "b")
    assert len(chat.feed([_chunk("a"), _chunk("b", "length"), usage_only, "[DONE]"])) == 3  # chat: as it comes


def test_unknown_engine_name() -> None:
    with pytest.raises(ValueError, match="unknown engine 'llamacpp'"):
        engine("llamacpp")


def test_attribution_weighs_a_shared_prefill_by_computed_tokens() -> None:
    """Two requests of 1,000 prompt tokens prefilled in one step; one had 900 of them in the engine's prefix cache:
    it computed 100 of the step's 1,100 tokens and owns that share of its prefill energy, not half."""
    from meter.attribution import AttributionPolicy, CounterReading, attribute
    from meter.timeline import Timeline

    ms = 1_000_000
    t0 = 1_700_000_000_000 * ms

    def tl(rid: str, cached: int) -> Timeline:
        return Timeline(rid, "t", "m", "b0", t0, t0, t0 + 60 * ms, t0 + 90 * ms, 1000, 3, cached_tokens=cached)

    readings = [CounterReading(t0 + k * 100 * ms, 1_000_000 + 30_000 * k) for k in range(3)]
    a = attribute(readings, [tl("cached", 900), tl("fresh", 0)], AttributionPolicy(lag_ns=0))
    assert a.attributed_mj + a.idle_mj == a.counter_mj
    cached, fresh = a.requests["cached"], a.requests["fresh"]
    assert abs(cached.decode_mj - fresh.decode_mj) <= 1  # decode is per sequence (integer mJ, rounded)
    assert abs(cached.prefill_mj / (cached.prefill_mj + fresh.prefill_mj) - 100 / 1100) < 0.01
    with pytest.raises(ValueError, match="cached_tokens"):
        Timeline("x", "t", "m", "b0", t0, t0, t0 + ms, t0 + 2 * ms, 10, 1, cached_tokens=11)
