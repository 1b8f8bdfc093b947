"""Split a backend's measured counter energy into per-request, per-phase millijoules plus an idle bucket.

This is the contract every energy report relies on. It is a pure function of (counter readings of one backend,
request timelines of that backend, policy); it does no I/O and keeps no state.

The model
=========

Time. A counter reading taken at wall-clock ``t`` shows the energy the GPUs had spent up to about ``t - lag``
(NVML's counter advances every ~100 ms and trails the work by about one update). Every reading is therefore moved
back by ``policy.lag_ns`` into *work time*; the span covered is ``[t_first - lag, t_last - lag]``. Reading interval
``i`` is ``[t_i - lag, t_{i+1} - lag]`` and carries ``E_i = energy_{i+1} - energy_i`` millijoules.

What a request was doing. Only requests that made their backend's GPU work own energy (``Timeline.on_gpu``, the
billing rule of ``meter.timeline``: released to a backend and not refused by it); every such timeline passed in is
taken to have run on the backend the readings belong to. A request's on-GPU window is ``[released_ns, done_ns]``,
cut into three phases around the end of its prefill step, ``prefill_end`` (``Timeline.prefill_end_ns``): its first
token, or, for a request that ended without one (it failed at prefill, was cancelled, hit its deadline), the moment
it ended:

- *prefill step* ``[max(released, prefill_end - est), prefill_end]``. TGI prefills the requests that joined the
  running batch together, in one step that ends with their first tokens, so
  ``est = prefill_overhead_ns + (prompt tokens of the requests of its step) / prefill_tokens_per_s``. The requests of
  one step are those whose prefill_end is within ``batch_tolerance_ns`` of this one's, and, among requests whose
  prefill_end is a step's end (a first token or a generation failure), chains of them each of which ended less than
  half its own shortest step (``prefill_overhead_ns + its prompt / prefill_tokens_per_s``) after the previous one:
  the GPU runs one prefill step at a time, so a request that ended that soon after another cannot have had a step of
  its own after it; its first token came in late (on a loaded host the gateway reads two first tokens of one step
  milliseconds apart, past any fixed tolerance, and each alone would get a step far shorter than the one it shared);
- *wait* ``[released, prefill step start)``: released to TGI, queued there for its prefill;
- *decode* ``(first_token, done]``; a request without a first token has no decode.

Abandoned prefills. A request that ends without a first token owns the prefill step the engine ran for it. A
generation failure (``INTERNAL``) comes at the end of its step, like a first token: its step is estimated as any
other, ending when it ended. A request whose client left (``Timeline.abandoned_prefill``: cancelled, past its
deadline, a time limit) left at an unknown point, and may have spent the start of its window in the backend's queue
behind the decode step in progress. The requests with known steps in the same span show the backend's queue waits
(from release to step, counting only waits that no other known prefill overlaps). One that left before its wait was
over never ran (an engine drops a request whose client left from its queue); one that left later was in its step,
and an engine does not stop a forward pass (TGI filters the request out after the step, vLLM and SGLang abort it
between steps). Which of the two it was nobody saw, so with ``abandoned_step_completes`` (the default) the request
is billed the step it would have run *at the chance that it began*: the share of the waits shorter than its window.
Its step starts after the median of those waits and runs that share of its estimated length, past the leaving if
need be (``done`` moves there, at most ``abandoned_step_max_ns`` later: the engine bills that tail in the epochs it
falls in and seals the request after them): the whole step when every wait was shorter, none (its window is
waiting) when none was, the whole step from its release when the span shows no wait at all (the abandoning request
bears the doubt). This removes the cliff of a threshold: under the rule before ("began after the median wait, else
never"), a client leaving just before the median was billed nothing for the steps that did run. The bill is a
chance, not a fact: per tenant it is right only on average (40 cancels 4-12 ms after sending: about half ran, so
the true cost itself varies by some 20 % with which did), and the split of a reading interval between a shortened
step and decode leans the step's way (in such a probe against the simulator the abandoning tenant was billed -9 ...
+31 % against its cost over eight runs, with the rule before +17 and +29 % in two). Without
``abandoned_step_completes`` the step is taken to have been cut when the request left (ending then, as with the
simulator's ``finish_step_on_cancel`` off), after the median wait; one that left before it has no step.
Cut at the leaving on an engine that completes the step, the rest of the step went to the requests decoding beside
it: in ``tests/integration/test_billing_adversaries.py`` the abandoning tenant was billed a third under its cost and
its decoding neighbour three quarters over. A long prompt that an engine prefills in chunks (vLLM, SGLang, TGI 3
with chunking) completes only the chunk in flight: with ``prefill_chunk_tokens`` set (per backend), the step runs at
most one chunk's estimated length past the leaving; without it, a prompt longer than a chunk would be billed chunks
that never ran.

Who owns an instant. At every instant the energy goes to exactly one class, by precedence:

1. the requests in a prefill step, shared in proportion to prompt tokens (equally if all have zero);
2. else the requests in decode, shared equally (a decode step produces one token for each);
3. else the requests waiting for their prefill (the GPU is held for them), shared in proportion to prompt tokens
   like the prefill they wait for (equally if all have zero), booked as prefill — shared by the same rule as the
   step, so that a longer prompt, which turns some of that wait into prefill step, never costs its request less;
4. else idle.

Within one reading interval. Power is taken as uniform over the interval except that a prefill instant weighs ``w =
prefill_power_ratio + prefill_ratio_per_1k_tokens x (prompt tokens in the step) / 1000`` times an instant of any
other class (a compute-bound step draws more the more tokens it has to fill the GPU with: a 20-token prefill draws
far less than a 2,000-token one; ``meter.engine.calibrate`` fits both terms from the counter): ``E_i`` is split over
the interval's pieces in proportion to ``duration x (w if prefill else 1)``. If ``idle_power_w`` is set, the idle
pieces first get ``min(E_i, idle_power_w x idle duration)`` and the rest goes to the active pieces by the same
weights (all of it to idle if the interval has no active piece). The ratio matters only in an interval holding
prefill together with other classes; intervals that hold a single class need no power model at all.

Integers. Each request's share is a float sum over intervals; the floats are turned into integer millijoules by a
largest-remainder split of ``counter_mj`` over (each request's total, idle), ties broken by request id, then each
request's integer total is split into prefill and decode by rounding its prefill float. Hence, for every input,
``sum(prefill_mj + decode_mj) + idle_mj == counter_mj`` exactly, every request's total is within 1 mJ of its exact
share, and the result does not depend on the order of the inputs.

Guarantees (tests/test_attribution.py holds the implementation to them):

- conservation to the millijoule, for every input; adjacent spans add up to their union (each integer within 1 mJ
  of its exact share, so per request within 2 mJ) where no request abandoned its prefill: the backend's queue wait
  that places an abandoned prefill's step is measured on the requests released within the span, so it may differ
  between a span and its halves (the engine attributes whole epochs);
- identical requests served together get totals within 1 mJ; the result is independent of input order;
- locality: a lone request gets every interval inside its window; an interval touching no request is all idle;
- a longer decode never costs less (for every input); more prompt tokens in a shared prefill never cost less when
  power is constant, ``prefill_power_ratio >= 1`` and the span holds the batch's windows (with an arbitrary counter
  a small-prompt request can lose a few mJ, because the longer estimated step turns shared wait into prefill; and
  a request whose first token came less than half the longer step earlier joins that step, and its prefill window,
  which ends at its own first token, opens a sliver before the batch's that it owns alone: a few mJ);
- stability: against an ideal counter (exact, every 1 ms), an NVML-like one (100 ms updates, frozen values, lag)
  misplaces at most, per request, the sum over the jumps of its GPU share of |jump| x the energy of the readings
  around the jump (~ max power x (2 x interval + 2 x alignment error)). Use ``drop_stale_readings`` on GPU counters.

Cost. One sweep over the sorted request and reading boundaries (O((n_requests + n_readings) log)), then prefix sums
of "energy per unit share" per class, so a request's share is read off at its own boundaries: no loop over
readings x requests. About 0.25 s for 10,000 requests over 1,000 readings in CPython 3.11 on a shared 2-core host.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from types import MappingProxyType
from typing import NamedTuple, cast

from common.errors import ConservationError
from meter.timeline import Timeline

__all__ = [
    "Attribution",
    "AttributionPolicy",
    "CounterReading",
    "PhaseEnergy",
    "RequestPhases",
    "attribute",
    "drop_stale_readings",
    "request_phases",
]

_NS_PER_S = 1_000_000_000
_MJ_PER_W_NS = 1e-6  # 1 W for 1 ns is 1e-9 J = 1e-6 mJ

# Class codes of an elementary segment (precedence order).
_PREFILL_TOKENS = 0  # prefill step, shared by prompt tokens
_PREFILL_EQUAL = 1  # prefill step whose members all have zero prompt tokens, shared equally
_DECODE = 2
_WAIT_TOKENS = 3  # waiting for a prefill, shared by prompt tokens
_WAIT_EQUAL = 4  # waiting, all with zero prompt tokens: shared equally
_IDLE = 5


@dataclass(frozen=True, slots=True)
class CounterReading:
    """One sampler tick of one backend: the sum of its GPUs' cumulative energy counters."""

    t_ns: int  # when the reading was taken (wall clock, time.time_ns())
    energy_mj: int  # cumulative, non-decreasing within a segment


