"""ledger_writers: how far each ledger has written, so that a meter seals nothing a cut-off replica's journal holds

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

A gateway replica that loses the database keeps its timelines in its journal and writes them when the database is
back. A meter that sealed the other requests of those epochs meanwhile had given them the replica's energy, for good.
Each ledger now says how far it has written; the meter seals only behind every writer it has heard from lately.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ledger_writers",
        sa.Column("writer_id", sa.String(), nullable=False, comment="the ledger's id (its journal's)"),
        sa.Column("name", sa.String(), nullable=False, comment="host:pid of the process that wrote the row last"),
        sa.Column(
            "through_ns",
            sa.BigInteger(),
            nullable=False,
            comment="every record handed to the ledger before this time (ns) is in the database",
        ),
        sa.PrimaryKeyConstraint("writer_id"),
    )


def downgrade() -> None:
    op.drop_table("ledger_writers")
