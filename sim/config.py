"""Every knob of the simulated TGI server and the simulated GPU under it, checked once at construction.

Router knobs carry TGI's launcher names and defaults (``launcher/src/main.rs``), so a config reads like a TGI command
line. Cost and power knobs model one H100 serving a Llama-3-8B-shaped model; their defaults come from
``shared/measurements/gpu.md`` (see ``sim/costmodel.py`` for the reasoning behind each number).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Configuration of one simulated TGI server and its GPU."""

    # --- which engine's HTTP API it serves: tgi, vllm or sglang (sim.engines); the engine and GPU under it are one ---
    engine: str = "tgi"

    # --- what /info reports ---
    model_id: str = "meta-llama/Llama-3.1-8B-Instruct"
    version: str = "3.3.6-dev0"  # the TGI version of tests/reference/tgi_openapi.json
    compute_type: str = "gpu+optimized"  # TGI's COMPUTE_TYPE default, sent as x-compute-type
    # Name of the simulated GPU: the counter's device is "sim:<name>". None: the server's base URL, which is what
    # meter.sources.sim.SimSource falls back to before the first read, so both agree.
    name: str | None = None

    # --- router limits and validation (TGI launcher flags and defaults) ---
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    validation_workers: int = 2
    max_client_batch_size: int = 4

    # --- continuous batching (backends/v3/src/backend.rs, queue.rs) ---
    max_batch_prefill_tokens: int = 4096
    # KV-cache budget in tokens. TGI infers it from free GPU memory; an 8B bf16 model on an 80 GB H100 leaves room
    # for far more than 128 x 2048 tokens, so by default memory never binds before max_concurrent_requests does.
    max_batch_total_tokens: int = 262_144
    max_batch_size: int | None = None
    # TGI's launcher default is 0.3 since v2.0.2 (PR #1820); older docs quote 1.2 as an example.
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    kv_block_size_tokens: int = 1  # flashinfer's paged-attention block size (1); flashdecoding uses 256
    # TGI 3.x turns prefill chunking on for flash models with flashinfer/flashdecoding attention (Llama on an H100
    # included); the router then ignores waiting_served_ratio and max_waiting_tokens and lets every forward take in
    # waiting requests up to the prefill budget. Off by default here, so that those two knobs model the classic rule.
    prefill_chunking: bool = False
    # A client that leaves mid-step: on, the step runs to its end with its request, as a real engine's forward pass
    # does (TGI filters the request out after it, vLLM and SGLang abort it between steps); off, the request leaves the
    # step at once and a step left empty ends (what the simulator did before 2026-12-07). Either way a request still
    # queued leaves at once.
    finish_step_on_cancel: bool = True
    # Automatic prefix caching (sim.prefix_cache): None is the engine's default, on for vllm and sglang, off for tgi.
    prefix_caching: bool | None = None
    prefix_block_tokens: int = 16  # vLLM's default block size; SGLang's radix cache matches single tokens (1)

    # --- step timing (ms); every duration is multiplied by time_scale; 0 makes every step instantaneous ---
    time_scale: float = 1.0
    prefill_overhead_ms: float = 5.0
    prefill_tokens_per_s: float = 20_000.0
    decode_step_ms: float = 10.0
    decode_per_request_ms: float = 0.15
    # KV-cache reads: a decode step's time grows with the tokens in the batch's cache (prompts + tokens so far).
    # 0 by default (the model the attribution assumes); sim.costmodel.COST_MODELS["misspecified"] sets it.
    decode_context_ms_per_1k_tokens: float = 0.0

    # --- board power (W) ---
    idle_power_w: float = 80.0
    prefill_power_w: float = 650.0
    prefill_power_w_per_1k_tokens: float = 0.0  # prefill power rising with the step's prompt tokens
    decode_base_power_w: float = 250.0
    decode_power_per_request_w: float = 4.0
    decode_context_power_w_per_1k_tokens: float = 0.0  # decode power rising with the batch's KV-cache tokens
    max_power_w: float = 650.0  # cap on prefill and decode power

    # --- the energy counter, NVML-like ---
    counter_update_period_ms: int = 100
    counter_lag_ms: int = 0
    counter_offset_mj: int = 0  # NVML counts from driver load, not from zero; set this to test consumers for that

    # --- tokenizer ---
    add_bos_token: bool = True  # Llama-3's tokenizer prepends <|begin_of_text|> on /generate (not on chat)

    def __post_init__(self) -> None:
        if self.engine not in ("tgi", "vllm", "sglang"):
            raise ValueError(f"`engine` must be one of tgi, vllm, sglang, got {self.engine!r}")
        positive_ints = (
            "max_concurrent_requests",
            "max_input_tokens",
            "max_total_tokens",
            "max_batch_prefill_tokens",
            "max_batch_total_tokens",
            "max_waiting_tokens",
            "kv_block_size_tokens",
            "counter_update_period_ms",
            "validation_workers",
            "max_client_batch_size",
            "max_best_of",
            "prefix_block_tokens",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("max_stop_sequences", "max_top_n_tokens", "counter_offset_mj"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {self.max_batch_size}")
        # The same start-up checks as TGI's launcher/router, so that every valid request fits a batch on its own.
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("`max_input_tokens` must be < `max_total_tokens`")
        if self.max_batch_prefill_tokens < self.max_input_tokens:
            raise ValueError("`max_batch_prefill_tokens` must be >= `max_input_tokens`")
        if self.max_batch_total_tokens < self.max_total_tokens:
            raise ValueError("`max_batch_total_tokens` must be >= `max_total_tokens`")
        if self.waiting_served_ratio < 0:
            raise ValueError("`waiting_served_ratio` must be >= 0")
        if not 0 <= self.counter_lag_ms <= 1000:
            raise ValueError(f"`counter_lag_ms` must be within 0..1000, got {self.counter_lag_ms}")
        if self.time_scale < 0:
            raise ValueError(f"`time_scale` must be >= 0, got {self.time_scale}")
        timing = ("prefill_overhead_ms", "decode_step_ms", "decode_per_request_ms", "decode_context_ms_per_1k_tokens")
        for name in timing:
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("`prefill_tokens_per_s` must be > 0")
        powers = (
            "idle_power_w",
            "prefill_power_w",
            "prefill_power_w_per_1k_tokens",
            "decode_base_power_w",
            "decode_power_per_request_w",
            "decode_context_power_w_per_1k_tokens",
            "max_power_w",
        )
        for name in powers:
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
