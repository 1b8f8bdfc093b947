"""What recorded traffic would have cost under other policies: the ledger's requests replayed on simulated backends.

``load`` reads one window of a ledger (SQLite or PostgreSQL): every request that reached a backend (its arrival at
the gateway, its release to a backend, prompt and generated tokens, traffic class, backend, first token) and the
backends' measured energy (``backend_epochs``: counter, idle). ``evaluate`` replays those requests through
``sim.fleet`` (TGI's continuous batching and the simulated H100's power, ``sim/costmodel.py``) under each
``Scenario``: placement (``spread``/``pack``, the gateway's own ``common.placement``), window shaping for some classes,
parking of the backends a policy left unused. ``table`` prints them beside the recorded baseline.

What is compared. Every scenario runs over the same window as the recorded epochs, on as many backends as the
ledger shows (or ``--backends``), so the idle floors compare:
- ``J``: the fleet's energy over the window; ``J/token``: per generated token; ``idle J``: drawn while no step ran;
- ``above-floor J/req``: energy less the fleet's idle floor over the window (idle power x window x backends), per
  request: what the work itself cost, which placement and shaping change; the floor is what parking changes;
- ``TTFT``: from arrival at the gateway (holding included) to the first token;
- ``GPUs``: the most backends holding requests at one instant (what the load needed); ``parked``: backends the
  '+ park' scenarios scaled in at least once (``ParkModel``: idle past ``park_after_s``, ``wake_j`` per wake; the
  bill and idle J are net of it);
- ``as recorded`` replays the recorded release times on spread placement: how close the simulator's cost model
  comes to the measured energy on this traffic (on the demo's simulated GPUs, within a few per cent).
The recorded row's above-floor uses the cost model's idle power (the ledger does not store a floor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from common.placement import Policy
from meter.store.models import BackendEpoch, Request
from sim import costmodel
from sim.config import SimConfig
from sim.fleet import FleetRequest, FleetResult, hold_windows, parking, serve

PJ_PER_J = 10**12
NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class Recorded:
    """One window of a ledger."""

    start_ns: int  # absolute (ns since the epoch): the first epoch's start
    end_ns: int  # the last epoch's end
    backends: tuple[str, ...]
    requests: tuple[FleetRequest, ...]  # offsets from start_ns; release_ns as recorded
    ttft_ns: tuple[int | None, ...]  # per request (as ``requests``): recorded first token - received, if any
    generated_tokens: int
    counter_mj: int | None  # measured over the epochs; None when the meter's epochs do not cover every request
    idle_mj: int | None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    placement: Policy = "spread"
    pack_target: int = 7
    hold_ms: float = 0.0  # window shaping for hold_classes (0: released at arrival)
    hold_classes: frozenset[str] | None = None  # None: every class
    spill_on_prefill: bool = False  # pack: [routing] pack_spill_on_prefill
    park: bool = False  # backends idle past ParkModel.park_after_s are scaled in (sim.fleet.parking)
    as_recorded: bool = False  # released when the gateway released them, not at arrival


@dataclass(frozen=True, slots=True)
class ParkModel:
    """What the '+ park' scenarios assume: a backend without work for ``park_after_s`` is scaled in (the parking
    signal's default hold), and each wake costs ``wake_j`` (default: 60 s at 200 W, loading an 8B model's weights
    and warming up). The TTFT of a wake is not modelled."""

    park_after_s: float = 300.0
    wake_j: float = 12_000.0


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the comparison."""

    name: str
    requests: int
    energy_j: float | None  # None: not measured (the recorded row, when the meter's epochs miss some requests)
    j_per_token: float | None
    idle_j: float | None
    above_floor_j_per_req: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    gpus: int
    parked: int = 0


