"""Hypothesis strategies and a small continuous-batching engine for the attribution tests.

Two kinds of input:

- *arbitrary* timelines, readings and policies (``timelines``, ``readings``, ``policies``), for properties that must
  hold for every input (conservation, order independence, locality, decode monotonicity);
- *physical* schedules from ``simulate`` — a TGI-like engine (a prefill step for every request that arrived during
  the previous step, otherwise one decode step for all running requests) with a piecewise-constant power trace
  (prefill 650 W, decode 250-450 W by batch size, idle 80 W). The engine knows the true energy of every step and who
  it served, so a test can compare attributions from an exact or an NVML-like counter against the truth.

All engine times are whole milliseconds and powers whole watts, so the true counter is an exact integer in mJ.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate

from hypothesis import strategies as st

from meter.attribution import AttributionPolicy, CounterReading
from meter.timeline import Timeline

T0_NS = 1_764_000_000_000_000_000  # a 2025 wall-clock epoch: realistic magnitudes, beyond float's exact integers
MS = 1_000_000
US = 1_000

# ---------------------------------------------------------------------------------------------------------------
# Arbitrary inputs


@st.composite
def timeline(draw: st.DrawFn, request_id: str, span_us: int = 3_000_000, on_gpu: bool | None = None) -> Timeline:
    """One request somewhere in [T0, T0 + span]; ``on_gpu`` None: sometimes unreleased or without a backend."""
    kind = "ok" if on_gpu else draw(st.sampled_from(["ok", "ok", "ok", "no_first_token", "unreleased", "no_backend"]))
    if on_gpu is False:
        kind = draw(st.sampled_from(["unreleased", "no_backend"]))
    received = T0_NS + draw(st.integers(0, span_us)) * US
    released = received + draw(st.integers(0, 200_000)) * US
    first = released + draw(st.integers(0, 400_000)) * US
    done = first + draw(st.integers(0, 2_000_000)) * US
    prompt = draw(st.integers(0, 4000))
    generated = draw(st.integers(0, 300))
    if kind == "unreleased":
        return Timeline(request_id, "t", "m", None, received, None, None, received + (done - released), prompt, 0)
    # A request without a first token failed at prefill, was abandoned (its client left) or was refused.
    status = "OK"
    if kind == "no_first_token":
        status = draw(st.sampled_from(["INTERNAL", "CANCELLED", "DEADLINE_EXCEEDED", "OK", "INVALID_ARGUMENT"]))
    return Timeline(
        request_id,
        "t",
        "m",
        None if kind == "no_backend" else "b0",
        received,
        released,
        None if kind == "no_first_token" else first,
        done,
        prompt,
        0 if kind == "no_first_token" else generated,
        status=status,
    )


@st.composite
def timelines(draw: st.DrawFn, max_size: int = 12, span_us: int = 3_000_000) -> list[Timeline]:
    n = draw(st.integers(0, max_size))
    return [draw(timeline(f"r{j:03d}", span_us)) for j in range(n)]


@st.composite
def readings(draw: st.DrawFn, min_size: int = 2, max_size: int = 40, span_us: int = 3_000_000) -> list[CounterReading]:
    """Strictly increasing times (any spacing), non-decreasing counter (any increments, zero included)."""
    n = draw(st.integers(min_size, max_size))
    t_us = T0_NS // US + draw(st.integers(-300_000, span_us // 2))
    energy_mj = draw(st.integers(0, 10**12))
    out = [CounterReading(t_us * US, energy_mj)]
    for _ in range(n - 1):
        t_us += draw(st.integers(1, 400_000))
        energy_mj += draw(st.one_of(st.just(0), st.integers(0, 300_000)))
        out.append(CounterReading(t_us * US, energy_mj))
    return out


@st.composite
def policies(draw: st.DrawFn) -> AttributionPolicy:
    return AttributionPolicy(
        lag_ns=draw(st.integers(0, 250)) * MS,
        prefill_tokens_per_s=draw(st.floats(500.0, 100_000.0)),
        prefill_overhead_ns=draw(st.integers(0, 20_000)) * US,
        prefill_power_ratio=draw(st.floats(0.25, 5.0)),
        prefill_ratio_per_1k_tokens=draw(st.one_of(st.just(0.0), st.floats(0.0, 2.0))),
        idle_power_w=draw(st.one_of(st.none(), st.floats(0.0, 300.0))),
        batch_tolerance_ns=draw(st.integers(0, 5_000)) * US,
        abandoned_step_completes=draw(st.booleans()),
        abandoned_step_max_ns=draw(st.sampled_from([0, 30 * MS, 2_000 * MS])),
        prefill_chunk_tokens=draw(st.sampled_from([None, 64, 2048])),
    )


# ---------------------------------------------------------------------------------------------------------------
# A physical engine


PREFILL_W = 650
IDLE_W = 80
ENGINE_TOKENS_PER_S = 20_000  # 20 prompt tokens per ms: prompts are multiples of 20, so prefill steps are whole ms
ENGINE_OVERHEAD_MS = 5


def decode_w(batch: int) -> int:
    """Memory-bound decode: 250 W alone, up to 450 W at a batch of 32 and more."""
    return 250 + (200 * min(batch, 32)) // 32


def decode_step_ms(batch: int) -> int:
    return 20 + batch // 4


@dataclass(frozen=True, slots=True)
class Arrival:
    request_id: str
    at_ms: int  # after the engine's start
    prompt_tokens: int  # a multiple of 20
    generated_tokens: int  # >= 1
    fate: str = "ok"  # "ok"; "fail": an error at the end of its prefill step; "refuse": validation, no GPU work;
    # "leave": its client leaves `leave_ms` after its release (queued: it never runs; in a step: it leaves the step)
    leave_ms: int = 0


@dataclass(frozen=True, slots=True)
class Step:
    start_ns: int
    end_ns: int
    power_w: int
    kind: str  # "prefill", "decode", "idle"
    shares: dict[str, float]  # who the step served, summing to 1 (empty when idle)

    @property
    def energy_mj(self) -> int:
        return self.power_w * (self.end_ns - self.start_ns) // MS  # W x ms = mJ, exact


@dataclass(slots=True)
class Schedule:
    """What the engine did: contiguous steps from ``start_ns`` to ``end_ns`` and the timelines it produced."""

    steps: list[Step]
    timelines: list[Timeline]
    start_ns: int
    end_ns: int
    _cum_mj: list[int] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._starts = [s.start_ns for s in self.steps]
        self._cum_mj = [0, *accumulate(s.energy_mj for s in self.steps)]

    def energy_mj_at(self, t_ns: int) -> int:
        """The exact cumulative energy at ``t_ns`` (whole ms); 0 before the start, flat after the end."""
        if t_ns <= self.start_ns:
            return 0
        if t_ns >= self.end_ns:
            return self._cum_mj[-1]
        k = bisect_right(self._starts, t_ns) - 1
        step = self.steps[k]
        return self._cum_mj[k] + step.power_w * (t_ns - step.start_ns) // MS

    def true_mj(self) -> dict[str, float]:
        """Each request's true energy: every step's energy split by who it served."""
        out = {tl.request_id: 0.0 for tl in self.timelines}
        for step in self.steps:
            for rid, share in step.shares.items():
                out[rid] += step.energy_mj * share
        return out

    def jumps(self) -> dict[str, list[tuple[int, float]]]:
        """Each request's share of the GPU as a step function: (time, |change|) at every change."""
        out: dict[str, list[tuple[int, float]]] = {tl.request_id: [] for tl in self.timelines}
        prev: dict[str, float] = {}
        for step in [*self.steps, Step(self.end_ns, self.end_ns, 0, "idle", {})]:
            for rid in prev.keys() | step.shares.keys():
                change = abs(step.shares.get(rid, 0.0) - prev.get(rid, 0.0))
                if change > 1e-12:
                    out[rid].append((step.start_ns, change))
            prev = step.shares
        return out

    def engine_policy(self, lag_ns: int) -> AttributionPolicy:
        """The policy whose prefill estimate matches this engine exactly (which cuts a step where a request leaves:
        ``abandoned_step_completes`` off)."""
        return AttributionPolicy(
            lag_ns=lag_ns,
            prefill_tokens_per_s=float(ENGINE_TOKENS_PER_S),
            prefill_overhead_ns=ENGINE_OVERHEAD_MS * MS,
            prefill_power_ratio=2.0,
            batch_tolerance_ns=2 * MS,
            abandoned_step_completes=False,
        )