@dataclass(frozen=True, slots=True)
class AttributionPolicy:
    """The tunable assumptions of the model (see the module docstring); reports print the policy they used."""

    lag_ns: int = 100_000_000  # the counter shows energy spent at t at about t + lag; readings are shifted back by it
    prefill_tokens_per_s: float = 20_000.0  # to estimate how long a prefill step took (it ends at the first token)
    prefill_overhead_ns: int = 5_000_000
    prefill_power_ratio: float = 2.0  # prefill draws this many times decode power; splits an interval holding both
    # ...plus this much per 1,000 prompt tokens in the step: a small prefill does not fill the GPU and draws less
    prefill_ratio_per_1k_tokens: float = 0.0
    idle_power_w: float | None = None  # power when nothing runs; None: split partly idle intervals by time
    batch_tolerance_ns: int = 2_000_000  # first tokens this close together came out of one prefill step
    # A client that leaves during its prefill step: True, the engine runs the step to its end (a forward pass is not
    # stopped: TGI, vLLM and SGLang drop the request after it), so the request owns the whole step; False, the step
    # was cut when it left (the simulator's old rule), so it owns the step up to then.
    abandoned_step_completes: bool = True
    # ...and runs at most this long past the leaving: the engine looks this far back for requests whose step may
    # reach into an epoch (``EngineSettings.reach_ns``), so a longer estimate (a mis-set prefill_tokens_per_s, a
    # batch of huge prompts) cannot make it wait on, or bill, work from arbitrarily far back.
    abandoned_step_max_ns: int = 2_000_000_000
    # The engine prefills long prompts in chunks of this many tokens (vLLM's max_num_batched_tokens, SGLang's
    # chunked_prefill_size, TGI 3 with chunking): a client that leaves mid-prefill stops it after the chunk in flight,
    # so its step runs at most one chunk's estimated length past the leaving. None: in one step (TGI without it).
    prefill_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.lag_ns < 0:
            raise ValueError(f"lag_ns must be >= 0, got {self.lag_ns}")
        if not self.prefill_tokens_per_s > 0 or math.isinf(self.prefill_tokens_per_s):
            raise ValueError(f"prefill_tokens_per_s must be positive and finite, got {self.prefill_tokens_per_s}")
        if self.prefill_overhead_ns < 0:
            raise ValueError(f"prefill_overhead_ns must be >= 0, got {self.prefill_overhead_ns}")
        if not self.prefill_power_ratio > 0 or math.isinf(self.prefill_power_ratio):
            raise ValueError(f"prefill_power_ratio must be positive and finite, got {self.prefill_power_ratio}")
        if not self.prefill_ratio_per_1k_tokens >= 0 or math.isinf(self.prefill_ratio_per_1k_tokens):
            raise ValueError(
                f"prefill_ratio_per_1k_tokens must be >= 0 and finite, got {self.prefill_ratio_per_1k_tokens}"
            )
        if self.idle_power_w is not None and (not self.idle_power_w >= 0 or math.isinf(self.idle_power_w)):
            raise ValueError(f"idle_power_w must be None or >= 0 and finite, got {self.idle_power_w}")
        if self.batch_tolerance_ns < 0:
            raise ValueError(f"batch_tolerance_ns must be >= 0, got {self.batch_tolerance_ns}")
        if self.abandoned_step_max_ns < 0:
            raise ValueError(f"abandoned_step_max_ns must be >= 0, got {self.abandoned_step_max_ns}")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be None or >= 1, got {self.prefill_chunk_tokens}")

    @property
    def step_past_leaving_ns(self) -> int:
        """How long an abandoned prefill's step may run on after its client left: at most ``abandoned_step_max_ns``,
        and with chunked prefill at most one chunk."""
        if self.prefill_chunk_tokens is None:
            return self.abandoned_step_max_ns
        chunk_ns = self.prefill_overhead_ns + round(self.prefill_chunk_tokens * _NS_PER_S / self.prefill_tokens_per_s)
        return min(self.abandoned_step_max_ns, chunk_ns)

    @property
    def past_done_ns(self) -> int:
        """How long after its recorded end a request may still own work: an abandoned prefill's step runs on
        (``abandoned_step_completes``) up to ``abandoned_step_max_ns``; every other request's work ends at its end."""
        return self.abandoned_step_max_ns if self.abandoned_step_completes else 0


