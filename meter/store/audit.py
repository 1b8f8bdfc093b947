"""The audit log: who created, revoked or rotated a key, changed the billing settings, or read reports as an admin.

Appended in the same transaction as the change it records (a key and its creation record exist together or not at
all); never updated or deleted by joulegate. ``actor`` names who acted: ``key:<key_id>`` for an API call,
``cli:<user>@<host>`` for a command run against the database (whoever can do that is an operator).
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from meter.store.models import AuditEvent, table_of

AUDIT = table_of(AuditEvent)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    at_ns: int
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


def cli_actor() -> str:
    """The operator running a command: the OS user and host (the database does not know people)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def record(conn: sa.Connection, actor: str, action: str, target: str, **detail: Any) -> None:
    """Append one event inside the caller's transaction."""
    conn.execute(
        sa.insert(AUDIT).values(
            at_ns=time.time_ns(),
            actor=actor,
            action=action,
            target=target,
            detail=json.dumps(detail, sort_keys=True, separators=(",", ":")),
        )
    )


def list_events(
    engine: sa.Engine, *, since_ns: int | None = None, action: str | None = None, limit: int = 1000
) -> list[AuditRecord]:
    """Events oldest first (``action``: exact name, or a prefix ending in ``.``, e.g. ``key.``)."""
    query = sa.select(AUDIT).order_by(AUDIT.c.id).limit(limit)
    if since_ns is not None:
        query = query.where(AUDIT.c.at_ns >= since_ns)
    if action:
        query = query.where(AUDIT.c.action.startswith(action) if action.endswith(".") else AUDIT.c.action == action)
    with engine.connect() as conn:
        return [AuditRecord(r.at_ns, r.actor, r.action, r.target, json.loads(r.detail)) for r in conn.execute(query)]
