"""TGI's HTTP answers as the simulator renders them: JSON bodies (``Details``, ``StreamDetails``, best-of
sequences), the SSE events of ``/generate_stream``, the ``x-*`` timing headers, and the SSE response writer.

Both the TGI routes (``sim.server``) and the OpenAI-compatible routes (``sim.openai``) answer through these; the
byte-level encoding is ``sim.wire``'s.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from sim import wire
from sim.config import SimConfig
from sim.generation import generated_text, top_tokens
from sim.infer import StreamBatch
from sim.scheduler import SimRequest
from sim.tokenizer import VOCAB
from sim.validation import BodyRejection, ValidRequest


class SseStream:
    """An SSE response being written; remembers when it last wrote, for keep-alives."""

    __slots__ = ("_last_write_s", "_response")

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._last_write_s = time.monotonic()

    async def write(self, data: bytes) -> None:
        self._last_write_s = time.monotonic()
        await self._response.write(data)

    async def keepalive_if_due(self) -> None:
        if time.monotonic() - self._last_write_s >= wire.KEEPALIVE_INTERVAL_S:
            await self.write(wire.SSE_KEEPALIVE)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=wire.dumps(body), status=status, headers=headers, content_type="application/json")


def rejection_response(e: BodyRejection) -> web.Response:
    return web.Response(status=e.status, text=e.message, content_type="text/plain", charset="utf-8")


def full_text(sim: SimRequest) -> str:
    text = generated_text(sim.tokens)
    return sim.valid.inputs + text if sim.valid.return_full_text else text


def seed_json(valid: ValidRequest) -> int | None:
    return valid.seed if valid.sampling else None


def prefill_json(valid: ValidRequest) -> list[dict[str, Any]]:
    """Decoder input tokens: the first has no logprob (NaN in TGI, ``null`` on the wire)."""
    out = []
    for i, t in enumerate(valid.prompt_tokens()):
        lp = None if i == 0 else -round(0.5 + (t.id % 97) / 20, 2)
        out.append({"id": t.id, "text": t.text, "logprob": lp})
    return out


def details_json(sim: SimRequest, with_prefill: bool) -> dict[str, Any]:
    """TGI's ``Details`` (``top_tokens`` present only when asked for)."""
    valid = sim.valid
    out: dict[str, Any] = {
        "finish_reason": sim.finish_reason,
        "generated_tokens": len(sim.tokens),
        "seed": seed_json(valid),
        "prefill": prefill_json(valid) if with_prefill else [],
        "tokens": [wire.token(VOCAB[i]) for i in sim.tokens],
    }
    if valid.top_n_tokens:
        out["top_tokens"] = [[wire.token(t) for t in top_tokens(i, valid.top_n_tokens)] for i in sim.tokens]
    return out


def best_of_sequence_json(sim: SimRequest, with_prefill: bool) -> dict[str, Any]:
    details = details_json(sim, with_prefill)
    out: dict[str, Any] = {
        "generated_text": full_text(sim),
        "finish_reason": details["finish_reason"],
        "generated_tokens": details["generated_tokens"],
        "seed": details["seed"],
        "prefill": details["prefill"],
        "tokens": details["tokens"],
    }
    if "top_tokens" in details:
        out["top_tokens"] = details["top_tokens"]
    return out


def stream_details_json(sim: SimRequest) -> dict[str, Any]:
    """TGI's ``StreamDetails``: finish_reason, generated_tokens, seed, input_length."""
    return {
        "finish_reason": sim.finish_reason,
        "generated_tokens": len(sim.tokens),
        "seed": seed_json(sim.valid),
        "input_length": sim.valid.input_length,
    }


def encode_tgi_batch(batch: StreamBatch, details: bool) -> bytes:
    """The SSE events of ``batch`` as ``/generate_stream`` writes them."""
    sim = batch.request
    top_n = sim.valid.top_n_tokens
    last = len(batch.tokens) - 1
    parts = []
    for k, index in enumerate(batch.tokens):
        entry = VOCAB[index]
        position = batch.first_index + k
        if batch.end and k == last:
            top = top_tokens(index, top_n)
            body = wire.stream_response(
                position, entry, top, full_text(sim), stream_details_json(sim) if details else None
            )
            parts.append(wire.sse(body))
        elif top_n:
            parts.append(wire.sse(wire.stream_response(position, entry, top_tokens(index, top_n), None, None)))
        else:
            parts.append(wire.stream_token_event(position, entry))
    return b"".join(parts)


def timing_headers(config: SimConfig, inputs: str, sim: SimRequest, t_start_ns: int, now_ns: int) -> dict[str, str]:
    """The ``x-*`` headers of a non-streamed answer, computed as ``generate_internal`` computes them."""
    start_ns = sim.start_ns if sim.start_ns is not None else sim.queued_ns
    total_ns = now_ns - t_start_ns
    inference_ns = now_ns - start_ns
    generated = max(len(sim.tokens), 1)
    return {
        "x-compute-type": config.compute_type,
        "x-compute-time": wire.seconds_header(total_ns),
        "x-compute-characters": str(len(inputs)),
        "x-total-time": wire.millis_header(total_ns),
        "x-validation-time": wire.millis_header(sim.queued_ns - t_start_ns),
        "x-queue-time": wire.millis_header(start_ns - sim.queued_ns),
        "x-inference-time": wire.millis_header(inference_ns),
        "x-time-per-token": wire.millis_header(inference_ns // generated),
        "x-prompt-tokens": str(sim.valid.input_length),
        "x-generated-tokens": str(len(sim.tokens)),
    }