class PhaseEnergy(NamedTuple):
    """One request's energy inside one attributed span (a named tuple, cheap to build: one per request and span)."""

    prefill_mj: int  # prefill steps plus the time the GPU was held for it while it waited for its prefill
    decode_mj: int
    active_ns: int  # time the request was on the GPU inside the span (weight for sharing idle energy later)

    @property
    def total_mj(self) -> int:
        return self.prefill_mj + self.decode_mj


@dataclass(frozen=True, slots=True)
class Attribution:
    """Where the counter energy of one span of one backend went. ``attributed_mj + idle_mj == counter_mj``."""

    start_ns: int  # span covered, in work time (first reading time minus lag)
    end_ns: int  # last reading time minus lag
    counter_mj: int  # last reading minus first reading
    idle_mj: int
    requests: Mapping[str, PhaseEnergy] = field(default_factory=lambda: MappingProxyType({}))  # by request_id

    @property
    def attributed_mj(self) -> int:
        return sum(p.prefill_mj + p.decode_mj for p in self.requests.values())


class RequestPhases(NamedTuple):
    """Where one request's phases begin and end in work time (the model above): wait [released, prefill_start),
    prefill step [prefill_start, prefill_end], decode (prefill_end, done] if it ``decodes``. A named tuple: one is
    built per request and span, and a frozen dataclass costs several times more to build."""

    request_id: str
    released_ns: int
    done_ns: int
    prefill_start_ns: int  # end of the wait, start of the prefill step
    prefill_end_ns: int  # end of the prefill step: the first token, or the end of a request that got none
    decodes: bool  # it got a first token: (prefill_end, done] is decode
    prompt_tokens: int  # the tokens its prefill computed (``Timeline.computed_tokens``): what its share is weighed by
    # An abandoned prefill whose client left within the backend's queue waits: the chance that its step had begun
    # (the share of the waits shorter than its window); its step is billed at that share of its length. 1 otherwise.
    step_share: float = 1.0


