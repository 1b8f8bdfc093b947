"""Where the ledger's journal goes by default: with its database, never in the directory a process was started from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import ConfigError, load_config


def test_the_default_journal_sits_beside_a_sqlite_database_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "started-here"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    db = tmp_path / "data" / "jg.db"
    cfg = load_config(environ={}, overrides={"db": {"url": f"sqlite:///{db}"}})
    assert Path(cfg.meter.journal_path) == tmp_path / "data" / "jg.db.journal.jsonl"


def test_a_server_database_gets_a_journal_of_its_own_under_the_xdg_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    a = load_config(environ={}, overrides={"db": {"url": "postgresql://jg:one@db-a/joulegate"}})
    a_new_password = load_config(environ={}, overrides={"db": {"url": "postgresql://jg:two@db-a/joulegate"}})
    b = load_config(environ={}, overrides={"db": {"url": "postgresql://jg:one@db-b/joulegate"}})
    path = Path(a.meter.journal_path)
    assert path.parent == tmp_path / "state" / "joulegate" and path.suffix == ".jsonl"
    assert a_new_password.meter.journal_path == a.meter.journal_path  # the password is not part of its name
    assert b.meter.journal_path != a.meter.journal_path  # never replayed into another database
    assert "one" not in path.name
    monkeypatch.delenv("XDG_STATE_HOME")
    home = load_config(environ={}, overrides={"db": {"url": "postgresql://jg@db-a/joulegate"}})
    assert Path(home.meter.journal_path).parent == Path(os.environ["HOME"]) / ".local" / "state" / "joulegate"


def test_a_relative_sqlite_path_does_not_put_the_journal_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    paths = []
    for cwd in ("one", "two"):
        (tmp_path / cwd).mkdir()
        monkeypatch.chdir(tmp_path / cwd)
        paths.append(Path(load_config(environ={}).meter.journal_path))  # the default db: sqlite:///joulegate.db
    assert all(p.parent == tmp_path / "state" / "joulegate" for p in paths)
    assert paths[0] != paths[1]  # two databases (one per directory), two journals


def test_an_explicit_journal_path_wins_and_none_can_be_found_without_a_home(monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = load_config(environ={"JOULEGATE_METER__JOURNAL_PATH": "/var/lib/joulegate/journal.jsonl"})
    assert explicit.meter.journal_path == "/var/lib/joulegate/journal.jsonl"
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    with pytest.raises(ConfigError, match=r"meter.journal_path: set it"):
        load_config(environ={}, overrides={"db": {"url": "postgresql://jg@db/joulegate"}})
