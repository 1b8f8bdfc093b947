"""Per-tenant comparison of joulegate's bill with Shapley values, for the simulator and the GPU benchmarks. Pure.

Two games (see ``sim/shapley.py``):

- *above idle*: the energy above the board's idle floor. joulegate's bill also holds the floor while a request was
  on the GPU (its idle bucket gets only the time nothing ran), so its above-idle part is the bill less the floor's
  share, split by the attribution's own rules: ``attribute`` run on a counter that rises at exactly the idle
  floor (prefill weighing like any other work: the floor is the same whatever runs). The RESULT's headline keys.
- *busy*: the energy drawn while the GPU worked for somebody, floor included: compared with the bill as it stands.

A tenant's error is (joulegate - Shapley) / Shapley, in %: positive means the tenant is over-charged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meter.attribution import AttributionPolicy, CounterReading, attribute
from meter.timeline import Timeline

_MJ_PER_W_NS = 1e-6


def floor_share_mj(
    readings: Sequence[CounterReading], timelines: Iterable[Timeline], policy: AttributionPolicy, idle_w: float
) -> dict[str, int]:
    """Each request's share of the idle floor while it was on the GPU, by the attribution's rules: ``attribute`` over
    a counter that draws exactly ``idle_w`` at the readings' times, with prefill weighing 1 (the floor does not
    depend on what runs) and the floor known to the policy (so idle time keeps exactly its floor)."""
    if not readings:
        return {}
    t0 = readings[0].t_ns
    floor = [CounterReading(r.t_ns, round(idle_w * (r.t_ns - t0) * _MJ_PER_W_NS)) for r in readings]
    flat = AttributionPolicy(
        lag_ns=policy.lag_ns,
        prefill_tokens_per_s=policy.prefill_tokens_per_s,
        prefill_overhead_ns=policy.prefill_overhead_ns,
        prefill_power_ratio=1.0,
        idle_power_w=idle_w,
        batch_tolerance_ns=policy.batch_tolerance_ns,
    )
    return {rid: pe.total_mj for rid, pe in attribute(floor, timelines, flat).requests.items()}


@dataclass(frozen=True, slots=True)
class TenantRow:
    """One tenant, in joules. ``*_err_pct``: joulegate against Shapley, positive when over-charged."""

    tenant: str
    shape: str
    requests: int
    shapley_j: float  # request-level Shapley value, above-idle game
    joulegate_j: float  # the bill less its floor share
    busy_shapley_j: float  # request-level Shapley value, busy game
    bill_j: float  # what joulegate billed (prefill + decode)
    tenant_game_j: float  # Shapley value with tenants as players, above-idle game (for comparison only)

    @property
    def err_pct(self) -> float:
        return _pct(self.joulegate_j, self.shapley_j)

    @property
    def busy_err_pct(self) -> float:
        return _pct(self.bill_j, self.busy_shapley_j)

    @property
    def tenant_game_err_pct(self) -> float:
        return _pct(self.joulegate_j, self.tenant_game_j)


def _pct(got: float, truth: float) -> float:
    return 100.0 * (got - truth) / truth if truth else float("nan")


def pooled(rows: Iterable[TenantRow]) -> list[TenantRow]:
    """Rows of several runs summed per tenant (first-seen order)."""
    out: dict[str, TenantRow] = {}
    for r in rows:
        o = out.get(r.tenant)
        out[r.tenant] = r if o is None else TenantRow(
            r.tenant,
            r.shape,
            o.requests + r.requests,
            o.shapley_j + r.shapley_j,
            o.joulegate_j + r.joulegate_j,
            o.busy_shapley_j + r.busy_shapley_j,
            o.bill_j + r.bill_j,
            o.tenant_game_j + r.tenant_game_j,
        )  # fmt: skip
    return list(out.values())


def tenant_rows(
    tenant_of: Mapping[str, str],
    shapes: Mapping[str, str],
    shapley_j: Mapping[str, float],
    busy_shapley_j: Mapping[str, float],
    tenant_game_j: Mapping[str, float],
    bill_mj: Mapping[str, int],
    floor_mj: Mapping[str, int],
) -> list[TenantRow]:
    """Per tenant, from per-request bills and floor shares (mJ) and per-tenant Shapley values (J)."""
    rows = []
    for tenant in shapes:
        ids = [rid for rid, t in tenant_of.items() if t == tenant]
        bill = sum(bill_mj.get(rid, 0) for rid in ids) / 1000
        floor = sum(floor_mj.get(rid, 0) for rid in ids) / 1000
        rows.append(
            TenantRow(
                tenant=tenant,
                shape=shapes[tenant],
                requests=len(ids),
                shapley_j=shapley_j[tenant],
                joulegate_j=bill - floor,
                busy_shapley_j=busy_shapley_j[tenant],
                bill_j=bill,
                tenant_game_j=tenant_game_j[tenant],
            )
        )
    return rows


def max_abs(values: Iterable[float]) -> float:
    return max(abs(v) for v in values)


def mean_abs(values: Sequence[float]) -> float:
    return sum(abs(v) for v in values) / len(values)


_HEAD = (
    "tenant", "requests", "Shapley J", "joulegate J", "err %", "busy Shapley J", "bill J", "err %",
    "tenant-game J", "vs it %",
)  # fmt: skip


def _cells(r: TenantRow) -> list[str]:
    return [
        r.tenant,
        str(r.requests),
        f"{r.shapley_j:.1f}",
        f"{r.joulegate_j:.1f}",
        f"{r.err_pct:+.2f}",
        f"{r.busy_shapley_j:.1f}",
        f"{r.bill_j:.1f}",
        f"{r.busy_err_pct:+.2f}",
        f"{r.tenant_game_j:.1f}",
        f"{r.tenant_game_err_pct:+.2f}",
    ]


def text_table(rows: Sequence[TenantRow]) -> str:
    """Aligned columns: above idle (Shapley, joulegate, error), busy (Shapley, bill, error), tenant game."""
    table = [list(_HEAD), *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEAD))]
    out = []
    for line in table:
        out.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        )
    return "\n".join(out)


def markdown_table(rows: Sequence[TenantRow]) -> str:
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def result_line(default_rows: Sequence[TenantRow], misspecified_rows: Sequence[TenantRow] | None) -> str:
    """``RESULT shapley_max_tenant_err_pct=... shapley_mean_tenant_err_pct=... misspecified_max_tenant_err_pct=...``
    (above-idle game), then the busy game's and the tenant game's worst tenant, for the record."""
    errs = [r.err_pct for r in default_rows]
    parts = [
        f"shapley_max_tenant_err_pct={max_abs(errs):.2f}",
        f"shapley_mean_tenant_err_pct={mean_abs(errs):.2f}",
        "misspecified_max_tenant_err_pct="
        + ("nan" if misspecified_rows is None else f"{max_abs(r.err_pct for r in misspecified_rows):.2f}"),
        f"busy_max_tenant_err_pct={max_abs(r.busy_err_pct for r in default_rows):.2f}",
        f"tenant_game_max_err_pct={max_abs(r.tenant_game_err_pct for r in default_rows):.2f}",
    ]
    return "RESULT " + " ".join(parts)
