"""Every migration after 0011 says whether code older than it may still write to the schema it makes, and does it.

``schema_compat.oldest_writer`` (migration 0011) is how a rolling upgrade's old pods know they may go on writing to a
schema a newer joulegate migrated. It is only as good as each later migration's author: one that changes what rows
mean must raise it, or old pods write on and their rows are read the new way. So every later migration must declare
``old_writers_continue`` (a bool; the template leaves it unset, so a new migration fails here until its author
decides), and this test runs each one on a fresh database and checks that it did what it declared: the mark left
alone (True), or raised to its own revision (False).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from meter.store.migrate import MIGRATIONS_DIR

FIRST_RULED = "0012"  # migrations before it predate the rule (0011 made the mark)


def compat_violations(script_location: Path, db_path: Path) -> list[str]:
    """What the migrations in ``script_location`` from FIRST_RULED on do against the rule, on a fresh SQLite file."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    revisions = list(reversed(list(ScriptDirectory.from_config(cfg).walk_revisions())))  # oldest first
    engine = sa.create_engine(f"sqlite:///{db_path}")
    out: list[str] = []
    try:
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn

            def mark() -> str | None:
                return conn.exec_driver_sql("SELECT MAX(oldest_writer) FROM schema_compat").scalar()

            for rev in revisions:
                if rev.revision < FIRST_RULED:
                    command.upgrade(cfg, rev.revision)
                    continue
                declared = getattr(rev.module, "old_writers_continue", None)
                if not isinstance(declared, bool):
                    out.append(f"{rev.revision}: declares no old_writers_continue (True or False)")
                before = mark()
                command.upgrade(cfg, rev.revision)
                after = mark()
                if declared is True and after != before:
                    out.append(f"{rev.revision}: says old writers continue, but moved oldest_writer to {after}")
                if declared is False and after != rev.revision:
                    out.append(f"{rev.revision}: says old writers stop, but left oldest_writer at {after}")
            conn.commit()
    finally:
        engine.dispose()
    return out


def test_every_migration_keeps_its_word_about_old_writers(tmp_path: Path) -> None:
    assert compat_violations(MIGRATIONS_DIR, tmp_path / "db.sqlite") == []


def _with_migration(tmp_path: Path, body: str) -> Path:
    """A copy of the shipped migrations with one more, 0012 (or the one after the shipped head), made of ``body``."""
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    head = ScriptDirectory(str(copy)).get_current_head()
    assert head is not None
    nxt = f"{int(head) + 1:04d}"
    (copy / "versions" / f"{nxt}_test.py").write_text(
        f'"""test"""\nimport sqlalchemy as sa\nfrom alembic import op\n\nrevision = "{nxt}"\n'
        f'down_revision = "{head}"\nbranch_labels = None\ndepends_on = None\n\n{body}\n'
        "\n\ndef downgrade() -> None:\n    pass\n"
    )
    return copy


NEW_COLUMN = 'def upgrade() -> None:\n    op.add_column("requests", sa.Column("note", sa.String(), nullable=True))\n'
RAISE = "    op.execute(f\"UPDATE schema_compat SET oldest_writer = '{revision}'\")\n"


def test_the_rule_catches_a_migration_that_does_not_keep_it(tmp_path: Path) -> None:
    undeclared = compat_violations(_with_migration(tmp_path / "a", NEW_COLUMN), tmp_path / "a.db")
    assert [v.split(": ", 1)[1] for v in undeclared] == ["declares no old_writers_continue (True or False)"]
    stop_but_left = _with_migration(tmp_path / "b", f"old_writers_continue = False\n\n\n{NEW_COLUMN}")
    [said] = compat_violations(stop_but_left, tmp_path / "b.db")
    assert "says old writers stop, but left oldest_writer at 0011" in said
    continue_but_raised = _with_migration(tmp_path / "c", f"old_writers_continue = True\n\n\n{NEW_COLUMN}{RAISE}")
    [said] = compat_violations(continue_but_raised, tmp_path / "c.db")
    assert "says old writers continue, but moved oldest_writer to" in said
    kept = _with_migration(tmp_path / "d", f"old_writers_continue = False\n\n\n{NEW_COLUMN}{RAISE}")
    assert compat_violations(kept, tmp_path / "d.db") == []
    kept = _with_migration(tmp_path / "e", f"old_writers_continue = True\n\n\n{NEW_COLUMN}")
    assert compat_violations(kept, tmp_path / "e.db") == []
