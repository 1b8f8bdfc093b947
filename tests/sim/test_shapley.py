"""sim.shapley: the exact Shapley computation (its axioms, by hypothesis; a closed form), and the cluster-by-cluster
ground truth of a trace against brute force over every coalition of the whole trace."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import permutations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.config import SimConfig
from sim.costmodel import with_cost_model
from sim.replay import TraceRequest, replay
from sim.shapley import clusters, shapley, shapley_truth, sum_by_tenant, tenant_values

MS = 1_000_000
S = 1_000_000_000


@st.composite
def games(draw: st.DrawFn, n_min: int = 1, n_max: int = 6) -> list[int]:
    """Integer games with v(empty) = 0."""
    n = draw(st.integers(n_min, n_max))
    values = draw(st.lists(st.integers(-(10**12), 10**12), min_size=1 << n, max_size=1 << n))
    values[0] = 0
    return values


def _by_permutations(values: list[int]) -> list[Fraction]:
    """The definition: marginal contributions averaged over every order of joining."""
    n = len(values).bit_length() - 1
    total = [0] * n
    for order in permutations(range(n)):
        mask = 0
        for i in order:
            total[i] += values[mask | 1 << i] - values[mask]
            mask |= 1 << i
    return [Fraction(t, math.factorial(n)) for t in total]


@settings(max_examples=80, deadline=None)
@given(games(n_max=5))
def test_matches_the_definition_over_every_order(values: list[int]) -> None:
    assert shapley(values) == _by_permutations(values)


@settings(max_examples=100, deadline=None)
@given(games())
def test_efficiency_values_add_up_to_the_grand_coalition(values: list[int]) -> None:
    assert sum(shapley(values)) == values[-1]


@settings(max_examples=100, deadline=None)
@given(games(n_min=2), st.data())
def test_symmetric_players_get_the_same(values: list[int], data: st.DataObject) -> None:
    n = len(values).bit_length() - 1
    i, j = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
    # make i and j interchangeable: v(S + i) = v(S + j) for every S holding neither
    for mask in range(1 << n):
        if not mask >> i & 1 and mask >> j & 1:
            values[mask ^ (1 << j) | (1 << i)] = values[mask]
    phi = shapley(values)
    assert phi[i] == phi[j]


@settings(max_examples=100, deadline=None)
@given(games(), st.data())
def test_a_null_player_gets_nothing(values: list[int], data: st.DataObject) -> None:
    n = len(values).bit_length() - 1
    i = data.draw(st.integers(0, n - 1))
    for mask in range(1 << n):
        if mask >> i & 1:
            values[mask] = values[mask ^ (1 << i)]
    phi = shapley(values)
    assert phi[i] == 0
    assert sum(phi) == values[-1]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(games(n, n), games(n, n))))
def test_additive_over_games(pair: tuple[list[int], list[int]]) -> None:
    v, w = pair
    together = shapley([a + b for a, b in zip(v, w, strict=True)])
    assert together == [a + b for a, b in zip(shapley(v), shapley(w), strict=True)]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=7))
def test_the_airport_game_has_its_closed_form(costs: list[int]) -> None:
    """A runway serves every plane of a coalition: it costs the largest need among them. Littlechild and Owen: each
    segment of the runway is shared equally by the planes that need it."""
    n = len(costs)
    values = [max((costs[i] for i in range(n) if mask >> i & 1), default=0) for mask in range(1 << n)]
    levels = sorted(set(costs))
    expected = []
    for c in costs:
        phi = Fraction(0)
        below = 0
        for level in levels:
            if level > c:
                break
            phi += Fraction(level - below, sum(1 for x in costs if x >= level))
            below = level
        expected.append(phi)
    assert shapley(values) == expected


def test_refuses_a_list_that_is_not_a_game() -> None:
    with pytest.raises(ValueError, match="2\\*\\*n"):
        shapley([0, 1, 2])


# --- the ground truth of a trace ---

CONFIG = SimConfig()


def _trace() -> list[TraceRequest]:
    """Two clusters (the GPU idles between them) of requests of three tenants."""
    return [
        TraceRequest("a0", "a", 0, 800, 6),
        TraceRequest("b0", "b", 20 * MS, 40, 60),
        TraceRequest("c0", "c", 20 * MS, 200, 20),
        TraceRequest("a1", "a", 3 * S, 30, 40),
        TraceRequest("b1", "b", 3 * S + 50 * MS, 600, 10),
        TraceRequest("c1", "c", 3 * S + 50 * MS, 10, 3),
    ]


def _brute_force(trace: list[TraceRequest], config: SimConfig, players: list[list[str]]) -> list[list[Fraction]]:
    """Shapley values of both games with ``players`` (groups of request ids), every coalition replayed whole."""
    by_id = {r.request_id: r for r in trace}
    above, busy = [], []
    for mask in range(1 << len(players)):
        members = [by_id[rid] for i, group in enumerate(players) if mask >> i & 1 for rid in group]
        rep = replay(members, config, start_ns=0)
        above.append(rep.above_idle_pj if members else 0)
        busy.append(rep.busy_pj if members else 0)
    return [shapley(above), shapley(busy)]


@pytest.mark.parametrize("model", ["default", "misspecified"])
def test_cluster_by_cluster_equals_every_coalition_of_the_whole_trace(model: str) -> None:
    config = with_cost_model(CONFIG, model)
    trace = _trace()
    truth = shapley_truth(trace, config)
    assert truth.cluster_sizes == (3, 3) and truth.replays == 16  # instead of 64
    ids = [r.request_id for r in trace]
    above, busy = _brute_force(trace, config, [[rid] for rid in ids])
    assert [truth.above_idle_pj[rid] for rid in ids] == above
    assert [truth.busy_pj[rid] for rid in ids] == busy
    full = replay(trace, config, start_ns=0)
    assert sum(truth.above_idle_pj.values()) == truth.total_above_idle_pj == full.above_idle_pj
    assert sum(truth.busy_pj.values()) == truth.total_busy_pj == full.busy_pj


def test_the_tenant_game_from_cluster_values_equals_its_brute_force() -> None:
    trace = _trace()
    truth = shapley_truth(trace, CONFIG)
    tenant_of = {r.request_id: r.tenant for r in trace}
    groups = [[r.request_id for r in trace if r.tenant == t] for t in "abc"]
    above, busy = _brute_force(trace, CONFIG, groups)
    assert tenant_values(truth, tenant_of, 0) == dict(zip("abc", above, strict=True))
    assert tenant_values(truth, tenant_of, 1) == dict(zip("abc", busy, strict=True))
    # one request per tenant and cluster: the tenant game is the request game summed per tenant
    assert sum_by_tenant(truth.above_idle_pj, tenant_of) == tenant_values(truth, tenant_of, 0)


def test_the_tenant_game_moves_with_how_others_group_their_requests() -> None:
    """Why players are requests: with tenants as players, tenant x's value changes when the other requests are
    filed under one tenant or under two; the request-level value summed per tenant cannot."""
    trace = [TraceRequest("x", "x", 0, 20, 200)] + [TraceRequest(f"y{i}", "y", 0, 20, 200) for i in range(4)]
    one = {r.request_id: r.tenant for r in trace}
    two = {**one, "y2": "z", "y3": "z"}
    truth = shapley_truth(trace, CONFIG)
    assert tenant_values(truth, one, 0)["x"] != tenant_values(truth, two, 0)["x"]
    assert sum_by_tenant(truth.above_idle_pj, one)["x"] == sum_by_tenant(truth.above_idle_pj, two)["x"]
    # five identical requests served together: each gets a fifth
    assert len(set(truth.above_idle_pj.values())) == 1


def test_clusters_are_the_busy_periods_of_the_full_trace() -> None:
    trace = _trace()
    parts = clusters(trace, replay(trace, CONFIG, start_ns=0))
    assert [[r.request_id for r in p] for p in parts] == [["a0", "b0", "c0"], ["a1", "b1", "c1"]]


def test_refuses_too_large_a_cluster() -> None:
    trace = [TraceRequest(f"r{i}", "t", i * MS, 20, 100) for i in range(5)]
    with pytest.raises(ValueError, match="cluster 0 holds 5 requests"):
        shapley_truth(trace, CONFIG, max_cluster=4)


def test_refuses_clusters_that_interact() -> None:
    """With waiting_served_ratio 1.2, fewer than floor(4 x 1.2) = 4 newcomers wait up to max_waiting_tokens decode
    steps for a running batch of 4, while the full trace's 4 newcomers interrupt it at once. So a coalition holding
    one newcomer finishes later than the whole trace does: past the next cluster's first arrival."""
    config = SimConfig(waiting_served_ratio=1.2, max_waiting_tokens=20)
    running = [TraceRequest(f"run{i}", "t", 0, 10, 30) for i in range(4)]
    newcomers = [TraceRequest(f"new{i}", "t", 25 * MS, 10, 40) for i in range(4)]
    first = running + newcomers
    end_whole = replay(first, config, start_ns=0).last_activity_ns
    end_one = replay([*running, newcomers[0]], config, start_ns=0).last_activity_ns
    assert end_one > end_whole + 100 * MS  # the lone newcomer waited ~20 steps
    later = TraceRequest("later", "t", (end_whole + end_one) // 2, 10, 5)
    with pytest.raises(ValueError, match="the clusters interact"):
        shapley_truth([*first, later], config)
