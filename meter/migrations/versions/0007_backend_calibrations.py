"""backend_calibrations: each backend's latest fitted power model, so that a restarted meter starts calibrated

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "backend_calibrations",
        sa.Column("backend", sa.String(), nullable=False, comment="the backend (as requests.backend)"),
        sa.Column(
            "lag_ns", sa.BigInteger(), nullable=False, comment="the counter's fitted lag behind the wall clock (ns)"
        ),
        sa.Column("prefill_w", sa.Float(), nullable=False, comment="prefill power of a step of the mean size (W)"),
        sa.Column("active_w", sa.Float(), nullable=False, comment="decode (or waiting-request) power (W)"),
        sa.Column("idle_w", sa.Float(), nullable=True, comment="idle power (W); NULL when too little idle was seen"),
        sa.Column(
            "prefill_w_per_1k_tokens", sa.Float(), nullable=False, comment="prefill power rise per 1,000 step tokens"
        ),
        sa.Column(
            "prefill_mean_tokens", sa.Float(), nullable=False, comment="the steps' mean size the prefill_w is of"
        ),
        sa.Column("intervals", sa.Integer(), nullable=False, comment="reading intervals the fit used"),
        sa.Column("residual_w", sa.Float(), nullable=False, comment="root-mean-square misfit, as average power (W)"),
        sa.Column("fitted_ns", sa.BigInteger(), nullable=False, comment="when the meter that fitted it wrote it"),
        sa.PrimaryKeyConstraint("backend"),
    )


def downgrade() -> None:
    op.drop_table("backend_calibrations")
