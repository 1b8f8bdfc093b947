"""Shapley values of a trace's energy, exactly: the ground truth a per-request energy bill is checked against.

The game. Serve only a coalition S of the trace's requests (same arrival times, same engine, same GPU: a
``sim.replay``) and take its energy. Two values per coalition, both exact integers (picojoules) from the replay:

- *above idle*: the energy above the board's idle floor, ``E(S) - P_idle x window``; window-independent, since
  outside the work the board draws exactly the floor. This is the energy the work itself causes.
- *busy*: the energy drawn while a step ran, floor included: what a bill that charges "the GPU while it worked for
  you" splits (joulegate's; its idle bucket holds only the time nothing ran).

The Shapley value of a player is its marginal contribution averaged over every order of joining; it is the unique
split that is efficient (values add up to the grand coalition's), symmetric, gives a null player nothing and is
additive over games.

Players are requests, summed per tenant. Why not tenants as players, as one would first think: with tenants as
players, the fixed cost of a shared decode step (most of its energy) is split equally between the tenants in it,
whatever their number of sequences, so a tenant's value depends on how the *other* tenants group their requests
into accounts: ten sequences under one account pay less than the same ten under ten accounts, and a lone sequence
beside them pays more. A bill must not move with someone else's account structure. With requests as players the
grouping does not matter (a tenant's value is the sum of its requests'). ``tenant_values`` computes the tenant
game too, for comparison.

Exactly, not by sampling. 2^n replays are out of reach for hundreds of requests, and sampled orders converge far too
slowly (a request's marginal cost is either a whole shared step or almost nothing). But requests that are never on
the GPU together do not interact: if the trace falls into *clusters* such that every coalition of a cluster's
requests has finished before the next cluster's first arrival, the engine starts every cluster empty, the game is
the sum of one game per cluster, and Shapley values (additive) are computed cluster by cluster, 2^k replays for a
cluster of k requests. ``clusters`` cuts the trace where the full trace leaves the GPU idle; ``shapley_truth``
checks the condition for every coalition it replays and refuses a trace that breaks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from sim.config import SimConfig
from sim.replay import Replay, TraceRequest, replay

__all__ = ["ShapleyTruth", "clusters", "shapley", "shapley_truth", "sum_by_tenant", "tenant_values"]


def shapley(values: Sequence[int]) -> list[Fraction]:
    """Exact Shapley values of the game of n players whose coalition ``mask`` (bit i: player i) is worth
    ``values[mask]`` (``len(values) == 2**n``; ``values[0]``, the empty coalition, is normally 0).

    phi_i = sum over S not holding i of |S|! (n - |S| - 1)! / n! x (v(S + i) - v(S)), summed in integers and divided
    once, so the result is exact for integer values."""
    n = len(values).bit_length() - 1
    if len(values) != 1 << n:
        raise ValueError(f"need 2**n coalition values, got {len(values)}")
    fact = [math.factorial(k) for k in range(n + 1)]
    out = []
    for i in range(n):
        bit = 1 << i
        total = 0
        for mask in range(1 << n):
            if mask & bit:
                continue
            k = mask.bit_count()
            total += fact[k] * fact[n - k - 1] * (values[mask | bit] - values[mask])
        out.append(Fraction(total, fact[n]))
    return out


def clusters(trace: Sequence[TraceRequest], full: Replay) -> list[tuple[TraceRequest, ...]]:
    """Cut ``trace`` (in arrival order) wherever a request arrives after every earlier one is done in ``full`` (the
    replay of the whole trace, started at the trace's origin): the GPU's busy periods."""
    done = {t.request_id: t.done_ns for t in full.timelines}
    out: list[list[TraceRequest]] = []
    busy_until = None
    for r in sorted(trace, key=lambda r: (r.arrival_ns, r.request_id)):
        arrival = full.start_ns + r.arrival_ns
        if busy_until is None or arrival > busy_until:
            out.append([])
            busy_until = arrival
        out[-1].append(r)
        busy_until = max(busy_until, done[r.request_id])
    return [tuple(c) for c in out]


@dataclass(frozen=True, slots=True)
class ShapleyTruth:
    """Exact Shapley values (pJ) of each request, in the above-idle and the busy game, and each game's total."""

    above_idle_pj: Mapping[str, Fraction]
    busy_pj: Mapping[str, Fraction]
    total_above_idle_pj: int
    total_busy_pj: int
    cluster_sizes: tuple[int, ...]
    # per cluster: the two games' values of every coalition (bit i: the cluster's i-th request in arrival order)
    coalition_values: tuple[tuple[tuple[int, int], ...], ...]
    cluster_ids: tuple[tuple[str, ...], ...]

    @property
    def replays(self) -> int:
        return sum(1 << k for k in self.cluster_sizes)


def shapley_truth(
    trace: Sequence[TraceRequest],
    config: SimConfig,
    *,
    start_ns: int = 0,
    max_cluster: int = 12,
    on_cluster: Callable[[int, int], None] | None = None,
) -> ShapleyTruth:
    """Request-level Shapley values of ``trace`` served by a simulator with ``config``, cluster by cluster.

    Raises ValueError for a cluster of more than ``max_cluster`` requests (2^k replays), and when some coalition of a
    cluster is still on the GPU when the next cluster begins (the clusters would interact: spread the trace out).
    ``on_cluster(index, count)`` is called as each cluster is done (progress)."""
    full = replay(trace, config, start_ns=start_ns)
    parts = clusters(trace, full)
    above: dict[str, Fraction] = {}
    busy: dict[str, Fraction] = {}
    sizes: list[int] = []
    all_values: list[tuple[tuple[int, int], ...]] = []
    for index, part in enumerate(parts):
        k = len(part)
        if k > max_cluster:
            raise ValueError(
                f"cluster {index} holds {k} requests ({part[0].request_id} ...): more than {max_cluster}, whose exact "
                "Shapley values would take 2^k replays; leave the GPU idle between smaller groups of requests"
            )
        next_start = start_ns + parts[index + 1][0].arrival_ns if index + 1 < len(parts) else None
        values: list[tuple[int, int]] = []
        for mask in range(1 << k):
            members = [part[i] for i in range(k) if mask >> i & 1]
            if not members:
                values.append((0, 0))
                continue
            got = replay(members, config, start_ns=start_ns)
            if next_start is not None and got.last_activity_ns >= next_start:
                ids = ", ".join(r.request_id for r in members)
                raise ValueError(
                    f"requests {ids} alone are still on the GPU when the next cluster begins "
                    f"({part[-1].request_id} -> {parts[index + 1][0].request_id}): the clusters interact"
                )
            values.append((got.above_idle_pj, got.busy_pj))
        for game, out in ((0, above), (1, busy)):
            phis = shapley([v[game] for v in values])
            for r, phi in zip(part, phis, strict=True):
                out[r.request_id] = phi
        sizes.append(k)
        all_values.append(tuple(values))
        if on_cluster is not None:
            on_cluster(index, len(parts))
    return ShapleyTruth(
        above_idle_pj=MappingProxyType(above),
        busy_pj=MappingProxyType(busy),
        total_above_idle_pj=full.above_idle_pj,
        total_busy_pj=full.busy_pj,
        cluster_sizes=tuple(sizes),
        coalition_values=tuple(all_values),
        cluster_ids=tuple(tuple(r.request_id for r in part) for part in parts),
    )


def tenant_values(truth: ShapleyTruth, tenant_of: Mapping[str, str], game: int = 0) -> dict[str, Fraction]:
    """The Shapley values of the *tenant* game (tenants as players; ``game`` 0 above idle, 1 busy), from the
    coalition values ``shapley_truth`` already has: a coalition of tenants is worth the sum over clusters of the
    coalition of their requests there. For comparison with the request-level values (see the module docstring)."""
    tenants = sorted(set(tenant_of.values()))
    index = {t: i for i, t in enumerate(tenants)}
    # per cluster: the request bits of each tenant
    masks: list[list[int]] = []
    for ids in truth.cluster_ids:
        per_tenant = [0] * len(tenants)
        for bit, rid in enumerate(ids):
            per_tenant[index[tenant_of[rid]]] |= 1 << bit
        masks.append(per_tenant)

    def value(tmask: int) -> int:
        total = 0
        for per_tenant, values in zip(masks, truth.coalition_values, strict=True):
            rmask = 0
            for t in range(len(tenants)):
                if tmask >> t & 1:
                    rmask |= per_tenant[t]
            total += values[rmask][game]
        return total

    return dict(zip(tenants, shapley([value(m) for m in range(1 << len(tenants))]), strict=True))


def sum_by_tenant(values: Mapping[str, Fraction], tenant_of: Mapping[str, str]) -> dict[str, Fraction]:
    """Request-level values summed per tenant."""
    out: dict[str, Fraction] = {}
    for rid, v in values.items():
        t = tenant_of[rid]
        out[t] = out.get(t, Fraction(0)) + v
    return out
