"""Alembic environment for joulegate's store.

Runs online only. ``meter.store.migrate.upgrade`` hands over an open connection in
``config.attributes["connection"]``, so no alembic.ini is needed at runtime; developers creating a new revision use
``alembic -c meter/migrations/alembic.ini revision --autogenerate -m "..."`` with ``JOULEGATE_DB__URL`` or the
ini's ``sqlalchemy.url`` pointing at a database at head.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from meter.store.db import make_engine
from meter.store.models import metadata

config = context.config


def _configure_and_run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite's ALTER TABLE needs copy-and-move
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = os.environ.get("JOULEGATE_DB__URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set JOULEGATE_DB__URL or sqlalchemy.url in alembic.ini")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _configure_and_run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("joulegate migrations run online only")
run_migrations_online()
