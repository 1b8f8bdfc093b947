"""``joulegate export``: final per-request energy as CloudEvents (``meter.reports.cloudevents``) to a billing
pipeline — an HTTP endpoint (OpenMeter's ``/api/v1/events``, batched as ``application/cloudevents-batch+json``), a
JSON Lines file, or stdout.

Once (the default) or every ``--every`` seconds. The cursor lives in the process: a start sends again what was
sealed since ``--since`` (default: 24 hours ago). That is safe because the event id is the request id — a sink that
deduplicates by id counts each request once — and it means a crashed exporter loses nothing. A batch the sink
refuses (after retries) stops the round without moving the cursor; the next round sends it again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from app.commands.database import CommandError, add_db_arguments, check_db_url, db_failure, url_origin
from app.commands.report import parse_time
from app.config import ConfigError, load_config

BATCH = 500
DAY_NS = 86_400 * 10**9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db_arguments(parser)
    parser.add_argument(
        "--sink",
        required=True,
        metavar="URL|PATH|-",
        help="http(s) URL (POST), a .jsonl file (appended), or - (stdout)",
    )
    parser.add_argument("--source", default="joulegate", help="the events' source (default: joulegate)")
    parser.add_argument("--since", metavar="ISO", help="send what was sealed from then on (default: 24 hours ago)")
    parser.add_argument("--every", type=float, metavar="SECONDS", help="keep exporting at this interval")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="HTTP sink header")


def _post(url: str, events: list[dict[str, Any]], headers: dict[str, str]) -> None:
    import urllib.error
    import urllib.request

    import tenacity

    body = json.dumps(events, allow_nan=False).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"content-type": "application/cloudevents-batch+json", **headers}
    )

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(4),
        wait=tenacity.wait_exponential(multiplier=0.5, max=8),
        retry=tenacity.retry_if_exception(_transient),
        reraise=True,
    )
    def send() -> None:
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()

    try:
        send()
    except urllib.error.HTTPError as exc:
        raise CommandError(f"--sink {url} answered {exc.code}: {exc.read()[:300].decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise CommandError(f"--sink {url}: {exc}") from None


def _transient(exc: BaseException) -> bool:
    """Worth another try: the sink was unreachable, overloaded (429) or failing (5xx); not a 4xx refusal."""
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    return isinstance(exc, urllib.error.URLError | TimeoutError | ConnectionError)


def _write(sink: str, events: list[dict[str, Any]], headers: dict[str, str]) -> None:
    if sink.startswith(("http://", "https://")):
        _post(sink, events, headers)
        return
    lines = "".join(json.dumps(e, allow_nan=False) + "\n" for e in events)
    if sink == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
        return
    with open(sink, "a", encoding="utf-8") as f:
        f.write(lines)


def export_round(engine: Any, cursor: Any, options: Any, args: argparse.Namespace, headers: dict[str, str]):
    """Send everything sealed after ``cursor``; the new cursor and how many events went out."""
    from meter.reports.cloudevents import sealed_after, usage_event

    sent = 0
    while True:
        with engine.connect() as conn:
            reports, after = sealed_after(conn, cursor, options, limit=BATCH)
        if after == cursor:
            return cursor, sent
        if reports:
            _write(args.sink, [usage_event(r, args.source) for r in reports], headers)
            sent += len(reports)
        cursor = after


def run(args: argparse.Namespace) -> int:
    from app.metering import settings_from_config
    from common.logs import logs_to_stderr
    from meter.reports import ReportOptions
    from meter.reports.cloudevents import Cursor
    from meter.store import current, make_engine

    logs_to_stderr()
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--header {h!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    if args.every is not None and args.every <= 0:
        raise ConfigError("--every must be a positive number of seconds")
    overrides: dict[str, Any] = {"db": {"url": args.db}} if args.db else {}
    config = load_config(args.config, overrides=overrides)
    since_ns = parse_time(args.since, "--since")
    cursor = Cursor(sealed_ns=time.time_ns() - DAY_NS if since_ns is None else since_ns)
    url = config.db.url
    check_db_url(url, must_exist=True, origin=url_origin(args))
    options = ReportOptions(fallback=settings_from_config(config))
    engine = make_engine(url)
    try:
        if current(engine) is None:
            raise CommandError("the database has no joulegate schema (`joulegate migrate` creates it)")
        while True:
            cursor, sent = export_round(engine, cursor, options, args, headers)
            print(f"joulegate export: {sent} event(s) sent", file=sys.stderr)
            if args.every is None:
                return 0
            time.sleep(args.every)
    except (ConfigError, CommandError):
        raise
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        raise db_failure(exc, url) from None
    finally:
        engine.dispose()