def simulate(arrivals: list[Arrival], lead_ms: int = 1000, tail_ms: int = 1500) -> Schedule:
    """Run a TGI-like continuous-batching engine over ``arrivals``; idle ``lead_ms`` before and ``tail_ms`` after.

    Fates, as the simulator (``sim/``) treats them: a refused request never reaches the engine; a failing one is
    prefilled with its step and ends at the step's end without a token; a request whose client leaves while queued
    never runs, and one that leaves during a step leaves it then (the others finish it; a step left empty ends).
    """
    start_ns = T0_NS
    todo = sorted(arrivals, key=lambda a: (a.at_ms, a.request_id))
    released = {a.request_id: start_ns + (lead_ms + a.at_ms) * MS for a in todo}
    by_id = {a.request_id: a for a in todo}
    leave = {a.request_id: released[a.request_id] + a.leave_ms * MS for a in todo if a.fate == "leave"}
    first: dict[str, int] = {}
    done: dict[str, int] = {}
    status: dict[str, str] = {}
    steps: list[Step] = []
    queue: list[str] = []
    running: dict[str, int] = {}  # request id -> tokens still to generate
    t = start_ns
    nxt = 0

    def run_step(kind: str, members: list[str], dur_ns: int) -> list[str]:
        """Steps from t on for ``members``, split where one leaves; returns those left at the end."""
        nonlocal t
        end = t + dur_ns
        present = list(members)
        for rid in sorted((r for r in members if r in leave and t < leave[r] < end), key=lambda r: leave[r]):
            cut = leave[rid]
            steps.append(_step(kind, present, t, cut))
            t = cut
            present.remove(rid)
            done[rid], status[rid] = cut, "CANCELLED"
            if not present:
                return []  # a step its requests all left ends there
        steps.append(_step(kind, present, t, end))
        t = end
        return present

    def _step(kind: str, members: list[str], a: int, b: int) -> Step:
        if kind == "prefill":
            tokens = sum(by_id[r].prompt_tokens for r in members)
            shares = {r: (by_id[r].prompt_tokens / tokens if tokens else 1 / len(members)) for r in members}
            return Step(a, b, PREFILL_W, "prefill", shares)
        return Step(a, b, decode_w(len(members)), "decode", dict.fromkeys(members, 1 / len(members)))

    while nxt < len(todo) or queue or running:
        while nxt < len(todo) and released[todo[nxt].request_id] <= t:
            rid = todo[nxt].request_id
            nxt += 1
            if by_id[rid].fate == "refuse":
                done[rid], status[rid] = released[rid] + MS, "INVALID_ARGUMENT"
            else:
                queue.append(rid)
        for rid in [r for r in queue if r in leave and leave[r] <= t]:  # left while queued: it never ran
            queue.remove(rid)
            done[rid], status[rid] = leave[rid], "CANCELLED"
        if queue:
            tokens = sum(by_id[r].prompt_tokens for r in queue)
            dur_ns = ENGINE_OVERHEAD_MS * MS + tokens * MS // (ENGINE_TOKENS_PER_S // 1000)
            members, queue = queue, []
            for r in run_step("prefill", members, dur_ns):
                if by_id[r].fate == "fail":
                    done[r], status[r] = t, "INTERNAL"
                    continue
                first[r] = t
                if by_id[r].generated_tokens == 1:
                    done[r], status[r] = t, "OK"
                else:
                    running[r] = by_id[r].generated_tokens - 1
        elif running:
            members = list(running)
            kept = run_step("decode", members, decode_step_ms(len(members)) * MS)
            for r in members:
                if r not in kept:
                    del running[r]  # left during the step
            for r in kept:
                running[r] -= 1
                if running[r] == 0:
                    del running[r]
                    done[r], status[r] = t, "OK"
        elif nxt < len(todo):
            nxt_t = released[todo[nxt].request_id]
            steps.append(Step(t, nxt_t, IDLE_W, "idle", {}))
            t = nxt_t
    end_ns = max(t, *done.values()) + tail_ms * MS if done else t + tail_ms * MS
    if end_ns > t:
        steps.append(Step(t, end_ns, IDLE_W, "idle", {}))
    tls = [
        Timeline(
            a.request_id,
            "adversary" if a.fate != "ok" else "t",
            "m",
            "b0",
            released[a.request_id],
            released[a.request_id],
            first.get(a.request_id),
            done[a.request_id],
            a.prompt_tokens,
            a.generated_tokens if a.request_id in first else 0,
            status=status[a.request_id],
        )
        for a in todo
    ]
    return Schedule(steps, tls, start_ns, end_ns)


