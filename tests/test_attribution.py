"""meter.attribution: hand-computed examples, and the properties the energy reports rely on (hypothesis).

Examples use lag 0 and readings every 100 ms from T0 unless said otherwise; their expected numbers are worked out
in the comments from the model in meter/attribution.py.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meter.attribution import (
    Attribution,
    AttributionPolicy,
    CounterReading,
    PhaseEnergy,
    attribute,
    drop_stale_readings,
    request_phases,
)
from meter.timeline import Timeline
from tests.attribution_strategies import (
    MS,
    PREFILL_W,
    T0_NS,
    NvmlCounter,
    adversary_beside_decoders,
    arrivals,
    decode_step_ms,
    decode_w,
    fine_readings,
    misplacement_bound_mj,
    nvml_counters,
    policies,
    readings,
    rel,
    simulate,
    timeline,
    timelines,
    window_ns,
)
from tests.attribution_strategies import Arrival as EngineArrival

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def ms(x: float) -> int:
    return T0_NS + round(x * MS)


def tl(
    rid: str,
    released_ms: float | None,
    first_ms: float | None,
    done_ms: float,
    prompt: int = 0,
    generated: int = 10,
    backend: str | None = "b0",
    status: str = "OK",
) -> Timeline:
    rel_ns = None if released_ms is None else ms(released_ms)
    received = ms(0) if rel_ns is None else rel_ns
    return Timeline(
        rid,
        "t",
        "m",
        backend,
        received,
        rel_ns,
        None if first_ms is None else ms(first_ms),
        ms(done_ms),
        prompt,
        generated,
        status=status,
    )


def grid(increments_mj: list[int], every_ms: float = 100, offset_ms: float = 0) -> list[CounterReading]:
    out = [CounterReading(ms(offset_ms), 1_000_000)]
    for k, e in enumerate(increments_mj, start=1):
        out.append(CounterReading(ms(offset_ms + k * every_ms), out[-1].energy_mj + e))
    return out


LAG0 = AttributionPolicy(lag_ns=0)
Policy = AttributionPolicy


def check_conserved(a: Attribution) -> None:
    assert a.attributed_mj + a.idle_mj == a.counter_mj
    assert a.idle_mj >= 0
    for p in a.requests.values():
        assert p.prefill_mj >= 0 and p.decode_mj >= 0 and p.active_ns >= 0


def total(a: Attribution, rid: str) -> int:
    p = a.requests.get(rid)
    return 0 if p is None else p.total_mj


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed examples


def test_one_request():
    # 10 W: 1000 mJ per 100 ms over 1 s. Prompt 0 -> est = 5 ms overhead: prefill [200, 205], decode (205, 700].
    # Interval [200, 300]: prefill 5 ms x ratio 2 = 10, decode 95 -> 1000 * 10/105 = 95.24 prefill, 904.76 decode.
    # Intervals [300, 700]: 4000 decode. Idle: [0, 200] and [700, 1000] = 5000.
    a = attribute(grid([1000] * 10), [tl("a", 200, 205, 700)], LAG0)
    assert a.counter_mj == 10_000 and a.start_ns == ms(0) and a.end_ns == ms(1000)
    assert a.requests == {"a": PhaseEnergy(prefill_mj=95, decode_mj=4905, active_ns=500 * MS)}
    assert a.idle_mj == 5000
    assert a.requests["a"].total_mj == 5000 and a.attributed_mj == 5000


def test_lag_moves_readings_back_into_work_time():
    # The same counter seen 150 ms late: with lag 150 ms the result is identical to the example above.
    late = grid([1000] * 10, offset_ms=150)
    a = attribute(late, [tl("a", 200, 205, 700)], AttributionPolicy(lag_ns=150 * MS))
    assert (a.start_ns, a.end_ns, a.idle_mj) == (ms(0), ms(1000), 5000)
    assert a.requests["a"] == PhaseEnergy(95, 4905, 500 * MS)
    # Ignoring the lag puts the work 150 ms late in the counter: [150, 250] now holds the 5 ms prefill, 45 ms of
    # decode and 50 ms of idle -> 1000 * 55/105 = 523.8; [250, 650] 4000; [650, 750] half -> 500. Total 5023.8.
    b = attribute(late, [tl("a", 200, 205, 700)], LAG0)
    assert b.start_ns == ms(150) and b.requests["a"].total_mj == 5024


def test_two_overlapping_decoders():
    # No prefill windows (overhead 0, prompt 0). A decodes (0, 400], B decodes (200, 550]; 3000 mJ per interval.
    # [0, 200]: A alone 6000. [200, 400]: shared, 3000 each. [400, 500]: B 3000. [500, 600]: B 50 ms, idle 50 ms.
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=0)
    a = attribute(grid([3000] * 6), [tl("A", 0, 0, 400), tl("B", 200, 200, 550)], pol)
    assert a.requests["A"] == PhaseEnergy(0, 9000, 400 * MS)
    assert a.requests["B"] == PhaseEnergy(0, 7500, 350 * MS)
    assert a.idle_mj == 1500


def test_prefill_interrupts_decode():
    # Overhead 10 ms, 10,000 tokens/s, ratio 2. A: released 0, prompt 0 -> prefill [0, 10], decode (10, 200].
    # B: released 40, first token 80, 200 tokens -> est 10 + 20 = 30 ms: wait [40, 50] (A's decode wins it),
    # prefill [50, 80], decode (80, 200]. Interval [0, 100] (6000 mJ), weights: A prefill 10x2, A decode 40,
    # B prefill 30x2, both decode 20 -> 140; 6000/140 = 300/7 per unit. A: prefill 6000/7 = 857.14, decode
    # (40 + 10) * 300/7 = 2142.86. B: prefill 18000/7 = 2571.43, decode 428.57. Interval [100, 200] (4000): 2000 each.
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=10 * MS, prefill_tokens_per_s=10_000.0)
    a = attribute(grid([6000, 4000]), [tl("A", 0, 10, 200), tl("B", 40, 80, 200, prompt=200)], pol)
    assert a.requests["A"] == PhaseEnergy(857, 4143, 200 * MS)
    assert a.requests["B"] == PhaseEnergy(2571, 2429, 160 * MS)
    assert a.idle_mj == 0


def test_idle_gaps_with_and_without_idle_power():
    # A decodes (150, 250] (no prefill window). Increments 1000, 5000, 1000 mJ.
    timelines_ = [tl("A", 150, 150, 250)]
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=0)
    # By time: [100, 200] half each -> 2500; [200, 300] half each -> 500. A 3000, idle 1000 + 2500 + 500 = 4000.
    a = attribute(grid([1000, 5000, 1000]), timelines_, pol)
    assert (a.requests["A"].decode_mj, a.idle_mj) == (3000, 4000)
    # Idle at 10 W: idle pieces take 10 W x 50 ms = 500 mJ first. [100, 200]: A 4500; [200, 300]: A 500.
    b = attribute(grid([1000, 5000, 1000]), timelines_, replace(pol, idle_power_w=10.0))
    assert (b.requests["A"].decode_mj, b.idle_mj) == (5000, 2000)
    # Idle power above what the interval holds: idle takes it all (min(E_i, P x t)), the request gets nothing there.
    c = attribute(grid([1000, 5000, 1000]), timelines_, replace(pol, idle_power_w=1000.0))
    assert (c.requests["A"].decode_mj, c.idle_mj) == (0, 7000)


def test_one_prefill_step_for_first_tokens_within_tolerance():
    # C decodes all along (no prefill window). A: released 400, first token 500, 1000 tokens; B: released 400,
    # first token 501, 3000 tokens. 20,000 tokens/s, overhead 5 ms, 1000 mJ per 100 ms.
    # Tolerance 2 ms: one step of 5 + 4000/20 = 205 ms for both, clipped at release: both prefill all of [400, 500],
    # A gets 1000 * 1000/4000 = 250 there. Tolerance 0: B's token came 1 ms after A's, far less than half the 155 ms
    # a step of its own would have taken, and the GPU prefills one step at a time: the same step all the same (its
    # token was read late; on a loaded host two tokens of one step come in milliseconds apart).
    c = tl("C", 0, 0, 1000)
    a_ = tl("A", 400, 500, 500, prompt=1000)
    b_ = tl("B", 400, 501, 501, prompt=3000)
    base = AttributionPolicy(lag_ns=0, prefill_overhead_ns=5 * MS, prefill_tokens_per_s=20_000.0)
    together = attribute(grid([1000] * 10), [c, a_, b_], base)
    late = attribute(grid([1000] * 10), [c, a_, b_], replace(base, batch_tolerance_ns=0))
    assert together.requests["A"].prefill_mj == late.requests["A"].prefill_mj == 250
    # D (100 tokens) got its token 20 ms after A's: time enough for a 10 ms step of its own (5 + 100/20), so apart.
    # A's step is 55 ms [445, 500]: in [400, 500] it weighs 2 x 55 against C's 45 ms of decode -> 1000 x 110/155;
    # D's [510, 520] weighs 2 x 10 against C's 90 ms in [500, 600] -> 1000 x 20/110.
    apart = attribute(grid([1000] * 10), [c, a_, tl("D", 400, 520, 520, prompt=100)], base)
    assert (apart.requests["A"].prefill_mj, apart.requests["D"].prefill_mj) == (710, 182)
    # An abandoned request's end is not a step's end: it joins a step only within the tolerance.
    cut = attribute(grid([1000] * 10), [c, a_, tl("E", 400, None, 503, prompt=3000, status="CANCELLED")], base)
    assert cut.requests["A"].prefill_mj != 250


def test_a_request_that_ends_without_a_token_owns_the_prefill_step_it_ended_in():
    # W failed at prefill: released at 100, no token, ended at 300. Its 2,000-token prompt is a 100 ms step (no
    # overhead), so its step is [200, 300] and it waited [100, 200]. D decodes (200, 400]: the prefill step wins
    # [200, 300] over D's decode (TGI pauses the running batch for a prefill), D gets (300, 400].
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=0)
    for status in ("INTERNAL", "CANCELLED", "DEADLINE_EXCEEDED", "OK"):
        w = tl("W", 100, None, 300, prompt=2000, generated=0, status=status)
        a = attribute(grid([1000] * 5), [w, tl("D", 200, 200, 400)], pol)
        assert a.requests["W"] == PhaseEnergy(2000, 0, 200 * MS), status
        assert a.requests["D"] == PhaseEnergy(0, 1000, 200 * MS)
        assert a.idle_mj == 2000
    # Cancelled 50 ms after its release, less than its step's estimate, its step cut there (the cut rule; the
    # default, an engine finishing the step, is the next test's): the step is clipped to its release. In the reading
    # [200, 300] it weighs prefill_power_ratio (2) x 50 ms against D's 50 ms of decode: 2/3 of 1000 mJ.
    a = attribute(grid([1000] * 5), [tl("W", 250, None, 300, prompt=2000, status="CANCELLED"), tl("D", 200, 200, 400)],
                  replace(pol, abandoned_step_completes=False))  # fmt: skip
    assert a.requests["W"].prefill_mj == 667 and a.requests["D"].decode_mj == 1333


def test_a_prefill_abandoned_within_the_queue_waits_is_billed_its_step_at_the_chance_that_it_began():
    """Four requests show the backend's queue waits: 0, 0, 20 and 30 ms (released alone, 200 tokens: 100 ms steps).
    W (2,000 tokens: a 1 s step) is released at 4 s, alone. Its client leaving 15 ms in, half the waits were shorter:
    its step began with a chance of one half, and it is billed half its step, from its release (the median of the
    waits shorter than 15 ms: 0). Leaving 35 ms in, every wait was shorter: the whole step, after the median wait
    (0 ms). At once: none. There is no cliff for a client to aim at: under the rule before ("began after the median
    wait, else never"), leaving just before the median was billed nothing although half of such steps did run."""
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=0, prefill_tokens_per_s=2_000.0)
    known = [tl(f"K{i}", 1000 * i, 1000 * i + wait + 100, 1000 * i + wait + 150, prompt=200)
             for i, wait in enumerate((0, 0, 20, 30))]  # fmt: skip
    readings = grid([1000] * 60)
    for left_ms, expected in ((15, 5_000), (35, 10_000), (0, 0)):
        w = tl("W", 4000, None, 4000 + left_ms, prompt=2000, status="CANCELLED")
        a = attribute(readings, [*known, w], pol)
        assert total(a, "W") == expected, (left_ms, a.requests.get("W"))
        check_conserved(a)
    (phases,) = [p for p in request_phases([*known, w], pol) if p.request_id == "W"]
    assert phases.step_share == 0.0


