"""The pure half of the study (``study.py``): per-phase metrics of a run from the gateway's reports, the ratios the
study claims, tables and the RESULT line.

A *fixed run* sends requests of one shape (prompt P tokens, N new tokens) either one at a time (``sequential``,
each when the previous ended) or B at once through a gateway class that releases them together (``together``).
From ``joulegate.v1.EnergyReports`` (``ListRequests``: each request's prefill and decode joules and its gateway
timestamps; ``GetBackendEnergy``: the counter over the run's window) it gets:

- prefill J per prompt token = sum of the requests' prefill J / their prompt tokens (as the gateway counted them);
- decode J per generated token = sum of decode J / (generated tokens - requests): the first token of each request
  comes out of its prefill, so decode produced the rest;
- prefill and decode power = the phase's joules over the time at least one request was in that phase (the union of
  ``[released, first_token]``, resp. ``[first_token, done]``, at the gateway);
- attributed J per request = (prefill + decode J) / requests: the energy while the requests were on the GPU, idle
  power included, nothing of the idle time around them.

Everything here is what an operator reads back from the product; the engine's own timing (client side) is printed
next to it only to say what the GPU was doing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.shaping_drive import ClientResult, WindowEnergy, percentile
from bench.shaping_report import RunRow, best_shaped, ratio

DTYPE_ORDER = ("fp32", "bf16", "fp16", "fp8")


def union_s(intervals: Iterable[tuple[int, int]]) -> float:
    """Seconds covered by at least one of the ``[start_ns, end_ns]`` intervals (empty ones count nothing)."""
    total = 0
    end = None
    for a, b in sorted((a, b) for a, b in intervals if b > a):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e9


@dataclass(frozen=True, slots=True)
class FixedRun:
    """One fixed-shape run, as the gateway's reports tell it."""

    dtype: str
    label: str
    batch: int  # requests released together (1: sequential)
    mode: str  # "sequential" | "together"
    requests: int
    errors: int
    missing: int  # requests the reports did not list
    prompt_tokens: int
    generated_tokens: int
    prefill_j: float
    decode_j: float
    counter_j: float  # the backend's counter over the run's window (whole epochs)
    window_s: float
    prefill_s: float
    decode_s: float
    decode_ms_per_token: float  # client side, median over requests: (done - first token) / (tokens - 1)
    ttft_p50_ms: float
    final: bool
    conservation_error_mj: int
    gaps: int

    @property
    def prefill_j_per_token(self) -> float:
        return self.prefill_j / self.prompt_tokens if self.prompt_tokens else math.nan

    @property
    def decode_j_per_token(self) -> float:
        n = self.generated_tokens - self.requests
        return self.decode_j / n if n > 0 else math.nan

    @property
    def prefill_w(self) -> float:
        return self.prefill_j / self.prefill_s if self.prefill_s > 0 else math.nan

    @property
    def decode_w(self) -> float:
        return self.decode_j / self.decode_s if self.decode_s > 0 else math.nan

    @property
    def attributed_j_per_request(self) -> float:
        return (self.prefill_j + self.decode_j) / self.requests if self.requests else math.nan

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.missing == 0 and self.requests > 0


def fixed_run(dtype: str, label: str, batch: int, mode: str, clients: Sequence[ClientResult],
              window: WindowEnergy) -> FixedRun:  # fmt: skip
    ok = [c for c in clients if c.error is None]
    by_id = {r.request_id: r for r in window.requests}
    mine = [by_id[c.request_id] for c in ok if c.request_id in by_id]
    decode_ms = [
        (c.done_ns - c.first_token_ns) / 1e6 / (c.generated_tokens - 1)
        for c in ok
        if c.first_token_ns is not None and c.generated_tokens > 1
    ]
    return FixedRun(
        dtype=dtype,
        label=label,
        batch=batch,
        mode=mode,
        requests=len(ok),
        errors=len(clients) - len(ok),
        missing=len(ok) - len(mine),
        prompt_tokens=sum(c.prompt_tokens for c in ok if c.request_id in by_id),
        generated_tokens=sum(r.generated_tokens for r in mine),
        prefill_j=sum(r.prefill_j for r in mine),
        decode_j=sum(r.decode_j for r in mine),
        counter_j=window.counter_j,
        window_s=(window.end_ns - window.start_ns) / 1e9,
        prefill_s=union_s(
            (r.released_ns, r.first_token_ns) for r in mine if r.released_ns is not None and r.first_token_ns
        ),
        decode_s=union_s((r.first_token_ns, r.done_ns) for r in mine if r.first_token_ns and r.done_ns),
        decode_ms_per_token=percentile(decode_ms, 0.5),
        ttft_p50_ms=percentile([c.ttft_ms for c in ok if c.ttft_ms is not None], 0.5),
        final=all(r.final for r in mine) and len(mine) == len(ok),
        conservation_error_mj=window.conservation_error_mj,
        gaps=window.gaps,
    )


