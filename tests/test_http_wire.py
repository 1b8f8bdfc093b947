"""The OpenAI routes rename the model in runs of upstream chunks relayed as bytes: every chunk's, or none."""

from __future__ import annotations

import orjson
import pytest

from proxy.http import wire


def _run(*models: str | None) -> bytes:
    out = b""
    for i, model in enumerate(models):
        chunk: dict[str, object] = {"object": "chat.completion.chunk", "id": "", "created": 1}
        if model is not None:
            chunk["model"] = model
        chunk["choices"] = [{"index": 0, "delta": {"content": f'"model":"x{i}"'}, "finish_reason": None}]
        chunk["usage"] = None
        out += b"data:" + orjson.dumps(chunk) + b"\n\n"
    return out


@pytest.mark.parametrize("ours", ["mine", "meta-llama/Llama-3.1-8B-Instruct", "abcd", "m\u00e9", 'q"uote'])
def test_every_chunk_renamed_or_none(ours: str) -> None:
    new = b'"model":' + orjson.dumps(ours)
    for models in (["abcd"] * 3, ["up"], ["up", "up", "other"], ["up", None, "up"], [None, None], ["a\\b", "a\\b"]):
        run = _run(*models)
        got = wire.rename_model(run, len(models), new)
        if len(set(models)) == 1 and models[0] is not None and "\\" not in models[0]:
            assert got is not None
            assert [e["model"] for e in wire.sse_events(got)] == [ours] * len(models)
            # nothing else changed: the texts that look like a model field are inside strings (escaped quotes)
            assert [e["choices"] for e in wire.sse_events(got)] == [e["choices"] for e in wire.sse_events(run)]
        else:
            assert got is None
