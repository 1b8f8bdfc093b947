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
"""

from __future__ import annotations

from sim.config import SimConfig

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000


def watts_to_mw(watts: float) -> int:
    return round(watts * 1000)


def prefill_duration_ns(config: SimConfig, prompt_tokens: int) -> int:
    """Wall time of one prefill step over ``prompt_tokens`` prompt tokens (the whole new batch)."""
    seconds = config.prefill_overhead_ms / 1000 + prompt_tokens / config.prefill_tokens_per_s
    return round(seconds * NS_PER_S * config.time_scale)


def decode_duration_ns(config: SimConfig, batch_size: int) -> int:
    """Wall time of one decode step that produces one token for each of ``batch_size`` sequences."""
    ms = config.decode_step_ms + config.decode_per_request_ms * batch_size
    return round(ms * NS_PER_MS * config.time_scale)


def idle_power_mw(config: SimConfig) -> int:
    return watts_to_mw(config.idle_power_w)


def prefill_power_mw(config: SimConfig) -> int:
    return watts_to_mw(config.prefill_power_w)


def decode_power_mw(config: SimConfig, batch_size: int) -> int:
    """Board power while decoding a batch of ``batch_size``: a memory-bound floor plus a little per sequence."""
    watts = config.decode_base_power_w + config.decode_power_per_request_w * batch_size
    return watts_to_mw(min(watts, config.max_power_w))
