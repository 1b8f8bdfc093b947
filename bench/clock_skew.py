"""What a gateway replica's clock skew does to the bills: the same traffic billed with one replica's stamps shifted.

    python -m bench.clock_skew [--seeds 2] [--scenes 12]

Attribution lines each request's timeline (stamped by the gateway replica that served it) up with the counter's
readings (stamped by the meter). A replica whose clock is off moves its requests against the counter, and against
the requests of the other replicas on the same GPU. This replays the Shapley bench's traces on the simulator
(``bench.shapley``: four tenants of distinct shapes sharing one GPU in scenes, a 10 Hz sampler, 100 ms counter
updates, 50 ms lag) and bills them with the real metering engine under the defaults of ``joulegate serve`` (lag and
prefill power calibrated from the data), once with every clock right and once per skew with every other request
(replica B: half of every tenant's traffic) stamped ``skew`` ms off. It prints, per skew, the largest change of a
tenant's bill and the median change of a request's, on B's requests and on the others', against the bill with no
skew. It is what ``meter.clock_skew_warn_ms`` (10 ms: ``engine_writer_clock_skewed``) is set from. Ends with

    RESULT skew_25ms_max_tenant_pct=... skew_100ms_max_tenant_pct=... skew_1000ms_max_tenant_pct=...
           skew_25ms_median_request_pct=... skew_100ms_median_request_pct=... skew_1000ms_median_request_pct=...
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import structlog

from bench.shapley import BACKEND, COUNTER_LAG_MS, NS_PER_MS, NS_PER_S, SAMPLER, T0_NS, joulegate_bill
from bench.shapley_trace import make_trace
from meter.config import MeterConfig, engine_settings
from meter.timeline import Timeline
from sim.config import SimConfig
from sim.replay import Replay, replay

SKEWS_MS = (0, 5, 10, 25, 50, 100, 250, 1000, -25, -100)
REPORTED_MS = (25, 100, 1000)


def _shifted(t: Timeline, by_ns: int) -> Timeline:
    def move(v: int | None) -> int | None:
        return None if v is None else v + by_ns

    return replace(
        t,
        received_ns=t.received_ns + by_ns,
        released_ns=move(t.released_ns),
        first_token_ns=move(t.first_token_ns),
        done_ns=t.done_ns + by_ns,
    )


def skewed(rep: Replay, on_b: set[str], skew_ns: int) -> Replay:
    """The replay with replica B's timelines stamped ``skew_ns`` off (the counter's readings are the meter's)."""
    return replace(rep, timelines=tuple(_shifted(t, skew_ns) if t.request_id in on_b else t for t in rep.timelines))


def by_tenant(bill: dict[str, int], tenant_of: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for rid, mj in bill.items():
        out[tenant_of[rid]] = out.get(tenant_of[rid], 0) + mj
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--seed", type=int, default=20261207)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # the engine's info logs: off
    settings = engine_settings(MeterConfig())
    config = SimConfig(counter_lag_ms=COUNTER_LAG_MS)
    tenant_change: dict[int, list[float]] = {s: [] for s in SKEWS_MS}
    b_change: dict[int, list[float]] = {s: [] for s in SKEWS_MS}
    a_change: dict[int, list[float]] = {s: [] for s in SKEWS_MS}
    with tempfile.TemporaryDirectory(prefix="clock-skew-") as tmp:
        for k in range(args.seeds):
            trace = make_trace(args.seed + k, args.scenes, [config])
            dry = replay(trace, config, start_ns=T0_NS)
            end = (dry.end_ns // settings.epoch_ns + 1) * settings.epoch_ns + NS_PER_S
            rep = replay(trace, config, start_ns=T0_NS, end_ns=end, sampler=SAMPLER, backend=BACKEND)
            tenant_of = {r.request_id: r.tenant for r in trace}
            on_b = {r.request_id for i, r in enumerate(sorted(trace, key=lambda r: r.arrival_ns)) if i % 2}
            base = joulegate_bill(rep, settings, Path(tmp)).request_mj

            base_t = by_tenant(base, tenant_of)
            for skew_ms in SKEWS_MS:
                bill = joulegate_bill(skewed(rep, on_b, skew_ms * NS_PER_MS), settings, Path(tmp)).request_mj
                got_t = by_tenant(bill, tenant_of)
                tenant_change[skew_ms] += [abs(got_t[t] / base_t[t] - 1) * 100 for t in base_t]
                for rid, mj in base.items():
                    if mj > 0:
                        (b_change if rid in on_b else a_change)[skew_ms].append(abs(bill.get(rid, 0) / mj - 1) * 100)
                print(
                    f"seed {args.seed + k} skew {skew_ms:+5d} ms: tenants {max(tenant_change[skew_ms]):6.2f} % max; "
                    f"requests (median |change|) on B {statistics.median(b_change[skew_ms]):6.2f} %, "
                    f"others {statistics.median(a_change[skew_ms]):6.2f} %; billed {sum(bill.values()) / 1e3:.1f} J "
                    f"of {sum(base.values()) / 1e3:.1f} J",
                    flush=True,
                )
    print()
    print(f"{'skew':>8}  {'tenant max %':>12}  {'B request median %':>18}  {'other request median %':>22}")
    for skew_ms in SKEWS_MS:
        print(
            f"{skew_ms:+6d} ms  {max(tenant_change[skew_ms]):12.2f}  {statistics.median(b_change[skew_ms]):18.2f}  "
            f"{statistics.median(a_change[skew_ms]):22.2f}"
        )
    fields = [f"skew_{s}ms_max_tenant_pct={max(tenant_change[s]):.2f}" for s in REPORTED_MS]
    fields += [f"skew_{s}ms_median_request_pct={statistics.median(b_change[s] + a_change[s]):.2f}" for s in REPORTED_MS]
    print("RESULT " + " ".join(fields), flush=True)


if __name__ == "__main__":
    main()
