"""A deterministic replay of a request trace on the simulated TGI and GPU, on a virtual clock: no sleeping.

Why. Ground truths such as the Shapley value of each tenant's traffic need the *same* trace served again and again
with parts of it left out, and exactly: the live simulator runs in real time and its asyncio timers jitter by a
millisecond. The replay drives the very scheduling core the live server uses (``sim.batching.BatchingCore``: TGI's
continuous-batching rules) and the same GPU model (``sim.gpu.SimGPU``: power, exact integral, NVML-like counter),
but jumps a virtual clock from event to event, so a replay takes milliseconds of CPU and always gives the same
picojoules.

Input: ``TraceRequest``s (arrival offset from the trace start, tenant, prompt tokens, new tokens; optionally a client
that leaves or a deadline, or a failure at prefill). Every request generates exactly ``new_tokens`` tokens unless it
fails or leaves. Requests arriving at the same nanosecond are queued together before the engine looks at the queue.
Ties between events at one instant go arrivals first, then clients leaving, then the step that ends.

Output (``Replay``): per request the ``meter.timeline.Timeline`` a gateway in front of the server would record (no
network delay: released when it arrived, first token and end as the engine produced them); the energy counter as a
10 Hz sampler would read it (``meter.attribution.CounterReading``s of ``SimGPU.counter``: 100 ms updates, the
config's lag, ``sample_jitter_ns`` of deterministic lateness per read); the exact energy over the window, and how
much of it was drawn while no step ran (idle); each request's true energy (``sim.ledger`` rules).
"""

from __future__ import annotations

import heapq
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from meter.attribution import CounterReading
from meter.timeline import Timeline
from sim import costmodel
from sim.batching import BatchingCore, BatchRequest, Step
from sim.config import SimConfig
from sim.generation import Markers, SequencePlan
from sim.generation import Sequence as TokenSequence
from sim.gpu import SimGPU

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
MODEL_ID = "sim-model"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace. Times are offsets from the trace's start, in ns."""

    request_id: str
    tenant: str
    arrival_ns: int
    prompt_tokens: int
    new_tokens: int  # max_new_tokens; generated in full unless the request fails or its client leaves
    cancel_after_ns: int | None = None  # the client goes away this long after arrival (status CANCELLED)
    deadline_after_ns: int | None = None  # the gateway gives up this long after arrival (DEADLINE_EXCEEDED)
    fail_at_prefill: bool = False  # the model fails before the first token (TGI: a generation error)

    def leave(self) -> tuple[int, str] | None:
        """(offset, status) of the earlier of the cancel and the deadline, if any."""
        options = [(self.cancel_after_ns, "CANCELLED"), (self.deadline_after_ns, "DEADLINE_EXCEEDED")]
        present = [(t, s) for t, s in options if t is not None]
        return min(present) if present else None


@dataclass(frozen=True, slots=True)
class Sampler:
    """When the meter reads the counter: every ``period_ns`` from ``phase_ns`` after the window's start, each read up
    to ``jitter_ns`` late (a deterministic draw from ``seed``), as a 10 Hz sampler thread would."""

    period_ns: int = 100 * NS_PER_MS
    phase_ns: int = 37 * NS_PER_MS
    jitter_ns: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.period_ns <= 0 or self.phase_ns < 0 or not 0 <= self.jitter_ns < self.period_ns:
            raise ValueError("the sampler needs period_ns > 0, phase_ns >= 0 and 0 <= jitter_ns < period_ns")


@dataclass(frozen=True, slots=True)
class Replay:
    """What one replay produced. ``energy_pj`` is the exact integral over [start_ns, end_ns]."""

    start_ns: int
    end_ns: int
    timelines: tuple[Timeline, ...]
    readings: tuple[CounterReading, ...]
    energy_pj: int
    idle_pj: int  # drawn while no step ran
    idle_power_mw: int
    truth_pj: Mapping[str, tuple[int, int]] = field(default_factory=lambda: MappingProxyType({}))  # (prefill, decode)
    last_activity_ns: int = 0  # when the last step ended (start_ns if none ran)
    prefill_steps: int = 0
    decode_steps: int = 0

    @property
    def busy_pj(self) -> int:
        """Energy drawn while steps ran: what the requests own (the sum of their true energy)."""
        return self.energy_pj - self.idle_pj

    @property
    def above_idle_pj(self) -> int:
        """Energy above the idle floor over the window: the work's own energy, whatever the window's length."""
        return self.energy_pj - self.idle_power_mw * (self.end_ns - self.start_ns)


def check_trace(trace: Sequence[TraceRequest], config: SimConfig) -> None:
    """Raise ValueError, naming the request, for anything TGI's validation would refuse or a replay cannot hold."""
    seen: set[str] = set()
    for r in trace:
        if r.request_id in seen:
            raise ValueError(f"request id {r.request_id!r} appears twice in the trace")
        seen.add(r.request_id)
        if r.arrival_ns < 0:
            raise ValueError(f"{r.request_id}: arrival_ns must be >= 0, got {r.arrival_ns}")
        if not 1 <= r.prompt_tokens <= config.max_input_tokens:
            raise ValueError(f"{r.request_id}: prompt_tokens must be within 1..{config.max_input_tokens}")
        if r.new_tokens < 1 or r.prompt_tokens + r.new_tokens > config.max_total_tokens:
            raise ValueError(f"{r.request_id}: new_tokens must be >= 1 and prompt + new <= {config.max_total_tokens}")
        for name in ("cancel_after_ns", "deadline_after_ns"):
            value = getattr(r, name)
            if value is not None and value < 0:
                raise ValueError(f"{r.request_id}: {name} must be >= 0, got {value}")


