"""The pure half of the shaping benchmarks: policies under test, per-run metrics, tables, the plot, the RESULT line.

Metrics of one run (one policy serving one trace, alone on its backend, in its own window of whole epochs):

- ``j_per_request``: the energy counter over the window / requests. The honest bill: it includes the idle power
  between sparse arrivals and after the last one (every policy of a scenario is measured over a window of the same
  length), because an idle GPU still draws its floor.
- ``attr_j_per_request``: the energy the gateway attributed to the run's requests (prefill + decode, no idle share)
  / requests. What shaping can actually change: the work's energy above nothing, while requests are on the GPU.
- ``j_per_token``: counter energy / generated tokens.
- TTFT p50/p95 and end-to-end latency p50/p95 at the client (first message carrying a generated token); TTFT p95 at
  the gateway (received -> first token, from the reports) as a cross-check.
- ``truth_err_pct`` (simulator only): attributed energy of the run's requests vs the simulator's ground truth.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.shaping_drive import ClientResult, WindowEnergy, percentile


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A policy under test: its traffic class's name, its ``[models.shaping.classes.<name>]`` table and TTFT bound."""

    name: str
    params: Mapping[str, Any]
    bound_ms: float | None  # the TTFT p95 it promises (None: passthrough, the baseline)
    note: str = ""

    @property
    def shaped(self) -> bool:
        return self.bound_ms is not None

    def class_config(self) -> dict[str, Any]:
        return dict(self.params)