def test_an_abandoned_prefill_owns_its_whole_step_since_the_engine_finishes_it():
    """TGI, vLLM and SGLang do not stop a forward pass whose request's client left: they drop the request after it.
    W (2,000 tokens: a 100 ms step) is released at 250 and its client leaves at 300; D decodes (200, 400] and its own
    wait says the backend's queue takes no time, so W's step is [250, 350], past the leaving, and D decodes around it.
    Reading [200, 300]: W's 50 ms of prefill weigh 2 x 50 against D's 50 ms: 667; [300, 400] the same. Cut when its
    client left (the rule before), W had only the first 667, and D the other 667: a quarter of the bill moved."""
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=0)
    d = tl("D", 200, 200, 400)
    w = tl("W", 250, None, 300, prompt=2000, status="CANCELLED")
    a = attribute(grid([1000] * 5), [w, d], pol)
    assert a.requests["W"] == PhaseEnergy(1333, 0, 100 * MS) and a.requests["D"].decode_mj == 667
    check_conserved(a)
    cut = attribute(grid([1000] * 5), [w, d], replace(pol, abandoned_step_completes=False))
    assert cut.requests["W"].prefill_mj == 667 and cut.requests["D"].decode_mj == 1333
    # The step runs at most abandoned_step_max_ns past the leaving: 20 ms here, so [250, 320]. Reading [300, 400]:
    # W's 20 ms weigh 2 x 20 against D's 80 ms of decode alone: 333.
    capped = attribute(grid([1000] * 5), [w, d], replace(pol, abandoned_step_max_ns=20 * MS))
    assert capped.requests["W"].prefill_mj == 667 + 333 and capped.requests["D"].decode_mj == 1000
    # An engine that prefills in chunks (200 tokens: 10 ms) stops after the chunk in flight: [250, 310]. Reading
    # [300, 400]: W's 10 ms weigh 2 x 10 against D's 90 ms of decode alone: 181.8; with the 666.7 before, 848.
    chunked = attribute(grid([1000] * 5), [w, d], replace(pol, prefill_chunk_tokens=200))
    assert chunked.requests["W"].prefill_mj == 848 and chunked.requests["D"].decode_mj == 1152
    check_conserved(chunked)
    # A client that left before the backend's queue wait was over: the step never began (the engine drops a request
    # whose client left from its queue); its window is waiting, and K's step holds the GPU through it: nothing is its.
    # K's wait (released 100, its 100 ms step [200, 300]) says the queue takes 100 ms; W left 40 ms after release.
    k = tl("K", 100, 300, 300, prompt=2000, generated=1)
    queued = attribute(grid([1000] * 5), [k, tl("W", 250, None, 290, prompt=2000, status="CANCELLED")], pol)
    assert queued.requests["W"].total_mj == 0
    check_conserved(queued)


