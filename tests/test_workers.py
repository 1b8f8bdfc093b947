"""``joulegate serve --workers N`` without a server: the settings, what each worker runs, the ports, the refusals.

The processes themselves (kill -9 of a worker, the drain, the books) are in tests/integration/test_workers.py."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import load_config
from app.workers import check_workers_db, hold_port, worker_config, worker_journal_path
from common.errors import ConfigError
from common.net import bind_tcp
from tests.conftest import REPO_ROOT, free_port

PG = "postgresql+psycopg://joulegate@db:5432/joulegate"


def _config(tmp_path: Path, **server: object) -> object:
    return load_config(
        environ={},
        overrides={
            "server": {"workers": 3, **server},
            "db": {"url": PG},
            "meter": {"source": "sim", "journal_path": str(tmp_path / "j" / "journal.jsonl")},
            "models": [{"model_id": "m", "backends": [{"url": "http://127.0.0.1:9"}]}],
        },
    )


def test_one_worker_is_the_default_and_the_flag_sets_it() -> None:
    assert load_config(environ={}).server.workers == 1
    assert load_config(environ={"JOULEGATE_SERVER__WORKERS": "4"}).server.workers == 4
    with pytest.raises(ConfigError, match=r"server\.workers"):
        load_config(environ={"JOULEGATE_SERVER__WORKERS": "0"})


def test_each_worker_has_its_own_journal_the_request_path_only_and_its_own_metrics_port(tmp_path: Path) -> None:
    cfg = _config(tmp_path, worker_metrics_listen="127.0.0.1:9400")
    workers = [worker_config(cfg, i) for i in range(3)]  # type: ignore[arg-type]
    journals = [w.meter.journal_path for w in workers]
    assert journals[0] == str(tmp_path / "j" / "journal.jsonl")  # worker 0 keeps the single gateway's journal
    assert journals[1:] == [str(tmp_path / "j" / f"journal.worker-{i}.jsonl") for i in (1, 2)]
    assert len(set(journals)) == 3
    assert str(worker_journal_path(cfg, 2)) == journals[2]  # type: ignore[arg-type]
    assert {w.meter.source for w in workers} == {"none"}  # the meter runs once, in its own child
    assert [w.server.worker_metrics_listen for w in workers] == [f"127.0.0.1:{9400 + i}" for i in range(3)]
    assert {w.server.grpc_listen for w in workers} == {cfg.server.grpc_listen}  # type: ignore[attr-defined]


def test_a_worker_configuration_survives_the_trip_to_the_child(tmp_path: Path) -> None:
    from app.config import Config

    w = worker_config(_config(tmp_path), 1)  # type: ignore[arg-type]
    assert Config.model_validate_json(w.model_dump_json()) == w


def test_worker_metrics_need_a_port() -> None:
    with pytest.raises(ConfigError, match="worker_metrics_listen"):
        load_config(environ={"JOULEGATE_SERVER__WORKERS": "2", "JOULEGATE_SERVER__WORKER_METRICS_LISTEN": "h:0"})


def test_several_workers_on_sqlite_are_refused(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={"server": {"workers": 2}, "db": {"url": f"sqlite:///{tmp_path}/x.db"}})
    with pytest.raises(ConfigError, match="needs PostgreSQL"):
        check_workers_db(cfg)
    check_workers_db(cfg.model_copy(update={"server": cfg.server.model_copy(update={"workers": 1})}))


def test_the_command_refuses_sqlite_workers_in_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--backend", "http://127.0.0.1:9"),
            *("--db", f"sqlite:///{tmp_path / 'x.db'}", "--meter", "none"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("joulegate serve: server.workers = 2 needs PostgreSQL"), lines


def test_shared_ports_let_several_sockets_listen_and_the_supervisor_sees_a_taken_port() -> None:
    a = bind_tcp("127.0.0.1", 0, reuse_port=True)
    port = a.getsockname()[1]
    b = bind_tcp("127.0.0.1", port, reuse_port=True)
    try:
        a.listen()
        b.listen()
        with pytest.raises(OSError):
            bind_tcp("127.0.0.1", port, reuse_port=False).close()
        with pytest.raises(OSError):  # a port something listens on: refused before any worker starts
            hold_port(f"127.0.0.1:{port}")
    finally:
        a.close()
        b.close()
    free = free_port()
    held = hold_port(f"127.0.0.1:{free}")  # free: held (bound, not listening), and workers bind beside it
    try:
        beside = bind_tcp("127.0.0.1", free, reuse_port=True)
        beside.listen()
        with socket.create_connection(("127.0.0.1", free), timeout=2):
            pass
        beside.close()
    finally:
        held.close()
    any_port = hold_port("127.0.0.1:0")  # port 0 resolves once, for every worker
    assert any_port.getsockname()[1] != 0
    any_port.close()
