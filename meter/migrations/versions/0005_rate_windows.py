"""rate_windows: per-tenant, per-minute leases of the rate limits shared by every gateway

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rate_windows",
        sa.Column("scope", sa.String(), nullable=False, comment="<tenant>/requests or <tenant>/tokens"),
        sa.Column("window_start_ns", sa.BigInteger(), nullable=False, comment="start of the UTC minute"),
        sa.Column(
            "used", sa.BigInteger(), nullable=False, comment="leased to gateways so far in the window (<= the limit)"
        ),
        sa.PrimaryKeyConstraint("scope", "window_start_ns"),
    )


def downgrade() -> None:
    op.drop_table("rate_windows")
