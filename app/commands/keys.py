"""``joulegate keys``: create, list and revoke API keys.

``keys create`` prints one human line, then the new key alone on the last line, so scripts can take it with
``tail -n 1``. The key is shown only this once; the database keeps its SHA-256. A database without a schema is
migrated first; a SQLite file that does not exist is refused (a typo would otherwise create a database no gateway
reads: ``joulegate migrate`` creates one).

``--class`` is checked against the traffic classes of the configuration (``--config`` and the environment, as the
gateway reads them): a key whose default class no model has would get every request it sends without an
``x-traffic-class`` refused.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any

from app.commands.database import CommandError, add_db_arguments, check_db_url, db_failure, url_origin
from app.config import Config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_db_arguments(common)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = sub.add_parser("create", parents=[common], help="create a key for a tenant (printed once)")
    create.add_argument("--tenant", required=True, help="tenant name (created if missing)")
    create.add_argument("--admin", action="store_true", help="may read every tenant's energy")
    create.add_argument(
        "--class",
        dest="default_class",
        metavar="CLASS",
        help="default traffic class of the key's requests: a class of [models.shaping] in the config (--config)",
    )
    create.add_argument("--label", help="free text: who holds the key")
    create.add_argument("--expires-in", metavar="DURATION", help="the key stops working after this (30d, 12h, 90m)")
    create.add_argument(
        "--scope",
        choices=["all", *SCOPE_CHOICES],
        default="all",
        help="generate: the generation APIs only; reports: energy reports only; all (default): both",
    )

    listing = sub.add_parser("list", parents=[common], help="list keys (never their secrets)")
    listing.add_argument("--active", action="store_true", help="only keys that work now (not revoked or expired)")

    revoke = sub.add_parser("revoke", parents=[common], help="revoke a key by its key id")
    revoke.add_argument("key_id", help="the key's public id (the part after jg_)")

    rotate = sub.add_parser(
        "rotate", parents=[common], help="issue a key that replaces KEY_ID; the old one works for --grace more"
    )
    rotate.add_argument("key_id", help="the key's public id (the part after jg_)")
    rotate.add_argument("--grace", metavar="DURATION", default="24h", help="how long the old key keeps working (24h)")


SCOPE_CHOICES = ("generate", "reports")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_ns(text: str, flag: str) -> int:
    """``30d``, ``12h``, ``90m``, ``45s`` (a whole number and a unit) as nanoseconds."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in _UNITS_S or not number.isdigit():
        raise CommandError(f"{flag} {text!r}: expected a whole number and a unit (s, m, h, d), e.g. 30d", exit_code=2)
    return int(number) * _UNITS_S[unit] * 10**9


def _iso(ns: int | None) -> str:
    if ns is None:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_class(config: Config, name: str) -> list[str]:
    """Refuse a default class that no configured model has (``CommandError``); return the models that lack it (a
    request of the key to one of those must name its class with ``x-traffic-class``)."""
    classes = {m.model_id: set(m.shaping.classes) for m in config.models}
    if not classes:
        raise CommandError(
            f"--class {name!r}: no traffic classes to check it against: pass the gateway's configuration "
            "(--config FILE with its [[models]]) so the key's class is one the gateway has",
            exit_code=2,
        )
    if not any(name in names for names in classes.values()):
        known = sorted(set().union(*classes.values()))
        raise CommandError(
            f"--class {name!r}: no model of the configuration has this traffic class (classes: {', '.join(known)})",
            exit_code=2,
        )
    return [model for model, names in classes.items() if name not in names]


def run(args: argparse.Namespace) -> int:
    from common.logs import logs_to_stderr
    from meter.store import create_key, ensure_schema, list_keys, make_engine, revoke_key
    from meter.store.audit import cli_actor
    from meter.store.keys import ALL_SCOPES, rotate_key

    logs_to_stderr()
    overrides: dict[str, Any] = {"db": {"url": args.db}} if args.db else {}
    config = load_config(args.config, overrides=overrides)
    url = config.db.url
    check_db_url(url, must_exist=True, origin=url_origin(args))
    lacking = check_class(config, args.default_class) if getattr(args, "default_class", None) else []
    expires_in = getattr(args, "expires_in", None)
    expires_ns = time.time_ns() + parse_duration_ns(expires_in, "--expires-in") if expires_in else None
    grace_ns = parse_duration_ns(args.grace, "--grace") if args.action == "rotate" else 0
    actor = cli_actor()
    engine = make_engine(url)
    try:
        ensure_schema(engine)
        if args.action == "create":
            try:
                created = create_key(
                    engine,
                    args.tenant,
                    admin=args.admin,
                    default_class=args.default_class,
                    label=args.label,
                    scopes=ALL_SCOPES if args.scope == "all" else frozenset([args.scope]),
                    expires_ns=expires_ns,
                    actor=actor,
                )
            except ValueError as exc:
                raise CommandError(f"--tenant: {exc}", exit_code=2) from None
            role = "admin key" if args.admin else "key"
            if lacking:
                print(
                    f"note: models {', '.join(lacking)} have no class {args.default_class!r}: requests of this key "
                    "to them must send x-traffic-class",
                    file=sys.stderr,
                )
            until = f", expires {_iso(expires_ns)}" if expires_ns else ""
            print(f"created {role} {created.key_id} for tenant {created.tenant!r}{until} (shown once; store it now):")
            print(created.key)
            return 0
        if args.action == "rotate":
            rotated = rotate_key(engine, args.key_id, grace_ns=grace_ns, actor=actor)
            if rotated is None:
                print(f"no active key with id {args.key_id!r}", file=sys.stderr)
                return 1
            old_until = _iso(time.time_ns() + grace_ns)
            print(f"created key {rotated.key_id} for tenant {rotated.tenant!r} replacing {args.key_id}, which works "
                  f"until {old_until} at the latest (shown once; store it now):")  # fmt: skip
            print(rotated.key)
            return 0
        if args.action == "list":
            now_ns = time.time_ns()
            rows = [k for k in list_keys(engine) if k.active_at(now_ns) or not args.active]
            header = ("KEY_ID", "TENANT", "ADMIN", "SCOPES", "CLASS", "LABEL", "CREATED", "EXPIRES", "REVOKED",
                      "LAST_USED", "REPLACES")  # fmt: skip
            table = [header] + [
                (
                    k.key_id,
                    k.tenant,
                    "yes" if k.admin else "no",
                    ",".join(sorted(k.scopes)),
                    k.default_class or "-",
                    k.label or "-",
                    _iso(k.created_ns),
                    _iso(k.expires_ns),
                    _iso(k.revoked_ns),
                    _iso(k.last_used_ns),
                    k.rotated_from or "-",
                )
                for k in rows
            ]
            widths = [max(len(r[i]) for r in table) for i in range(len(header))]
            for r in table:
                print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
            return 0
        if revoke_key(engine, args.key_id, actor=actor):
            print(f"revoked {args.key_id}")
            return 0
        print(f"no active key with id {args.key_id!r}", file=sys.stderr)
        return 1
    except CommandError:
        raise
    except Exception as exc:
        raise db_failure(exc, url) from None
    finally:
        engine.dispose()
