"""Every long-running process refuses a database whose schema is not this version's, as one line and exit 2.

The processes are real (``python -m app.cli``): ``serve`` alone, ``serve --workers 2`` (its parent checks before the
children start) and the ``meter`` daemon, on a database left at the revision before this version's head, as an
upgrade that skipped ``joulegate migrate`` leaves it (SQLite; PostgreSQL for the workers, which need it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory

from meter.store import current, head, make_engine
from meter.store.migrate import alembic_config

REPO_ROOT = Path(__file__).resolve().parents[2]

_ARGS = {
    "serve": ["serve", "--backend", "http://127.0.0.1:9", "--meter", "none", "--grpc-listen", "127.0.0.1:0",
              "--http-listen", "127.0.0.1:0"],
    "serve --workers 2": ["serve", "--backend", "http://127.0.0.1:9", "--meter", "none", "--workers", "2",
                          "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
    "meter": ["meter", "--source", "sim", "--grpc-listen", "off"],
}  # fmt: skip


@pytest.mark.parametrize("which", list(_ARGS))
def test_a_process_on_an_unmigrated_database_stops_saying_what_to_run(
    tmp_path: Path, which: str, request: pytest.FixtureRequest
) -> None:
    # workers need PostgreSQL (a SQLite file's one write lock would serialise them)
    url = request.getfixturevalue("pg_url") if "workers" in which else f"sqlite:///{tmp_path / 'old.db'}"
    previous = ScriptDirectory.from_config(alembic_config()).get_revision(head()).down_revision
    assert isinstance(previous, str)
    engine = make_engine(url)
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), previous)
        conn.commit()
    engine.dispose()
    args = [*_ARGS[which], "--db", url]
    if which == "meter":
        config = tmp_path / "jg.toml"
        config.write_text('[[models]]\nmodel_id = "m"\nbackends = [{ url = "http://127.0.0.1:9", node = "n" }]\n')
        args += ["--config", str(config), "--node", "n"]
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "JOULEGATE_METER__JOURNAL_PATH": str(tmp_path / "j.jsonl")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"at revision {previous} and this joulegate needs {head()}" in done.stderr
    assert "run `joulegate migrate`" in done.stderr
    assert "Traceback" not in done.stderr and "unexpected error" not in done.stderr
    assert current(url) == previous
