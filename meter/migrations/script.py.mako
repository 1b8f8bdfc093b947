"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
% if imports:
${imports}
% endif

revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}

# schema_compat (0011): may code of the revisions before this one go on writing to the schema this makes? True: its
# rows stay right here (an added nullable column, a new index or table it never touches); False: it must stop (rows
# change meaning, or old writers would leave out what this adds), and upgrade() raises the mark to this revision.
# Left unset, tests/test_migration_compat.py fails: it holds every migration to what it says here.
old_writers_continue: bool


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}
    # with old_writers_continue = False:
    # op.execute("UPDATE schema_compat SET oldest_writer = '${up_revision}'")


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
