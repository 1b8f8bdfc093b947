"""``joulegate report usage|requests|backends|settings``: energy reports read straight from SQL, for operators.

No gateway and no key are needed: whoever can read the database sees every tenant (``--tenant`` narrows it). The
semantics are those of the gRPC ``EnergyReports`` service (``meter.reports``): usage and requests select requests
by the time they were received, backends select epochs by their start; ranges are ``[--start, --end)``.

The bill does not depend on who prints it: the idle policy, grid intensity and PUE are the ones stored in the
database (``report settings`` lists them; ``report settings --set ...`` adds a period, effective now or later,
never earlier). The config file (``--config``) stands in only while the database holds none, and the output says
so. ``--idle-policy`` shows another policy than the stored one, and the output says that too.

Output is a table for people (a header line names the range and the settings that apply), or for billing
pipelines ``--format csv`` (one header row), ``json`` (title, columns, one object per row) or ``parquet`` (a file,
``--output``), all at full precision with the total as a last row with key ``total``. ``report backends`` exits
with status 1 if any backend fails the conservation check (counter != attributed + idle + adjustment).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from app.commands.database import CommandError, add_db_arguments, check_db_url, db_failure, redact, url_origin
from app.config import ConfigError, load_config

USAGE_COLUMNS = (
    "key", "requests", "prompt_tokens", "generated_tokens", "prefill_j", "decode_j", "idle_j", "total_j", "total_wh",
    "j_per_generated_token", "idle_share", "co2e_g", "provisional_requests", "estimated_prompt_requests",
)  # fmt: skip
REQUEST_COLUMNS = (
    "request_id", "tenant", "model_id", "backend", "status", "received", "prompt_tokens", "generated_tokens",
    "prefill_j", "decode_j", "idle_j", "total_j", "final", "prompt_tokens_estimated", "idle_policy",
)  # fmt: skip
BACKEND_COLUMNS = (
    "backend", "counter_j", "attributed_j", "prefill_j", "decode_j", "idle_j", "adjustment_j",
    "conservation_error_mj", "requests", "samples", "gaps", "attributed_until",
)  # fmt: skip
FORMATS = ("table", "csv", "json", "parquet")
SETTINGS_COLUMNS = ("effective", "idle_policy", "grid_g_co2e_per_kwh", "pue", "recorded", "source")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_db_arguments(common)
    common.add_argument("--start", metavar="ISO", help="range start, e.g. 2024-05-01 or 2024-05-01T12:00:00Z (UTC)")
    common.add_argument("--end", metavar="ISO", help="range end, exclusive (default: now)")
    common.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table (people), csv, json or parquet (billing pipelines: full precision, one row per line/record)",
    )
    common.add_argument("--output", metavar="PATH", help="write there instead of stdout (parquet needs a file)")
    asked = argparse.ArgumentParser(add_help=False)
    asked.add_argument(
        "--idle-policy",
        choices=["none", "time", "tokens"],
        help="show idle shares under this policy instead of the stored one (the output says so)",
    )
    sub = parser.add_subparsers(dest="report", metavar="REPORT", required=True)

    usage = sub.add_parser(
        "usage", parents=[common, asked], help="energy and tokens of the requests received in the range"
    )
    usage.add_argument("--group-by", choices=["tenant", "model", "backend", "hour", "day"], default="tenant")
    usage.add_argument("--tenant", help="only this tenant")

    requests = sub.add_parser("requests", parents=[common, asked], help="requests with their energy, newest first")
    requests.add_argument("--tenant", help="only this tenant")
    requests.add_argument("--model", help="only this model id")
    requests.add_argument("--backend", help="only this backend")
    requests.add_argument("--status", help="only this status (OK, CANCELLED, ...)")
    requests.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100; 0: all)")

    sub.add_parser("backends", parents=[common], help="per backend: counter, attributed and idle energy")

    settings = sub.add_parser(
        "settings", parents=[common], help="the stored billing settings (idle policy, grid intensity, PUE)"
    )
    settings.add_argument(
        "--set", action="store_true", help="add a period with these settings (the others stay as in force now)"
    )
    settings.add_argument("--policy", choices=["none", "time", "tokens"], help="with --set: the idle policy")
    settings.add_argument("--grid", type=float, metavar="G", help="with --set: grid intensity, gCO2e/kWh")
    settings.add_argument("--pue", type=float, help="with --set: power usage effectiveness (>= 1)")
    settings.add_argument("--effective", metavar="ISO", help="with --set: from when (default: now; never in the past)")


def parse_time(text: str | None, flag: str) -> int | None:
    """ISO 8601 date or date-time as ns since the epoch; a time without a zone is UTC."""
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag}: not an ISO 8601 date or time: {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    whole = int(parsed.timestamp())
    return whole * 1_000_000_000 + parsed.microsecond * 1000


def _iso(ns: int | None) -> str:
    from meter.reports import rfc3339

    return "-" if ns is None else rfc3339(ns)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    cells = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _emit(header: Sequence[str], rows: Sequence[Sequence[Any]], *, args: argparse.Namespace, title: str,
          pretty: Sequence[Sequence[str]], numeric: set[int]) -> None:  # fmt: skip
    """The rows in the format asked for: a table with its title line for people; CSV (one header row), JSON (the
    title, the columns and one object per row; NaN as null) or Parquet (one record per row, the title in the
    file's metadata) at full precision for machines."""
    fmt: str = args.format
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([dict(zip(header, r, strict=True)) for r in rows])
        pq.write_table(table.replace_schema_metadata({"joulegate.title": title}), args.output)
        return
    with _out(args.output) as out:
        if fmt == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        elif fmt == "json":
            records = [{h: _json_value(v) for h, v in zip(header, r, strict=True)} for r in rows]
            json.dump({"title": title, "columns": list(header), "rows": records}, out, allow_nan=False)
            out.write("\n")
        else:
            out.write(f"{title}\n{_table([h.upper() for h in header], pretty, numeric)}\n")


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@contextlib.contextmanager
def _out(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8", newline="") as f:
        yield f


def _settings_line(periods: Sequence[Any], stored: bool, asked: str | None) -> str:
    """What bills the rows: the stored settings periods that apply (or the config standing in), and a policy the
    reader asked for instead."""
    parts = []
    for p in periods:
        since = "" if len(periods) == 1 else f" from {_iso(p.effective_ns)}"
        parts.append(
            f"idle policy {p.idle_policy.value}, grid {p.grid_g_co2e_per_kwh:g} gCO2e/kWh, PUE {p.pue:g}{since}"
        )
    text = "; ".join(parts) + (" (stored)" if stored else " (from this config: none stored in the database yet)")
    if asked is not None:
        text += f" | idle shares shown under the policy asked for: {asked} (not the bill's)"
    return text


def _usage(conn: Any, args: argparse.Namespace, options: Any, start_ns: int | None, end_ns: int) -> int:
    from meter.reports import GroupBy, get_usage

    report = get_usage(
        conn, options, start_ns=start_ns, end_ns=end_ns, group_by=GroupBy(args.group_by), tenant=args.tenant
    )
    rows = [*report.rows, report.total]
    raw = [
        (r.key, r.requests, r.prompt_tokens, r.generated_tokens, r.prefill_j, r.decode_j, r.idle_j, r.total_j,
         r.total_wh, r.j_per_generated_token, r.idle_share, r.co2e_g, r.provisional_requests,
         r.estimated_prompt_requests)
        for r in rows
    ]  # fmt: skip
    pretty = [
        (r.key, str(r.requests), str(r.prompt_tokens), str(r.generated_tokens), f"{r.prefill_j:.3f}",
         f"{r.decode_j:.3f}", f"{r.idle_j:.3f}", f"{r.total_j:.3f}", f"{r.total_wh:.6f}",
         f"{r.j_per_generated_token:.4f}", f"{r.idle_share:.1%}", f"{r.co2e_g:.4f}", str(r.provisional_requests),
         str(r.estimated_prompt_requests))
        for r in rows
    ]  # fmt: skip
    asked = report.idle_policy_asked.value if report.idle_policy_asked is not None else None
    title = (
        f"usage by {args.group_by}, requests received in [{_iso(start_ns) if start_ns is not None else 'beginning'}, "
        f"{_iso(end_ns)}) | {_settings_line(report.periods, report.settings.stored, asked)}"
    )
    if args.format != "table":
        # The settings of the period in force at the end of the range (the table's title lists every period).
        at_end = report.settings.at(end_ns)
        policy = asked or at_end.idle_policy.value
        header = (*USAGE_COLUMNS, "idle_policy", "grid_g_co2e_per_kwh", "pue", "settings_periods", "idle_policy_asked")
        with_settings = [
            (*r, policy, at_end.grid_g_co2e_per_kwh, at_end.pue, len(report.periods), asked is not None) for r in raw
        ]
        _emit(header, with_settings, args=args, title=title, pretty=pretty, numeric=set())
    else:
        _emit(USAGE_COLUMNS, raw, args=args, title=title, pretty=pretty, numeric=set(range(1, 14)))
        if report.total.provisional_requests:
            print(f"{report.total.provisional_requests} request(s) provisional: their figures may still change")
        if report.total.estimated_prompt_requests:
            print(
                f"{report.total.estimated_prompt_requests} request(s) with an estimated prompt_tokens "
                "(the backend could not count them)"
            )
    return 0


def _requests(conn: Any, args: argparse.Namespace, options: Any, start_ns: int | None, end_ns: int) -> int:
    from meter.reports import MAX_PAGE_SIZE, RequestFilter, list_requests, settings_history

    if args.limit < 0:
        raise ConfigError(f"--limit: must be >= 0, got {args.limit}")
    flt = RequestFilter(
        tenant=args.tenant, model_id=args.model, backend=args.backend, status=args.status, start_ns=start_ns,
        end_ns=end_ns,
    )  # fmt: skip
    found: list[Any] = []
    token = ""
    while args.limit == 0 or len(found) < args.limit:
        want = MAX_PAGE_SIZE if args.limit == 0 else min(MAX_PAGE_SIZE, args.limit - len(found))
        page = list_requests(conn, flt, options, page_size=want, page_token=token)
        found += page.requests
        token = page.next_page_token
        if not token:
            break
    raw = [
        (r.request_id, r.tenant, r.model_id, r.backend or "", r.status or "", _iso(r.received_ns), r.prompt_tokens,
         r.generated_tokens, r.prefill_j, r.decode_j, r.idle_j, r.total_j, r.final, r.prompt_tokens_estimated,
         r.idle_policy.value)
        for r in found
    ]  # fmt: skip
    pretty = [
        (*(str(c) for c in r[:6]), f"{r[6]}{' (estimated)' if r[13] else ''}", str(r[7]),
         *(f"{c:.3f}" for c in r[8:12]), "yes" if r[12] else "no (provisional)", "yes" if r[13] else "no", r[14])
        for r in raw
    ]  # fmt: skip
    history = settings_history(conn, options)
    asked = options.idle_policy.value if options.idle_policy is not None else None
    title = (
        f"requests received in [{_iso(start_ns) if start_ns is not None else 'beginning'}, {_iso(end_ns)}), "
        f"newest first ({len(found)} shown{', more exist' if token else ''}) | "
        f"{_settings_line(history.overlapping(start_ns, end_ns), history.stored, asked)}"
    )
    _emit(REQUEST_COLUMNS, raw, args=args, title=title, pretty=pretty, numeric={6, 7, 8, 9, 10, 11})
    return 0


def _backends(conn: Any, args: argparse.Namespace, start_ns: int | None, end_ns: int) -> int:
    from meter.reports import get_backend_energy

    backends = get_backend_energy(conn, start_ns=start_ns, end_ns=end_ns)
    raw = [
        (b.backend, b.counter_mj / 1000, b.attributed_mj / 1000, b.prefill_mj / 1000, b.decode_mj / 1000,
         b.idle_mj / 1000, b.adjustment_mj / 1000, b.conservation_error_mj, b.requests, b.samples, b.gaps,
         _iso(b.attributed_until_ns))
        for b in backends
    ]  # fmt: skip
    pretty = [(r[0], *(f"{c:.3f}" for c in r[1:7]), *(str(c) for c in r[7:])) for r in raw]
    since = _iso(start_ns) if start_ns is not None else "beginning"
    title = f"backend energy over the epochs starting in [{since}, {_iso(end_ns)})"
    _emit(BACKEND_COLUMNS, raw, args=args, title=title, pretty=pretty, numeric=set(range(1, 11)))
    broken = [b.backend for b in backends if b.conservation_error_mj != 0]
    if broken:
        print(
            f"conservation check FAILED (counter != attributed + idle + adjustment) on: {', '.join(broken)}",
            file=sys.stderr,
        )
        return 1
    if args.format == "table":
        print(
            f"conservation check: ok on {len(backends)} backend(s) (counter = attributed + idle + adjustment, "
            "to the mJ)"
        )
        adjusted = [b for b in backends if b.adjustment_mj]
        for b in adjusted:
            print(
                f"{b.backend}: {b.adjusted_epochs} epoch(s) booked {b.adjustment_mj / 1000:+.3f} J that recomputes "
                "would have moved to (+) or from (-) requests already final"
            )
    return 0


def _settings(engine: Any, args: argparse.Namespace, fallback: Any) -> int:
    from meter.reports import BillingSettings, IdlePolicy, add_settings, load_settings
    from meter.store.audit import cli_actor

    with engine.connect() as conn:
        history = load_settings(conn, fallback)
    if args.set:
        if args.policy is None and args.grid is None and args.pue is None:
            raise ConfigError("--set: name at least one of --policy, --grid, --pue")
        now = history.at(time.time_ns())
        new = BillingSettings(
            idle_policy=IdlePolicy(args.policy) if args.policy else now.idle_policy,
            grid_g_co2e_per_kwh=now.grid_g_co2e_per_kwh if args.grid is None else args.grid,
            pue=now.pue if args.pue is None else args.pue,
        )
        add_settings(
            engine,
            new,
            effective_ns=parse_time(args.effective, "--effective"),
            source="joulegate report settings",
            actor=cli_actor(),
        )
        with engine.connect() as conn:
            history = load_settings(conn, fallback)
    elif args.policy or args.grid is not None or args.pue is not None or args.effective:
        raise ConfigError("--policy, --grid, --pue and --effective go with --set")
    raw = [
        (
            _iso(p.effective_ns),
            p.idle_policy.value,
            p.grid_g_co2e_per_kwh,
            p.pue,
            _iso(p.recorded_ns) if p.recorded_ns else "-",
            p.source,
        )
        for p in history.periods
    ]
    pretty = [tuple(str(c) for c in r) for r in raw]
    title = "billing settings, each for the requests received from its time on" + (
        "" if history.stored else " (none stored yet: this config's, until a gateway or meter stores its own)"
    )
    _emit(SETTINGS_COLUMNS, raw, args=args, title=title, pretty=pretty, numeric={2, 3})
    return 0


def run(args: argparse.Namespace) -> int:
    from app.metering import settings_from_config
    from common.logs import logs_to_stderr
    from meter.reports import IdlePolicy, ReportError, ReportOptions
    from meter.store import current, make_engine

    logs_to_stderr()
    if args.format == "parquet" and not args.output:
        raise ConfigError("--format parquet writes a file: give --output PATH")
    overrides: dict[str, Any] = {"db": {"url": args.db}} if args.db else {}
    config = load_config(args.config, overrides=overrides)
    start_ns = parse_time(args.start, "--start")
    end_ns = parse_time(args.end, "--end")
    end_ns = time.time_ns() if end_ns is None else end_ns
    if start_ns is not None and start_ns >= end_ns:
        raise ConfigError("--end must be after --start")
    url = config.db.url
    check_db_url(url, must_exist=True, origin=url_origin(args))  # a mistyped SQLite path: no empty report
    fallback = settings_from_config(config)
    options = ReportOptions(
        idle_policy=IdlePolicy(args.idle_policy) if getattr(args, "idle_policy", None) else None, fallback=fallback
    )
    engine = make_engine(url)
    try:
        if current(engine) is None:
            raise CommandError(
                f"{redact(url)} has no joulegate schema (a wrong database? `joulegate migrate` creates it)"
            )
        if args.report == "settings":
            return _settings(engine, args, fallback)
        with engine.connect() as conn:
            if args.report == "usage":
                return _usage(conn, args, options, start_ns, end_ns)
            if args.report == "requests":
                return _requests(conn, args, options, start_ns, end_ns)
            return _backends(conn, args, start_ns, end_ns)
    except (ConfigError, CommandError):
        raise
    except ReportError as exc:
        raise ConfigError(exc.message) from None
    except Exception as exc:
        raise db_failure(exc, url) from None
    finally:
        engine.dispose()
