"""Release policies and tenant fairness as pure decisions, driven by a fake clock (no event loop)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.shaping_config import ClassConfig
from proxy.shaping.fairness import FairQueue
from proxy.shaping.policies import (
    AdaptivePolicy,
    BatchPolicy,
    HeldState,
    PassthroughPolicy,
    RateEstimator,
    TokensPolicy,
    WindowPolicy,
    make_policy,
)


def held(count: int, oldest_s: float | None, prompt_tokens: int = 0, capacity: int = 0) -> HeldState:
    return HeldState(count=count, prompt_tokens=prompt_tokens, oldest_s=oldest_s, capacity=capacity)


# -- passthrough ------------------------------------------------------------------------------------------------
def test_passthrough_releases_into_free_slots_only() -> None:
    p = PassthroughPolicy()
    assert p.decide(held(5, 1.0, capacity=3), 1.0).count == 3
    assert p.decide(held(2, 1.0, capacity=8), 1.0).count == 2
    d = p.decide(held(2, 1.0, capacity=0), 1.0)
    assert d.count == 0 and d.wake_at_s is None  # waits for capacity, not for a timer


# -- window -----------------------------------------------------------------------------------------------------
def test_window_boundaries_are_multiples_of_the_window_since_the_unix_epoch() -> None:
    w = WindowPolicy(0.25)
    t0 = 1_700_000_000.0
    assert w.boundary_after(t0 + 0.01) == pytest.approx(t0 + 0.25)
    assert w.boundary_after(t0 + 0.25) == pytest.approx(t0 + 0.5)  # strictly after
    d = w.decide(held(3, t0 + 0.01), t0 + 0.2)
    assert d.count == 0 and d.wake_at_s == pytest.approx(t0 + 0.25)
    assert w.decide(held(3, t0 + 0.01), t0 + 0.25).count == 3  # everything held goes at the boundary


def test_window_two_replicas_release_at_the_same_instant() -> None:
    """Two gateway replicas with different arrivals agree on the release time: no coordination needed."""
    window_s = 0.2
    a, b = WindowPolicy(window_s), WindowPolicy(window_s)
    rng = random.Random(7)
    for _ in range(200):
        t = 1_700_000_000 + rng.uniform(0, 1000)
        ta, tb = t, t + rng.uniform(0, 0.999 * (a.boundary_after(t) - t))  # same epoch, different instants
        due_a = a.decide(held(1, ta), ta).wake_at_s
        due_b = b.decide(held(1, tb), tb).wake_at_s
        assert due_a is not None and due_b is not None
        assert due_a == pytest.approx(due_b, abs=1e-9)
        assert 0 < due_a - ta <= window_s + 1e-9
        assert due_a / window_s == pytest.approx(round(due_a / window_s), abs=1e-6)


# -- batch ------------------------------------------------------------------------------------------------------
def test_batch_releases_by_count_without_waiting() -> None:
    p = BatchPolicy(max_batch=4, hold_s=1.0)
    assert p.decide(held(3, 10.0), 10.01).count == 0
    assert p.decide(held(4, 10.0), 10.01).count == 4
    assert p.decide(held(9, 10.0), 10.01).count == 4  # one full batch per decision; the core asks again


def test_batch_releases_by_timeout_of_the_oldest() -> None:
    p = BatchPolicy(max_batch=8, hold_s=0.5)
    d = p.decide(held(2, 10.0), 10.3)
    assert d.count == 0 and d.wake_at_s == pytest.approx(10.5)
    assert p.decide(held(2, 10.0), 10.5).count == 2


# -- tokens -----------------------------------------------------------------------------------------------------
def test_tokens_releases_at_the_prefill_budget() -> None:
    p = TokensPolicy(prefill_tokens=4096, hold_s=0.5)
    assert p.decide(held(4, 10.0, prompt_tokens=4000), 10.1).count == 0
    d = p.decide(held(5, 10.0, prompt_tokens=5000), 10.1)
    assert d.count == 5 and d.token_budget == 4096  # the core takes requests while their prompts fit 4096
    d = p.decide(held(1, 10.0, prompt_tokens=100), 10.2)
    assert d.count == 0 and d.wake_at_s == pytest.approx(10.5)
    assert p.decide(held(1, 10.0, prompt_tokens=100), 10.5).count == 1


# -- adaptive ---------------------------------------------------------------------------------------------------
def test_rate_estimator_tracks_a_poisson_rate_and_decays_when_arrivals_stop() -> None:
    rng = random.Random(3)
    for rate in (2.0, 50.0, 800.0):
        est = RateEstimator(tau_s=5.0)
        t = 0.0
        while t < 60:
            t += rng.expovariate(rate)
            est.observe(t)
        assert est.rate(t) == pytest.approx(rate, rel=0.25)
        assert est.rate(t + 15) < 0.1 * est.rate(t)


def feed(policy: AdaptivePolicy, rate_per_s: float, until_s: float, seed: int = 1) -> float:
    rng = random.Random(seed)
    t = 0.0
    while True:
        nxt = t + rng.expovariate(rate_per_s)
        if nxt > until_s:
            return t
        t = nxt
        policy.on_arrival(t)


def test_adaptive_hold_stays_within_the_bound_and_shrinks_under_heavy_load() -> None:
    holds = []
    for rate in (0.5, 5.0, 50.0, 500.0, 5000.0):
        p = AdaptivePolicy(ttft_bound_s=1.0, service_ttft_s=0.2, target_batch=16, rate_window_s=2.0)
        t = feed(p, rate, 20.0)
        h = p.hold_s(t)
        assert 0 <= h <= 0.8 + 1e-12  # bound - service TTFT
        holds.append(h)
    assert holds[0] == pytest.approx(0.8)  # light load: the whole budget
    assert all(a >= b for a, b in itertools.pairwise(holds))
    assert holds[-1] < 0.01  # ~15 / 5000 s: batches fill by count at once


def test_adaptive_releases_at_target_batch_or_at_its_hold() -> None:
    p = AdaptivePolicy(ttft_bound_s=1.0, service_ttft_s=0.2, target_batch=4, rate_window_s=2.0)
    t = feed(p, 2.0, 30.0)
    h = p.hold_s(t)
    d = p.decide(held(2, t), t)
    assert d.count == 0 and d.wake_at_s == pytest.approx(t + h)
    assert p.decide(held(4, t), t).count == 4  # target reached: no reason to wait
    assert p.decide(held(2, t), t + h + 1e-6).count == 2
    with pytest.raises(ValueError):
        AdaptivePolicy(ttft_bound_s=0.1, service_ttft_s=0.2, target_batch=4, rate_window_s=2.0)


def test_make_policy_reads_the_validated_config() -> None:
    assert isinstance(make_policy(ClassConfig()), PassthroughPolicy)
    w = make_policy(ClassConfig(policy="window", window_ms=250))
    assert isinstance(w, WindowPolicy) and w.window_s == 0.25
    b = make_policy(ClassConfig(policy="batch"))
    assert isinstance(b, BatchPolicy) and b.max_batch == 16 and b.hold_limit_s == 0.25
    a = make_policy(ClassConfig(policy="adaptive", ttft_bound_ms=2000, service_ttft_ms=500))
    assert isinstance(a, AdaptivePolicy) and a.budget_s == pytest.approx(1.5)


# -- fairness ---------------------------------------------------------------------------------------------------
def test_a_flooding_tenant_cannot_starve_a_light_one() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(1000):
        q.push(f"flood-{i}", tenant="flood", cost=100, weight=1, arrived_s=0.0)
    for i in range(10):
        q.push(f"light-{i}", tenant="light", cost=100, weight=1, arrived_s=1.0)  # arrived after the flood
    first = [q.pop() for _ in range(20)]
    assert sum(x.startswith("light") for x in first) == 10
    # a newcomer after many picks is tagged near the current virtual time: it goes almost at once
    for _ in range(500):
        q.pop()
    q.push("late", tenant="light", cost=100, weight=1, arrived_s=2.0)
    assert [q.pop() for _ in range(2)].count("late") == 1


def test_weights_set_the_token_shares_of_backlogged_tenants() -> None:
    q: FairQueue[tuple[str, int]] = FairQueue()
    for i in range(300):
        q.push(("acme", i), tenant="acme", cost=100, weight=2.0, arrived_s=0.0)
        q.push(("beta", i), tenant="beta", cost=100, weight=1.0, arrived_s=0.0)
    first = [q.pop()[0] for _ in range(300)]
    assert first.count("acme") == pytest.approx(200, abs=2)


def test_fair_shares_count_tokens_not_requests() -> None:
    q: FairQueue[tuple[str, int]] = FairQueue()
    for i in range(200):
        q.push(("big", i), tenant="big", cost=1000, weight=1, arrived_s=0.0)
        q.push(("small", i), tenant="small", cost=100, weight=1, arrived_s=0.0)
    tokens = {"big": 0, "small": 0}
    for _ in range(110):
        who, _i = q.pop()
        tokens[who] += 1000 if who == "big" else 100
    assert tokens["big"] == pytest.approx(tokens["small"], rel=0.15)


def test_fair_queue_remove_and_oldest() -> None:
    q: FairQueue[str] = FairQueue()
    for i, t in enumerate((5.0, 3.0, 4.0)):
        q.push(f"x{i}", tenant=f"t{i}", cost=10, weight=1, arrived_s=t)
    assert q.oldest_s() == 3.0
    assert q.remove("x1") and not q.remove("x1")
    assert q.oldest_s() == 4.0 and len(q) == 2 and "x1" not in q
    assert [q.pop(), q.pop()] == ["x0", "x2"]
    assert q.peek() is None and q.oldest_s() is None
    with pytest.raises(IndexError):
        q.pop()


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 2000), st.booleans()), min_size=1, max_size=120
    ),
    weights=st.tuples(st.floats(0.5, 4), st.floats(0.5, 4), st.floats(0.5, 4)),
)
def test_fair_queue_fifo_per_tenant_and_removal(
    ops: list[tuple[str, int, bool]], weights: tuple[float, float, float]
) -> None:
    w = dict(zip("abc", weights, strict=True))
    q: FairQueue[int] = FairQueue()
    removed: set[int] = set()
    for i, (tenant, cost, drop) in enumerate(ops):
        q.push(i, tenant=tenant, cost=cost, weight=w[tenant], arrived_s=float(i))
        if drop:
            assert q.remove(i)
            removed.add(i)
    assert len(q) == len(ops) - len(removed)
    assert q.oldest_s() == next((float(i) for i in range(len(ops)) if i not in removed), None)
    order = [q.pop() for _ in range(len(q))]
    assert set(order) == set(range(len(ops))) - removed
    for tenant in "abc":
        mine = [i for i in order if ops[i][0] == tenant]
        assert mine == sorted(mine)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 2000)), min_size=2, max_size=150),
    weights=st.tuples(st.floats(0.5, 4), st.floats(0.5, 4), st.floats(0.5, 4)),
)
def test_fair_queue_bounds_the_normalised_service_gap(
    ops: list[tuple[str, int]], weights: tuple[float, float, float]
) -> None:
    """SCFQ's bound: while tenants i and j both wait, W_i/w_i - W_j/w_j <= L_max/w_i + L_max/w_j."""
    w = dict(zip("abc", weights, strict=True))
    q: FairQueue[int] = FairQueue()
    for i, (tenant, cost) in enumerate(ops):
        q.push(i, tenant=tenant, cost=cost, weight=w[tenant], arrived_s=0.0)
    waiting = {t: sum(1 for tt, _c in ops if tt == t) for t in "abc"}
    served = dict.fromkeys("abc", 0.0)
    max_cost = max(c for _t, c in ops)
    while len(q):
        tenant, cost = ops[q.pop()]
        served[tenant] += cost
        waiting[tenant] -= 1
        both = [t for t in "abc" if waiting[t] > 0]
        for a in both:
            for b in both:
                assert served[a] / w[a] - served[b] / w[b] <= max_cost / w[a] + max_cost / w[b] + 1e-6
