"""Which engine a backend runs, found by asking it: TGI's ``/info``, SGLang's ``/get_model_info``, vLLM's
``/version`` + ``/v1/models``, in that order (each route is the engine's own: TGI serves no ``/get_model_info``,
SGLang and vLLM no ``/info``; TGI and SGLang also serve ``/v1/models``, which is why it is asked last).

A backend configured with ``engine = "tgi" | "vllm" | "sglang"`` is asked only as that engine.
"""

from __future__ import annotations

from typing import Any

from proxy.engines.base import BackendLike, Engine
from proxy.engines.sglang import Sglang
from proxy.engines.tgi import Tgi
from proxy.engines.vllm import Vllm

ENGINES: dict[str, Engine] = {e.name: e for e in (Tgi(), Sglang(), Vllm())}
ENGINE_NAMES = tuple(ENGINES)


def engine(name: str) -> Engine:
    """The adapter of an engine by name (``tgi``, ``vllm``, ``sglang``)."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})") from None


async def probe(backend: BackendLike, configured: str | None = None) -> tuple[Engine, dict[str, Any]] | None:
    """(the engine, its TGI-shaped info) of ``backend``, or None when no engine answered as itself."""
    candidates = [engine(configured)] if configured else list(ENGINES.values())
    for candidate in candidates:
        info = await candidate.describe(backend)
        if info is not None:
            return candidate, info
    return None
