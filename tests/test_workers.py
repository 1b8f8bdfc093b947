"""``joulegate serve --workers N`` without a server: the settings, what each worker runs, the ports, the refusals.

The processes themselves (kill -9 of a worker, the drain, the books) are in tests/integration/test_workers.py."""

from __future__ import annotations

import asyncio
import os
import signal
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


# -- the supervisor, with stand-in children (a shell script in place of the interpreter) ---------------------------

FAKE_CHILD = """#!/bin/sh
cat > /dev/null
echo $$ >> "$FAKE_DIR/pids-$5"
case "$FAKE_MODE" in
  exit2) exit 2 ;;
  exit1) exit 1 ;;
esac
trap 'echo $$ >> "$FAKE_DIR/termed"; exit 0' TERM
while true; do sleep 0.05; done
"""


def _supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> object:
    from app.workers import Supervisor

    script = tmp_path / "fake-python"
    script.write_text(FAKE_CHILD)
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_MODE", mode)
    cfg = load_config(
        environ={},
        overrides={
            "server": {"workers": 2, "grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "drain_grace_s": 1},
            "db": {"url": f"sqlite:///{tmp_path / 'x.db'}"},  # the supervisor alone: the command refuses SQLite
            "meter": {"source": "none", "journal_path": str(tmp_path / "journal.jsonl")},
            "models": [{"model_id": "m", "backends": [{"url": "http://127.0.0.1:9"}]}],
        },
    )
    return Supervisor(cfg, python=str(script))


def _pids(tmp_path: Path, role: str) -> list[int]:
    path = tmp_path / f"pids-{role}"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


async def test_a_child_that_exits_2_stops_the_command_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = _supervisor(tmp_path, monkeypatch, "exit2")
    with pytest.raises(ConfigError, match="exited 2"):
        await asyncio.wait_for(sup.run(), 30)  # type: ignore[attr-defined]


async def test_a_child_that_keeps_failing_at_start_stops_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.commands.database import CommandError

    sup = _supervisor(tmp_path, monkeypatch, "exit1")
    with pytest.raises(CommandError, match="5 times in a row"):
        await asyncio.wait_for(sup.run(), 60)  # type: ignore[attr-defined]
    assert len(_pids(tmp_path, "worker-0")) >= 5 or len(_pids(tmp_path, "worker-1")) >= 5


async def test_a_killed_child_is_started_again_and_the_stop_drains_every_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = _supervisor(tmp_path, monkeypatch, "serve")
    run = asyncio.create_task(sup.run())  # type: ignore[attr-defined]
    from tests.waiting import wait_until_async

    await wait_until_async(lambda: _pids(tmp_path, "worker-0") and _pids(tmp_path, "worker-1"), 30, what="2 workers")
    first = _pids(tmp_path, "worker-1")[0]
    os.kill(first, signal.SIGKILL)
    await wait_until_async(lambda: len(_pids(tmp_path, "worker-1")) == 2, 30, what="worker 1 started again")
    assert len(_pids(tmp_path, "worker-0")) == 1  # the other was left alone
    sup._request_stop()  # type: ignore[attr-defined]  # what SIGTERM does
    assert await asyncio.wait_for(run, 30) == 0
    termed = {int(x) for x in (tmp_path / "termed").read_text().split()}
    assert termed == {_pids(tmp_path, "worker-0")[0], _pids(tmp_path, "worker-1")[1]}  # each drained on SIGTERM


async def test_children_that_cannot_be_started_stop_the_command_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.commands.database import CommandError

    sup = _supervisor(tmp_path, monkeypatch, "serve")
    sup.python = str(tmp_path / "no-such-python")  # type: ignore[attr-defined]
    with pytest.raises(CommandError, match="cannot start it: FileNotFoundError"):
        await asyncio.wait_for(sup.run(), 30)  # type: ignore[attr-defined]


DEAD_WORKER = """
import os, sys, time
from meter.ledger import Ledger
from meter.timeline import RequestStart
ledger = Ledger(sys.argv[1], sys.argv[2])
ledger.start()
now = time.time_ns()
ledger.request_started(RequestStart("in-flight", "acme", "m", "b1", now - 1000, now))
ledger.flush()
os._exit(0)  # as a kill: no close, the journal left behind
"""


def test_journals_of_workers_this_run_does_not_have_are_replayed_at_start(tmp_path: Path) -> None:
    from app.workers import adopt_orphan_journals, orphan_journals
    from meter.store import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    cfg = load_config(environ={}, overrides={"db": {"url": url}, "meter": {"journal_path": str(tmp_path / "j.jsonl")}})
    journal = worker_journal_path(cfg, 3)
    subprocess.run([sys.executable, "-c", DEAD_WORKER, url, str(journal)], cwd=REPO_ROOT, check=True, timeout=60)
    assert orphan_journals(cfg, 4) == []  # worker 3 of 4 takes its own journal over
    assert orphan_journals(cfg, 2) == [journal]
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT done_ns FROM requests").all() == [(None,)]  # open: the worker died
        adopt_orphan_journals(cfg, 2)
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT request_id, status, done_ns FROM requests").all()
        assert [(r[0], r[1]) for r in rows] == [("in-flight", "ABORTED")] and rows[0][2] is not None
        assert orphan_journals(cfg, 2) == []  # replayed, its segments deleted
    finally:
        engine.dispose()


def test_a_meter_source_that_is_not_there_stops_the_workers_with_exit_2(tmp_path: Path, pg_url: str) -> None:
    from tests.test_cli_errors import _nvml_present

    if _nvml_present():
        pytest.skip("NVML is here: --meter nvml would work")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--meter", "nvml", "--db", pg_url),
            *("--backend", "http://127.0.0.1:9", "--grpc-listen", f"127.0.0.1:{free_port()}", "--http-listen", "off"),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "JOULEGATE_METER__JOURNAL_PATH": str(tmp_path / "j.jsonl")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("joulegate serve:")]
    assert errors[0].startswith("joulegate serve: --meter nvml:"), errors  # the meter's own line
    assert errors[-1] == "joulegate serve: meter exited 2 (a bad setting: its one-line error is above)"


async def test_a_worker_metrics_port_that_is_taken_stops_the_start_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = _supervisor(tmp_path, monkeypatch, "serve")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    server = sup.config.server  # type: ignore[attr-defined]
    sup.config = sup.config.model_copy(  # type: ignore[attr-defined]
        update={"server": server.model_copy(update={"worker_metrics_listen": f"127.0.0.1:{port - 1}"})}
    )
    try:
        with pytest.raises(OSError, match=r"worker_metrics_listen: worker \d cannot listen on 127\.0\.0\.1:\d+"):
            await asyncio.wait_for(sup.run(), 30)  # type: ignore[attr-defined]
    finally:
        taken.close()
    assert not _pids(tmp_path, "worker-0")  # nothing was started
