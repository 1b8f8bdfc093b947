"""key lifecycle (expiry, scopes, last use, rotation) and the audit log

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Existing keys keep working as before: no expiry, both scopes (generate, reports), never used as far as the table
knows, created afresh.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column(
                "expires_ns",
                sa.BigInteger(),
                nullable=True,
                comment="when the key stops working (ns); NULL: never (rotation sets it on the old key)",
            )
        )
        batch.add_column(
            sa.Column(
                "scopes",
                sa.String(),
                server_default="generate,reports",
                nullable=False,
                comment="what it may call, comma-separated: generate (the generation APIs), reports (its tenant's "
                "energy)",
            )
        )
        batch.add_column(
            sa.Column(
                "last_used_ns",
                sa.BigInteger(),
                nullable=True,
                comment="last time a gateway or meter looked it up (ns; to within a minute); NULL: never",
            )
        )
        batch.add_column(
            sa.Column(
                "rotated_from",
                sa.String(),
                nullable=True,
                comment="key_id of the key this one replaced (keys rotate); NULL for a key created afresh",
            )
        )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False, comment="surrogate key, in order of recording"),
        sa.Column("at_ns", sa.BigInteger(), nullable=False, comment="when (ns since the epoch)"),
        sa.Column(
            "actor",
            sa.String(),
            nullable=False,
            comment="who: key:<key_id> (an API call), cli:<user>@<host> (a command on a database)",
        ),
        sa.Column(
            "action",
            sa.String(),
            nullable=False,
            comment="key.create, key.revoke, key.rotate, settings.set, report.read",
        ),
        sa.Column("target", sa.String(), nullable=False, comment="what: a key_id, a tenant, a report method"),
        sa.Column("detail", sa.Text(), nullable=False, comment="JSON object with the facts of the action"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_audit_events_at_ns"), "audit_events", ["at_ns"])


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_events_at_ns"), table_name="audit_events")
    op.drop_table("audit_events")
    with op.batch_alter_table("api_keys") as batch:
        for column in ("rotated_from", "last_used_ns", "scopes", "expires_ns"):
            batch.drop_column(column)
