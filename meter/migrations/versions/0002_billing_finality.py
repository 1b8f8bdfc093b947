"""billing finality: seals, stored idle shares, adjustments, true prompt counts, billing settings

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

- requests.prompt_tokens_estimated: the prompt count could not be had from the backend (reports say so);
- request_energy.idle_time_mj / idle_tokens_mj: each request's idle share under each policy, computed by the engine
  from the request's own timeline when it writes the epoch (reports no longer split idle themselves);
- backend_epochs.adjustment_mj: what a recompute would have moved to or from sealed requests;
- request_seals: requests whose figures are final;
- billing_settings: idle policy, grid intensity and PUE, with history.

Existing rows get 0 idle shares: their epochs' idle stays in the backends' buckets until they are recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_COMMENTS = {  # (table, column, type): (comment before, comment after); SQLite keeps no comments
    ("requests", "prompt_tokens", "int"): (
        "prompt length after truncation (TGI's input_length); 0 if unknown or open",
        "prompt length in tokens after truncation, as the backend counted it (TGI's input_length, or its /tokenize "
        "asked after the fact); 0 while open and for a request that did no GPU work",
    ),
    ("request_energy", "active_ns", "bigint"): (
        "time the request was on the backend (released_ns to done_ns) within the epoch",
        "time the request was on the backend (released_ns to done_ns) within the epoch; 0 if it did no GPU work",
    ),
}


def _comments(forward: bool) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for (table, column, kind), (before, after) in _COMMENTS.items():
        existing = sa.Integer() if kind == "int" else sa.BigInteger()
        op.alter_column(
            table,
            column,
            existing_type=existing,
            existing_nullable=False,
            comment=after if forward else before,
            existing_comment=before if forward else after,
        )


def upgrade() -> None:
    _comments(forward=True)
    op.add_column(
        "requests",
        sa.Column(
            "prompt_tokens_estimated",
            sa.Boolean(),
            server_default=sa.false(),
            nullable=False,
            comment="true: the backend could not be asked, prompt_tokens is the gateway's estimate (reports say so)",
        ),
    )
    op.add_column(
        "request_energy",
        sa.Column(
            "idle_time_mj",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="its share of the epoch's idle_mj in proportion to active_ns (idle policy 'time')",
        ),
    )
    op.add_column(
        "request_energy",
        sa.Column(
            "idle_tokens_mj",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="its share of the epoch's idle_mj in proportion to its prompt + generated tokens times the part of "
            "its own window (released_ns to done_ns) inside the epoch (idle policy 'tokens')",
        ),
    )
    op.add_column(
        "backend_epochs",
        sa.Column(
            "adjustment_mj",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="counter_mj - attributed_mj - idle_mj: what a recompute would have given sealed requests (+) or "
            "taken from them (-) but did not (their figures are final); 0 when none was affected",
        ),
    )
    op.create_table(
        "request_seals",
        sa.Column("request_id", sa.String(), nullable=False, comment="requests.request_id"),
        sa.Column("backend", sa.String(), nullable=False, comment="its backend (as requests.backend)"),
        sa.Column(
            "done_ns", sa.BigInteger(), nullable=False, comment="its requests.done_ns (the engine's seal cursor)"
        ),
        sa.Column("sealed_ns", sa.BigInteger(), nullable=False, comment="when the engine sealed it"),
        sa.Column("prefill_mj", sa.BigInteger(), nullable=False, comment="final prefill energy"),
        sa.Column("decode_mj", sa.BigInteger(), nullable=False, comment="final decode energy"),
        sa.Column("idle_time_mj", sa.BigInteger(), nullable=False, comment="final idle share under the 'time' policy"),
        sa.Column(
            "idle_tokens_mj", sa.BigInteger(), nullable=False, comment="final idle share under the 'tokens' policy"
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_request_seals")),
    )
    op.create_index(op.f("ix_request_seals_backend_done_ns"), "request_seals", ["backend", "done_ns"], unique=False)
    op.create_table(
        "billing_settings",
        sa.Column(
            "effective_ns",
            sa.BigInteger(),
            nullable=False,
            comment="applies to requests received at or after this time (ns)",
        ),
        sa.Column(
            "idle_policy", sa.String(), nullable=False, comment="how idle energy is shared: none, time or tokens"
        ),
        sa.Column("grid_g_co2e_per_kwh", sa.Float(), nullable=False, comment="grid carbon intensity, gCO2e per kWh"),
        sa.Column("pue", sa.Float(), nullable=False, comment="power usage effectiveness: facility energy / GPU energy"),
        sa.Column("recorded_ns", sa.BigInteger(), nullable=False, comment="when the row was written"),
        sa.Column("source", sa.String(), nullable=False, comment="who wrote it (a process's config, or an operator)"),
        sa.PrimaryKeyConstraint("effective_ns", name=op.f("pk_billing_settings")),
    )


def downgrade() -> None:
    _comments(forward=False)
    op.drop_table("billing_settings")
    op.drop_index(op.f("ix_request_seals_backend_done_ns"), table_name="request_seals")
    op.drop_table("request_seals")
    with op.batch_alter_table("backend_epochs") as batch:
        batch.drop_column("adjustment_mj")
    with op.batch_alter_table("request_energy") as batch:
        batch.drop_column("idle_tokens_mj")
        batch.drop_column("idle_time_mj")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("prompt_tokens_estimated")
