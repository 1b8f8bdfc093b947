"""ledger_writers.clock_offset_ns: each ledger's clock against the database server's, so a skewed host is seen

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

Requests carry the gateway's clock and samples the meter's; attribution lines them up. A replica whose clock is off
shifts its requests' energy onto its neighbours' in the same epochs, and nothing said so. Each ledger now measures
its offset with its how-far mark, and the meter logs (and /metrics shows) writers whose clocks disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "ledger_writers",
        sa.Column(
            "clock_offset_ns",
            sa.BigInteger(),
            nullable=True,
            comment="this writer's clock minus the database server's at its last mark (ns, +- half a round trip); "
            "NULL on SQLite (no server clock)",
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("ledger_writers") as batch:
        batch.drop_column("clock_offset_ns")