def test_a_prefill_step_weighs_more_the_more_tokens_it_has():
    # W is cancelled 50 ms after its release at 250 ms; its step (200 or 2,000 tokens at 2,000 tokens/s) is clipped to
    # [250, 300] (the cut rule), beside D's 50 ms of decode in the reading [200, 300]. With a weight of 1.0 + 0.5 per
    # 1,000 tokens a 2,000-token step weighs 2 (as the flat ratio of 2 above: 2/3 of 1000 mJ), a 200-token one 1.1.
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=0, prefill_tokens_per_s=2_000.0, prefill_power_ratio=1.0,
                            prefill_ratio_per_1k_tokens=0.5, abandoned_step_completes=False)  # fmt: skip
    d = tl("D", 200, 200, 400)
    for prompt, expected in ((2000, 667), (200, 524)):
        a = attribute(grid([1000] * 5), [tl("W", 250, None, 300, prompt=prompt, status="CANCELLED"), d], pol)
        assert a.requests["W"].prefill_mj == expected and a.requests["D"].decode_mj == 2000 - expected, prompt
        check_conserved(a)
    # Without the slope, the flat ratio alone.
    flat = attribute(grid([1000] * 5), [tl("W", 250, None, 300, prompt=200, status="CANCELLED"), d],
                     replace(pol, prefill_ratio_per_1k_tokens=0.0))  # fmt: skip
    assert flat.requests["W"].prefill_mj == 500


