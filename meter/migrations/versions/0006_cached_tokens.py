"""cached_tokens: the prompt tokens an engine found in its prefix cache (vLLM, SGLang), per request

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "requests",
        sa.Column(
            "cached_tokens",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="of prompt_tokens, those the engine found in its prefix cache (vLLM, SGLang report it; 0 "
            "where the engine does not say): the prefill share is weighed by the rest",
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("cached_tokens")
