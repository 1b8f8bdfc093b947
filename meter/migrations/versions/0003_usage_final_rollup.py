"""usage rollup of final figures: usage_final_hourly, usage_rollup_hours, usage_rollup_state

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

Usage reports read whole hours from ``usage_final_hourly``: per (hour received, tenant, model, backend) the sums of
final figures, written once for an hour all of whose requests are final (``meter.engine.rollup``). Existing
databases start with no hour rolled: the engine rolls the old hours up over its next passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_final_hourly",
        sa.Column(
            "hour_start_ns",
            sa.BigInteger(),
            nullable=False,
            comment="start of the UTC hour the requests were received in",
        ),
        sa.Column("tenant", sa.String(), nullable=False, comment="tenant name"),
        sa.Column("model_id", sa.String(), nullable=False, comment="model id"),
        sa.Column(
            "backend", sa.String(), nullable=False, comment="backend name; '' for requests that never reached one"
        ),
        sa.Column("requests", sa.BigInteger(), nullable=False, comment="requests received in the hour"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, comment="sum of prompt_tokens"),
        sa.Column("generated_tokens", sa.BigInteger(), nullable=False, comment="sum of generated_tokens"),
        sa.Column(
            "estimated_prompt_requests",
            sa.BigInteger(),
            nullable=False,
            comment="requests whose prompt count is an estimate",
        ),
        sa.Column("prefill_mj", sa.BigInteger(), nullable=False, comment="sum of the requests' final prefill energy"),
        sa.Column("decode_mj", sa.BigInteger(), nullable=False, comment="sum of the requests' final decode energy"),
        sa.Column("idle_time_mj", sa.BigInteger(), nullable=False, comment="sum of their idle shares under 'time'"),
        sa.Column("idle_tokens_mj", sa.BigInteger(), nullable=False, comment="sum of their idle shares under 'tokens'"),
        sa.PrimaryKeyConstraint("hour_start_ns", "tenant", "model_id", "backend", name=op.f("pk_usage_final_hourly")),
    )
    op.create_table(
        "usage_rollup_hours",
        sa.Column("hour_start_ns", sa.BigInteger(), nullable=False, comment="start of the UTC hour"),
        sa.Column("rolled_at_ns", sa.BigInteger(), nullable=False, comment="rows ingested up to this time are in it"),
        sa.Column("requests", sa.BigInteger(), nullable=False, comment="requests rolled up"),
        sa.PrimaryKeyConstraint("hour_start_ns", name=op.f("pk_usage_rollup_hours")),
    )
    op.create_table(
        "usage_rollup_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False, comment="always 1"),
        sa.Column(
            "checked_ns",
            sa.BigInteger(),
            nullable=False,
            comment="rows ingested after this may fall in a rolled hour: those hours read raw rows",
        ),
        sa.Column("version", sa.BigInteger(), nullable=False, comment="bumped by every change to the rollup"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_rollup_state")),
    )


def downgrade() -> None:
    op.drop_table("usage_rollup_state")
    op.drop_table("usage_rollup_hours")
    op.drop_table("usage_final_hourly")
