"""The GPU-bound engine under the reference backend: continuous batching over ``StaticLlama`` with every decode step
replayed from a CUDA graph.

``GraphEngine`` implements ``reference_engine.Engine`` (the HTTP layer cannot tell it from ``CBEngine``). Its own
generation thread loops:

1. take what the event loop handed over (new requests, cancellations);
2. if requests wait and slots are free: one batched prefill of as many of them as fit ``max_batch_tokens`` prompt
   tokens (shortest-first within the admitted set, as packed tokens cost nothing extra), which yields each one's
   first token. Like TGI, a prefill goes before the next decode step, so new requests join the running batch;
3. if requests are running: one decode step for all of them: the host writes each row's last token and position
   into the model's input buffers and replays the graph captured for (the smallest batch bucket holding the highest
   occupied slot, the smallest length bucket holding the longest row); then it reads the tokens back (the one
   synchronisation per step) and delivers them.

Outputs go to the event loop once per step with ``loop.call_soon_threadsafe``; a callback runs only while its
request is registered there, so nothing arrives after ``cancel``. Graphs are captured at start for every bucket
pair (batch 1, 2, 4, ..., ``max_batch_size``; cache length 128, 256, ..., ``max_len``), sharing one memory pool;
on a CPU (tests) the same decode step runs eagerly.

Why it is GPU-bound: a replay launches the whole step (~25 kernels per layer) with one call, so the GPU runs the
step back to back; the host's work per step is a few microseconds of Python plus one device-to-host copy.
"""

from __future__ import annotations

import asyncio
import heapq
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from bench.gpu.reference_engine import LLAMA3_8B, EngineOutput, ModelShape, OutputCallback

log = structlog.get_logger(__name__)

MIN_LENGTH_BUCKET = 128
SWITCH_INTERVAL_S = 0.0005


def buckets(limit: int, first: int = 1) -> list[int]:
    """Powers of two from ``first`` below ``limit``, then ``limit`` itself."""
    out = []
    b = first
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    """The smallest bucket that holds ``n``."""
    for b in sizes:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


@dataclass(frozen=True, slots=True)
class GraphEngineConfig:
    shape: ModelShape = LLAMA3_8B
    device: str = "cuda"
    dtype: str = "bf16"  # bf16 | fp16 | fp32 | fp8
    seed: int = 0
    max_batch_size: int = 64  # KV-cache slots: requests decoding at once (more wait in the engine)
    max_len: int = 2048  # cache positions per slot: prompt + new tokens
    max_batch_tokens: int = 8192  # prompt tokens per prefill
    cuda_graphs: bool = True  # False: eager decode steps (also what a CPU does)


@dataclass(slots=True)
class _Request:
    id: str
    prompt: list[int]
    max_new_tokens: int
    eos_token_id: int | None
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def position(self) -> int:
        """Where its last token goes in the cache when fed back."""
        return len(self.prompt) + len(self.tokens) - 1

    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens or (
            self.eos_token_id is not None and self.tokens[-1] == self.eos_token_id
        )


@dataclass(slots=True)
class _Counters:
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    outputs: int = 0
    outputs_after_cancel: int = 0
    last_output_ns: int = 0
    prefills: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0  # wall time of the prefills (each ends by reading its tokens back: synchronised)
    decode_steps: int = 0
    decode_rows: int = 0  # sum over steps of the batch bucket run (rows computed, occupied or not)
    decode_tokens: int = 0  # sum over steps of the requests served


