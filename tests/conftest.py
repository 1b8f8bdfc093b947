"""Shared fixtures: free loopback ports, the reference files, database URLs (SQLite always, PostgreSQL too), a
migrated database; every test that runs against PostgreSQL is marked ``postgres`` here."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import settings

from bench._procs import POSTGRES_ADMIN_URL, postgres_database

# CI (`.ci/run`) runs the property tests derandomized: the same examples on every run, so a landing is never blocked
# by a new random draw. Local `make test` explores new examples on every run (and keeps failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("JG_HYPOTHESIS_PROFILE", "default"))

# A developer's own JOULEGATE_* settings must not reach the gateways and CLIs the tests start (they would change
# behaviour and add warnings to output the tests read); tests that want one set it themselves.
for _name in [n for n in os.environ if n.startswith("JOULEGATE_")]:
    del os.environ[_name]

REFERENCE_DIR = Path(__file__).parent / "reference"
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def openapi_spec() -> dict:
    import json

    return json.loads((REFERENCE_DIR / "tgi_openapi.json").read_text())


def _postgres_database() -> Iterator[str]:
    """A fresh, empty database on the local PostgreSQL server, dropped afterwards."""
    with postgres_database(POSTGRES_ADMIN_URL, prefix="jg_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file, then a fresh PostgreSQL database (never skipped)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'joulegate.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL of a fresh, empty PostgreSQL database (for tests of PostgreSQL only)."""
    yield from _postgres_database()


@pytest.fixture
def db(db_url: str) -> Iterator[sa.Engine]:
    """An engine on a migrated, empty database: SQLite, then PostgreSQL."""
    from meter.store import make_engine, upgrade

    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``postgres`` every test that takes a PostgreSQL database: through ``pg_url`` or a ``"postgres"``
    parameter (``db_url``, ``db`` and any dialect parametrization), so ``-m "not postgres"`` runs without a server."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        uses_pg = "pg_url" in getattr(item, "fixturenames", ()) or any(p == "postgres" for p in params)
        if uses_pg and item.get_closest_marker("postgres") is None:
            item.add_marker(pytest.mark.postgres)