def find(runs: Sequence[FixedRun], dtype: str, batch: int) -> FixedRun | None:
    return next((r for r in runs if r.dtype == dtype and r.batch == batch and r.ok), None)


def above_floor_j_per_request(row: RunRow, idle_w: float | None) -> float:
    """The bill per request less the idle floor over its window: what shaping can change."""
    if idle_w is None or not row.requests:
        return math.nan
    return (row.counter_j - idle_w * row.window_s) / row.requests


@dataclass(frozen=True, slots=True)
class Ratios:
    """The study's three findings as joulegate's reports show them (NaN where a run is missing)."""

    prefill_fp32_over_bf16: float  # prefill J/prompt token at batch 32
    decode_fp32_over_bf16: float  # decode J/token at batch 1
    decode_b1_over_b32: float  # bf16 decode J/token
    shaping_above_floor: float  # best shaped policy's above-floor J/request / passthrough's
    sequential_over_shaped: float  # bf16 attributed J/request: one at a time / 32 released together
    extra: dict[str, float]


def ratios(runs: Sequence[FixedRun], shaping: Sequence[RunRow], idle_w: float | None, load: str) -> Ratios:
    def r(dtype: str, batch: int) -> FixedRun | None:
        return find(runs, dtype, batch)

    def over(a: FixedRun | None, b: FixedRun | None, what: str) -> float:
        if a is None or b is None:
            return math.nan
        return ratio(getattr(a, what), getattr(b, what))

    extra: dict[str, float] = {}
    for dtype in ("fp32", "fp16", "fp8"):
        for batch in (1, 32):
            extra[f"prefill_j_per_token_{dtype}_over_bf16_b{batch}"] = over(
                r(dtype, batch), r("bf16", batch), "prefill_j_per_token"
            )
            extra[f"decode_j_per_token_{dtype}_over_bf16_b{batch}"] = over(
                r(dtype, batch), r("bf16", batch), "decode_j_per_token"
            )
    b64 = r("bf16", 64)
    extra["decode_j_per_token_b1_over_b64"] = over(r("bf16", 1), b64, "decode_j_per_token")
    extra["fp32_sequential_over_bf16_shaped_j_per_request"] = over(
        r("fp32", 1), r("bf16", 32), "attributed_j_per_request"
    )
    best = best_shaped(shaping, "poisson", load)
    above = math.nan
    if best is not None:
        above = ratio(above_floor_j_per_request(best.row, idle_w), above_floor_j_per_request(best.baseline, idle_w))
        extra["shaping_bill_ratio"] = best.j_ratio
        extra["shaping_attributed_ratio"] = best.attr_ratio
    return Ratios(
        prefill_fp32_over_bf16=over(r("fp32", 32), r("bf16", 32), "prefill_j_per_token"),
        decode_fp32_over_bf16=over(r("fp32", 1), r("bf16", 1), "decode_j_per_token"),
        decode_b1_over_b32=over(r("bf16", 1), r("bf16", 32), "decode_j_per_token"),
        shaping_above_floor=above,
        sequential_over_shaped=over(r("bf16", 1), r("bf16", 32), "attributed_j_per_request"),
        extra=extra,
    )


