"""The simulated GPU's bookkeeping: exact integration, exact attribution, an NVML-like counter (pure, no clock)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.config import SimConfig
from sim.gpu import SimGPU
from sim.ledger import PJ_PER_MJ, EnergyLedger, Phase

PERIOD_NS = 100_000_000
T0_NS = 1_700_000_000_012_345_678  # deliberately off the 100 ms grid


# one transition: (ns since the previous one, phase, power in mW, which of 4 accounts own it, their weights,
# an account whose request ends right after the transition, if any)
transition = st.tuples(
    st.integers(min_value=0, max_value=250_000_000),
    st.sampled_from([Phase.IDLE, Phase.PREFILL, Phase.DECODE]),
    st.integers(min_value=0, max_value=700_000),
    st.lists(st.integers(min_value=0, max_value=3), max_size=4, unique=True),
    st.lists(st.integers(min_value=0, max_value=2000), min_size=4, max_size=4),
    st.one_of(st.none(), st.integers(min_value=0, max_value=3)),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(transition, min_size=1, max_size=40),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=250_000_000),
)
def test_energy_is_conserved_attributed_exactly_and_counted_at_boundaries(
    transitions: list, lag_ms: int, tail_ns: int
) -> None:
    idle_mw = 80_000
    ledger = EnergyLedger(T0_NS, idle_power_mw=idle_mw, update_period_ns=PERIOD_NS)
    ids = ["r0", "r1", "r2", "r0"]  # accounts 0 and 3 carry the same request id: they add up
    accounts = [ledger.open_account(rid, prompt_tokens=10 + i) for i, rid in enumerate(ids)]
    # independent reference: the segments, then exact shares as fractions
    segments: list[tuple[int, int, int, Phase, list[int], list[int]]] = []  # start, end, mW, phase, owners, w
    state: tuple[int, Phase, list[int], list[int]] = (idle_mw, Phase.IDLE, [], [])
    t = T0_NS
    lag_ns = lag_ms * 1_000_000
    last_counter = 0
    closed: set[int] = set()
    frozen: dict[str, object] = {}  # request id -> its truth once all its accounts are final
    for dt, phase, power, owner_ids, weights, ends in transitions:
        segments.append((t, t + dt, *state))
        t += dt
        owner_ids = [i for i in owner_ids if i not in closed]  # a request that ended owns nothing more
        owners = [accounts[i] for i in owner_ids]
        w = [weights[i] for i in owner_ids]
        ledger.set_state(t, phase, power, owners, w if phase is Phase.PREFILL else None)
        state = (power, phase if owners else Phase.IDLE, owner_ids, w if phase is Phase.PREFILL else [])
        if ends is not None:
            closed.add(ends)
            ledger.close_account(accounts[ends])

        def integral(until: int, now: int = t, power: int = state[0]) -> int:
            past = sum(p * (min(e, until) - s) for s, e, p, *_ in segments if s < until)
            return past + (power * (until - now) if until > now else 0)

        reading = ledger.counter_pj(t, lag_ns)
        boundary = ((t - lag_ns) // PERIOD_NS) * PERIOD_NS
        assert boundary % PERIOD_NS == 0 and boundary <= t - lag_ns < boundary + PERIOD_NS
        assert reading == (integral(boundary) if boundary > T0_NS else 0)
        assert reading >= last_counter
        last_counter = reading

        # a request whose accounts are all final keeps its millijoules forever
        snap = ledger.snapshot(t)
        assert sum(r.prefill_mj + r.decode_mj for r in snap.requests.values()) + snap.idle_mj == snap.total_mj
        for rid, truth in snap.requests.items():
            if rid in frozen:
                assert truth == frozen[rid]
            final = [i for i, r in enumerate(ids) if r == rid]
            if all(i in closed and i not in state[2] for i in final):
                frozen[rid] = truth
    end = t + tail_ns
    segments.append((t, end, *state))
    exact_total = sum(p * (e - s) for s, e, p, *_ in segments)
    assert ledger.energy_pj(end) == exact_total

    snap = ledger.snapshot(end)
    assert snap.total_pj == exact_total
    assert snap.total_mj == exact_total // PJ_PER_MJ
    assert sum(r.prefill_mj + r.decode_mj for r in snap.requests.values()) + snap.idle_mj == snap.total_mj

    # exact shares: prefill by weight (equal if all zero), decode equally, no owner -> idle
    exact: dict[tuple[str, str], Fraction] = {}
    exact_idle = Fraction(0)
    for s, e, p, phase, owner_ids, w in segments:
        energy = Fraction(p * (e - s))
        if phase is Phase.IDLE or not owner_ids:
            exact_idle += energy
            continue
        weights = w if phase is Phase.PREFILL and sum(w) > 0 else [1] * len(owner_ids)
        for i, wi in zip(owner_ids, weights, strict=True):
            key = (ids[i], "prefill" if phase is Phase.PREFILL else "decode")
            exact[key] = exact.get(key, Fraction(0)) + energy * wi / sum(weights)
    slack = Fraction(len(segments), PJ_PER_MJ)  # integer picojoule splits
    for rid, truth in snap.requests.items():
        parts = ids.count(rid)  # each account's part is within 1 mJ
        for kind, got in (("prefill", truth.prefill_mj), ("decode", truth.decode_mj)):
            want = exact.get((rid, kind), Fraction(0)) / PJ_PER_MJ
            assert abs(got - want) < parts + slack
    assert abs(snap.idle_mj - exact_idle / PJ_PER_MJ) < 1 + slack
    assert set(snap.requests) == {"r0", "r1", "r2"}
    assert snap.requests["r0"].prompt_tokens == 10 + 13
    assert snap.requests == ledger.snapshot(end).requests  # no clock: the same question, the same answer
    assert ledger.snapshot(end, "r1").requests == {"r1": snap.requests["r1"]}


def test_counter_advances_only_at_boundaries_and_lags() -> None:
    """Constant 100 W: the counter shows exactly 10 J per 100 ms, stepping at boundaries, `lag` late."""
    t0 = 10 * PERIOD_NS + 30_000_000
    ledger = EnergyLedger(t0, idle_power_mw=100_000, update_period_ns=PERIOD_NS)
    for lag_ns in (0, 150_000_000):
        seen = []
        for ms in range(0, 1000, 7):
            now = t0 + ms * 1_000_000
            mj = ledger.counter_pj(now, lag_ns) // PJ_PER_MJ
            boundary = ((now - lag_ns) // PERIOD_NS) * PERIOD_NS
            expected = max(boundary - t0, 0) * 100 // 1_000_000  # 100 W x ns -> mJ
            assert mj == expected
            seen.append(mj)
        steps = {b - a for a, b in itertools.pairwise(seen)} - {0}
        assert steps <= {7000, 10_000}  # first partial step (70 ms after t0), then 10 J per 100 ms


def test_history_covers_long_quiet_spells() -> None:
    ledger = EnergyLedger(0, idle_power_mw=50_000, update_period_ns=PERIOD_NS, boundaries_kept=8)
    ledger.set_state(3600 * 10**9, Phase.IDLE, 50_000)  # an hour later: bounded work, still exact
    now = 3600 * 10**9 + 5
    assert ledger.counter_pj(now, 300_000_000) == 50_000 * (3600 * 10**9 - 300_000_000)
    with pytest.raises(LookupError):
        ledger.counter_pj(now, 2 * 10**9)  # older than the kept history


def test_sim_gpu_drop_cuts_a_request_out_of_its_step() -> None:
    config = SimConfig(counter_update_period_ms=100)
    gpu = SimGPU(config, "sim:test", t0_ns=0)
    a = gpu.open_account("a", 100)
    b = gpu.open_account("b", 100)
    gpu.decode([a, b], t_ns=1_000_000_000)
    assert gpu.drop(a, t_ns=1_010_000_000)
    assert not gpu.drop(a, t_ns=1_010_000_000)
    gpu.idle(t_ns=1_020_000_000)
    two = 258_000  # 250 W + 2 x 4 W, in mW
    one = 254_000
    assert a.decode_pj == two * 10_000_000 // 2
    assert b.decode_pj == two * 10_000_000 // 2 + one * 10_000_000
    truth = gpu.truth(t_ns=1_020_000_000)
    assert truth.total_pj == 80_000 * 1_000_000_000 + two * 10_000_000 + one * 10_000_000


def test_sim_gpu_prefill_is_shared_by_the_tokens_each_request_has_in_the_step() -> None:
    gpu = SimGPU(SimConfig(), "sim:test", t0_ns=0)
    a = gpu.open_account("a", 50)
    b = gpu.open_account("b", 50)
    gpu.prefill([a, b], t_ns=10**9, weights=[50, 14])  # b's prompt is cut: 14 tokens in this step
    assert gpu.drop(b, t_ns=10**9 + 32_000_000)  # b leaves half way: the rest of the step is a's alone
    gpu.idle(t_ns=10**9 + 64_000_000)
    half = 650_000 * 32_000_000
    assert a.prefill_pj == half * 50 // 64 + half
    assert b.prefill_pj == half - half * 50 // 64
