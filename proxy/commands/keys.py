"""``joulegate keys``: create, list and revoke API keys.

``keys create`` prints one human line, then the new key alone on the last line, so scripts can take it with
``tail -n 1``. The key is shown only this once; the database keeps its SHA-256. A database without a schema
(e.g. a fresh SQLite file) is migrated first.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from proxy.commands.migrate import add_db_arguments, logs_to_stderr, redact, resolve_db_url
from proxy.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_db_arguments(common)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = sub.add_parser("create", parents=[common], help="create a key for a tenant (printed once)")
    create.add_argument("--tenant", required=True, help="tenant name (created if missing)")
    create.add_argument("--admin", action="store_true", help="may read every tenant's energy")
    create.add_argument("--class", dest="default_class", metavar="CLASS", help="default traffic class")
    create.add_argument("--label", help="free text: who holds the key")

    listing = sub.add_parser("list", parents=[common], help="list keys (never their secrets)")
    listing.add_argument("--active", action="store_true", help="only keys that are not revoked")

    revoke = sub.add_parser("revoke", parents=[common], help="revoke a key by its key id")
    revoke.add_argument("key_id", help="the key's public id (the part after jg_)")


def _iso(ns: int | None) -> str:
    if ns is None:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(args: argparse.Namespace) -> int:
    from meter.store import create_key, ensure_schema, list_keys, make_engine, revoke_key

    logs_to_stderr()
    try:
        url = resolve_db_url(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    engine = make_engine(url)
    try:
        ensure_schema(engine)
        if args.action == "create":
            created = create_key(
                engine, args.tenant, admin=args.admin, default_class=args.default_class, label=args.label
            )
            role = "admin key" if args.admin else "key"
            print(f"created {role} {created.key_id} for tenant {created.tenant!r} (shown once; store it now):")
            print(created.key)
            return 0
        if args.action == "list":
            rows = list_keys(engine, include_revoked=not args.active)
            header = ("KEY_ID", "TENANT", "ADMIN", "CLASS", "LABEL", "CREATED", "REVOKED")
            table = [header] + [
                (
                    k.key_id,
                    k.tenant,
                    "yes" if k.admin else "no",
                    k.default_class or "-",
                    k.label or "-",
                    _iso(k.created_ns),
                    _iso(k.revoked_ns),
                )
                for k in rows
            ]
            widths = [max(len(r[i]) for r in table) for i in range(len(header))]
            for r in table:
                print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
            return 0
        if revoke_key(engine, args.key_id):
            print(f"revoked {args.key_id}")
            return 0
        print(f"no active key with id {args.key_id!r}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"joulegate keys: {redact(url)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