def load(engine: sa.Engine, start_ns: int | None, end_ns: int | None, model: str | None = None) -> Recorded:
    """The finished requests received in [start_ns, end_ns) (of ``model``) that reached a backend, and the epochs of
    their backends that overlap the span from the first arrival to the last end. ValueError when there are none."""
    q = sa.select(
        Request.request_id,
        Request.backend,
        Request.traffic_class,
        Request.received_ns,
        Request.released_ns,
        Request.first_token_ns,
        Request.done_ns,
        Request.prompt_tokens,
        Request.generated_tokens,
    ).where(Request.done_ns.is_not(None), Request.backend.is_not(None), Request.prompt_tokens > 0)
    if start_ns is not None:
        q = q.where(Request.received_ns >= start_ns)
    if end_ns is not None:
        q = q.where(Request.received_ns < end_ns)
    if model is not None:
        q = q.where(Request.model_id == model)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(Request.received_ns, Request.request_id)).all()
        if not rows:
            raise ValueError("no finished request reached a backend in that range")
        backends = tuple(sorted({r.backend for r in rows}))
        first = min(r.received_ns for r in rows)
        last = max(r.done_ns for r in rows)
        epochs = conn.execute(
            sa.select(
                BackendEpoch.backend,
                BackendEpoch.epoch_start_ns,
                BackendEpoch.epoch_end_ns,
                BackendEpoch.counter_mj,
                BackendEpoch.idle_mj,
                BackendEpoch.first_reading_ns,
                BackendEpoch.last_reading_ns,
            ).where(
                BackendEpoch.backend.in_(backends),
                BackendEpoch.epoch_start_ns < last,
                BackendEpoch.epoch_end_ns > first,
            )
        ).all()
        by_backend: dict[str, list[Any]] = {}
        for e in epochs:
            by_backend.setdefault(e.backend, []).append(e)
    # the span every backend's meter covers (one backend's last epochs may not be attributed yet). The epochs' counter
    # energy runs from each backend's first reading to its last, not from its first epoch's start (a meter that
    # started mid-epoch has no readings before): the window the replay is held against is the readings'.
    read: list[list[Any]] = []  # per backend, its covered epochs that hold readings
    if set(by_backend) == set(backends):
        epochs_end = min(max(e.epoch_end_ns for e in es) for es in by_backend.values())
        read = [[e for e in es if e.epoch_end_ns <= epochs_end and e.first_reading_ns is not None]
                for es in by_backend.values()]  # fmt: skip
    if read and all(read):
        covered = [e for e in epochs if e.epoch_end_ns <= epochs_end]
        w_start = min(first, max(min(e.first_reading_ns for e in es) for es in read))
        w_end = min(max(e.last_reading_ns for e in es) for es in read)
    else:  # a backend without a metered epoch (or one without readings): no measured baseline
        w_start, w_end, covered = first, last, []
    measured = bool(covered) and w_end >= last
    requests = snap_releases(
        FleetRequest(
            request_id=r.request_id,
            arrival_ns=r.received_ns - w_start,
            prompt_tokens=r.prompt_tokens,
            new_tokens=max(1, r.generated_tokens),
            traffic_class=r.traffic_class or "",
            release_ns=(r.released_ns - w_start) if r.released_ns is not None else None,
        )
        for r in rows
    )
    return Recorded(
        start_ns=w_start,
        end_ns=w_end,
        backends=backends,
        requests=requests,
        ttft_ns=tuple(r.first_token_ns - r.received_ns if r.first_token_ns is not None else None for r in rows),
        generated_tokens=sum(r.generated_tokens for r in rows),
        counter_mj=sum(e.counter_mj for e in covered) if measured else None,
        idle_mj=sum(e.idle_mj for e in covered) if measured else None,
    )


HELD_NS = 5 * NS_PER_MS  # a request released this long after its arrival was held by the shaper
TOGETHER_NS = 5 * NS_PER_MS  # held requests of one class released this close to the previous one left together


