"""Helpers for the end-to-end metering tests: traffic from several tenants, waiting for attribution, the books.

The ``test_metering_*.py`` tests import it.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import sqlalchemy as sa

from meter.engine import MeteringEngine, attributed_until, expected_usage, usage_table
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc
from sim.ledger import RequestTruth
from sim.server import SimTGI
from tests.waiting import wait_until_async


@dataclass
class Traffic:
    calls: int = 0
    failures: int = 0
    request_ids: list[str] | None = None


async def run_traffic(
    channel: grpc.aio.Channel,
    keys: Sequence[str],
    *,
    seconds: float,
    clients_per_key: int = 3,
    gap_s: float = 0.3,
    seed: int = 7,
    model_id: str = "sim-model",
) -> Traffic:
    """Clients per API key send Generate (1-3 prompts) and GenerateStream calls with random gaps, prompt lengths
    (20-600 tokens) and max_new_tokens (5-60) until ``seconds`` have passed."""
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    out = Traffic(request_ids=[])
    stop = time.monotonic() + seconds

    async def client(key: str, rnd: random.Random) -> None:
        md = (("authorization", f"Bearer {key}"),)
        while time.monotonic() < stop:
            await asyncio.sleep(rnd.expovariate(1 / gap_s))
            params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=rnd.randint(5, 60)))
            out.calls += 1
            try:
                if rnd.random() < 0.3:
                    call = stub.GenerateStream(
                        pb.SingleGenerationRequest(
                            model_id=model_id,
                            request=pb.GenerationRequest(text="w " * rnd.randint(20, 600)),
                            params=params,
                        ),
                        metadata=md,
                    )
                    async for _ in call:
                        pass
                    rid = dict(await call.initial_metadata())["x-request-id"]
                    out.request_ids.append(rid)  # type: ignore[union-attr]
                else:
                    n = rnd.randint(1, 3)
                    texts = [pb.GenerationRequest(text="w " * rnd.randint(20, 600)) for _ in range(n)]
                    unary = stub.Generate(
                        pb.BatchedGenerationRequest(model_id=model_id, requests=texts, params=params), metadata=md
                    )
                    await unary
                    rid = dict(await unary.initial_metadata())["x-request-id"]
                    ids = [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]  # as the gateway names them
                    out.request_ids.extend(ids)  # type: ignore[union-attr]
            except grpc.aio.AioRpcError:
                out.failures += 1

    rnd = random.Random(seed)
    await asyncio.gather(*(client(k, random.Random(rnd.random())) for k in keys for _ in range(clients_per_key)))
    return out


async def more_traffic_until_calibrated(
    channel: grpc.aio.Channel, keys: Sequence[str], engine: MeteringEngine, traffic: Traffic, *, rounds: int = 15
) -> Traffic:
    """More traffic, 2 s at a time (at most ``rounds`` times), until every backend's calibration in ``engine`` has
    settled; added to ``traffic``. Requests are sealed only then (the product's ``uncalibrated_seal_hold_s``): ~5 s
    of traffic settle it, but on a host slowed by other work the fit can need more intervals, and the seals would
    wait 300 s (up to 30 s more here; a fit refused past its warm-up is retried with every epoch since e590ef8:
    before, it waited 30 s for its next epoch, and that was these tests' flake on CI)."""
    for seed in range(rounds):
        if all(engine.stats.calibration.values()):
            break
        more = await run_traffic(channel, keys, seconds=2.0, seed=100 + seed)
        traffic.calls += more.calls
        traffic.failures += more.failures
        traffic.request_ids = [*(traffic.request_ids or []), *(more.request_ids or [])]
    return traffic


def query(db: sa.Engine, sql: str, params: dict | None = None) -> list[sa.Row]:
    with db.connect() as conn:
        return list(conn.execute(sa.text(sql), params or {}))


async def wait_attributed(db: sa.Engine, timeout_s: float = 15.0) -> None:
    """Until every backend's attribution covers the end of its last request."""

    def covered() -> bool:
        last_done = dict(
            query(db, "SELECT backend, MAX(done_ns) FROM requests WHERE backend IS NOT NULL GROUP BY backend")
        )
        with db.connect() as conn:
            return all((attributed_until(conn, b) or 0) > d for b, d in last_done.items())

    await wait_until_async(covered, timeout_s, what="attribution to cover every backend's last request", poll_s=0.2)


async def wait_sealed(db: sa.Engine, request_ids: Sequence[str], timeout_s: float = 30.0) -> None:
    """Until every one of ``request_ids`` is final (sealed): what a bill shows, not a provisional figure."""

    def sealed() -> bool:
        return set(request_ids) <= {r[0] for r in query(db, "SELECT request_id FROM request_seals")}

    await wait_until_async(sealed, timeout_s, what="every request to be sealed", poll_s=0.2)


def check_books(db: sa.Engine) -> dict[str, int]:
    """Conservation, exactly: per epoch counter = its requests' energy + idle + the adjustment booked for sealed
    requests; consecutive epochs of a backend tile time without overlap; every seal holds the sums of its rows.
    usage_hourly equals its rebuild. Returns the counter energy per backend."""
    # One statement, so one snapshot: the engine may be recomputing an epoch (rows and epoch row in one transaction)
    # while this reads, and two reads could see its epoch row before and its rows after.
    epochs = query(
        db,
        "SELECT e.*, COALESCE(r.rows_prefill_mj, 0) AS rows_prefill_mj, "
        "COALESCE(r.rows_decode_mj, 0) AS rows_decode_mj FROM backend_epochs e LEFT JOIN "
        "(SELECT backend, epoch_start_ns, SUM(prefill_mj) AS rows_prefill_mj, "
        "SUM(decode_mj) AS rows_decode_mj FROM request_energy GROUP BY backend, epoch_start_ns) r "
        "ON r.backend = e.backend AND r.epoch_start_ns = e.epoch_start_ns "
        "WHERE e.backend <> '' ORDER BY e.backend, e.epoch_start_ns",
    )
    totals: dict[str, int] = {}
    prev: dict[str, sa.Row] = {}
    for e in epochs:
        assert (e.rows_prefill_mj, e.rows_decode_mj) == (e.prefill_mj, e.decode_mj), e
        assert e.counter_mj == e.prefill_mj + e.decode_mj + e.idle_mj + e.adjustment_mj, e
        if e.backend in prev:
            p = prev[e.backend]
            assert p.epoch_end_ns == e.epoch_start_ns
            if p.last_reading_ns is not None and e.first_reading_ns is not None:
                # They share the boundary reading; the earlier one may end a little before it, when the boundary
                # only repeated the value before it (a stale read, dropped): then no energy lies in between.
                assert p.last_reading_ns <= e.first_reading_ns
        prev[e.backend] = e
        totals[e.backend] = totals.get(e.backend, 0) + e.counter_mj
    seals = query(
        db,
        "SELECT s.request_id, s.prefill_mj, s.decode_mj, s.idle_time_mj, s.idle_tokens_mj, SUM(e.prefill_mj), "
        "SUM(e.decode_mj), SUM(e.idle_time_mj), SUM(e.idle_tokens_mj) FROM request_seals s JOIN request_energy e "
        "ON e.request_id = s.request_id GROUP BY s.request_id, s.prefill_mj, s.decode_mj, s.idle_time_mj, "
        "s.idle_tokens_mj",
    )
    for r in seals:
        assert tuple(r[1:5]) == tuple(r[5:9]), r
    with db.connect() as conn:
        assert usage_table(conn) == expected_usage(conn)
    return totals


def failed_reads(db: sa.Engine) -> int:
    """Counter reads that failed. On a loaded machine the event loop that serves the simulator can stall past the
    sampler's read timeout: the meter then records a gap (rightly), and the requests inside it get no energy."""
    return int(query(db, "SELECT COUNT(*) FROM samples WHERE energy_mj IS NULL")[0][0])


def sampler_phase_ms(db: sa.Engine, device: str, period_ms: int = 100) -> float:
    """Where the sampler's reads fall inside the simulated counter's update period (its updates sit on wall-clock
    multiples of the period). Near 0 (or the period) every read races an update, so each one randomly shows the
    newest update or the one before: the readings' timing is then ambiguous by a whole period."""
    times = sorted(r[0] % (period_ms * 1_000_000) for r in query(db, "SELECT t_ns FROM samples WHERE device = :d",
                                                                    {"d": device}))  # fmt: skip
    return times[len(times) // 2] / 1e6


@dataclass(frozen=True)
class Accuracy:
    n: int
    median: float
    p95: float
    worst: float
    tenant_errors: dict[str, float]  # relative error of each tenant's total
    phase_errors: dict[str, float]  # relative error of all prefill, all decode
    worst_case: str = ""  # the request with the largest error: attributed vs true mJ

    def __str__(self) -> str:
        tenants = ", ".join(f"{k} {v:+.2%}" for k, v in sorted(self.tenant_errors.items()))
        phases = ", ".join(f"{k} {v:+.2%}" for k, v in sorted(self.phase_errors.items()))
        return (
            f"{self.n} requests: per-request error median {self.median:.2%}, p95 {self.p95:.2%}, worst "
            f"{self.worst:.2%} ({self.worst_case}); tenant totals {tenants}; phase totals {phases}"
        )


def accuracy(db: sa.Engine, sims: Sequence[SimTGI]) -> Accuracy:
    """Attributed energy per request (over all its epochs) against the simulators' truth."""
    truth: dict[str, RequestTruth] = {}
    for sim in sims:
        truth.update(sim.truth().requests)
    got = query(
        db,
        "SELECT e.request_id, SUM(e.prefill_mj), SUM(e.decode_mj), MAX(r.tenant) FROM request_energy e "
        "JOIN requests r ON r.request_id = e.request_id WHERE e.backend <> '' GROUP BY e.request_id",
    )
    errors = []
    worst = (-1.0, "")
    tenants: dict[str, list[int]] = {}
    phases = {"prefill": [0, 0], "decode": [0, 0]}
    for rid, pre, dec, tenant in got:
        t = truth[rid]
        errors.append(abs(pre + dec - t.total_mj) / t.total_mj)
        if errors[-1] > worst[0]:
            worst = (errors[-1], f"{rid}: {pre + dec} mJ vs {t.total_mj} mJ true, {t.generated_tokens} tokens")
        acc = tenants.setdefault(tenant, [0, 0])
        acc[0] += pre + dec
        acc[1] += t.total_mj
        phases["prefill"][0] += pre
        phases["prefill"][1] += t.prefill_mj
        phases["decode"][0] += dec
        phases["decode"][1] += t.decode_mj
    errors.sort()
    return Accuracy(
        n=len(errors),
        median=statistics.median(errors),
        p95=errors[min(len(errors) - 1, int(0.95 * len(errors)))],
        worst=errors[-1],
        tenant_errors={k: a / b - 1 for k, (a, b) in tenants.items()},
        phase_errors={k: a / b - 1 for k, (a, b) in phases.items()},
        worst_case=worst[1],
    )
