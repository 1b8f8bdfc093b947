"""The generation engine under the reference backend: transformers' continuous batching on a random-init Llama.

``Engine`` is the small interface the HTTP layer needs (submit, cancel, health, stop). ``CBEngine`` implements it
with ``model.init_continuous_batching()`` (transformers >= 5.x): the manager runs its own generation thread; results
come back through ``register_result_handler``, which hands every output to the event loop with
``loop.call_soon_threadsafe``, so the loop never blocks on the GPU.

Weights are random: an 8B model needs no download, and energy and timing do not depend on what the weights are
(../../shared/measurements/gpu.md). torch and transformers are imported only when a ``CBEngine`` is built, so the HTTP
layer imports without them.

What transformers 5.17's manager does that matters here (read from its source and seen on the CPU):

- ``add_request(input_ids, request_id, max_new_tokens, streaming=True, eos_token_id=...)``: with ``streaming`` every
  decode step delivers a ``GenerationOutput`` whose ``generated_tokens`` is the whole list so far (not a delta).
  ``eos_token_id=-1`` disables EOS, so a request generates exactly ``max_new_tokens``.
- ``register_result_handler`` must be called on the event loop and before ``add_request`` (else the first outputs
  land in the manager's shared queue). The handler is dropped when a finished output arrives.
- ``cancel_request`` delivers nothing: no final output, and the handler stays registered. One more step's output can
  still arrive after it (the step in flight). The engine swaps in a handler that drops those and unregisters it.
- A crash of the generation thread fails the requests it holds (outputs with ``error``); ``add_request`` afterwards
  returns None and drops the request silently. ``fatal_error`` reports it so the server can fail fast.
- On a CPU the KV-cache sizing reads free memory through psutil; without psutil it sees 0 bytes and the thread dies
  with ``MemoryError`` at the first request.
- Prefix sharing (``allow_block_sharing``) is off by default here: with it, a repeated prompt would skip most of its
  prefill, which TGI-like energy comparisons should not silently get.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)

CANCELLED_DRAIN_S = 5.0  # how long a cancelled request's handler stays to swallow the step that was in flight


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """What the engine reports for one request: all tokens so far (cumulative), their logprobs, and whether it is
    over (``finished``), with ``error`` set when it failed."""

    tokens: list[int]
    logprobs: list[float]
    finished: bool
    error: str | None = None


OutputCallback = Callable[[EngineOutput], None]


class Engine(Protocol):
    """What the HTTP layer needs from a generation engine. All methods are called on the event loop's thread, and
    ``on_output`` is called there too."""

    def submit(
        self,
        request_id: str,
        input_ids: list[int],
        max_new_tokens: int,
        eos_token_id: int | None,
        on_output: OutputCallback,
    ) -> None:
        """Queue a request; raise ``RuntimeError`` when the engine cannot take it."""
        ...

    def cancel(self, request_id: str) -> None:
        """Stop generating for ``request_id`` and free its KV cache; no further ``on_output`` call comes."""
        ...

    def fatal_error(self) -> str | None:
        """Why the engine died, or None while it runs."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks (active requests in the engine, tokens delivered, ...)."""
        ...

    def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A Llama-architecture model to build with random weights."""

    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    vocab_size: int = 128_256
    max_position_embeddings: int = 8192
    rope_theta: float = 500_000.0

    @property
    def name(self) -> str:
        return (
            f"random-llama-h{self.hidden_size}-l{self.num_hidden_layers}-i{self.intermediate_size}"
            f"-a{self.num_attention_heads}-kv{self.num_key_value_heads}-v{self.vocab_size}"
        )


LLAMA3_8B = ModelShape()
# Small enough for a 2-core CPU in a test: ~3 ms a decode step (the LM head dominates).
TINY = ModelShape(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    max_position_embeddings=4096,
)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build the model and the continuous-batching manager."""

    shape: ModelShape = LLAMA3_8B
    device: str = "cuda"
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    attn_implementation: str = "sdpa"  # the manager turns it into "paged|sdpa"
    seed: int = 0
    block_size: int = 256  # KV-cache block (tokens)
    num_blocks: int | None = None  # None: the manager sizes the cache from free memory (90 %)
    max_batch_tokens: int | None = None  # tokens per forward (prefill budget); None: the manager's default
    prefix_sharing: bool = False
    return_logprobs: bool = True
    warmup: bool = True


@dataclass(slots=True)
class _Counters:
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    outputs: int = 0
    tokens_after_cancel: int = 0
    last_output_ns: int = 0
    handlers: dict[str, Any] = field(default_factory=dict)