def snap_releases(requests: Iterable[FleetRequest]) -> tuple[FleetRequest, ...]:
    """The recorded releases with every batch the shaper released together on one instant (its first release).

    The gateway stamps each request of a released batch as it hands it on (a fraction of a millisecond apart), and
    sends the batch to one backend; the fleet replay knows a batch by one release instant. Held requests (released
    ``HELD_NS`` or more after arrival) of a class released within ``TOGETHER_NS`` of the previous one join its batch.
    Pure; order as given."""
    out = list(requests)
    held = sorted(
        (i for i, r in enumerate(out) if r.release_ns is not None and r.release_ns - r.arrival_ns >= HELD_NS),
        key=lambda i: (out[i].traffic_class, out[i].released_ns),
    )
    first: FleetRequest | None = None
    prev: FleetRequest | None = None
    for i in held:
        r = out[i]
        if (
            prev is None
            or first is None
            or r.traffic_class != prev.traffic_class
            or r.released_ns - prev.released_ns > TOGETHER_NS
        ):
            first = r
        prev = r
        out[i] = replace(r, release_ns=first.released_ns)
    return tuple(out)


def sim_config(recorded: Recorded, cost_model: str = "default") -> SimConfig:
    """The simulator's config for this traffic: the cost model's knobs, limits wide enough for every request."""
    longest_prompt = max(r.prompt_tokens for r in recorded.requests)
    longest = max(r.prompt_tokens + r.new_tokens for r in recorded.requests)
    base = SimConfig()
    max_input = max(base.max_input_tokens, longest_prompt)
    max_total = max(base.max_total_tokens, longest + 1, max_input + 1)
    config = replace(
        base,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        max_batch_prefill_tokens=max(base.max_batch_prefill_tokens, max_input),
        max_batch_total_tokens=max(base.max_batch_total_tokens, max_total),
    )
    return costmodel.with_cost_model(config, cost_model)


def default_scenarios(
    pack_target: int, hold_ms: Sequence[float], hold_classes: frozenset[str] | None
) -> list[Scenario]:
    out = [
        Scenario("as recorded", as_recorded=True),
        Scenario("spread"),
        Scenario(f"pack {pack_target}", placement="pack", pack_target=pack_target),
        Scenario(f"pack {pack_target} + park", placement="pack", pack_target=pack_target, park=True),
        Scenario(
            f"pack {pack_target}, spill on prefill", placement="pack", pack_target=pack_target, spill_on_prefill=True
        ),
    ]
    which = "all" if hold_classes is None else ",".join(sorted(hold_classes))
    for ms in hold_ms:
        out.append(Scenario(f"spread, hold {which} {ms:g} ms", hold_ms=ms, hold_classes=hold_classes))
        out.append(
            Scenario(
                f"pack {pack_target} + park, hold {which} {ms:g} ms",
                placement="pack",
                pack_target=pack_target,
                hold_ms=ms,
                hold_classes=hold_classes,
                park=True,
            )
        )
    return out


def run_scenario(recorded: Recorded, scenario: Scenario, config: SimConfig, backends: int) -> FleetResult:
    if scenario.as_recorded:
        trace: Sequence[FleetRequest] = recorded.requests
    else:
        trace = hold_windows(recorded.requests, round(scenario.hold_ms * NS_PER_MS), scenario.hold_classes)
    return serve(
        trace,
        config,
        backends=backends,
        policy=scenario.placement,
        pack_target=scenario.pack_target,
        spill_on_prefill=scenario.spill_on_prefill,
        end_ns=recorded.end_ns - recorded.start_ns,
        tail_ns=0,  # the recorded window is the window: its epochs cover the requests' ends
    )