@st.composite
def arrivals(draw: st.DrawFn, max_requests: int = 20, fates: tuple[str, ...] = ("ok",)) -> list[Arrival]:
    """Bursts and stragglers: gaps of 0 (same burst) to 1.5 s; prompts up to 2,000 tokens; up to 160 new tokens.

    ``fates``: what may happen to a request besides finishing (``Arrival.fate``); a leaving client leaves 1-300 ms
    after its release (in the queue, during its prefill, or while it decodes)."""
    n = draw(st.integers(1, max_requests))
    at_ms = 0
    out = []
    for j in range(n):
        at_ms += draw(st.one_of(st.just(0), st.integers(0, 60), st.integers(0, 1500)))
        fate = draw(st.sampled_from(fates))
        out.append(
            Arrival(
                f"q{j:03d}",
                at_ms,
                20 * draw(st.integers(0, 100)),
                draw(st.one_of(st.integers(1, 8), st.integers(1, 160))),
                fate,
                draw(st.integers(1, 300)) if fate == "leave" else 0,
            )
        )
    return out


@st.composite
def adversary_beside_decoders(draw: st.DrawFn) -> list[Arrival]:
    """Issue 8's adversaries next to a tenant that decodes: 1-4 neighbours (``n*``) arrive together and decode
    100-160 tokens (2-4 s); while they do, an adversary (``a*``) sends, one at a time (400-600 ms apart, so each of
    its prefills is a step of its own), requests that fail at prefill, leave 1-200 ms after release (a tiny deadline
    or a cancel: in the queue or during the prefill), are refused, or are huge prompts with one new token."""
    out = [
        Arrival(f"n{j}", 0, 20 * draw(st.integers(0, 25)), draw(st.integers(100, 160)))
        for j in range(draw(st.integers(1, 4)))
    ]
    at_ms = 0
    for j in range(draw(st.integers(1, 4))):
        at_ms += draw(st.integers(400, 600))
        fate = draw(st.sampled_from(["fail", "leave", "leave", "refuse", "ok"]))
        prompt = 20 * draw(st.integers(30, 150))  # 600-3,000 tokens
        leave_ms = draw(st.integers(1, 200)) if fate == "leave" else 0
        out.append(Arrival(f"a{j}", at_ms, prompt, 1 if fate == "ok" else 20, fate, leave_ms))
    return out