def result_line(x: Ratios) -> str:
    main = {
        "prefill_j_per_token_fp32_over_bf16": x.prefill_fp32_over_bf16,
        "decode_j_per_token_fp32_over_bf16": x.decode_fp32_over_bf16,
        "decode_j_per_token_b1_over_b32": x.decode_b1_over_b32,
        "shaping_above_floor_ratio": x.shaping_above_floor,
        "sequential_over_shaped_j_per_request": x.sequential_over_shaped,
    }
    return "RESULT " + " ".join(f"{k}={v:.3f}" for k, v in main.items())


def extra_line(x: Ratios) -> str:
    return "RESULT_EXTRA " + " ".join(f"{k}={v:.3f}" for k, v in x.extra.items() if not math.isnan(v))


# --- tables ---


def _f(v: float, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def precision_table(runs: Sequence[FixedRun]) -> str:
    """Markdown: per dtype and batch, per-phase J/token and power, and the ratio to bf16 at the same batch."""
    head = (
        "| dtype | batch | prefill J/prompt token | x bf16 | decode J/token | x bf16 | decode ms/token | "
        "prefill W | decode W | attributed J/request | final |"
    )
    lines = [head, "|" + "---|" * 11]
    order = {d: i for i, d in enumerate(DTYPE_ORDER)}
    for run in sorted((r for r in runs if r.batch in (1, 32)), key=lambda r: (r.batch, order.get(r.dtype, 9))):
        base = find(runs, "bf16", run.batch)
        lines.append(
            f"| {run.dtype} | {run.batch} | {_f(run.prefill_j_per_token, '.4f')} | "
            f"{_f(ratio(run.prefill_j_per_token, base.prefill_j_per_token) if base else math.nan, '.2f')} | "
            f"{_f(run.decode_j_per_token, '.3f')} | "
            f"{_f(ratio(run.decode_j_per_token, base.decode_j_per_token) if base else math.nan, '.2f')} | "
            f"{_f(run.decode_ms_per_token, '.2f')} | {_f(run.prefill_w, '.0f')} | {_f(run.decode_w, '.0f')} | "
            f"{_f(run.attributed_j_per_request, '.1f')} | {'yes' if run.final else 'no'} |"
        )
    return "\n".join(lines)


def batching_table(runs: Sequence[FixedRun], dtype: str = "bf16") -> str:
    lines = [
        "| batch | decode J/token | x batch 1 | decode ms/token | decode W | prefill J/prompt token | "
        "attributed J/request |",
        "|" + "---|" * 7,
    ]
    b1 = find(runs, dtype, 1)
    for run in sorted((r for r in runs if r.dtype == dtype), key=lambda r: r.batch):
        lines.append(
            f"| {run.batch} | {_f(run.decode_j_per_token, '.3f')} | "
            f"{_f(ratio(run.decode_j_per_token, b1.decode_j_per_token) if b1 else math.nan, '.3f')} | "
            f"{_f(run.decode_ms_per_token, '.2f')} | {_f(run.decode_w, '.0f')} | "
            f"{_f(run.prefill_j_per_token, '.4f')} | {_f(run.attributed_j_per_request, '.1f')} |"
        )
    return "\n".join(lines)


def shaping_table(rows: Sequence[RunRow], idle_w: float | None) -> str:
    lines = [
        "| policy | bound ms | n | window s | bill J/req | x pass | above floor J/req | x pass | attributed J/req | "
        "TTFT p50 ms | TTFT p95 ms |",
        "|" + "---|" * 11,
    ]
    base = next((r for r in rows if r.bound_ms is None), None)
    base_above = above_floor_j_per_request(base, idle_w) if base else math.nan
    for r in rows:
        above = above_floor_j_per_request(r, idle_w)
        bill_x = ratio(r.j_per_request, base.j_per_request) if base else math.nan
        lines.append(
            f"| {r.policy} | {_f(r.bound_ms, '.0f') if r.bound_ms else '-'} | {r.requests} | {r.window_s:.0f} | "
            f"{_f(r.j_per_request, '.1f')} | {_f(bill_x, '.3f')}"
            f" | {_f(above, '.1f')} | {_f(ratio(above, base_above), '.3f')} | {_f(r.attr_j_per_request, '.1f')} | "
            f"{_f(r.ttft_p50_ms, '.0f')} | {_f(r.ttft_p95_ms, '.0f')} |"
        )
    return "\n".join(lines)