class CBEngine:
    """``Engine`` over ``model.init_continuous_batching()``. Build it on the thread that runs the event loop."""

    def __init__(self, config: EngineConfig) -> None:
        import torch
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.config = config
        self._torch = torch
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.dtype]
        s = config.shape
        model_config = LlamaConfig(
            hidden_size=s.hidden_size,
            intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_hidden_layers,
            num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads,
            vocab_size=s.vocab_size,
            max_position_embeddings=s.max_position_embeddings,
            rope_theta=s.rope_theta,
            bos_token_id=s.vocab_size - 256,
            eos_token_id=s.vocab_size - 255,
            attn_implementation=config.attn_implementation,
        )
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build straight in the target dtype: no fp32 copy of 8B weights
        try:
            with torch.device(config.device):
                model = LlamaForCausalLM(model_config)
        finally:
            torch.set_default_dtype(previous)
        model.eval()
        self.parameters = sum(p.numel() for p in model.parameters())
        self.build_s = time.perf_counter() - t0
        generation_config = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=-1)
        cb_config = ContinuousBatchingConfig(
            block_size=config.block_size,
            num_blocks=config.num_blocks,
            max_batch_tokens=config.max_batch_tokens,
            allow_block_sharing=config.prefix_sharing,
            return_logprobs=config.return_logprobs,
            seed=config.seed,
        )
        t1 = time.perf_counter()
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        if config.warmup:
            self._manager.warmup()
        self._manager.start()
        self.start_s = time.perf_counter() - t1
        self.model = model
        self._counters = _Counters()
        self._cancelled: set[str] = set()
        log.info(
            "cb_engine_started",
            shape=s.name,
            parameters=self.parameters,
            device=config.device,
            dtype=config.dtype,
            attn=model.config._attn_implementation,
            build_s=round(self.build_s, 2),
            start_s=round(self.start_s, 2),
        )

    # --- Engine ---

    def submit(
        self,
        request_id: str,
        input_ids: list[int],
        max_new_tokens: int,
        eos_token_id: int | None,
        on_output: OutputCallback,
    ) -> None:
        error = self.fatal_error()
        if error is not None:
            raise RuntimeError(error)
        counters = self._counters

        def handler(result: Any) -> None:  # on the event loop, through call_soon_threadsafe
            counters.outputs += 1
            counters.last_output_ns = time.time_ns()
            finished = bool(result.is_finished())
            if finished:
                counters.handlers.pop(request_id, None)
                if result.error is not None:
                    counters.failed += 1
                else:
                    counters.finished += 1
            on_output(
                EngineOutput(
                    tokens=result.generated_tokens,
                    logprobs=result.logprobs,
                    finished=finished,
                    error=None if result.error is None else str(result.error),
                )
            )

        # the handler first: outputs of a request with no handler go to the manager's shared queue
        self._manager.register_result_handler(request_id, handler)
        counters.handlers[request_id] = handler
        accepted = self._manager.add_request(
            input_ids=input_ids,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=True,
            eos_token_id=-1 if eos_token_id is None else eos_token_id,
        )
        if accepted is None:  # the manager is stopping or its thread died: it dropped the request
            self._unregister(request_id)
            counters.handlers.pop(request_id, None)
            raise RuntimeError(self.fatal_error() or "the continuous-batching manager refused the request")
        counters.submitted += 1

    def cancel(self, request_id: str) -> None:
        if self._counters.handlers.pop(request_id, None) is None:
            return  # finished or never submitted
        self._counters.cancelled += 1
        counters = self._counters

        def swallow(result: Any) -> None:
            counters.tokens_after_cancel += 1

        with self._manager.output_router._lock:
            if request_id in self._manager.output_router.result_handlers:
                self._manager.output_router.result_handlers[request_id] = (swallow, asyncio.get_running_loop())
        self._manager.cancel_request(request_id)
        asyncio.get_running_loop().call_later(CANCELLED_DRAIN_S, self._unregister, request_id)

    def fatal_error(self) -> str | None:
        status = self._manager.background_thread_status
        if status.fatal_error is not None:
            return f"{type(status.fatal_error).__name__}: {status.fatal_error}"
        if not self._manager.is_running():
            return "the generation thread is not running"
        return None

    def stats(self) -> dict[str, Any]:
        c = self._counters
        processor = self._manager.batch_processor
        scheduler = getattr(processor, "scheduler", None)
        return {
            "submitted": c.submitted,
            "finished": c.finished,
            "failed": c.failed,
            "cancelled": c.cancelled,
            "outputs": c.outputs,
            "outputs_after_cancel": c.tokens_after_cancel,
            "waiting_for_output": len(c.handlers),
            "engine_active": len(scheduler.active_requests) if scheduler is not None else 0,
            "engine_waiting": len(scheduler.waiting_requests) if scheduler is not None else 0,
            "last_output_ns": c.last_output_ns,
            "kv_blocks": self._manager.continuous_batching_config.num_blocks,
            "max_batch_tokens": self._manager.continuous_batching_config.max_batch_tokens,
        }

    def stop(self) -> None:
        if self._manager.is_running():
            self._manager.stop(block=True, timeout=30)

    # --- helpers ---

    def _unregister(self, request_id: str) -> None:
        with self._manager.output_router._lock:
            self._manager.output_router.result_handlers.pop(request_id, None)