@settings(max_examples=150, deadline=None)
@given(readings(), timelines(), policies(), st.floats(0.01, 3.0))
def test_a_steeper_prefill_slope_never_gives_decode_or_idle_more(rs, tls, pol, more):
    """The per-token term only raises the weight of prefill instants: in every interval the decode and idle pieces
    keep their weight against a heavier prefill, so their energy never rises (within rounding: 3 mJ per request),
    and the books still balance to the millijoule."""
    steeper = replace(pol, prefill_ratio_per_1k_tokens=pol.prefill_ratio_per_1k_tokens + more)
    base, heavy = attribute(rs, tls, pol), attribute(rs, tls, steeper)
    check_conserved(heavy)
    decode = sum(p.decode_mj for p in base.requests.values())
    assert sum(p.decode_mj for p in heavy.requests.values()) <= decode + 3 * len(base.requests)
    if pol.idle_power_w is None:  # with an idle floor, idle takes its floor first whatever the weights
        assert heavy.idle_mj <= base.idle_mj + 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(100, 3000), st.floats(0.0, 0.49)), min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(1, 3000), st.floats(1.0, 3.0)), min_size=0, max_size=4),
)
def test_first_tokens_of_one_step_read_late_still_make_one_step(batch, later):
    """A batch prefilled in one step, its first tokens read late by less than half the shortest step each would
    have had alone (jitter from 0 to 0.49 of it, chained): every request's step is the batch's, overhead plus all of
    its tokens. Requests ending later, each at least a step of its own after the previous one (past the tolerance),
    get steps of their own prompt only."""
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=5 * MS, prefill_tokens_per_s=20_000.0)

    def shortest_ms(prompt: int) -> float:
        return 5 + prompt / 20

    tls, end = [], 10_000.0
    for i, (prompt, jitter) in enumerate(batch):
        end += jitter * shortest_ms(prompt) if i else 0.0
        tls.append(tl(f"b{i}", 0, end, end + 50, prompt=prompt))
    for i, (prompt, gap) in enumerate(later):
        end += max(2.5, gap * shortest_ms(prompt))  # past the 2 ms tolerance, and a whole step of its own
        tls.append(tl(f"l{i}", 0, end, end + 50, prompt=prompt))
    phases = {p.request_id: p for p in request_phases(tls, pol)}
    step_ns = 5 * MS + round(sum(p for p, _ in batch) * 1e9 / 20_000)
    for i in range(len(batch)):
        p = phases[f"b{i}"]
        assert p.prefill_end_ns - p.prefill_start_ns == step_ns
    for i, (prompt, _gap) in enumerate(later):
        p = phases[f"l{i}"]
        assert p.prefill_end_ns - p.prefill_start_ns == 5 * MS + round(prompt * 1e9 / 20_000)


def test_a_request_its_backend_refused_owns_nothing_and_yields_to_everyone():
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=0)
    for status in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        r = tl("R", 100, None, 300, prompt=2000, generated=0, status=status)
        assert not r.on_gpu and r.prefill_end_ns is None
        a = attribute(grid([1000] * 5), [r, tl("D", 200, 200, 400)], pol)
        assert "R" not in a.requests and a.requests["D"] == PhaseEnergy(0, 2000, 200 * MS)
        assert a.idle_mj == 3000  # [100, 200] is idle: nobody was on the GPU
    # A first token means it was prefilled, whatever its status says afterwards.
    assert tl("X", 100, 150, 300, status="UNAVAILABLE").on_gpu


def test_an_abandoned_prefill_joins_the_step_of_first_tokens_within_the_tolerance():
    # F failed at the end of the step that gave G its first token 1 ms later: one step of 2 x 1,000 tokens (100 ms),
    # so F's step is [200, 300], [200, 201] its own and [201, 300] shared with G by tokens: 1000 x 50.5/100 of that
    # reading. D decodes all along and gets none of it (a prefill step pauses the running batch).
    pol = AttributionPolicy(lag_ns=0, prefill_overhead_ns=0, batch_tolerance_ns=2 * MS)
    f = tl("F", 100, None, 300, prompt=1000, generated=0, status="INTERNAL")
    d = tl("D", 100, 100, 400)
    a = attribute(grid([1000] * 5), [f, tl("G", 100, 301, 400, prompt=1000), d], pol)
    assert a.requests["F"].prefill_mj == 505
    # G's first token 4 ms later, past the tolerance, is still F's step: a step of its own would have taken 50 ms.
    # F's step [200, 300], G's [204, 304]: F has [200, 204] alone and half of [204, 300] -> 1000 x 52/100.
    late = attribute(grid([1000] * 5), [f, tl("G", 100, 304, 400, prompt=1000), d], pol)
    assert late.requests["F"].prefill_mj == 520
    # 60 ms later it had time for its own step: F's own is 50 ms, [250, 300], and D decodes [200, 250].
    alone = attribute(grid([1000] * 5), [f, tl("G", 100, 360, 400, prompt=1000), d], pol)
    assert alone.requests["F"].prefill_mj == 667  # weights in [200, 300]: D 50, F 2 x 50


def test_requests_off_the_gpu_get_nothing():
    a = attribute(
        grid([1000] * 5),
        [tl("queued", None, None, 300), tl("nobackend", 100, 120, 300, backend=None), tl("x", 0, 5, 500)],
        LAG0,
    )
    assert set(a.requests) == {"x"} and a.requests["x"].total_mj == 5000 and a.idle_mj == 0


def test_requests_outside_the_span_are_left_out():
    a = attribute(grid([1000] * 3, offset_ms=100), [tl("before", 0, 5, 50), tl("after", 450, 455, 500)], LAG0)
    assert a.requests == {} and a.idle_mj == 3000