def percentile(values: Sequence[int], q: float) -> float | None:
    """Nearest-rank percentile (ms) of ns values; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))
    return ordered[int(k)] / NS_PER_MS


def recorded_row(recorded: Recorded, config: SimConfig, ttft_class: str | None = None) -> Row:
    n = len(recorded.requests)
    ttft = [
        t
        for r, t in zip(recorded.requests, recorded.ttft_ns, strict=True)
        if t is not None and (ttft_class is None or r.traffic_class == ttft_class)
    ]
    p50, p95 = percentile(ttft, 50), percentile(ttft, 95)
    name = "recorded (measured)"
    if recorded.counter_mj is None or recorded.idle_mj is None:
        return Row(name, n, None, None, None, None, p50, p95, gpus=len(recorded.backends))
    energy_j = recorded.counter_mj / 1000
    floor_pj = costmodel.idle_power_mw(config) * (recorded.end_ns - recorded.start_ns) * len(recorded.backends)
    return Row(
        name=name,
        requests=n,
        energy_j=energy_j,
        j_per_token=energy_j / max(1, recorded.generated_tokens),
        idle_j=recorded.idle_mj / 1000,
        above_floor_j_per_req=(energy_j - floor_pj / PJ_PER_J) / n,
        ttft_p50_ms=p50,
        ttft_p95_ms=p95,
        gpus=len(recorded.backends),
    )


def scenario_row(
    name: str,
    result: FleetResult,
    park: ParkModel | None,
    classes: dict[str, str] | None = None,
    ttft_class: str | None = None,
) -> Row:
    n = len(result.served)
    energy, idle, parked = result.energy_pj, result.idle_pj, 0
    if park is not None:
        p = parking(result, park_after_ns=round(park.park_after_s * 1e9), wake_pj=round(park.wake_j * PJ_PER_J))
        energy -= p.saving_pj
        idle -= p.saving_pj
        parked = p.parked_backends
    ttft = [s.ttft_ns for s in result.served if ttft_class is None or (classes or {}).get(s.request_id) == ttft_class]
    return Row(
        name=name,
        requests=n,
        energy_j=energy / PJ_PER_J,
        j_per_token=energy / PJ_PER_J / max(1, result.generated_tokens),
        idle_j=idle / PJ_PER_J,
        above_floor_j_per_req=result.above_floor_pj / PJ_PER_J / max(1, n),
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p95_ms=percentile(ttft, 95),
        gpus=result.peak_backends_busy,
        parked=parked,
    )


def evaluate(
    recorded: Recorded,
    scenarios: Sequence[Scenario],
    *,
    backends: int | None = None,
    cost_model: str = "default",
    ttft_class: str | None = None,
    park: ParkModel = ParkModel(),
) -> list[Row]:
    """The recorded row, then one per scenario. ``ttft_class``: TTFT of that class's requests only (energy is the
    whole fleet's)."""
    config = sim_config(recorded, cost_model)
    n = backends or len(recorded.backends)
    classes = {r.request_id: r.traffic_class for r in recorded.requests}
    rows = [recorded_row(recorded, config, ttft_class)]
    for s in scenarios:
        result = run_scenario(recorded, s, config, n)
        rows.append(scenario_row(s.name, result, park if s.park else None, classes, ttft_class))
    return rows


def table(rows: Sequence[Row]) -> str:
    head = (
        f"{'policy':<34} {'requests':>8} {'J':>10} {'J/token':>8} {'idle J':>9} {'above-floor J/req':>17} "
        f"{'TTFT p50 ms':>11} {'TTFT p95 ms':>11} {'GPUs':>5} {'parked':>6}"
    )
    lines = [head]

    def num(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    for r in rows:
        lines.append(
            f"{r.name:<34} {r.requests:>8} {num(r.energy_j, 1):>10} {num(r.j_per_token, 3):>8} "
            f"{num(r.idle_j, 1):>9} {num(r.above_floor_j_per_req, 2):>17} {num(r.ttft_p50_ms, 1):>11} "
            f"{num(r.ttft_p95_ms, 1):>11} {r.gpus:>5} {r.parked:>6}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str, title: str) -> None:
    """Bars of above-floor J/request and of the bill (J), TTFT p95 as points: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 0.45 * len(rows) + 2), sharey=True)
    ax1.barh(names, [r.energy_j or 0 for r in rows], color="tab:gray")
    ax1.set_xlabel("energy over the window, J")
    ax2.barh(names, [r.above_floor_j_per_req or 0 for r in rows], color="tab:green")
    ax2.set_xlabel("above-floor J per request")
    ax3.barh(names, [r.ttft_p95_ms or 0 for r in rows], color="tab:blue")
    ax3.set_xlabel("TTFT p95, ms")
    ax1.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
