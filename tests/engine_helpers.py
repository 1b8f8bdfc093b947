"""A synthetic world for the engine tests: a GPU whose power follows its requests, its counter, and SQL writers.

The engine tests import from it. Rows go in through the store's own bulk writer (``meter.store.bulk``), the one the
ledger uses, with ``ingested_ns`` chosen by the test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from meter.engine import EngineSettings, MeteredBackend, MeteringEngine
from meter.ledger import start_row, timeline_row
from meter.store.bulk import BulkWriter
from meter.timeline import RequestStart, Timeline

S = 1_000_000_000
MS = 1_000_000
T0 = 1_700_000_000 * S  # a multiple of 10 s


@dataclass
class Gpu:
    """A board whose power is idle_w plus, for each request on it, prefill_w during its prefill and decode_w after.

    ``energy_mj(t)`` is the exact integral since T0 (in mJ, float).
    """

    idle_w: float = 80.0
    prefill_w: float = 500.0
    decode_w: float = 150.0
    requests: list[Timeline] = field(default_factory=list)

    def power_w(self, t_ns: int) -> float:
        p = self.idle_w
        for r in self.requests:
            assert r.released_ns is not None
            if r.released_ns <= t_ns < r.done_ns:
                first = r.first_token_ns if r.first_token_ns is not None else r.done_ns
                p += self.prefill_w if t_ns < first else self.decode_w
        return p

    def _breaks(self, lo: int, hi: int) -> list[int]:
        pts = {lo, hi}
        for r in self.requests:
            for t in (r.released_ns, r.first_token_ns, r.done_ns):
                if t is not None and lo < t < hi:
                    pts.add(t)
        return sorted(pts)

    def energy_mj(self, t_ns: int) -> float:
        pts = self._breaks(T0, t_ns)
        return sum(self.power_w(a) * (b - a) * 1e-6 for a, b in itertools.pairwise(pts))

    def request_mj(self, r: Timeline) -> float:
        """The board's whole energy over the window of a request that had the board to itself (as the simulator's
        truth counts it: while a step runs, all power is the step's)."""
        assert r.released_ns is not None
        first = r.first_token_ns if r.first_token_ns is not None else r.done_ns
        pre, dec = self.idle_w + self.prefill_w, self.idle_w + self.decode_w
        return (pre * (first - r.released_ns) + dec * (r.done_ns - first)) * 1e-6


def samples_for(
    gpu: Gpu,
    device: str,
    t_from: int,
    t_to: int,
    *,
    every_ns: int = 100 * MS,
    offset_ns: int = 7 * MS,
    lag_ns: int = 0,
    base_mj: int = 1_000_000,
) -> list[tuple[str, int, int | None, str | None]]:
    """Sample rows of one device: a reading at t shows floor(energy up to t - lag) + base."""
    out: list[tuple[str, int, int | None, str | None]] = []
    t = t_from + offset_ns
    while t <= t_to:
        out.append((device, t, base_mj + math.floor(gpu.energy_mj(t - lag_ns)), None))
        t += every_ns
    return out


def timeline(
    rid: str,
    released: int,
    first: int | None,
    done: int,
    *,
    backend: str | None = "b1",
    tenant: str = "acme",
    model: str = "m",
    prompt: int = 100,
    generated: int = 10,
) -> Timeline:
    return Timeline(
        request_id=rid,
        tenant=tenant,
        model_id=model,
        backend=backend,
        received_ns=(released if released is not None else done) - 5 * MS,
        released_ns=released if backend is not None else None,
        first_token_ns=first if backend is not None else None,
        done_ns=done,
        prompt_tokens=prompt if backend is not None else 0,
        generated_tokens=generated if backend is not None else 0,
        status="OK" if backend is not None else "RESOURCE_EXHAUSTED",
    )


def write(
    db: sa.Engine,
    *,
    starts: Iterable[RequestStart] = (),
    timelines: Iterable[Timeline] = (),
    samples: Sequence[tuple[str, int, int | None, str | None]] = (),
    ingested_ns: int,
) -> None:
    writer = BulkWriter.for_dialect(db.dialect)
    with db.begin() as conn:
        writer.write(
            conn, [start_row(s) for s in starts], [timeline_row(t) for t in timelines], list(samples), ingested_ns
        )


def make_engine(
    db: sa.Engine,
    backends: dict[str, tuple[str, ...]] | None = None,
    weights: Callable[[str, int], str | None] | None = None,
    **settings: object,
) -> MeteringEngine:
    base: dict[str, object] = {"epoch_ns": 10 * S, "settle_ns": 2 * S, "lag_ns": 0, "calibrate": False}
    base.update(settings)
    specs = [MeteredBackend(n, d) for n, d in (backends or {"b1": ("gpu0",)}).items()]
    return MeteringEngine(db, specs, EngineSettings(**base), weights=weights)  # type: ignore[arg-type]


def rows(db: sa.Engine, sql: str, params: dict | None = None) -> list[sa.Row]:
    with db.connect() as conn:
        return list(conn.execute(sa.text(sql), params or {}))
