"""meter.store: engines, the Alembic schema against the models, retention, and `joulegate migrate` (SQLite and PG)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from app.cli import main as cli_main
from meter.store import current, ensure_schema, head, make_engine, metadata, normalize_url, prune_samples, upgrade
from meter.store.models import Request, Sample


def test_normalize_url_maps_libpq_schemes_to_psycopg3() -> None:
    assert normalize_url("postgres://u:p@h:5/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u:p@h:5/db").render_as_string(hide_password=False) == (
        "postgresql+psycopg://u:p@h:5/db"
    )
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_sqlite_engine_runs_wal_normal_with_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    with engine.connect() as conn:
        pragma = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "synchronous")}
        pragma |= {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("busy_timeout", "foreign_keys")}
    assert pragma == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 10_000, "foreign_keys": 1}
    engine.dispose()


def test_postgres_engine_accepts_libpq_style_url(pg_url: str) -> None:
    engine = make_engine(pg_url.replace("postgresql+psycopg://", "postgres://"))
    with engine.connect() as conn:
        assert conn.dialect.driver == "psycopg"
        assert conn.exec_driver_sql("SELECT current_setting('application_name')").scalar() == "joulegate"
    engine.dispose()


def test_memory_sqlite_is_one_database_across_threads() -> None:
    engine = make_engine("sqlite://")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(engine.connect().exec_driver_sql("SELECT x FROM t").scalar()))
    t.start()
    t.join()
    assert seen == [1]


def test_migrated_schema_equals_the_models(db_url: str) -> None:
    assert current(db_url) is None
    upgrade(db_url)
    assert current(db_url) == head()
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, metadata)
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert diff == []
    assert tables == {*metadata.tables, "alembic_version"}


def test_upgrade_is_idempotent_and_ensure_schema_leaves_a_schema_alone(db_url: str) -> None:
    assert ensure_schema(db_url) == head()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Sample.__table__), [{"device": "d", "t_ns": 1, "energy_mj": 5, "error": None}]
        )  # data survives a second upgrade
    upgrade(db_url)
    assert ensure_schema(engine) == head()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(Sample.__table__)).scalar() == 1
    engine.dispose()


def test_concurrent_upgrades_do_not_collide(db_url: str) -> None:
    errors: list[BaseException] = []

    def go() -> None:
        try:
            upgrade(db_url)
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert current(db_url) == head()


def test_requests_nullability_matches_the_documented_open_row() -> None:
    cols = Request.__table__.c
    nullable = {c.name for c in cols if c.nullable}
    assert nullable == {
        "backend",
        "traffic_class",
        "api",
        "status",
        "correlation_id",
        "released_ns",
        "first_token_ns",
        "done_ns",
    }
    assert all(c.comment for t in metadata.tables.values() for c in t.c), "every column documents its meaning"
    indexed = {tuple(c.name for c in ix.columns) for ix in Request.__table__.indexes}
    assert indexed == {
        ("backend", "released_ns"),
        ("backend", "done_ns"),
        ("tenant", "received_ns"),
        ("received_ns",),
        ("ingested_ns",),
    }


def test_prune_samples_deletes_only_older_rows_in_chunks(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    rows = [{"device": f"d{d}", "t_ns": t, "energy_mj": t * 10, "error": None} for d in range(3) for t in range(100)]
    with engine.begin() as conn:
        conn.execute(sa.insert(Sample.__table__), rows)
    assert prune_samples(engine, 40, chunk_rows=7) == 120
    assert prune_samples(engine, 40, chunk_rows=7) == 0
    with engine.connect() as conn:
        left = conn.execute(sa.select(sa.func.min(Sample.t_ns), sa.func.count()).select_from(Sample)).one()
    assert tuple(left) == (40, 180)
    engine.dispose()


def test_migrate_command_upgrades_and_reports_the_revision(
    db_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOULEGATE_DB__URL", raising=False)
    config = tmp_path / "jg.toml"
    config.write_text(f'[db]\nurl = "{db_url}"\n')
    assert cli_main(["migrate", "--config", str(config)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].endswith(f"upgraded from an empty database to revision {head()}")
    assert current(db_url) == head()
    # --db wins over the config file: this one points at a fresh SQLite file
    other = tmp_path / "other.db"
    assert cli_main(["migrate", "--config", str(config), "--db", f"sqlite:///{other}"]) == 0
    assert other.exists() and current(f"sqlite:///{other}") == head()
    assert cli_main(["migrate", "--db", f"sqlite:///{other}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"already at revision {head()}")


def test_migrate_command_fails_cleanly_on_an_unreachable_database(
    capsys: pytest.CaptureFixture[str], unused_port: int
) -> None:
    rc = cli_main(["migrate", "--db", f"postgresql://nobody:secret@127.0.0.1:{unused_port}/x"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot use the database" in err and "Connection refused" in err and "secret" not in err
    assert len(err.strip().splitlines()) == 1


def test_the_first_revision_downgrades_cleanly(db_url: str) -> None:
    from alembic import command

    from meter.store.migrate import alembic_config

    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        command.downgrade(alembic_config(conn), "base")
        conn.commit()
        assert set(sa.inspect(conn).get_table_names()) <= {"alembic_version"}
    assert current(engine) is None
    upgrade(engine)
    assert current(engine) == head()
    engine.dispose()


def _at_revision(db_url: str, rev: str) -> None:
    from alembic import command

    from meter.store.migrate import alembic_config

    engine = make_engine(db_url)
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), rev)
        conn.commit()
    engine.dispose()


def test_a_schema_older_than_this_version_stops_every_command_until_it_is_migrated(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgraded joulegate on a database nobody migrated: before, ensure_schema let it start, and the ledger's
    writers' marks and the engine's passes then failed every second on the missing table behind a live process."""
    from alembic.script import ScriptDirectory

    from common.errors import SchemaMismatchError
    from meter.store.migrate import alembic_config

    monkeypatch.delenv("JOULEGATE_DB__URL", raising=False)
    previous = ScriptDirectory.from_config(alembic_config()).get_revision(head()).down_revision
    assert isinstance(previous, str)
    _at_revision(db_url, previous)
    with pytest.raises(SchemaMismatchError, match=rf"at revision {previous} and this joulegate needs {head()}"):
        ensure_schema(db_url)
    assert current(db_url) == previous  # refused, and left as it was: upgrading is `migrate`'s job
    assert cli_main(["keys", "list", "--db", db_url]) == 2
    err = capsys.readouterr().err
    assert "run `joulegate migrate`" in err and "unexpected error" not in err
    assert cli_main(["migrate", "--db", db_url]) == 0
    assert ensure_schema(db_url) == head()