def replay(
    trace: Sequence[TraceRequest],
    config: SimConfig,
    *,
    start_ns: int,
    end_ns: int | None = None,
    sampler: Sampler | None = None,
    backend: str = "sim0",
    tail_ns: int = NS_PER_S,
) -> Replay:
    """Serve ``trace`` from ``start_ns`` (when the board powers on; arrivals are offsets from it) on a virtual clock.

    The window ends at ``end_ns`` or, if the work goes on longer (or ``end_ns`` is None), ``tail_ns`` after the last
    step. ``config.time_scale`` stretches steps as in the live simulator. ``sampler`` None: no counter readings.
    """
    check_trace(trace, config)
    gpu = SimGPU(config, f"sim:{backend}", t0_ns=start_ns)
    core = BatchingCore(config, gpu)
    order = sorted(trace, key=lambda r: (r.arrival_ns, r.request_id))
    requests: dict[str, BatchRequest] = {}
    statuses: dict[str, str] = {}
    leaves: list[tuple[int, str]] = []  # heap of (absolute time, request id)
    reads = _Reads(gpu, sampler, start_ns)
    never = 1 << 62

    steps = core.steps(start_ns)
    step: Step | None = next(steps)
    step_end = never
    last_activity = start_ns
    i = 0
    while True:
        t_arrival = start_ns + order[i].arrival_ns if i < len(order) else never
        t_leave = leaves[0][0] if leaves else never
        t = min(t_arrival, t_leave, step_end)
        if t == never:
            break
        reads.until(t)
        if t == t_arrival:
            while i < len(order) and start_ns + order[i].arrival_ns == t:
                r = order[i]
                i += 1
                request = _request(r, gpu, t)
                requests[r.request_id] = request
                core.submit(request)
                leave = r.leave()
                if leave is not None:
                    heapq.heappush(leaves, (t + leave[0], r.request_id))
                    statuses[r.request_id] = leave[1]
            if step is None:
                step = steps.send(t)
                step_end = t + step.duration_ns if step is not None else never
        elif t == t_leave:
            _, rid = heapq.heappop(leaves)
            request = requests[rid]
            if request.done:
                continue
            if core.cancel(request, t) and step is not None:  # the step lost its last request: it ends now
                last_activity = t
                step = steps.send(t)
                step_end = t + step.duration_ns if step is not None else never
        else:
            last_activity = t
            step = steps.send(t)
            step_end = t + step.duration_ns if step is not None else never

    window_end = max(last_activity + tail_ns, end_ns if end_ns is not None else start_ns)
    reads.until(window_end)
    energy_pj = gpu.energy_pj(window_end)
    truth = {rid: (req.account.prefill_pj, req.account.decode_pj) for rid, req in requests.items()}
    busy_pj = sum(p + d for p, d in truth.values())
    timelines = tuple(_timeline(r, requests[r.request_id], statuses, backend) for r in order)
    return Replay(
        start_ns=start_ns,
        end_ns=window_end,
        timelines=timelines,
        readings=tuple(reads.out),
        energy_pj=energy_pj,
        idle_pj=energy_pj - busy_pj,
        idle_power_mw=costmodel.idle_power_mw(config),
        truth_pj=MappingProxyType(truth),
        last_activity_ns=last_activity,
        prefill_steps=core.prefill_steps,
        decode_steps=core.decode_steps,
    )


class _Reads:
    """The sampler's reads, taken as the virtual clock passes them (the counter is read before later events)."""

    def __init__(self, gpu: SimGPU, sampler: Sampler | None, start_ns: int) -> None:
        self.gpu = gpu
        self.sampler = sampler
        self.out: list[CounterReading] = []
        self._k = 0
        self._rand = random.Random(sampler.seed if sampler is not None else 0)
        self._start_ns = start_ns
        self._next = self._time(0) if sampler is not None else None

    def _time(self, k: int) -> int:
        assert self.sampler is not None
        s = self.sampler
        jitter = self._rand.randrange(s.jitter_ns) if s.jitter_ns else 0
        return self._start_ns + s.phase_ns + k * s.period_ns + jitter

    def until(self, t_ns: int) -> None:
        while self._next is not None and self._next <= t_ns:
            self.out.append(CounterReading(t_ns=self._next, energy_mj=self.gpu.counter(self._next).energy_mj))
            self._k += 1
            self._next = self._time(self._k)


def _request(r: TraceRequest, gpu: SimGPU, now_ns: int) -> BatchRequest:
    plan = SequencePlan(
        max_new_tokens=r.new_tokens,
        stop=(),
        rng_seed=zlib.crc32(r.request_id.encode()),
        top_n_tokens=0,
        markers=Markers(error_after=0) if r.fail_at_prefill else Markers(),
    )
    account = gpu.open_account(r.request_id, r.prompt_tokens)
    return BatchRequest(r.request_id, r.prompt_tokens, r.new_tokens, TokenSequence(plan), account, now_ns)


def _timeline(r: TraceRequest, request: BatchRequest, statuses: dict[str, str], backend: str) -> Timeline:
    if request.cancelled:
        status = statuses.get(r.request_id, "CANCELLED")
    elif request.error is not None:
        status = "INTERNAL"  # the gateway's status for a generation error (common.errors.GenerationFailed)
    else:
        status = "OK"
    assert request.done_ns is not None, "every request ends in a replay"
    return Timeline(
        request_id=r.request_id,
        tenant=r.tenant,
        model_id=MODEL_ID,
        backend=backend,
        received_ns=request.queued_ns,
        released_ns=request.queued_ns,
        first_token_ns=request.first_token_ns,
        done_ns=request.done_ns,
        prompt_tokens=r.prompt_tokens,
        generated_tokens=len(request.tokens),
        status=status,
    )
