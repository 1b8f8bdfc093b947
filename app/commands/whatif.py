"""``joulegate whatif``: what the recorded traffic would have cost under other placement and shaping policies.

Replays the ledger's requests of a window (``--start``/``--end``, ``--model``) on simulated backends (``app.whatif``)
and prints, beside the measured baseline, each policy's energy (J, J/token, idle J, above-floor J per request),
TTFT p50/p95 and the GPUs it needed; ``--plot PATH`` draws them.
"""

from __future__ import annotations

import argparse

from app.commands.database import CommandError, add_db_arguments, open_database, redact
from app.commands.report import parse_time
from app.config import ConfigError
from sim.costmodel import COST_MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db_arguments(parser)
    parser.add_argument("--start", metavar="ISO", help="requests received from (UTC; default: the first)")
    parser.add_argument("--end", metavar="ISO", help="requests received before (default: the last)")
    parser.add_argument("--model", help="only this model id")
    parser.add_argument("--backends", type=int, help="simulated backends (default: as many as the ledger shows)")
    parser.add_argument("--pack-target", type=int, default=7, help="pack: requests in flight per backend (default 7)")
    parser.add_argument(
        "--hold-ms", type=float, action="append", default=None, help="a window-shaping hold to try (repeatable)"
    )
    parser.add_argument(
        "--hold-class", action="append", default=None, help="class the hold applies to (repeatable; default: batch)"
    )
    parser.add_argument(
        "--park-after-s", type=float, default=300.0, help="+ park: a backend idle this long is scaled in (300)"
    )
    parser.add_argument(
        "--wake-j", type=float, default=12_000.0, help="+ park: the energy of one cold start (12000: 60 s at 200 W)"
    )
    parser.add_argument("--ttft-class", metavar="CLASS", help="TTFT columns of this traffic class only")
    parser.add_argument("--cost-model", choices=sorted(COST_MODELS), default="default", help="sim/costmodel.py")
    parser.add_argument("--plot", metavar="PNG", help="draw the comparison there")


def run(args: argparse.Namespace) -> int:
    from app import whatif

    start_ns = parse_time(args.start, "--start")
    end_ns = parse_time(args.end, "--end")
    if start_ns is not None and end_ns is not None and start_ns >= end_ns:
        raise ConfigError("--end must be after --start")
    if args.pack_target < 1:
        raise ConfigError("--pack-target must be >= 1")
    if args.backends is not None and args.backends < 1:
        raise ConfigError("--backends must be >= 1")
    holds = args.hold_ms if args.hold_ms is not None else [500.0]
    if any(h < 0 for h in holds):
        raise ConfigError("--hold-ms must be >= 0")
    if args.park_after_s < 0 or args.wake_j < 0:
        raise ConfigError("--park-after-s and --wake-j must be >= 0")
    classes = frozenset(args.hold_class or ["batch"])
    url, engine = open_database(args, must_exist=True)
    try:
        try:
            recorded = whatif.load(engine, start_ns, end_ns, args.model)
        except ValueError as exc:
            raise CommandError(f"{redact(url)}: {exc}") from None
    finally:
        engine.dispose()
    scenarios = whatif.default_scenarios(args.pack_target, holds, classes)
    rows = whatif.evaluate(
        recorded,
        scenarios,
        backends=args.backends,
        cost_model=args.cost_model,
        ttft_class=args.ttft_class,
        park=whatif.ParkModel(args.park_after_s, args.wake_j),
    )
    n_backends = args.backends or len(recorded.backends)
    span_s = (recorded.end_ns - recorded.start_ns) / 1e9
    print(
        f"joulegate whatif: {len(recorded.requests)} requests over {span_s:.1f} s on {len(recorded.backends)} "
        f"backends ({', '.join(recorded.backends)}), replayed on {n_backends} simulated backends "
        f"(cost model {args.cost_model})"
    )
    if args.ttft_class:
        print(f"TTFT of class {args.ttft_class!r} only; energy of the whole fleet")
    print(whatif.table(rows))
    if recorded.counter_mj is None:
        print("  (no measured baseline: the meter's epochs do not cover every request of the range yet)")
    base = rows[2]  # spread, released at arrival
    for r in rows[3:]:
        if base.above_floor_j_per_req and base.energy_j and base.ttft_p95_ms:
            print(
                f"  {r.name}: above-floor J/req x{(r.above_floor_j_per_req or 0) / base.above_floor_j_per_req:.2f}, "
                f"bill x{(r.energy_j or 0) / base.energy_j:.2f}, "
                f"TTFT p95 x{(r.ttft_p95_ms or 0) / base.ttft_p95_ms:.2f} vs spread"
            )
    if args.plot:
        whatif.plot(rows, args.plot, f"whatif: {len(recorded.requests)} requests, {n_backends} backends")
        print(f"plot: {args.plot}")
    return 0