def attribute(
    readings: Sequence[CounterReading],
    timelines: Iterable[Timeline],
    policy: AttributionPolicy = AttributionPolicy(),  # frozen, so one shared default is safe
) -> Attribution:
    """Split the energy between the first and last reading over the timelines, per the module's model.

    ``readings`` are one segment of one backend: strictly increasing in time, counter non-decreasing (split at
    counter resets and decide about failed reads before calling). Raises ValueError otherwise, and for two different
    timelines with the same request id. Fewer than two readings give an empty attribution.
    """
    _check_readings(readings)
    lag_ns = policy.lag_ns
    requests = request_phases(timelines, policy, since_ns=readings[0].t_ns - lag_ns if readings else None)
    if len(readings) < 2:
        start_ns = readings[0].t_ns - lag_ns if readings else 0
        return Attribution(start_ns=start_ns, end_ns=start_ns, counter_mj=0, idle_mj=0)

    bounds_ns = [r.t_ns - lag_ns for r in readings]
    span_start_ns, span_end_ns = bounds_ns[0], bounds_ns[-1]
    counter_mj = readings[-1].energy_mj - readings[0].energy_mj

    pre_f, dec_f, idle_f = _float_shares(readings, bounds_ns, requests, policy)

    # Requests that touch the span: they were active in it or got energy from it.
    ids: list[str] = []
    totals_f: list[float] = []
    active: dict[str, int] = {}
    for req in requests:
        active_ns = max(0, min(req.done_ns, span_end_ns) - max(req.released_ns, span_start_ns))
        total = pre_f[req.request_id] + dec_f[req.request_id]
        if active_ns > 0 or total > 0:
            ids.append(req.request_id)
            totals_f.append(total)
            active[req.request_id] = active_ns

    ints = _largest_remainder([*totals_f, idle_f], counter_mj, [*ids, None])
    out: dict[str, PhaseEnergy] = {}
    for rid, total_f, total_mj in zip(ids, totals_f, ints, strict=False):
        pre = pre_f[rid]
        prefill_mj = min(total_mj, max(0, math.floor(pre + 0.5))) if total_f > 0 else total_mj
        out[rid] = PhaseEnergy(prefill_mj=prefill_mj, decode_mj=total_mj - prefill_mj, active_ns=active[rid])
    return Attribution(
        start_ns=span_start_ns,
        end_ns=span_end_ns,
        counter_mj=counter_mj,
        idle_mj=ints[-1],
        requests=MappingProxyType(out),
    )


