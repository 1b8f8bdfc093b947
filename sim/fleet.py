"""Several simulated backends behind one placement policy, on a virtual clock: what a fleet would have drawn.

``sim.replay`` serves a trace on one backend; this serves it on ``backends`` of them, each its own
``sim.batching.BatchingCore`` (TGI's continuous batching) and ``sim.gpu.SimGPU`` (power, exact integral), with the
gateway's placement (``common.placement.choose``, the very function ``proxy.backends.BackendPool`` calls) deciding
which backend takes each request at the instant it is released to the fleet; requests that shaping released
together (held, same class, same release instant) go to one backend, as the gateway sends a released batch
(``choose_batch``). A request that finds every backend
full waits in a FIFO at the gateway until a slot frees. No sleeping: a few thousand requests take a second of CPU.

Every backend is measured over the same window (the first arrival's power-on to ``tail_ns`` after the last step on
any backend), so idle floors compare. ``parked`` backends are those that took no request in the window: with
``FleetResult.bill_pj(park=True)`` their idle floor is taken off, as if an autoscaler had scaled them in for the whole
window (no cold start paid: they never woke).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common import placement
from sim import costmodel
from sim.batching import BatchingCore, BatchRequest, Step, Steps
from sim.config import SimConfig
from sim.gpu import SimGPU
from sim.replay import TraceRequest, _request

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class FleetRequest:
    """One request: offsets from the trace's start, in ns. ``release_ns`` (>= arrival): when shaping hands it to
    the fleet (None: at arrival)."""

    request_id: str
    arrival_ns: int
    prompt_tokens: int
    new_tokens: int
    traffic_class: str = ""
    release_ns: int | None = None

    @property
    def released_ns(self) -> int:
        return self.arrival_ns if self.release_ns is None else max(self.arrival_ns, self.release_ns)


@dataclass(frozen=True, slots=True)
class Served:
    """What happened to one request, as offsets from the trace's start."""

    request_id: str
    backend: int
    arrival_ns: int
    released_ns: int
    first_token_ns: int
    done_ns: int
    generated_tokens: int

    @property
    def ttft_ns(self) -> int:
        """From arrival at the gateway (holding included) to the first token."""
        return self.first_token_ns - self.arrival_ns


@dataclass(frozen=True, slots=True)
class BackendEnergy:
    energy_pj: int  # exact integral over the window
    idle_pj: int  # drawn while no step ran
    requests: int


@dataclass(frozen=True, slots=True)
class FleetResult:
    window_ns: int
    idle_power_mw: int
    backends: tuple[BackendEnergy, ...]
    served: tuple[Served, ...]
    peak_backends_busy: int  # the most backends holding requests at one instant

    @property
    def energy_pj(self) -> int:
        return sum(b.energy_pj for b in self.backends)

    @property
    def idle_pj(self) -> int:
        return sum(b.idle_pj for b in self.backends)

    @property
    def floor_pj(self) -> int:
        """What the fleet would have drawn idling all window."""
        return self.idle_power_mw * self.window_ns * len(self.backends)

    @property
    def above_floor_pj(self) -> int:
        """Energy above the idle floor: the work's own, whatever the window's length."""
        return self.energy_pj - self.floor_pj

    @property
    def parked(self) -> int:
        return sum(1 for b in self.backends if b.requests == 0)

    def bill_pj(self, *, park: bool = False) -> int:
        """The fleet's energy over the window; ``park``: less the idle floor of the backends that took nothing."""
        if not park:
            return self.energy_pj
        return sum(b.energy_pj for b in self.backends if b.requests > 0)

    @property
    def generated_tokens(self) -> int:
        return sum(s.generated_tokens for s in self.served)


@dataclass
class _Backend:
    core: BatchingCore
    gpu: SimGPU
    steps: Steps
    step: Step | None
    step_end: int
    on: list[tuple[BatchRequest, int]]  # (request, its prompt + new tokens) not yet done
    taken: int = 0

    def load(self, max_concurrent: int) -> placement.Load:
        outstanding = sum(total - len(r.tokens) for r, total in self.on)
        starting = sum(1 for r, _ in self.on if r.first_token_ns is None)
        return placement.Load(len(self.on), outstanding, max(0, max_concurrent - len(self.on)), starting=starting)