class GraphEngine:
    """``Engine`` over ``StaticLlama`` with CUDA-graph decode steps. Build it on the event loop's thread."""

    def __init__(self, config: GraphEngineConfig) -> None:
        import torch

        from bench.gpu.static_llama import StaticLlama

        if config.max_batch_tokens < 1 or config.max_len < 2 or config.max_batch_size < 1:
            raise ValueError("max_batch_tokens, max_len and max_batch_size must be positive (max_len >= 2)")
        self.config = config
        self._torch = torch
        # The generation thread waits on the GPU without the GIL once per step and must get it back at once; under
        # the default 5 ms switch interval the event loop (SSE writes for every stream) can hold it for a whole step.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._cuda = config.device.startswith("cuda")
        if self._cuda:
            # set_device needs an index: a bare "cuda" means the current device.
            device = torch.device(config.device)
            self._cuda_index = torch.cuda.current_device() if device.index is None else device.index
            torch.cuda.set_device(self._cuda_index)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model = StaticLlama(
                config.shape,
                dtype=config.dtype,
                device=config.device,
                slots=config.max_batch_size,
                max_len=config.max_len,
                seed=config.seed,
            )
        self.parameters = self.model.parameters()
        self.build_s = time.perf_counter() - t0
        self.batch_buckets = buckets(config.max_batch_size)
        self.length_buckets = buckets(config.max_len, min(MIN_LENGTH_BUCKET, config.max_len))
        self._graphs: dict[tuple[int, int], Any] = {}
        t1 = time.perf_counter()
        with torch.inference_mode():
            self._warm_up()
        self.start_s = time.perf_counter() - t1
        self._counters = _Counters()
        self._callbacks: dict[str, OutputCallback] = {}  # event loop side: who gets outputs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._fatal: str | None = None
        self._active = 0
        self._waiting = 0
        self._thread = threading.Thread(target=self._run, name="graph-engine", daemon=True)
        self._thread.start()
        log.info("graph_engine_started", **self.model.describe(), graphs=len(self._graphs),
                 build_s=round(self.build_s, 2), start_s=round(self.start_s, 2))  # fmt: skip

    # --- start-up ---

    def _warm_up(self) -> None:
        """A prefill (library handles, kernel choice) and the largest prefill the budget allows (so its memory is
        taken now, not mid-run); then every decode graph, or one eager step per bucket on a CPU."""
        m = self.model
        m.prefill([[1, 2, 3]], [0])
        per = max(1, min(self.config.max_len, self.config.max_batch_tokens))
        n = min(self.config.max_batch_size, max(1, self.config.max_batch_tokens // per))
        m.prefill([[7] * per for _ in range(n)], list(range(n)))
        m.in_positions.zero_()
        m.in_tokens.zero_()
        if not (self._cuda and self.config.cuda_graphs):
            m.decode_step(self.batch_buckets[0], self.length_buckets[0])
            return
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs off the capture path, as torch's docs ask
            for b in self.batch_buckets:
                m.decode_step(b, self.length_buckets[-1])
        torch.cuda.current_stream().wait_stream(side)
        for b in reversed(self.batch_buckets):  # largest first: smaller graphs reuse its pool memory
            for length in reversed(self.length_buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    m.decode_step(b, length)
                self._graphs[(b, length)] = graph
        torch.cuda.synchronize()

    # --- Engine (event loop side) ---

    def submit(
        self,
        request_id: str,
        input_ids: list[int],
        max_new_tokens: int,
        eos_token_id: int | None,
        on_output: OutputCallback,
    ) -> None:
        if self._fatal is not None:
            raise RuntimeError(self._fatal)
        if self._stopping:
            raise RuntimeError("the engine is stopping")
        if not input_ids or max_new_tokens < 1:
            raise RuntimeError("a request needs at least one prompt token and one new token")
        if len(input_ids) + max_new_tokens - 1 > self.config.max_len:
            raise RuntimeError(
                f"{len(input_ids)} prompt + {max_new_tokens} new tokens exceed the cache's {self.config.max_len}"
            )
        if len(input_ids) > self.config.max_batch_tokens:
            raise RuntimeError(f"{len(input_ids)} prompt tokens exceed max_batch_tokens {self.config.max_batch_tokens}")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._callbacks[request_id] = on_output
        self._counters.submitted += 1
        self._post(("submit", _Request(request_id, list(input_ids), max_new_tokens, eos_token_id)))

    def cancel(self, request_id: str) -> None:
        if self._callbacks.pop(request_id, None) is None:
            return  # finished or never submitted
        self._counters.cancelled += 1
        self._post(("cancel", request_id))

    def fatal_error(self) -> str | None:
        if self._fatal is None and not self._thread.is_alive() and not self._stopping:
            return "the generation thread is not running"
        return self._fatal

    def stats(self) -> dict[str, Any]:
        c = self._counters
        return {
            "submitted": c.submitted,
            "finished": c.finished,
            "failed": c.failed,
            "cancelled": c.cancelled,
            "outputs": c.outputs,
            "outputs_after_cancel": c.outputs_after_cancel,
            "waiting_for_output": len(self._callbacks),
            "engine_active": self._active,
            "engine_waiting": self._waiting,
            "last_output_ns": c.last_output_ns,
            "kv_slots": self.config.max_batch_size,
            "max_len": self.config.max_len,
            "max_batch_tokens": self.config.max_batch_tokens,
            "dtype": self.config.dtype,
            "cuda_graphs": len(self._graphs),
            "prefills": c.prefills,
            "prefill_tokens": c.prefill_tokens,
            "prefill_s": round(c.prefill_s, 6),
            "decode_steps": c.decode_steps,
            "decode_rows": c.decode_rows,
            "decode_tokens": c.decode_tokens,
        }

    def stop(self) -> None:
        self._stopping = True
        self._post(("stop", None))
        self._thread.join(timeout=30)

    def _post(self, item: tuple[str, Any]) -> None:
        with self._wake:
            self._inbox.append(item)
            self._wake.notify()

    def _deliver(self, batch: list[tuple[str, EngineOutput]]) -> None:
        """On the event loop: hand each output to its request, unless it was cancelled meanwhile."""
        c = self._counters
        c.last_output_ns = time.time_ns()
        for request_id, out in batch:
            callback = self._callbacks.get(request_id)
            if callback is None:
                c.outputs_after_cancel += 1
                continue
            c.outputs += 1
            if out.finished or out.error is not None:
                del self._callbacks[request_id]
                if out.error is None:
                    c.finished += 1
                else:
                    c.failed += 1
            callback(out)

    # --- the generation thread ---

    def _run(self) -> None:
        torch = self._torch
        waiting: deque[_Request] = deque()
        running: dict[int, _Request] = {}  # slot -> request
        free = list(range(self.config.max_batch_size))
        heapq.heapify(free)
        try:
            if self._cuda:
                torch.cuda.set_device(self._cuda_index)
            with torch.inference_mode():
                while True:
                    with self._wake:
                        while not self._inbox and not waiting and not running:
                            self._wake.wait()
                        items = list(self._inbox)
                        self._inbox.clear()
                    for kind, item in items:
                        if kind == "stop":
                            return
                        if kind == "submit":
                            waiting.append(item)
                        else:
                            self._drop(item, waiting, running, free)
                    if waiting and free:
                        self._prefill(waiting, running, free)
                    if running:
                        self._decode(running, free)
                    self._active, self._waiting = len(running), len(waiting)
        except BaseException as exc:  # the thread must not die silently: fail everything it held
            self._fatal = f"{type(exc).__name__}: {exc}"
            log.error("graph_engine_died", error=self._fatal)
            lost = [*waiting, *running.values()]
            self._send([(r.id, EngineOutput(list(r.tokens), list(r.logprobs), True, self._fatal)) for r in lost])
            self._active = self._waiting = 0

    def _drop(self, request_id: str, waiting: deque[_Request], running: dict[int, _Request], free: list[int]) -> None:
        for r in waiting:
            if r.id == request_id:
                waiting.remove(r)
                return
        for slot, r in running.items():
            if r.id == request_id:
                del running[slot]
                heapq.heappush(free, slot)
                return

    def _send(self, batch: list[tuple[str, EngineOutput]]) -> None:
        if batch and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _prefill(self, waiting: deque[_Request], running: dict[int, _Request], free: list[int]) -> None:
        budget = self.config.max_batch_tokens
        group: list[_Request] = []
        while waiting and len(group) < len(free) and budget >= len(waiting[0].prompt):
            r = waiting.popleft()
            budget -= len(r.prompt)
            group.append(r)
        group.sort(key=lambda r: len(r.prompt))
        for r in group:
            r.slot = heapq.heappop(free)
        t0 = time.perf_counter()
        tokens, logprobs = self.model.prefill([r.prompt for r in group], [r.slot for r in group])
        c = self._counters
        c.prefill_s += time.perf_counter() - t0
        c.prefills += 1
        c.prefill_tokens += sum(len(r.prompt) for r in group)
        out = []
        for r, t, lp in zip(group, tokens, logprobs, strict=True):
            r.tokens.append(t)
            r.logprobs.append(lp)
            finished = r.done()
            out.append((r.id, EngineOutput(list(r.tokens), list(r.logprobs), finished)))
            if finished:
                heapq.heappush(free, r.slot)
            else:
                running[r.slot] = r
        self._send(out)

    def _decode(self, running: dict[int, _Request], free: list[int]) -> None:
        torch = self._torch
        m = self.model
        batch = bucket_for(max(running) + 1, self.batch_buckets)
        length = bucket_for(max(r.position for r in running.values()) + 1, self.length_buckets)
        tokens = [0] * batch
        positions = [0] * batch
        for slot, r in running.items():
            tokens[slot] = r.tokens[-1]
            positions[slot] = r.position
        m.in_tokens[:batch].copy_(torch.tensor(tokens), non_blocking=False)
        m.in_positions[:batch].copy_(torch.tensor(positions), non_blocking=False)
        graph = self._graphs.get((batch, length))
        if graph is not None:
            graph.replay()
        else:
            m.decode_step(batch, length)
        new_tokens = m.out_tokens[:batch].to("cpu").tolist()
        new_logprobs = m.out_logprobs[:batch].to("cpu").tolist()
        c = self._counters
        c.decode_steps += 1
        c.decode_rows += batch
        c.decode_tokens += len(running)
        out = []
        for slot in sorted(running):
            r = running[slot]
            r.tokens.append(new_tokens[slot])
            r.logprobs.append(new_logprobs[slot])
            finished = r.done()
            out.append((r.id, EngineOutput(list(r.tokens), list(r.logprobs), finished)))
            if finished:
                del running[slot]
                heapq.heappush(free, slot)
        self._send(out)
