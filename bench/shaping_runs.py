"""Run plans for the shaping benchmarks: which policy serves which trace when, and over which window it is metered.

A *lane* is one backend. Runs on one lane go one after the other, each starting on a metering-epoch boundary with
the backend idle, so the energies of two policies never mix; lanes (backends) run at the same time. Every run of a
scenario (one trace on one backend) is metered over a window of the *same* length, the shortest whole number of
epochs that holds the slowest of its runs from its start to its last answer (plus the counter lag): over the same
wall-clock span every policy pays the same idle floor for the same requests, so the comparison is fair and the idle
power between arrivals stays on the bill.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from bench.shaping_drive import (
    ClientResult,
    Metadata,
    WindowEnergy,
    epoch_ceil_ns,
    read_window,
    run_trace,
    sleep_until_ns,
    wait_attributed,
)
from bench.shaping_report import PolicySpec
from bench.shaping_trace import Trace
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.pb.fmaas import generation_pb2_grpc as pbg

log = structlog.get_logger(__name__)
NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Scenario:
    """One trace served by one backend (its own model id in the gateway, so its classes are its own)."""

    trace: Trace
    model_id: str
    backend: str  # the backend's name in the gateway (and in the energy reports)


@dataclass(slots=True)
class RunRecord:
    scenario: Scenario
    policy: PolicySpec
    start_ns: int
    clients: list[ClientResult] = field(default_factory=list)
    last_done_ns: int = 0
    slot_end_ns: int = 0  # when the lane's next run starts (or the lane ends)
    window_end_ns: int = 0
    notes: list[str] = field(default_factory=list)


def max_hold_s(policy: PolicySpec) -> float:
    """The longest the policy holds a request (adaptive: its whole TTFT bound, an upper bound on its hold)."""
    p = policy.params
    if p.get("policy") == "adaptive":
        return float(p["ttft_bound_ms"]) / 1000
    return float(p.get("hold_ms", p.get("window_ms", 0.0))) / 1000


async def run_lane(
    stub: pbg.GenerationServiceStub,
    runs: Sequence[tuple[Scenario, PolicySpec]],
    *,
    epoch_ns: int,
    tail_s: float,
    prompt_of: Callable[[int, int], str],
    metadata: Metadata,
    lead_s: float = 0.3,
    margin_s: float = 0.3,
    on_done: Callable[[RunRecord], None] | None = None,
    deadline_ns: int | None = None,
    on_skip: Callable[[Scenario, PolicySpec], None] | None = None,
) -> list[RunRecord]:
    """Run ``runs`` one after the other on one backend. Each run starts on an epoch boundary and keeps its slot until
    its trace's last arrival + the longest hold of any policy run on that trace + ``tail_s``, or until its last
    answer + ``margin_s`` if that is later (both rounded up to an epoch). With ``deadline_ns``, a run whose slot would
    end past it is skipped (``on_skip``), so that a run under a hard time limit still ends with its windows metered."""
    out: list[RunRecord] = []
    # every run of a scenario keeps a slot long enough for the scenario's longest hold, so that all of them can be
    # metered over a window of the same length (assign_windows)
    hold_s: dict[str, float] = {}
    for scenario, policy in runs:
        hold_s[scenario.trace.name] = max(hold_s.get(scenario.trace.name, 0.0), max_hold_s(policy))
    next_start = epoch_ceil_ns(time.time_ns() + round(lead_s * NS_PER_S), epoch_ns)
    for scenario, policy in runs:
        slot_s = scenario.trace.last_offset_s + hold_s[scenario.trace.name] + tail_s
        if deadline_ns is not None and next_start + round(slot_s * NS_PER_S) > deadline_ns:
            log.warning("run_skipped", scenario=scenario.trace.name, policy=policy.name, reason="deadline")
            if on_skip is not None:
                on_skip(scenario, policy)
            continue
        rec = RunRecord(scenario, policy, next_start)
        await sleep_until_ns(rec.start_ns)
        rec.clients = await run_trace(
            stub,
            scenario.trace,
            model_id=scenario.model_id,
            traffic_class=policy.name,
            start_ns=rec.start_ns,
            prompt_of=prompt_of,
            metadata=metadata,
        )
        rec.last_done_ns = max(c.done_ns for c in rec.clients)
        reserved = rec.start_ns + round(slot_s * NS_PER_S)
        rec.slot_end_ns = epoch_ceil_ns(max(reserved, rec.last_done_ns + round(margin_s * NS_PER_S)), epoch_ns)
        errors = sum(c.error is not None for c in rec.clients)
        log.info(
            "run_done",
            scenario=scenario.trace.name,
            policy=policy.name,
            requests=len(rec.clients),
            errors=errors,
            took_s=round((rec.last_done_ns - rec.start_ns) / NS_PER_S, 1),
        )
        if on_done is not None:
            on_done(rec)
        out.append(rec)
        next_start = rec.slot_end_ns
    return out


def assign_windows(records: Sequence[RunRecord], epoch_ns: int, margin_s: float = 0.3) -> None:
    """Give every run of a scenario a window of the same length: the longest any of them needs, in whole epochs.

    A run whose slot is shorter than that common window (it would overlap the lane's next run) keeps the window its
    own slot allows, and says so in its notes.
    """
    by_scenario: dict[str, list[RunRecord]] = {}
    for r in records:
        by_scenario.setdefault(r.scenario.trace.name, []).append(r)
    for recs in by_scenario.values():
        need = max(epoch_ceil_ns(r.last_done_ns + round(margin_s * NS_PER_S), epoch_ns) - r.start_ns for r in recs)
        for r in recs:
            if r.start_ns + need <= r.slot_end_ns:
                r.window_end_ns = r.start_ns + need
            else:
                r.window_end_ns = r.slot_end_ns
                own_s = (r.slot_end_ns - r.start_ns) / NS_PER_S
                r.notes.append(f"window {own_s:.0f} s, not the common {need / NS_PER_S:.0f} s")


async def measure(
    reports: epbg.EnergyReportsStub, metadata: Metadata, records: Sequence[RunRecord], timeout_s: float = 120.0
) -> list[WindowEnergy]:
    """Wait until every window is attributed, then read each one's energy (in ``records`` order)."""
    until: dict[str, int] = {}
    for r in records:
        until[r.scenario.backend] = max(until.get(r.scenario.backend, 0), r.window_end_ns)
    await wait_attributed(reports, metadata, until, timeout_s)
    return list(
        await asyncio.gather(
            *(
                read_window(
                    reports,
                    metadata,
                    backend=r.scenario.backend,
                    model_id=r.scenario.model_id,
                    start_ns=r.start_ns,
                    end_ns=r.window_end_ns,
                )
                for r in records
            )
        )
    )
