"""The dialect-specific ``INSERT`` that carries ``ON CONFLICT`` (SQLite and PostgreSQL spell it the same way)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite


def dialect_insert(bind: sa.Engine | sa.Connection | sa.Dialect) -> Callable[[Any], Any]:
    """``sqlite.insert`` or ``postgresql.insert`` for ``bind``; both have ``on_conflict_do_nothing/do_update``."""
    dialect = bind if isinstance(bind, sa.Dialect) else bind.dialect
    if dialect.name == "sqlite":
        return sqlite.insert
    if dialect.name == "postgresql":
        return postgresql.insert
    raise ValueError(f"unsupported database dialect {dialect.name!r} (joulegate supports sqlite and postgresql)")