def serve(
    trace: Sequence[FleetRequest],
    config: SimConfig,
    *,
    backends: int,
    policy: placement.Policy = "spread",
    pack_target: int = 7,
    spill_on_prefill: bool = False,
    start_ns: int = 0,
    end_ns: int | None = None,
    tail_ns: int = NS_PER_S,
) -> FleetResult:
    """Serve ``trace`` on ``backends`` simulated backends under ``policy``; see the module's docstring. The window
    is [start_ns, max(end_ns, tail_ns after the last step)]."""
    if backends < 1:
        raise ValueError(f"backends must be >= 1, got {backends}")
    never = 1 << 62
    fleet: list[_Backend] = []
    for k in range(backends):
        gpu = SimGPU(config, f"sim:fleet{k}", t0_ns=start_ns)
        core = BatchingCore(config, gpu)
        gen = core.steps(start_ns)
        fleet.append(_Backend(core, gpu, gen, next(gen), never, []))
    order = sorted(trace, key=lambda r: (r.released_ns, r.arrival_ns, r.request_id))
    arrival = {r.request_id: r.arrival_ns for r in trace}
    released: dict[str, int] = {}
    placed: dict[str, tuple[int, BatchRequest]] = {}
    waiting: list[FleetRequest] = []
    limit = config.max_concurrent_requests
    last_activity = start_ns
    peak = 0
    i = 0

    def place(now: int) -> None:
        nonlocal peak
        while waiting:
            group = _released_together(waiting)
            loads = [b.load(limit) for b in fleet]
            if len(group) > 1:  # the gateway puts a released batch on one backend (BackendPool.try_acquire_batch)
                k = placement.choose_batch(policy, loads, pack_target=pack_target, spill_on_prefill=spill_on_prefill)
            else:
                k = placement.choose(policy, loads, pack_target=pack_target, spill_on_prefill=spill_on_prefill)
            if k is None:
                return
            b = fleet[k]
            for r in group[: loads[k].free_slots]:
                waiting.pop(0)
                tr = TraceRequest(r.request_id, r.traffic_class, 0, r.prompt_tokens, r.new_tokens)
                request = _request(tr, b.gpu, now)
                b.core.submit(request)
                b.on.append((request, r.prompt_tokens + r.new_tokens))
                b.taken += 1
                placed[r.request_id] = (k, request)
                released[r.request_id] = now - start_ns
            peak = max(peak, sum(1 for x in fleet if x.on))
        for b in fleet:
            if b.step is None:
                b.step = b.steps.send(now)
                b.step_end = now + b.step.duration_ns if b.step is not None else never

    while True:
        t_release = start_ns + order[i].released_ns if i < len(order) else never
        t_step = min(b.step_end for b in fleet)
        t = min(t_release, t_step)
        if t == never:
            break
        if t == t_step:
            for b in fleet:
                if b.step_end == t:
                    last_activity = t
                    b.step = b.steps.send(t)
                    b.step_end = t + b.step.duration_ns if b.step is not None else never
                    b.on = [(r, n) for r, n in b.on if not r.done]
            place(t)  # a freed slot takes the next waiting request
        else:
            while i < len(order) and start_ns + order[i].released_ns == t:
                waiting.append(order[i])
                i += 1
            place(t)

    if waiting:
        raise RuntimeError(f"{len(waiting)} requests never found a backend")  # cannot happen: steps free slots
    window_end = max(last_activity + tail_ns, end_ns if end_ns is not None else start_ns)
    idle_mw = costmodel.idle_power_mw(config)
    out_backends = []
    for k, b in enumerate(fleet):
        energy = b.gpu.energy_pj(window_end)
        busy = sum(r.account.prefill_pj + r.account.decode_pj for kk, r in placed.values() if kk == k)
        out_backends.append(BackendEnergy(energy_pj=energy, idle_pj=energy - busy, requests=b.taken))
    served = []
    for r in trace:
        k, request = placed[r.request_id]
        assert request.first_token_ns is not None and request.done_ns is not None
        served.append(
            Served(
                request_id=r.request_id,
                backend=k,
                arrival_ns=arrival[r.request_id],
                released_ns=released[r.request_id],
                first_token_ns=request.first_token_ns - start_ns,
                done_ns=request.done_ns - start_ns,
                generated_tokens=len(request.tokens),
            )
        )
    return FleetResult(
        window_ns=window_end - start_ns,
        idle_power_mw=idle_mw,
        backends=tuple(out_backends),
        served=tuple(served),
        peak_backends_busy=peak,
    )