def test_fewer_than_two_readings_is_empty():
    assert attribute([], [tl("x", 0, 5, 500)]) == Attribution(0, 0, 0, 0, {})
    one = attribute([CounterReading(ms(100), 5)], [tl("x", 0, 5, 500)], AttributionPolicy(lag_ns=20 * MS))
    assert (one.start_ns, one.end_ns, one.counter_mj, one.idle_mj, dict(one.requests)) == (ms(80), ms(80), 0, 0, {})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([CounterReading(ms(100), 0), CounterReading(ms(0), 10)], "strictly increasing in time"),
        ([CounterReading(ms(0), 0), CounterReading(ms(0), 10)], "strictly increasing in time"),
        ([CounterReading(ms(0), 10), CounterReading(ms(100), 20), CounterReading(ms(200), 5)], "counter decreased"),
    ],
)
def test_bad_readings_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        attribute(bad, [])


def test_conflicting_timelines_raise_and_duplicates_are_merged():
    one = tl("x", 0, 5, 500)
    assert attribute(grid([1000] * 5), [one, one], LAG0) == attribute(grid([1000] * 5), [one], LAG0)
    with pytest.raises(ValueError, match="two different timelines"):
        attribute(grid([1000] * 5), [one, tl("x", 0, 5, 400)], LAG0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lag_ns": -1},
        {"prefill_tokens_per_s": 0.0},
        {"prefill_tokens_per_s": math.inf},
        {"prefill_overhead_ns": -1},
        {"prefill_power_ratio": 0.0},
        {"prefill_power_ratio": math.nan},
        {"prefill_ratio_per_1k_tokens": -0.1},
        {"prefill_ratio_per_1k_tokens": math.inf},
        {"prefill_ratio_per_1k_tokens": math.nan},
        {"idle_power_w": -1.0},
        {"batch_tolerance_ns": -1},
    ],
)
def test_bad_policy_raises(kwargs):
    with pytest.raises(ValueError):
        AttributionPolicy(**kwargs)


def test_drop_stale_readings_keeps_first_of_each_value():
    rs = [CounterReading(ms(t), e) for t, e in [(0, 5), (90, 9), (180, 9), (290, 14), (380, 14), (400, 14)]]
    assert [r.t_ns for r in drop_stale_readings(rs)] == [ms(0), ms(90), ms(290)]
    assert drop_stale_readings([]) == []


# ---------------------------------------------------------------------------------------------------------------
# Properties over arbitrary inputs


@PROPS
@given(readings(), timelines(), policies())
def test_conservation_to_the_millijoule(rs, tls, pol):
    a = attribute(rs, tls, pol)
    check_conserved(a)
    assert a.counter_mj == rs[-1].energy_mj - rs[0].energy_mj
    assert (a.start_ns, a.end_ns) == (rs[0].t_ns - pol.lag_ns, rs[-1].t_ns - pol.lag_ns)
    on_gpu = {t.request_id for t in tls if t.on_gpu}
    assert set(a.requests) <= on_gpu
    for _rid, p in a.requests.items():
        assert p.active_ns <= a.end_ns - a.start_ns
        assert p.active_ns > 0 or p.total_mj > 0


@PROPS
@given(readings(min_size=3), timelines(), policies(), st.data())
def test_adjacent_spans_add_up_to_their_union(rs, tls, pol, data):
    # An abandoned prefill's step is placed by the queue wait of the requests released within the span, which may
    # differ between a span and its halves (the module's guarantees say so; hypothesis found it): left out here.
    tls = [t for t in tls if not t.abandoned_prefill]
    b = data.draw(st.integers(1, len(rs) - 2), label="split reading")
    whole = attribute(rs, tls, pol)
    left = attribute(rs[: b + 1], tls, pol)
    right = attribute(rs[b:], tls, pol)
    assert left.counter_mj + right.counter_mj == whole.counter_mj
    assert (left.attributed_mj + left.idle_mj) + (right.attributed_mj + right.idle_mj) == whole.counter_mj
    # Each interval is split on its own, so the exact shares add; each integer is within 1 mJ of its exact share.
    assert abs(left.idle_mj + right.idle_mj - whole.idle_mj) <= 2
    for rid in whole.requests.keys() | left.requests.keys() | right.requests.keys():
        assert abs(total(left, rid) + total(right, rid) - total(whole, rid)) <= 2, rid


@PROPS
@given(readings(), timelines(), policies(), st.randoms(use_true_random=False))
def test_input_order_does_not_matter(rs, tls, pol, rnd):
    a = attribute(rs, tls, pol)
    shuffled = list(tls) + [t for t in tls if rnd.random() < 0.3]  # identical duplicates are harmless
    rnd.shuffle(shuffled)
    b = attribute(rs, iter(shuffled), pol)
    assert a == b
    assert list(a.requests) == list(b.requests) == sorted(a.requests)


@PROPS
@given(readings(), timelines(), policies(), st.data())
def test_requests_never_released_get_nothing(rs, tls, pol, data):
    off = [data.draw(timeline(f"off{j}", on_gpu=False), label=f"off{j}") for j in range(3)]
    with_off = attribute(rs, tls + off, pol)
    assert with_off == attribute(rs, tls, pol)
    assert not any(rid.startswith("off") for rid in with_off.requests)


@PROPS
@given(readings(), timelines(max_size=6), policies(), st.data())
def test_identical_requests_served_together_get_equal_shares(rs, tls, pol, data):
    twin = data.draw(timeline("twin", on_gpu=True), label="twin")
    copies = data.draw(st.integers(2, 5), label="copies")
    twins = [replace(twin, request_id=f"twin{k}") for k in range(copies)]
    a = attribute(rs, tls + twins, pol)
    check_conserved(a)
    totals = [total(a, t.request_id) for t in twins]
    # Identical inputs have identical exact shares; the largest-remainder split then hands out at most one extra mJ.
    assert max(totals) - min(totals) <= 1
    parts = [a.requests.get(t.request_id, PhaseEnergy(0, 0, 0)) for t in twins]
    assert max(p.prefill_mj for p in parts) - min(p.prefill_mj for p in parts) <= 1
    assert max(p.decode_mj for p in parts) - min(p.decode_mj for p in parts) <= 2