def drop_stale_readings(readings: Sequence[CounterReading]) -> list[CounterReading]:
    """Keep the first reading and each reading that shows a new counter value; drop repeats.

    NVML's counter updates every ~100 ms and a 10 Hz sampler drifts against it, so now and then two reads land
    between the same two updates: the second repeats the first. Attributed as it stands, that pair claims "no energy
    was spent over ~100 ms" and the next interval carries ~200 ms of energy in ~100 ms of work time, which misplaces a
    short prefill step by up to a whole interval. Dropping the repeat joins the two intervals, whose ends are then
    reads taken just after an update. A GPU never draws 0 W, so a repeat means "not updated", not "no energy". The
    span then ends at the last reading that showed a new value. Use it on GPU counters, not on sources that really
    can stand still.
    """
    out: list[CounterReading] = []
    for r in readings:
        if not out or r.energy_mj != out[-1].energy_mj:
            out.append(r)
    return out


def _check_readings(readings: Sequence[CounterReading]) -> None:
    for i in range(1, len(readings)):
        prev, cur = readings[i - 1], readings[i]
        if cur.t_ns <= prev.t_ns:
            raise ValueError(
                f"readings must be sorted and strictly increasing in time: reading {i} at t_ns={cur.t_ns} "
                f"is not after reading {i - 1} at t_ns={prev.t_ns}"
            )
        if cur.energy_mj < prev.energy_mj:
            raise ValueError(
                f"energy counter decreased from {prev.energy_mj} mJ (reading {i - 1}, t_ns={prev.t_ns}) to "
                f"{cur.energy_mj} mJ (reading {i}, t_ns={cur.t_ns}): a counter reset; split the readings into "
                "segments at resets and attribute each separately"
            )