@dataclass(frozen=True, slots=True)
class NvmlCounter:
    """How an H100's counter is seen: updates every ~100 ms, each showing the energy up to ``lag`` before it."""

    phase_ms: int  # first update after the start
    update_jitter_ms: tuple[int, ...]  # per update, within +-3 ms (measured 97-103 ms periods)
    read_jitter_ms: tuple[int, ...]  # per read, when the sampler's tick actually read
    true_lag_ms: int

    def read(self, schedule: Schedule, first_read_ms: int = 300) -> tuple[list[CounterReading], list[int]]:
        """Readings every ~100 ms from ``first_read_ms`` until near the end, and each reading's content time.

        A reading at ``t`` shows the value frozen at the last update ``u <= t``: the true energy up to ``u - lag``.
        """
        updates_ns = [
            schedule.start_ns + (self.phase_ms + 100 * k + self.update_jitter_ms[k % len(self.update_jitter_ms)]) * MS
            for k in range((schedule.end_ns - schedule.start_ns) // (100 * MS) + 1)
        ]
        out: list[CounterReading] = []
        content_ns: list[int] = []
        m = 0
        while True:
            t_ns = (
                schedule.start_ns + (first_read_ms + 100 * m + self.read_jitter_ms[m % len(self.read_jitter_ms)]) * MS
            )
            if t_ns > schedule.end_ns - 50 * MS:
                break
            k = bisect_right(updates_ns, t_ns) - 1
            tau_ns = (updates_ns[k] if k >= 0 else schedule.start_ns) - self.true_lag_ms * MS
            out.append(CounterReading(t_ns, schedule.energy_mj_at(tau_ns)))
            content_ns.append(tau_ns)
            m += 1
        return out, content_ns


@st.composite
def nvml_counters(draw: st.DrawFn) -> NvmlCounter:
    return NvmlCounter(
        phase_ms=draw(st.integers(0, 99)),
        update_jitter_ms=tuple(draw(st.lists(st.integers(-3, 3), min_size=1, max_size=7))),
        read_jitter_ms=tuple(draw(st.lists(st.integers(-15, 15), min_size=1, max_size=7))),
        true_lag_ms=draw(st.integers(0, 200)),
    )


def fine_readings(schedule: Schedule, every_ms: int = 1) -> list[CounterReading]:
    """An exact counter read every ``every_ms`` with no lag: the ideal instrument."""
    n = (schedule.end_ns - schedule.start_ns) // (every_ms * MS)
    return [
        CounterReading(t, schedule.energy_mj_at(t))
        for t in (schedule.start_ns + k * every_ms * MS for k in range(n + 1))
    ]


def misplacement_bound_mj(
    assumed_ns: list[int], content_ns: list[int], counter_mj: list[int], jumps: list[tuple[int, float]]
) -> float:
    """Bound on |attributed - true| for one request, for any reading grid, lag and counter freeze.

    Reading interval i carries E_i, the true energy of its content window I'_i = [content_i, content_{i+1}], but is
    split as if it were the energy of the assumed window I_i = [assumed_i, assumed_{i+1}]. The request gets E_i times
    a (power-weighted) average of its share s(t) over I_i, while it truly owns the integral of p(t) s(t) over I'_i.
    The two differ by at most E_i times the oscillation of s over the hull H_i of I_i and I'_i, and that oscillation
    is at most the sum of |jumps| of s inside H_i. Summing over intervals:
        |error| <= sum over jumps e of |jump_e| * M(e),   M(e) = sum of E_i over the intervals whose H_i holds e.
    M(e) is the energy of the few readings around an edge: at most max power x (2 x the longest interval + 2 x the
    worst misalignment between assumed and content time), e.g. 650 W x (2 x 200 ms + 2 x 65 ms) ~ 345 J.
    """
    h_start = [min(a, c) for a, c in zip(assumed_ns[:-1], content_ns[:-1], strict=True)]
    h_end = [max(a, c) for a, c in zip(assumed_ns[1:], content_ns[1:], strict=True)]
    energy = [counter_mj[i + 1] - counter_mj[i] for i in range(len(counter_mj) - 1)]
    prefix = [0, *accumulate(energy)]
    bound = 0.0
    for t_ns, change in jumps:
        lo = bisect_left(h_end, t_ns)  # h_end and h_start never decrease, so the intervals holding t are a range
        hi = bisect_right(h_start, t_ns)
        if hi > lo:
            bound += change * (prefix[hi] - prefix[lo])
    return bound


def window_ns(tl: Timeline) -> int:
    assert tl.released_ns is not None
    return tl.done_ns - tl.released_ns


def rel(a: float, b: float) -> float:
    return abs(a - b) / b if b else (0.0 if a == 0 else math.inf)