def _interval_energy(rs: list[CounterReading], lag_ns: int, lo_ns: int, hi_ns: int) -> tuple[int, int, int]:
    """Energy of the intervals inside [lo, hi], partly overlapping it, and outside it (work time)."""
    inside = partly = outside = 0
    for r0, r1 in itertools.pairwise(rs):
        a, b, e = r0.t_ns - lag_ns, r1.t_ns - lag_ns, r1.energy_mj - r0.energy_mj
        if lo_ns <= a and b <= hi_ns:
            inside += e
        elif b <= lo_ns or a >= hi_ns:
            outside += e
        else:
            partly += e
    return inside, partly, outside


@PROPS
@given(readings(), st.data(), policies())
def test_a_lone_request_gets_every_interval_inside_its_window(rs, data, pol):
    lone = data.draw(timeline("lone", on_gpu=True), label="lone")
    a = attribute(rs, [lone], pol)
    assert lone.released_ns is not None
    inside, partly, outside = _interval_energy(rs, pol.lag_ns, lone.released_ns, lone.done_ns)
    # Float shares are exact up to rounding; each integer is within 1 mJ of its share.
    assert inside - 1 <= total(a, "lone") <= inside + partly + 1
    assert outside - 1 <= a.idle_mj <= outside + partly + 1


@PROPS
@given(readings(), timelines(), policies())
def test_intervals_with_no_request_go_wholly_to_idle(rs, tls, pol):
    a = attribute(rs, tls, pol)
    # Each request's window: [released, done], or past done where an abandoned prefill's step ran on after it.
    phases = request_phases(tls, pol)
    done = {t.request_id: t.done_ns for t in tls}
    assert all(p.done_ns >= done[p.request_id] for p in phases)
    windows = sorted((p.released_ns, p.done_ns) for p in phases)
    empty = covered = 0  # intervals touching no window; intervals every instant of which is in some window
    for r0, r1 in itertools.pairwise(rs):
        lo, hi, e = r0.t_ns - pol.lag_ns, r1.t_ns - pol.lag_ns, r1.energy_mj - r0.energy_mj
        if not any(w0 < hi and w1 > lo for w0, w1 in windows):
            empty += e
        reach = lo
        for w0, w1 in windows:
            if w0 <= reach < w1:
                reach = w1
        if reach >= hi:
            covered += e
    # Every instant inside some on-GPU window belongs to a request (wait, prefill or decode), never to idle.
    assert empty - 1 <= a.idle_mj <= a.counter_mj - covered + 1