def _released_together(waiting: Sequence[FleetRequest]) -> list[FleetRequest]:
    """The head of the queue and the requests behind it that shaping released with it: a held request (released
    after its arrival) and those of its class released at the same instant."""
    head = waiting[0]
    if head.release_ns is None or head.release_ns <= head.arrival_ns:
        return [head]
    group = [head]
    for r in waiting[1:]:
        if r.release_ns != head.release_ns or r.traffic_class != head.traffic_class or r.release_ns <= r.arrival_ns:
            break
        group.append(r)
    return group


def hold_windows(
    trace: Sequence[FleetRequest], window_ns: int, classes: frozenset[str] | None = None
) -> list[FleetRequest]:
    """Window shaping: a request of ``classes`` (None: every class) arriving while no window is open opens one of
    ``window_ns``; every request of those classes that arrives in it is released at its end, together (the
    ``window`` shaper's rule, without its size cap). Others are released at arrival. Pure."""
    if window_ns < 0:
        raise ValueError(f"window_ns must be >= 0, got {window_ns}")
    out: list[FleetRequest] = []
    closes: dict[str, int] = {}  # per class: when its open window closes
    for r in sorted(trace, key=lambda r: (r.arrival_ns, r.request_id)):
        if window_ns == 0 or (classes is not None and r.traffic_class not in classes):
            out.append(FleetRequest(r.request_id, r.arrival_ns, r.prompt_tokens, r.new_tokens, r.traffic_class))
            continue
        close = closes.get(r.traffic_class)
        if close is None or r.arrival_ns >= close:
            close = closes[r.traffic_class] = r.arrival_ns + window_ns
        out.append(FleetRequest(r.request_id, r.arrival_ns, r.prompt_tokens, r.new_tokens, r.traffic_class, close))
    return out


@dataclass(frozen=True, slots=True)
class Parking:
    saving_pj: int  # idle floor not paid while parked, less the wakes (negative: parking lost)
    parked_backends: int  # backends parked at least once
    wakes: int


def parking(result: FleetResult, *, park_after_ns: int, wake_pj: int) -> Parking:
    """What parking would have saved over the window: every backend idle (no request placed on it) for longer than
    ``park_after_ns`` is parked for the rest of that idle spell, so its idle floor is not paid, and pays ``wake_pj``
    (the cold start you assume: loading the weights, warming up) when work comes back before the window ends.
    Negative when the wakes cost more than the parked time saved. The TTFT of the request that wakes a parked backend
    (its cold start) is not modelled: an autoscaler must wake ahead of the load. Pure."""
    if park_after_ns < 0 or wake_pj < 0:
        raise ValueError("park_after_ns and wake_pj must be >= 0")
    saving = wakes = parked = 0
    for k in range(len(result.backends)):
        spans = sorted((s.released_ns, s.done_ns) for s in result.served if s.backend == k)
        busy_until = 0
        gaps: list[tuple[int, bool]] = []  # (length, ends with a wake)
        for start, end in spans:
            if start > busy_until:
                gaps.append((start - busy_until, True))
            busy_until = max(busy_until, end)
        gaps.append((max(0, result.window_ns - busy_until), False))
        spells = [(length, wake) for length, wake in gaps if length > park_after_ns]
        parked += bool(spells)
        for length, wake in spells:
            saving += (length - park_after_ns) * result.idle_power_mw - (wake_pj if wake else 0)
            wakes += wake
    return Parking(saving, parked, wakes)
