"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Creates every table of the first schema (meter/store/models.py documents each column).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "backend_epochs",
        sa.Column("backend", sa.String(), nullable=False, comment="backend name"),
        sa.Column("epoch_start_ns", sa.BigInteger(), nullable=False, comment="epoch start (inclusive)"),
        sa.Column("epoch_end_ns", sa.BigInteger(), nullable=False, comment="epoch end (exclusive)"),
        sa.Column(
            "first_reading_ns",
            sa.BigInteger(),
            nullable=True,
            comment="t_ns of the first good sample used; NULL when the epoch had none",
        ),
        sa.Column(
            "last_reading_ns",
            sa.BigInteger(),
            nullable=True,
            comment="t_ns of the last good sample used; NULL when the epoch had none",
        ),
        sa.Column(
            "counter_mj",
            sa.BigInteger(),
            nullable=False,
            comment="energy the backend's device counters measured over the epoch (all its GPUs)",
        ),
        sa.Column(
            "attributed_mj", sa.BigInteger(), nullable=False, comment="energy given to requests (prefill + decode)"
        ),
        sa.Column("prefill_mj", sa.BigInteger(), nullable=False, comment="part of attributed_mj that was prefill"),
        sa.Column("decode_mj", sa.BigInteger(), nullable=False, comment="part of attributed_mj that was decode"),
        sa.Column(
            "idle_mj",
            sa.BigInteger(),
            nullable=False,
            comment="energy with no request on the backend (the idle bucket): counter_mj - attributed_mj",
        ),
        sa.Column("samples", sa.Integer(), nullable=False, comment="good counter readings used"),
        sa.Column("gaps", sa.Integer(), nullable=False, comment="failed reads and counter resets inside the epoch"),
        sa.Column(
            "active_ns_total",
            sa.BigInteger(),
            nullable=False,
            comment="sum over requests of their active_ns in this epoch",
        ),
        sa.Column(
            "attributed_at_ns",
            sa.BigInteger(),
            nullable=False,
            comment="when this attribution was computed (compare with requests.ingested_ns)",
        ),
        sa.PrimaryKeyConstraint("backend", "epoch_start_ns", name=op.f("pk_backend_epochs")),
    )
    op.create_table(
        "request_energy",
        sa.Column("request_id", sa.String(), nullable=False, comment="requests.request_id"),
        sa.Column(
            "epoch_start_ns",
            sa.BigInteger(),
            nullable=False,
            comment="start of the epoch (backend_epochs.epoch_start_ns)",
        ),
        sa.Column("backend", sa.String(), nullable=False, comment="backend whose energy this is"),
        sa.Column(
            "prefill_mj",
            sa.BigInteger(),
            nullable=False,
            comment="energy of the request's prefill (released_ns to first_token_ns) within the epoch",
        ),
        sa.Column(
            "decode_mj",
            sa.BigInteger(),
            nullable=False,
            comment="energy of the request's decode (first_token_ns to done_ns) within the epoch",
        ),
        sa.Column(
            "active_ns",
            sa.BigInteger(),
            nullable=False,
            comment="time the request was on the backend (released_ns to done_ns) within the epoch",
        ),
        sa.PrimaryKeyConstraint("request_id", "epoch_start_ns", name=op.f("pk_request_energy")),
    )
    op.create_index(
        op.f("ix_request_energy_backend_epoch_start_ns"), "request_energy", ["backend", "epoch_start_ns"], unique=False
    )

    op.create_table(
        "requests",
        sa.Column(
            "request_id", sa.String(), nullable=False, comment="gateway-assigned id (the x-request-id a client sees)"
        ),
        sa.Column("tenant", sa.String(), nullable=False, comment="tenant name (from the API key)"),
        sa.Column("model_id", sa.String(), nullable=False, comment="model id the request asked for"),
        sa.Column(
            "backend",
            sa.String(),
            nullable=True,
            comment="backend name that served it; NULL if it never left the gateway's queue",
        ),
        sa.Column(
            "traffic_class",
            sa.String(),
            nullable=True,
            comment="shaping class (interactive, batch, ...); NULL while open (RequestStart lacks it)",
        ),
        sa.Column("api", sa.String(), nullable=True, comment="'grpc' or 'http'; NULL while open"),
        sa.Column(
            "status",
            sa.String(),
            nullable=True,
            comment="gRPC status code name (OK, CANCELLED, ...), for HTTP requests too; NULL while open",
        ),
        sa.Column("correlation_id", sa.String(), nullable=True, comment="client's x-correlation-id, if it sent one"),
        sa.Column("received_ns", sa.BigInteger(), nullable=False, comment="when the gateway received the request"),
        sa.Column(
            "released_ns",
            sa.BigInteger(),
            nullable=True,
            comment="when the gateway sent it to the backend; NULL if it never was",
        ),
        sa.Column(
            "first_token_ns",
            sa.BigInteger(),
            nullable=True,
            comment="when the first generated token arrived (end of prefill); NULL if none did",
        ),
        sa.Column(
            "done_ns",
            sa.BigInteger(),
            nullable=True,
            comment="when the request ended (last token, error or cancel); NULL: still open on a backend",
        ),
        sa.Column(
            "prompt_tokens",
            sa.Integer(),
            nullable=False,
            comment="prompt length after truncation (TGI's input_length); 0 if unknown or open",
        ),
        sa.Column("generated_tokens", sa.Integer(), nullable=False, comment="tokens generated; 0 while open"),
        sa.Column(
            "ingested_ns",
            sa.BigInteger(),
            nullable=False,
            comment="when this row was last written with changed content (finds attribution epochs to recompute)",
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_requests")),
    )
    op.create_index(op.f("ix_requests_backend_done_ns"), "requests", ["backend", "done_ns"], unique=False)
    op.create_index(op.f("ix_requests_backend_released_ns"), "requests", ["backend", "released_ns"], unique=False)
    op.create_index(op.f("ix_requests_ingested_ns"), "requests", ["ingested_ns"], unique=False)
    op.create_index(op.f("ix_requests_received_ns"), "requests", ["received_ns"], unique=False)
    op.create_index(op.f("ix_requests_tenant_received_ns"), "requests", ["tenant", "received_ns"], unique=False)

    op.create_table(
        "samples",
        sa.Column("device", sa.String(), nullable=False, comment="device name, e.g. nvml:GPU-<uuid>"),
        sa.Column("t_ns", sa.BigInteger(), nullable=False, comment="wall clock just after the read"),
        sa.Column(
            "energy_mj", sa.BigInteger(), nullable=True, comment="cumulative counter (mJ); NULL when the read failed"
        ),
        sa.Column("error", sa.String(), nullable=True, comment="why the read failed; NULL for a good read"),
        sa.PrimaryKeyConstraint("device", "t_ns", name=op.f("pk_samples")),
    )
    op.create_index(op.f("ix_samples_t_ns"), "samples", ["t_ns"], unique=False)

    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), nullable=False, comment="surrogate key"),
        sa.Column("name", sa.String(), nullable=False, comment="the tenant's name, as in requests.tenant"),
        sa.Column("created_ns", sa.BigInteger(), nullable=False, comment="when the tenant row was created (ns)"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "usage_hourly",
        sa.Column(
            "hour_start_ns", sa.BigInteger(), nullable=False, comment="start of the UTC hour (a multiple of 3600e9 ns)"
        ),
        sa.Column("tenant", sa.String(), nullable=False, comment="tenant name"),
        sa.Column("model_id", sa.String(), nullable=False, comment="model id"),
        sa.Column(
            "backend", sa.String(), nullable=False, comment="backend name; '' for requests that never reached one"
        ),
        sa.Column("requests", sa.BigInteger(), nullable=False, comment="requests received in the hour"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, comment="sum of prompt_tokens"),
        sa.Column("generated_tokens", sa.BigInteger(), nullable=False, comment="sum of generated_tokens"),
        sa.Column("prefill_mj", sa.BigInteger(), nullable=False, comment="sum of the requests' prefill energy"),
        sa.Column("decode_mj", sa.BigInteger(), nullable=False, comment="sum of the requests' decode energy"),
        sa.Column("active_ns", sa.BigInteger(), nullable=False, comment="sum of the requests' time on a backend"),
        sa.PrimaryKeyConstraint("hour_start_ns", "tenant", "model_id", "backend", name=op.f("pk_usage_hourly")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False, comment="surrogate key"),
        sa.Column(
            "key_id",
            sa.String(),
            nullable=False,
            comment="public short id (12 hex chars), shown in listings and logs; not a secret",
        ),
        sa.Column(
            "key_hash",
            sa.String(),
            nullable=False,
            comment="lowercase hex SHA-256 of the whole key string (jg_<key_id>_<secret>)",
        ),
        sa.Column("tenant_id", sa.Integer(), nullable=False, comment="the tenant this key acts as"),
        sa.Column("admin", sa.Boolean(), nullable=False, comment="true: may read every tenant's energy"),
        sa.Column(
            "default_class",
            sa.String(),
            nullable=True,
            comment="traffic class for requests that name none; NULL: the gateway's default",
        ),
        sa.Column("label", sa.String(), nullable=True, comment="free text for humans (who holds the key)"),
        sa.Column("created_ns", sa.BigInteger(), nullable=False, comment="when the key was created (ns)"),
        sa.Column(
            "revoked_ns",
            sa.BigInteger(),
            nullable=True,
            comment="when the key was revoked (ns); NULL while it is valid",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_api_keys_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.UniqueConstraint("key_id", name=op.f("uq_api_keys_key_id")),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")

    op.drop_table("api_keys")
    op.drop_table("usage_hourly")
    op.drop_table("tenants")
    op.drop_index(op.f("ix_samples_t_ns"), table_name="samples")

    op.drop_table("samples")
    op.drop_index(op.f("ix_requests_tenant_received_ns"), table_name="requests")
    op.drop_index(op.f("ix_requests_received_ns"), table_name="requests")
    op.drop_index(op.f("ix_requests_ingested_ns"), table_name="requests")
    op.drop_index(op.f("ix_requests_backend_released_ns"), table_name="requests")
    op.drop_index(op.f("ix_requests_backend_done_ns"), table_name="requests")

    op.drop_table("requests")
    op.drop_index(op.f("ix_request_energy_backend_epoch_start_ns"), table_name="request_energy")

    op.drop_table("request_energy")
    op.drop_table("backend_epochs")