def standard_policies(
    bound_ms: float,
    service_ms: float,
    prefill_tokens: int,
    max_batch: int = 32,
    long_bound_ms: float | None = None,
) -> list[PolicySpec]:
    """passthrough, and window/batch/tokens/adaptive all promising TTFT p95 <= ``bound_ms``.

    A hold policy promises ``hold + service_ms`` (the backend's own time to first token for a released batch), so
    its hold is ``bound_ms - service_ms``; adaptive gets ``ttft_bound_ms = bound_ms`` and the same service estimate.
    ``long_bound_ms`` adds a ``batch-long`` class (a bulk class with a long hold) to show the far end of the curve.
    """
    hold = bound_ms - service_ms
    if hold <= 0:
        raise ValueError("bound_ms must exceed service_ms")
    out = [
        PolicySpec("passthrough", {"policy": "passthrough"}, None, "no hold"),
        PolicySpec("window", {"policy": "window", "window_ms": hold}, bound_ms, f"window {hold:.0f} ms"),
        PolicySpec(
            "batch",
            {"policy": "batch", "max_batch": max_batch, "hold_ms": hold},
            bound_ms,
            f"{max_batch} or {hold:.0f} ms",
        ),
        PolicySpec(
            "tokens",
            {"policy": "tokens", "max_batch_prefill_tokens": prefill_tokens, "hold_ms": hold},
            bound_ms,
            f"{prefill_tokens} tok or {hold:.0f} ms",
        ),
        PolicySpec(
            "adaptive",
            {
                "policy": "adaptive",
                "ttft_bound_ms": bound_ms,
                "service_ttft_ms": service_ms,
                "target_batch": max_batch,
            },
            bound_ms,
            f"bound {bound_ms:.0f} ms, service {service_ms:.0f} ms, target {max_batch}",
        ),
    ]
    if long_bound_ms is not None:
        long_hold = long_bound_ms - service_ms
        out.append(
            PolicySpec(
                "batch-long",
                {"policy": "batch", "max_batch": max_batch, "hold_ms": long_hold},
                long_bound_ms,
                f"{max_batch} or {long_hold:.0f} ms (bulk class)",
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class RunRow:
    """The metrics of one (trace, load, policy) run."""

    trace: str
    load: str
    rate_per_s: float
    policy: str
    bound_ms: float | None
    requests: int
    errors: int
    generated_tokens: int
    window_s: float
    counter_j: float
    attributed_j: float
    idle_j: float
    j_per_request: float
    attr_j_per_request: float
    j_per_token: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    gw_ttft_p95_ms: float
    queued_p50_ms: float
    final: bool
    conservation_error_mj: int
    gaps: int
    truth_attr_j: float | None = None
    truth_err_pct: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def within_bound(self) -> bool:
        return self.bound_ms is not None and self.ttft_p95_ms <= self.bound_ms


def summarize(
    *,
    trace: str,
    load: str,
    rate_per_s: float,
    policy: PolicySpec,
    clients: Sequence[ClientResult],
    window: WindowEnergy,
    truth_j: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
) -> RunRow:
    """Metrics of one run from what the client saw, the window's energy and (on the simulator) the ground truth."""
    ok = [c for c in clients if c.error is None]
    by_id = {r.request_id: r for r in window.requests if r.traffic_class == policy.name}
    mine = [by_id[c.request_id] for c in ok if c.request_id in by_id]
    n = len(ok)
    tokens = sum(c.generated_tokens for c in ok)
    attributed = sum(r.attributed_j for r in mine) if mine else math.nan  # no reports (unmetered dry run)
    notes_out = list(notes)
    if len(mine) != n:
        notes_out.append(f"{n - len(mine)} requests missing from the reports")
    other = [r for r in window.requests if r.traffic_class != policy.name]
    if other:
        notes_out.append(f"{len(other)} requests of other classes in the window")
    truth_attr = truth_err = None
    if truth_j is not None:
        known = [r for r in mine if r.request_id in truth_j]
        truth_attr = sum(truth_j[r.request_id] for r in known)
        att_known = sum(r.attributed_j for r in known)
        truth_err = (att_known - truth_attr) / truth_attr * 100 if truth_attr else math.nan
        if len(known) != len(mine):
            notes_out.append(f"{len(mine) - len(known)} requests missing from the truth")
    ttfts = [c.ttft_ms for c in ok if c.ttft_ms is not None]
    gw_ttfts = [r.ttft_ms for r in mine if r.ttft_ms is not None]
    queued = [(r.released_ns - r.received_ns) / 1e6 for r in mine if r.released_ns is not None]
    return RunRow(
        trace=trace,
        load=load,
        rate_per_s=rate_per_s,
        policy=policy.name,
        bound_ms=policy.bound_ms,
        requests=n,
        errors=len(clients) - n,
        generated_tokens=tokens,
        window_s=(window.end_ns - window.start_ns) / 1e9,
        counter_j=window.counter_j,
        attributed_j=attributed,
        idle_j=window.idle_j,
        j_per_request=window.counter_j / n if n else math.nan,
        attr_j_per_request=attributed / n if n else math.nan,
        j_per_token=window.counter_j / tokens if tokens else math.nan,
        ttft_p50_ms=percentile(ttfts, 0.5),
        ttft_p95_ms=percentile(ttfts, 0.95),
        latency_p50_ms=percentile([c.latency_ms for c in ok], 0.5),
        latency_p95_ms=percentile([c.latency_ms for c in ok], 0.95),
        gw_ttft_p95_ms=percentile(gw_ttfts, 0.95),
        queued_p50_ms=percentile(queued, 0.5),
        final=all(r.final for r in mine) and len(mine) == n,
        conservation_error_mj=window.conservation_error_mj,
        gaps=window.gaps,
        truth_attr_j=truth_attr,
        truth_err_pct=truth_err,
        notes=tuple(notes_out),
    )


# -- selection -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Best:
    """The lowest-J/request shaped policy within its TTFT bound in one scenario, against passthrough."""

    row: RunRow
    baseline: RunRow

    @property
    def j_ratio(self) -> float:
        return ratio(self.row.j_per_request, self.baseline.j_per_request)

    @property
    def attr_ratio(self) -> float:
        return ratio(self.row.attr_j_per_request, self.baseline.attr_j_per_request)

    @property
    def ttft_over_bound(self) -> float:
        assert self.row.bound_ms is not None
        return self.row.ttft_p95_ms / self.row.bound_ms


def best_shaped(rows: Sequence[RunRow], trace: str, load: str, max_bound_ms: float | None = None) -> Best | None:
    """Among the shaped runs of (trace, load) whose client TTFT p95 is within their bound (and the bound within
    ``max_bound_ms`` if given), the one with the lowest counter J/request; None if none qualifies."""
    scen = [r for r in rows if r.trace == trace and r.load == load]
    base = next((r for r in scen if r.bound_ms is None), None)
    ok = [
        r
        for r in scen
        if r.within_bound and r.errors == 0 and (max_bound_ms is None or (r.bound_ms or 0) <= max_bound_ms)
    ]
    if base is None or not ok:
        return None
    return Best(min(ok, key=lambda r: r.j_per_request), base)


def result_line(best: Best | None) -> str:
    if best is None:
        return "RESULT j_per_request_ratio=nan ttft_p95_over_bound=nan"
    return f"RESULT j_per_request_ratio={best.j_ratio:.3f} ttft_p95_over_bound={best.ttft_over_bound:.3f}"


# -- tables ----------------------------------------------------------------------------------------------------------

_COLUMNS = (
    ("trace", "trace", "{}"),
    ("load", "load", "{}"),
    ("req/s", "rate_per_s", "{:.2f}"),
    ("policy", "policy", "{}"),
    ("bound ms", "bound_ms", "{:.0f}"),
    ("n", "requests", "{}"),
    ("err", "errors", "{}"),
    ("window s", "window_s", "{:.0f}"),
    ("J/req", "j_per_request", "{:.1f}"),
    ("x pass", "_ratio", "{:.2f}"),
    ("attr J/req", "attr_j_per_request", "{:.1f}"),
    ("x pass (attr)", "_attr_ratio", "{:.2f}"),
    ("J/token", "j_per_token", "{:.3f}"),
    ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"),
    ("TTFT p95 ms", "ttft_p95_ms", "{:.0f}"),
    ("in bound", "_in_bound", "{}"),
    ("e2e p50 ms", "latency_p50_ms", "{:.0f}"),
    ("e2e p95 ms", "latency_p95_ms", "{:.0f}"),
    ("gw TTFT p95 ms", "gw_ttft_p95_ms", "{:.0f}"),
    ("truth err %", "truth_err_pct", "{:+.2f}"),
)


def ratio(a: float, b: float) -> float:
    """a / b, NaN where b is 0 or either is NaN."""
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _cells(row: RunRow, base: RunRow | None) -> dict[str, Any]:
    d = asdict(row)
    d["_ratio"] = ratio(row.j_per_request, base.j_per_request) if base else None
    d["_attr_ratio"] = ratio(row.attr_j_per_request, base.attr_j_per_request) if base else None
    d["_in_bound"] = "-" if row.bound_ms is None else ("yes" if row.within_bound else "NO")
    return d


def _fmt(fmt: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def _baselines(rows: Sequence[RunRow]) -> dict[tuple[str, str], RunRow]:
    return {(r.trace, r.load): r for r in rows if r.bound_ms is None}


def markdown_table(rows: Sequence[RunRow], include_truth: bool = True) -> str:
    cols = [c for c in _COLUMNS if include_truth or c[1] != "truth_err_pct"]
    base = _baselines(rows)
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        d = _cells(r, base.get((r.trace, r.load)))
        lines.append("| " + " | ".join(_fmt(fmt, d[key]) for _, key, fmt in cols) + " |")
    return "\n".join(lines)


def text_table(rows: Sequence[RunRow], include_truth: bool = True) -> str:
    cols = [c for c in _COLUMNS if include_truth or c[1] != "truth_err_pct"]
    base = _baselines(rows)
    cells = [[c[0] for c in cols]]
    for r in rows:
        d = _cells(r, base.get((r.trace, r.load)))
        cells.append([_fmt(fmt, d[key]) for _, key, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells)


def csv_text(rows: Sequence[RunRow]) -> str:
    buf = io.StringIO()
    base = _baselines(rows)
    fields = [f for f in RunRow.__dataclass_fields__ if f != "notes"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*fields, "x_passthrough", "x_passthrough_attr", "within_bound", "notes"])
    for r in rows:
        d = _cells(r, base.get((r.trace, r.load)))
        w.writerow(
            [
                *(d[f] if not isinstance(d[f], float) else f"{d[f]:.6g}" for f in fields),
                "" if d["_ratio"] is None else f"{d['_ratio']:.4g}",
                "" if d["_attr_ratio"] is None else f"{d['_attr_ratio']:.4g}",
                d["_in_bound"],
                "; ".join(r.notes),
            ]
        )
    return buf.getvalue()


# -- plot --------------------------------------------------------------------------------------------------------------

_MARKERS = {"passthrough": "o", "window": "s", "batch": "^", "tokens": "D", "adaptive": "*", "batch-long": "v"}
_COLOURS = {"poisson": "tab:blue", "bursty": "tab:orange"}


def plot(rows: Sequence[RunRow], path: Path, title: str) -> None:
    """J/request (counter, solid) and attributed J/request (hollow) against client TTFT p95, one panel per load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    loads = list(dict.fromkeys(r.load for r in rows))
    fig, axes = plt.subplots(1, len(loads), figsize=(5.2 * len(loads), 4.6), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        scen = [r for r in rows if r.load == load]
        for trace in dict.fromkeys(r.trace for r in scen):
            pts = sorted((r for r in scen if r.trace == trace), key=lambda r: r.ttft_p95_ms)
            colour = _COLOURS.get(trace, "tab:gray")
            for r in pts:
                m = _MARKERS.get(r.policy, "x")
                ax.scatter(r.ttft_p95_ms, r.j_per_request, marker=m, s=80, color=colour, zorder=3)
                ax.scatter(r.ttft_p95_ms, r.attr_j_per_request, marker=m, s=60, facecolors="none",
                           edgecolors=colour, zorder=3)  # fmt: skip
                ax.plot([r.ttft_p95_ms] * 2, [r.attr_j_per_request, r.j_per_request], color=colour, lw=0.6, alpha=0.5)
        rate = scen[0].rate_per_s if scen else math.nan
        ax.set_title(f"{load} load ({rate:g} req/s)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1000:g} s"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("TTFT p95 at the client (log)")
        ax.set_ylabel("J per request")
        ax.set_ylim(0, 1.1 * max(r.j_per_request for r in scen))
        ax.grid(True, which="both", alpha=0.3)
        for b in sorted({r.bound_ms for r in scen if r.bound_ms is not None}):
            ax.axvline(b, color="gray", ls="--", lw=0.8)
    handles = [Line2D([], [], marker=m, ls="", color="k", label=p) for p, m in _MARKERS.items()
               if any(r.policy == p for r in rows)]  # fmt: skip
    handles += [Line2D([], [], marker="o", ls="", color=c, label=t) for t, c in _COLOURS.items()
                if any(r.trace == t for r in rows)]  # fmt: skip
    handles += [
        Line2D([], [], marker="o", ls="", color="k", label="counter J/req (incl. idle)"),
        Line2D([], [], marker="o", ls="", markerfacecolor="none", color="k", label="attributed J/req"),
        Line2D([], [], ls="--", color="gray", label="TTFT bound"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_csv(path: Path) -> list[RunRow]:
    """Rows back from a CSV written by ``csv_text`` (to redraw a plot without rerunning)."""
    out: list[RunRow] = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            kw: dict[str, Any] = {}
            for name, fld in RunRow.__dataclass_fields__.items():
                raw = rec.get(name, "")
                if name == "notes":
                    kw[name] = tuple(n for n in rec.get("notes", "").split("; ") if n)
                elif fld.type in ("str",):
                    kw[name] = raw
                elif fld.type in ("int",):
                    kw[name] = int(raw)
                elif fld.type in ("bool",):
                    kw[name] = raw == "True"
                else:
                    kw[name] = None if raw in ("", "None") else float(raw)
            out.append(RunRow(**kw))
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="redraw a shaping plot from its CSV")
    ap.add_argument("csv", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--title", default="joulegate arrival shaping: J/request vs TTFT p95")
    a = ap.parse_args()
    plot(load_csv(a.csv), a.png, a.title)