@PROPS
@given(readings(), timelines(), policies(), st.data())
def test_more_generated_tokens_never_cost_less(rs, tls, pol, data):
    j = data.draw(timeline("j", on_gpu=True).filter(lambda t: t.first_token_ns is not None), label="j")
    longer_ns = data.draw(st.integers(1, 2_000_000), label="longer_us") * 1000
    more = replace(j, done_ns=j.done_ns + longer_ns, generated_tokens=j.generated_tokens + 1 + longer_ns // (20 * MS))
    base = attribute(rs, [*tls, j], pol)
    longer = attribute(rs, [*tls, more], pol)
    # Proven for every input: the extra decode time takes only instants that were idle, waiting or decode (all of
    # weight 1), so no interval's split moves against j; with idle_power_w the idle pieces shrink, which only frees
    # energy for the active ones. Integers are within 1 mJ of the exact shares, hence the 1 mJ slack.
    assert total(longer, "j") >= total(base, "j") - 1


@st.composite
def shared_prefill_batch(
    draw: st.DrawFn,
) -> tuple[list[Timeline], list[Timeline], list[CounterReading], AttributionPolicy]:
    """A batch released together and prefilled in one step, other traffic around it, a constant-power counter."""
    k = draw(st.integers(1, 5))
    released = T0_NS + draw(st.integers(0, 500)) * MS
    first = released + draw(st.integers(0, 300)) * MS
    batch = [
        Timeline(
            f"b{i}",
            "t",
            "m",
            "b0",
            released,
            released,
            first,
            first + draw(st.integers(0, 1500)) * MS,
            draw(st.integers(0, 3000)),
            5,
        )
        for i in range(k)
    ]
    step_ns = draw(st.integers(5, 300)) * MS
    power_w = draw(st.integers(1, 1000))
    first_ns = T0_NS - draw(st.integers(0, 300)) * MS
    lag_ns = 250 * MS  # the most policies() draws; readings run past every window plus the lag
    n = (T0_NS + 2600 * MS + lag_ns - first_ns) // step_ns + 2
    rs = [CounterReading(first_ns + i * step_ns, power_w * i * step_ns // MS) for i in range(n)]
    pol = draw(policies())
    pol = replace(pol, prefill_power_ratio=max(1.0, pol.prefill_power_ratio))
    return batch, draw(timelines(max_size=4)), rs, pol


@settings(max_examples=200, deadline=None)
@given(shared_prefill_batch(), st.integers(1, 2000))
def test_more_prompt_tokens_in_a_shared_prefill_never_cost_less(case, extra_tokens):
    """Holds when the counter's power is constant, prefill weighs at least as much as decode (ratio >= 1) and the
    span holds the batch's whole windows.

    Not for every input: more prompt tokens lengthen the estimated prefill step, turning a sliver of shared wait into
    prefill; if an arbitrary counter puts much more energy in that sliver's interval than in the rest of the step,
    a request with a small prompt can lose a few mJ there (hypothesis finds such cases within ~3,000 examples), and
    with a ratio below 1 a prefill instant is worth less than the wait it replaces. A span that cuts the prefill
    step can keep that loss and miss the larger share of the step that pays for it (found by hypothesis: -2 mJ).
    Nor next to an abandoned prefill: its step starts after the span's typical queue wait, which the batch's longer
    step shortens, moving a few mJ between the two (found by hypothesis: -2 mJ). Nor next to a request whose first
    token came less than half the longer step before the batch's: it cannot have had a step of its own, so it joins
    the batch's step (``_step_tokens``) and its prefill window, as long as the step but ending at its own first token,
    starts before the batch's; alone in that sliver it owns it, and its decode, which had taken a little of the
    batch's wait, becomes the batch's prefill (found by hypothesis: -2 mJ of 246, a 0-token request 3.7 ms ahead).
    """
    batch, others, rs, pol = case
    j = batch[0]
    more = replace(j, prompt_tokens=j.prompt_tokens + extra_tokens)
    end = j.prefill_end_ns
    assert end is not None
    step_ns = pol.prefill_overhead_ns + more.computed_tokens * 1e9 / pol.prefill_tokens_per_s
    joins_lo, joins_hi = end - max(step_ns / 2, pol.batch_tolerance_ns), end + pol.batch_tolerance_ns

    def joins_the_step(t: Timeline) -> bool:
        return t.prefill_end_ns is not None and joins_lo <= t.prefill_end_ns <= joins_hi

    others = [t for t in others if not t.abandoned_prefill and not joins_the_step(t)]
    base = attribute(rs, batch + others, pol)
    bigger = attribute(rs, [more, *batch[1:], *others], pol)
    assert total(bigger, "b0") >= total(base, "b0") - 1


def test_speed_10000_requests_over_1000_readings():
    """The meter runs this every few seconds; an O(readings x requests) version would take tens of seconds."""
    rng = random.Random(1)
    rs, e = [], 0
    for i in range(1000):
        rs.append(CounterReading(T0_NS + i * 100 * MS + rng.randint(-3, 3) * MS, e))
        e += rng.randint(8_000, 70_000)
    tls = []
    for j in range(10_000):
        released = T0_NS + rng.randint(0, 99_000) * MS
        first = released + rng.randint(0, 300) * MS
        done = first + rng.randint(0, 5000) * MS
        tls.append(Timeline(f"r{j:05d}", "t", "m", "b0", released, released, first, done, rng.randint(1, 2000), 9))
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a = attribute(rs, tls)
        best = min(best, time.perf_counter() - t)
    check_conserved(a)
    assert len(a.requests) == 10_000
    assert best < 2.0, f"{best:.2f} s"  # ~0.25 s measured on a shared 2-core machine


# ---------------------------------------------------------------------------------------------------------------
# Stability under the counter's 100 ms quantisation and lag, against a physical engine


def _errors_vs_bound(schedule, counter: NvmlCounter, lag_offset_ms: int, stale: bool) -> tuple[dict, dict, dict]:
    rs, content_ns = counter.read(schedule)
    if stale:
        kept = drop_stale_readings(rs)
        keep = {r.t_ns for r in kept}
        content_ns = [c for r, c in zip(rs, content_ns, strict=True) if r.t_ns in keep]
        rs = kept
    lag_ns = max(0, counter.true_lag_ms + 50 + lag_offset_ms) * MS
    coarse = attribute(rs, schedule.timelines, schedule.engine_policy(lag_ns))
    check_conserved(coarse)
    jumps = schedule.jumps()
    assumed_ns = [r.t_ns - lag_ns for r in rs]
    counter_mj = [r.energy_mj for r in rs]
    bound = {
        t.request_id: misplacement_bound_mj(assumed_ns, content_ns, counter_mj, jumps[t.request_id])
        for t in schedule.timelines
    }
    return coarse.requests, bound, {t.request_id: t for t in schedule.timelines}


@HEAVY
@given(arrivals(fates=("ok", "ok", "fail", "refuse")), nvml_counters(), st.sampled_from([0, -100, 100]), st.booleans())
def test_nvml_like_counter_stays_within_the_edge_bound(arr, counter, lag_offset_ms, stale):
    """Per request: |coarse - ideal| <= sum over the edges of its GPU share of |jump| x (energy read around it) + 2.

    The truth comes from the engine (each step's energy split by whom it served). The ideal attribution (exact
    counter every 1 ms, lag 0) must match it to rounding, because every engine step is whole milliseconds and the
    policy's prefill estimate equals the engine's step time: this checks the implementation against an independent
    computation. The NVML-like counter (100 ms updates +-3 ms, reads every 100 ms +-15 ms, frozen values, true lag
    0-200 ms, policy lag = true lag + 50 ms, or 100 ms off either way) must stay within the bound proven in
    ``misplacement_bound_mj``: each unit jump of a request's share can misplace at most the energy of the few
    readings around it, i.e. max power x (2 x 200 ms + 2 x alignment error) ~ 650 W x 0.5 s. The +2 mJ is the two
    roundings to integers.
    """
    schedule = simulate(arr)
    truth = schedule.true_mj()
    ideal = attribute(fine_readings(schedule), schedule.timelines, schedule.engine_policy(0))
    check_conserved(ideal)
    for rid, true_mj in truth.items():  # failing at prefill and refused requests included: exact, to rounding
        assert abs(total(ideal, rid) - true_mj) <= 1 + 1e-6, rid
    coarse, bound, _ = _errors_vs_bound(schedule, counter, lag_offset_ms, stale)
    for rid in truth:
        err = abs((coarse[rid].total_mj if rid in coarse else 0) - total(ideal, rid))
        assert err <= bound[rid] + 2, (rid, err, bound[rid])
        assert bound[rid] <= 650 * 600 * sum(j for _, j in schedule.jumps()[rid]) + 1  # the physical form


@st.composite
def steady_load(draw: st.DrawFn) -> list[EngineArrival]:
    """A busy server: 8-25 requests arriving 0-400 ms apart, prompts up to 1,000 tokens, 80-160 new tokens each."""
    n = draw(st.integers(8, 25))
    at_ms, out = 0, []
    for j in range(n):
        at_ms += draw(st.integers(0, 400))
        out.append(EngineArrival(f"q{j:03d}", at_ms, 20 * draw(st.integers(0, 50)), draw(st.integers(80, 160))))
    return out


@HEAVY
@given(steady_load(), nvml_counters(), st.sampled_from([0, -100, 100]))
def test_long_requests_in_aggregate_within_a_few_percent(arr, counter, lag_offset_ms):
    """The summed energy of all requests of >= 2 s is within 5 % of the ideal (10 % with the lag 100 ms off).

    Why: errors arise only at edges of a request's share (its own release, prefill, end, and others joining or
    leaving), each misplacing about (power step) x (alignment error: up to 50 ms from the frozen counter, plus the
    lag error) — a few tens of J per edge, signed and zero-mean when the lag is right — against >= 2 s x ~300 W of
    work per request; summed over many long requests they mostly cancel. A lag off by 100 ms shifts every window by
    100 ms, a bias of up to ~(650 - 80) W x 0.1 s per request, hence the looser 10 %. Stale reads are dropped first
    (``drop_stale_readings``), as the meter does. Single requests can be off by more (a short prefill step of a
    request with a small decode share is placed only to +-50 ms): that is the per-request bound's job.
    """
    schedule = simulate(arr)
    longs = [t.request_id for t in schedule.timelines if window_ns(t) >= 2000 * MS]
    assume(len(longs) >= 3)
    ideal = attribute(fine_readings(schedule), schedule.timelines, schedule.engine_policy(0))
    coarse, _, _ = _errors_vs_bound(schedule, counter, lag_offset_ms, stale=True)
    err = rel(sum(coarse[r].total_mj for r in longs), sum(ideal.requests[r].total_mj for r in longs))
    assert err <= (0.05 if lag_offset_ms == 0 else 0.10), err


@HEAVY
@given(adversary_beside_decoders())
def test_an_adversary_pays_for_the_gpu_work_it_caused_and_its_neighbours_pay_no_more(arr):
    """Failing at prefill, leaving during the queue or the prefill (tiny deadlines, cancels), refused, or a huge
    prompt with one new token, next to a tenant that decodes; against the engine's truth, with an ideal counter.

    Exact, to rounding, for every fate but leaving. A request that leaves was in its step for an unknown part of its
    window: the model bills it a step ending where it left, starting no earlier than the queue wait after its release
    (the median wait of requests with known steps: here at most one decode step, 21 ms). So it pays at least its
    true prefill less that much of prefill power, and at most its truth plus the decode it sat behind in the queue
    (one decode step); its neighbours' bills move by no more than the opposite amount.
    """
    schedule = simulate(arr)
    truth = schedule.true_mj()
    ideal = attribute(fine_readings(schedule), schedule.timelines, schedule.engine_policy(0))
    check_conserved(ideal)
    leavers = [a for a in arr if a.fate == "leave"]
    adversary = [a.request_id for a in arr if a.request_id.startswith("a")]
    neighbours = [a.request_id for a in arr if a.request_id.startswith("n")]
    billed_a = sum(total(ideal, r) for r in adversary)
    true_a = sum(truth[r] for r in adversary)
    billed_n = sum(total(ideal, r) for r in neighbours)
    true_n = sum(truth[r] for r in neighbours)
    rounding = len(arr) + 1e-6
    step_ms = decode_step_ms(len(neighbours))
    under = len(leavers) * PREFILL_W * step_ms  # the queue wait misplaced, at prefill power: W x ms = mJ
    over = len(leavers) * decode_w(len(neighbours)) * step_ms
    assert true_a - under - rounding <= billed_a <= true_a + over + rounding, (billed_a, true_a)
    assert true_n - over - rounding <= billed_n <= true_n + under + rounding, (billed_n, true_n)
    for a in arr:
        if a.fate == "refuse":
            assert total(ideal, a.request_id) == 0
        elif (a.request_id in adversary and a.fate != "leave") or not leavers:
            assert abs(total(ideal, a.request_id) - truth[a.request_id]) <= 1 + 1e-6, a


def test_engine_schedule_is_what_the_tests_assume():
    """Guard the test harness itself: steps are contiguous, shares sum to 1, the counter is exact."""
    s = simulate([EngineArrival("a", 0, 200, 3), EngineArrival("b", 0, 0, 1), EngineArrival("c", 30, 40, 2)])
    assert all(x.end_ns == y.start_ns for x, y in zip(s.steps, s.steps[1:], strict=False))
    assert all(abs(sum(x.shares.values()) - 1) < 1e-12 for x in s.steps if x.kind != "idle")
    kinds = [x.kind for x in s.steps]
    # a+b prefill (5 + 10 ms), decode for a (c arrives during it), prefill c (7 ms), decode a+c, then idle.
    assert kinds == ["idle", "prefill", "decode", "prefill", "decode", "idle"]
    assert s.energy_mj_at(s.end_ns) == sum(x.energy_mj for x in s.steps)
    a = {t.request_id: t for t in s.timelines}
    assert (a["a"].first_token_ns - a["a"].released_ns) == 15 * MS and a["b"].done_ns == a["b"].first_token_ns
