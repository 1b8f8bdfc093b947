"""``joulegate audit``: the audit log — key creation, revocation and rotation, billing-settings changes and admin
report reads, with who did them and when (``meter.store.audit``). Reading it takes the database, i.e. an operator."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.commands.database import CommandError, add_db_arguments, check_db_url, db_failure, url_origin
from app.commands.keys import _iso
from app.commands.report import parse_time
from app.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db_arguments(parser)
    parser.add_argument("--since", metavar="ISO", help="events at or after this time (UTC)")
    parser.add_argument("--action", help="one action (key.rotate) or a family ending in a dot (key.)")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many, oldest first (default 1000)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace) -> int:
    from common.logs import logs_to_stderr
    from meter.store import current, make_engine
    from meter.store.audit import list_events

    logs_to_stderr()
    overrides: dict[str, Any] = {"db": {"url": args.db}} if args.db else {}
    url = load_config(args.config, overrides=overrides).db.url
    check_db_url(url, must_exist=True, origin=url_origin(args))
    since_ns = parse_time(args.since, "--since")
    engine = make_engine(url)
    try:
        if current(engine) is None:
            raise CommandError("the database has no joulegate schema (`joulegate migrate` creates it)")
        events = list_events(engine, since_ns=since_ns, action=args.action, limit=args.limit)
    except CommandError:
        raise
    except Exception as exc:
        raise db_failure(exc, url) from None
    finally:
        engine.dispose()
    for e in events:
        if args.json:
            print(json.dumps({"at": _iso(e.at_ns), "at_ns": e.at_ns, "actor": e.actor, "action": e.action,
                              "target": e.target, "detail": e.detail}))  # fmt: skip
        else:
            detail = " ".join(f"{k}={v}" for k, v in sorted(e.detail.items()) if v is not None)
            print(f"{_iso(e.at_ns)}  {e.action:<13}  {e.target:<24}  {e.actor}  {detail}".rstrip())
    if not events:
        print("no audit events", file=sys.stderr)
    return 0
