"""backend_calibrations.devices: a stored fit is reused only on the devices it was made on

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

A backend's name can come to point at other GPUs (a service moved to another node, cards swapped); the fit stored
under the name describes the old ones. Rows stored before this revision have NULL devices and are never reused: the
next fit on the backend's devices replaces them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("backend_calibrations") as batch:
        batch.add_column(
            sa.Column(
                "devices",
                sa.String(),
                nullable=True,
                comment="the devices the fit was made on, as a sorted JSON array of names (nvml:<GPU UUID>); a meter "
                "reuses the fit only on the same devices. NULL: stored before 0008, never reused",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("backend_calibrations") as batch:
        batch.drop_column("devices")