def request_phases(
    timelines: Iterable[Timeline], policy: AttributionPolicy, *, since_ns: int | None = None
) -> list[RequestPhases]:
    """The requests that can own energy (``Timeline.on_gpu``), with their phase boundaries, sorted by request id.
    ``since_ns``: where the span begins that ``timelines`` hold every request of (the queue wait is measured only on
    requests released since: before it, what delayed them may be missing). Raises ValueError for two different
    timelines with the same request id."""
    by_id: dict[str, Timeline] = {}
    for tl in timelines:
        seen = by_id.get(tl.request_id)
        if seen is not None and seen != tl:
            raise ValueError(f"two different timelines for request {tl.request_id!r}")
        by_id[tl.request_id] = tl
    live = [by_id[rid] for rid in sorted(by_id) if by_id[rid].on_gpu]

    # One prefill step serves every request whose prefill ends within the tolerance of this one's.
    ends: dict[str, int] = {}
    for tl in live:
        end = tl.prefill_end_ns
        assert end is not None  # on_gpu
        ends[tl.request_id] = end
    with_end = sorted((ends[tl.request_id], tl.computed_tokens) for tl in live)
    end_ns = [f for f, _ in with_end]
    prefix_tokens = [0]
    for _, p in with_end:
        prefix_tokens.append(prefix_tokens[-1] + p)
    tol_ns = policy.batch_tolerance_ns
    step_tokens = _step_tokens([tl for tl in live if not tl.abandoned_prefill], ends, policy)
    est: dict[str, int] = {}
    for tl in live:
        end = ends[tl.request_id]
        batch_tokens = (
            prefix_tokens[bisect_right(end_ns, end + tol_ns)] - prefix_tokens[bisect_left(end_ns, end - tol_ns)]
        )
        batch_tokens = max(batch_tokens, step_tokens.get(tl.request_id, 0))
        est[tl.request_id] = policy.prefill_overhead_ns + round(batch_tokens * _NS_PER_S / policy.prefill_tokens_per_s)

    waits = _queue_waits_ns(live, ends, est, since_ns)
    median_wait_ns = waits[(len(waits) - 1) // 2] if waits else 0

    past_leaving_ns = policy.step_past_leaving_ns
    out: list[RequestPhases] = []
    for tl in live:
        released_ns = tl.released_ns
        assert released_ns is not None  # on_gpu
        end = ends[tl.request_id]
        done = tl.done_ns
        step_ns, share, earliest = est[tl.request_id], 1.0, released_ns
        if tl.abandoned_prefill and policy.abandoned_step_completes:
            share, wait_ns = _started(waits, done - released_ns)
            earliest = min(end, released_ns + wait_ns)
            if earliest < end:
                # Its step began after the backend's queue wait and ran its length (at the chance that it began at
                # all), past the client's leaving if need be; one that had not begun by then never ran: the engine
                # drops a request whose client left from its queue.
                step_ns = round(step_ns * share)
                end = done = max(end, min(earliest + step_ns, done + past_leaving_ns))
        elif tl.abandoned_prefill:
            earliest = min(end, released_ns + median_wait_ns)
        out.append(
            RequestPhases(
                tl.request_id,
                released_ns,
                done,
                max(earliest, end - step_ns),
                end,
                tl.first_token_ns is not None,
                tl.computed_tokens,
                share,
            )
        )
    return out


def _started(waits_ns: list[int], window_ns: int) -> tuple[float, int]:
    """For a request whose client left ``window_ns`` after its release, given the backend's queue waits (sorted):
    the chance that its step had begun (the share of the waits shorter than its window) and, if it had, the wait
    it likely had (their median). No wait measured: it began at once (the abandoning request bears the doubt)."""
    if not waits_ns:
        return 1.0, 0
    k = bisect_left(waits_ns, window_ns)
    if k == 0:
        return 0.0, window_ns
    return k / len(waits_ns), waits_ns[(k - 1) // 2]


def _step_tokens(known: list[Timeline], ends: dict[str, int], policy: AttributionPolicy) -> dict[str, int]:
    """The prompt tokens of the step of each request whose prefill end is a step's end (``known``), grouping into one
    step every chain of them each of which ended less than half its own shortest step after the previous one (it
    cannot have had a step of its own) or within the batch tolerance."""
    order = sorted(known, key=lambda tl: (ends[tl.request_id], tl.request_id))
    groups: list[list[Timeline]] = []
    prev_end: int | None = None
    for tl in order:
        end = ends[tl.request_id]
        shortest_ns = policy.prefill_overhead_ns + tl.computed_tokens * _NS_PER_S / policy.prefill_tokens_per_s
        if prev_end is not None and (end - prev_end <= policy.batch_tolerance_ns or 2 * (end - prev_end) < shortest_ns):
            groups[-1].append(tl)
        else:
            groups.append([tl])
        prev_end = end
    out: dict[str, int] = {}
    for group in groups:
        tokens = sum(tl.computed_tokens for tl in group)
        for tl in group:
            out[tl.request_id] = tokens
    return out


def _queue_waits_ns(live: list[Timeline], ends: dict[str, int], est: dict[str, int], since_ns: int | None) -> list[int]:
    """How long a request waits in the backend's queue before its prefill step begins when no other prefill is ahead
    of it (the hand-over, the backend's validation, the rest of the decode step in progress): the waits, sorted, of
    the requests with a first token from release to step, counting only waits that no other prefill overlaps (a
    known step, or the window of an abandoned prefill, whose step lies somewhere in it). Waits behind other
    prefills stay out: they are long under congestion, and what an abandoned request waited behind another prefill
    is that prefill's step, shared in the model anyway."""
    # Known steps, and the whole windows of abandoned prefills (their step lies somewhere in them).
    steps = sorted(
        (cast(int, tl.released_ns), tl.done_ns)  # an abandoned prefill was released
        if tl.abandoned_prefill
        else (ends[tl.request_id] - est[tl.request_id], ends[tl.request_id])
        for tl in live
    )
    starts: list[int] = []
    stops: list[int] = []
    for a, b in steps:  # their union, as disjoint sorted intervals
        if stops and a <= stops[-1]:
            stops[-1] = max(stops[-1], b)
        else:
            starts.append(a)
            stops.append(b)
    waits = []
    for tl in live:
        if tl.first_token_ns is None:
            continue
        released = tl.released_ns
        assert released is not None
        if since_ns is not None and released < since_ns:
            continue  # what it waited behind may be outside the timelines given
        step_start = ends[tl.request_id] - est[tl.request_id]
        if step_start <= released:
            waits.append(0)
            continue
        k = bisect_right(starts, released) - 1  # the last of them starting at or before the release
        if (k >= 0 and stops[k] > released) or bisect_left(starts, step_start) > k + 1:
            continue  # another prefill ran while it waited
        waits.append(step_start - released)
    waits.sort()
    return waits


def _float_shares(
    readings: Sequence[CounterReading],
    bounds_ns: list[int],
    requests: list[RequestPhases],
    policy: AttributionPolicy,
) -> tuple[dict[str, float], dict[str, float], float]:
    """Exact (float) prefill and decode shares per request, and idle, by one sweep over the sorted boundaries."""
    # Deltas of the running state at each boundary: waiting count, prefill tokens, prefill count, decode count,
    # waiting tokens.
    deltas: dict[int, list[int]] = {}

    def bump(t_ns: int, slot: int, by: int) -> None:
        d = deltas.get(t_ns)
        if d is None:
            d = deltas[t_ns] = [0, 0, 0, 0, 0]
        d[slot] += by

    zero = (0, 0, 0, 0, 0)
    for req in requests:
        for t_ns in (req.released_ns, req.prefill_start_ns, req.done_ns):
            if t_ns not in deltas:  # every boundary a share is read at must be a sweep time
                deltas[t_ns] = list(zero)
        if req.prefill_start_ns > req.released_ns:
            bump(req.released_ns, 0, 1)
            bump(req.prefill_start_ns, 0, -1)
            bump(req.released_ns, 4, req.prompt_tokens)
            bump(req.prefill_start_ns, 4, -req.prompt_tokens)
        end = req.prefill_end_ns
        if end > req.prefill_start_ns:
            bump(req.prefill_start_ns, 1, req.prompt_tokens)
            bump(req.prefill_start_ns, 2, 1)
            bump(end, 1, -req.prompt_tokens)
            bump(end, 2, -1)
        if end not in deltas:
            deltas[end] = list(zero)
        if req.decodes and req.done_ns > end:
            bump(end, 3, 1)
            bump(req.done_ns, 3, -1)
    for t_ns in bounds_ns:
        if t_ns not in deltas:
            deltas[t_ns] = list(zero)
    times = sorted(deltas)
    n_times = len(times)
    span_start_ns, span_end_ns = bounds_ns[0], bounds_ns[-1]

    # Pass 1: the elementary segments inside the span (class, divisor, duration, interval), and per interval the
    # weighted active duration and the idle duration.
    ratio = policy.prefill_power_ratio
    ratio_per_token = policy.prefill_ratio_per_1k_tokens / 1000
    n_intervals = len(bounds_ns) - 1
    active_w = [0.0] * n_intervals
    idle_ns = [0] * n_intervals
    seg_first: list[int] = []  # index into times where the segment starts
    seg_class: list[int] = []
    seg_div: list[int] = []
    seg_weight: list[float] = []  # power weight of the segment's instants (against 1 for decode or wait)
    seg_interval: list[int] = []
    waiting = prefill_tokens = prefilling = decoding = waiting_tokens = 0
    interval = -1
    for k in range(n_times - 1):
        t0 = times[k]
        d = deltas[t0]
        waiting += d[0]
        prefill_tokens += d[1]
        prefilling += d[2]
        decoding += d[3]
        waiting_tokens += d[4]
        if t0 < span_start_ns or t0 >= span_end_ns:
            continue
        if interval + 1 < n_intervals and t0 >= bounds_ns[interval + 1]:
            interval += 1  # every reading time is in `times`, so intervals advance one at a time
        dur_ns = times[k + 1] - t0
        weight = 1.0
        if prefilling:
            cls, div = (_PREFILL_TOKENS, prefill_tokens) if prefill_tokens else (_PREFILL_EQUAL, prefilling)
            weight = ratio + ratio_per_token * prefill_tokens
            active_w[interval] += weight * dur_ns
        elif decoding:
            cls, div = _DECODE, decoding
            active_w[interval] += dur_ns
        elif waiting:
            cls, div = (_WAIT_TOKENS, waiting_tokens) if waiting_tokens else (_WAIT_EQUAL, waiting)
            active_w[interval] += dur_ns
        else:
            cls, div = _IDLE, 1
            idle_ns[interval] += dur_ns
        seg_first.append(k)
        seg_class.append(cls)
        seg_div.append(div)
        seg_weight.append(weight)
        seg_interval.append(interval)

    # Energy per unit weight, per interval, for active and idle pieces.
    idle_power_w = policy.idle_power_w
    rho_active = [0.0] * n_intervals
    rho_idle = [0.0] * n_intervals
    for i in range(n_intervals):
        e_mj = readings[i + 1].energy_mj - readings[i].energy_mj
        a_w, i_ns = active_w[i], idle_ns[i]
        if idle_power_w is None or a_w == 0 or i_ns == 0:
            rho = e_mj / (a_w + i_ns)
            rho_active[i] = rho_idle[i] = rho
        else:
            idle_mj = min(float(e_mj), idle_power_w * i_ns * _MJ_PER_W_NS)
            rho_idle[i] = idle_mj / i_ns
            rho_active[i] = (e_mj - idle_mj) / a_w

    # Pass 2: energy per unit share of each segment, then prefix sums per class, indexed like `times`.
    # prefill per token, prefill per request, decode, wait per token, wait per request
    inc = [[0.0] * n_times for _ in range(5)]
    idle_total = 0.0
    for k, cls, div, weight, i in zip(seg_first, seg_class, seg_div, seg_weight, seg_interval, strict=True):
        dur_ns = times[k + 1] - times[k]
        if cls == _IDLE:
            idle_total += rho_idle[i] * dur_ns
        else:
            inc[cls][k + 1] = rho_active[i] * weight * dur_ns / div
    c_tok, c_eq, c_dec, c_wait_tok, c_wait_eq = (list(accumulate(x)) for x in inc)

    index = {t: k for k, t in enumerate(times)}
    prefill: dict[str, float] = {}
    decode: dict[str, float] = {}
    for req in requests:
        k_rel, k_pre = index[req.released_ns], index[req.prefill_start_ns]
        if req.prompt_tokens:
            pre = req.prompt_tokens * (c_wait_tok[k_pre] - c_wait_tok[k_rel])
        else:
            pre = c_wait_eq[k_pre] - c_wait_eq[k_rel]
        k_end = index[req.prefill_end_ns]
        if req.prompt_tokens:
            pre += req.prompt_tokens * (c_tok[k_end] - c_tok[k_pre])
        else:
            pre += c_eq[k_end] - c_eq[k_pre]
        dec = c_dec[index[req.done_ns]] - c_dec[k_end] if req.decodes else 0.0
        prefill[req.request_id] = max(0.0, pre)
        decode[req.request_id] = max(0.0, dec)
    return prefill, decode, max(0.0, idle_total)


def _largest_remainder(shares: list[float], total: int, keys: list[str | None]) -> list[int]:
    """Integers that sum to ``total`` exactly, each the floor or ceiling of its (non-negative) float share.

    The units left over after flooring go to the largest fractional parts; ties go to the smaller key, with
    ``None`` (the idle bucket) last, so the result does not depend on input order.
    """
    floors = [math.floor(s) for s in shares]
    left = total - sum(floors)
    if left == 0:
        return floors

    def tie(j: int) -> tuple[int, str]:
        key = keys[j]
        return (1, "") if key is None else (0, key)

    if left > 0:
        order = sorted(range(len(shares)), key=lambda j: (floors[j] - shares[j], tie(j)))
        n = len(order)
        for step in range(left):  # more than one round only if the floats drifted by a whole unit per bucket
            floors[order[step % n]] += 1
    else:
        order = sorted(range(len(shares)), key=lambda j: (shares[j] - floors[j], tie(j)))
        need = -left
        while need:
            took = False
            for j in order:
                if need and floors[j] > 0:
                    floors[j] -= 1
                    need -= 1
                    took = True
            if not took:
                raise ConservationError("cannot conserve energy: shares exceed the counter")  # unreachable for E >= 0
    return floors
