"""How long a TGI engine step takes on the simulated H100 and what the board draws meanwhile: pure functions.

The numbers are defaults of ``SimConfig``; the reasoning, from ``shared/measurements/gpu.md``:

- Prefill is compute-bound. An 8B model costs ~16 GFLOP per prompt token; at a realistic fraction of the H100's
  ~990 dense bf16 TFLOP/s that is ~20,000 prompt tokens/s, plus a fixed ~5 ms launch/step overhead. A bf16 GEMM loop
  draws 690-697 W against the 700 W limit, so a prefill step draws ~650 W.
- Decode is memory-bound. A step must read the 16 GB of weights (roofline >= 4.8 ms at 3.35 TB/s); with kernel
  launches and sampling a served step is ~10 ms, plus ~0.15 ms per sequence in the batch for its KV reads. The board
  draws well below its limit: ~250 W plus ~4 W per sequence (capped at 650 W). At batch 64 that is
  506 W x 19.6 ms / 64 = 0.155 J per output token, near ML.ENERGY's 0.12 J/token for Llama-3.1-8B at batch 64.
- Idle: 73-120 W measured; 80 W.

Power is kept in integer milliwatts so that energy (mW x ns = picojoules) integrates exactly in integers.

Cost models as data. ``COST_MODELS`` names sets of ``SimConfig`` cost and power knobs; ``with_cost_model`` applies
one. ``default`` is the model above, the one joulegate's attribution assumes (a decode step's cost depends on its
batch size only, so its sequences are interchangeable; prefill power is flat). ``misspecified`` breaks those
assumptions the way real hardware does, so that a check of the attribution against it is not circular:

- a decode step reads every sequence's KV cache: with an MHA 7B model (32 layers x 4096 x K and V x bf16 = 512 KiB
  per token) that is 0.15 ms more per 1,000 cached tokens at ~3.35 TB/s, and the harder-working memory draws more
  (+3 W per 1,000 tokens), so a long-context sequence costs its step more than a short one;
- a small prefill does not fill the GPU: prefill power rises with the step's tokens (350 W + 100 W per 1,000 tokens,
  capped at 700 W);
- the idle floor is 110 W (the H100 of bench/gpu/README.md idles at 121-145 W with a model loaded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from sim.config import SimConfig

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

COST_MODELS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "default": MappingProxyType({}),
        "misspecified": MappingProxyType(
            {
                "idle_power_w": 110.0,
                "prefill_power_w": 350.0,
                "prefill_power_w_per_1k_tokens": 100.0,
                "decode_step_ms": 9.0,
                "decode_per_request_ms": 0.05,
                "decode_context_ms_per_1k_tokens": 0.15,
                "decode_base_power_w": 220.0,
                "decode_power_per_request_w": 2.0,
                "decode_context_power_w_per_1k_tokens": 3.0,
                "max_power_w": 700.0,
            }
        ),
    }
)


def with_cost_model(config: SimConfig, name: str) -> SimConfig:
    """``config`` with the knobs of cost model ``name`` (``COST_MODELS``); its other knobs kept."""
    try:
        knobs = COST_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown cost model {name!r}; known: {', '.join(COST_MODELS)}") from None
    return dataclasses.replace(config, **knobs)


def watts_to_mw(watts: float) -> int:
    return round(watts * 1000)


def prefill_duration_ns(config: SimConfig, prompt_tokens: int) -> int:
    """Wall time of one prefill step over ``prompt_tokens`` prompt tokens (the whole new batch)."""
    seconds = config.prefill_overhead_ms / 1000 + prompt_tokens / config.prefill_tokens_per_s
    return round(seconds * NS_PER_S * config.time_scale)


def decode_duration_ns(config: SimConfig, batch_size: int, context_tokens: int) -> int:
    """Wall time of one decode step that produces one token for each of ``batch_size`` sequences, whose KV caches
    hold ``context_tokens`` tokens in all."""
    ms = (
        config.decode_step_ms
        + config.decode_per_request_ms * batch_size
        + config.decode_context_ms_per_1k_tokens * context_tokens / 1000
    )
    return round(ms * NS_PER_MS * config.time_scale)


def idle_power_mw(config: SimConfig) -> int:
    return watts_to_mw(config.idle_power_w)


def prefill_power_mw(config: SimConfig, prompt_tokens: int) -> int:
    """Board power during a prefill step over ``prompt_tokens`` tokens: compute-bound, near the power limit."""
    watts = config.prefill_power_w + config.prefill_power_w_per_1k_tokens * prompt_tokens / 1000
    return watts_to_mw(min(watts, config.max_power_w))


def decode_power_mw(config: SimConfig, batch_size: int, context_tokens: int) -> int:
    """Board power while decoding a batch of ``batch_size`` sequences with ``context_tokens`` KV-cache tokens in all:
    a memory-bound floor plus a little per sequence (and per cached token)."""
    watts = (
        config.decode_base_power_w
        + config.decode_power_per_request_w * batch_size
        + config.decode_context_power_w_per_1k_tokens * context_tokens / 1000
    )
    return watts_to_mw(min(watts, config.max_power_w))