@pytest.mark.parametrize("oldest_writer", ["0099", "head"])
def test_a_schema_this_version_does_not_know_is_refused_unless_it_still_takes_this_versions_writes(
    db_url: str, oldest_writer: str
) -> None:
    """A newer joulegate migrated the database to 0099. If its migrations say code as old as this may still write
    there (``schema_compat``, e.g. they only added a nullable column), this version starts — a rolling upgrade's old
    pods go on — and says so; if not, it refuses."""
    import structlog.testing

    from common.errors import SchemaMismatchError

    upgrade(db_url)
    oldest = head() if oldest_writer == "head" else oldest_writer
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
        conn.execute(sa.text("UPDATE schema_compat SET oldest_writer = :o"), {"o": oldest})
    engine.dispose()
    if oldest_writer == "head":
        with structlog.testing.capture_logs() as logs:
            assert ensure_schema(db_url) == "0099"
        assert [(e["event"], e["oldest_writer"]) for e in logs] == [("schema_newer_but_compatible", head())]
        return
    with pytest.raises(SchemaMismatchError, match=r"0099, which this joulegate .* does not know, and it takes writes "):
        ensure_schema(db_url)


def test_the_clock_offset_is_this_clock_minus_the_servers(db_url: str) -> None:
    """A clock 3 s ahead reads +3 s (within half a round trip); the real one, on the database's host, ~0. SQLite
    has no server clock to compare with."""
    import time

    from meter.store.clock import clock_offset_ns

    engine = make_engine(db_url)
    with engine.connect() as conn:
        ahead = clock_offset_ns(conn, lambda: time.time_ns() + 3_000_000_000)
        real = clock_offset_ns(conn)
    engine.dispose()
    if db_url.startswith("sqlite"):
        assert ahead is None and real is None
        return
    assert ahead is not None and real is not None
    assert abs(ahead - 3_000_000_000) < 500_000_000 and abs(real) < 500_000_000
