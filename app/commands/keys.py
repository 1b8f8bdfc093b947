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

    listing = sub.add_parser("list", parents=[common], help="list keys (never their secrets)")
    listing.add_argument("--active", action="store_true", help="only keys that are not revoked")

    revoke = sub.add_parser("revoke", parents=[common], help="revoke a key by its key id")
    revoke.add_argument("key_id", help="the key's public id (the part after jg_)")


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

    logs_to_stderr()
    overrides: dict[str, Any] = {"db": {"url": args.db}} if args.db else {}
    config = load_config(args.config, overrides=overrides)
    url = config.db.url
    check_db_url(url, must_exist=True, origin=url_origin(args))
    lacking = check_class(config, args.default_class) if getattr(args, "default_class", None) else []
    engine = make_engine(url)
    try:
        ensure_schema(engine)
        if args.action == "create":
            try:
                created = create_key(
                    engine, args.tenant, admin=args.admin, default_class=args.default_class, label=args.label
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
    except CommandError:
        raise
    except Exception as exc:
        raise db_failure(exc, url) from None
    finally:
        engine.dispose()
