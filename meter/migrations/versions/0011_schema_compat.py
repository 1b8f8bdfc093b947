"""schema_compat: the oldest revision whose code may still write to this schema, so a rolling upgrade's old pods run on

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

A joulegate refuses a database at a revision it does not know (a newer joulegate migrated it): it cannot tell whether
the newer schema still takes what it writes. The migration that makes a schema now says so: ``schema_compat`` holds
one row, the oldest revision whose code may still write here. Every later migration sets it: to its own revision
when code before it must stop (it changes what rows mean, or adds what old writers would leave out), or leaves it
when old code's rows stay right (an added nullable column, a new index). A process whose own newest revision is at
least that one starts on the newer schema (and says so in its log); the others refuse.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "schema_compat",
        sa.Column(
            "oldest_writer",
            sa.String(),
            nullable=False,
            comment="the oldest schema revision whose code may still write to this database (its newest revision "
            "at least this): later migrations raise it when older writers must stop",
        ),
        sa.PrimaryKeyConstraint("oldest_writer"),
    )
    op.bulk_insert(table, [{"oldest_writer": "0011"}])


def downgrade() -> None:
    op.drop_table("schema_compat")
