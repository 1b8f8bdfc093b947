"""``joulegate export``: final requests as CloudEvents to a file and to an HTTP endpoint over loopback, on SQLite and
PostgreSQL; ids are request ids (a re-export is deduplicated by the sink), only final requests go out, in seal order."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.cli import main as cli_main
from meter.reports.cloudevents import EVENT_TYPE

from .test_reports import scenario
from .test_reports_oracle import insert, open_store, seal

SEALED_NS = 1_700_000_000 * 10**9  # when the fixture's requests were sealed (2023-11-14T22:13:20Z)


@pytest.fixture
def db(db_url: str) -> Iterator[str]:
    for engine in open_store(db_url):
        insert(engine, *scenario())
        seal(engine, "AB", sealed_ns=SEALED_NS)
        seal(engine, "C", sealed_ns=SEALED_NS + 10**9)  # C is sealed a second later; D did no GPU work
    yield db_url


def _export(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_final_requests_become_cloudevents_in_seal_order(db: str, capsys, tmp_path: Path) -> None:
    sink = tmp_path / "events.jsonl"
    code, _, err = _export(capsys, "--db", db, "--sink", str(sink), "--since", "2023-11-01", "--source", "jg/test")
    assert code == 0, err
    events = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [e["id"] for e in events] == ["A", "B", "C"]  # D did no GPU work: final at 0 J, not billed energy
    a = events[0]
    assert (a["specversion"], a["type"], a["source"], a["subject"]) == ("1.0", EVENT_TYPE, "jg/test", "tenant-a")
    assert a["data"]["model"] == "m1" and a["data"]["prompt_tokens"] == 10 and a["data"]["generated_tokens"] == 30
    assert a["data"]["prefill_j"] == 0.3 and a["data"]["decode_j"] == 1.7  # its two epochs' rows, sealed
    assert a["data"]["total_j"] == pytest.approx(a["data"]["prefill_j"] + a["data"]["decode_j"] + a["data"]["idle_j"])
    assert "err" not in err.lower() and "3 event(s) sent" in err

    # A later start sends again from --since: same ids, same figures — the sink deduplicates by id
    code, _, _ = _export(capsys, "--db", db, "--sink", str(sink), "--since", "2023-11-01", "--source", "jg/test")
    again = [json.loads(line) for line in sink.read_text().splitlines()][3:]
    assert again == events
    # --since between the two seals: only C
    since = "2023-11-14T22:13:20.5Z"
    code, out, _ = _export(capsys, "--db", db, "--sink", "-", "--since", since)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["C"]


class _Sink(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], list[dict]]] = []
    status = 202
    first_status: int | None = None  # answered once, before `status`

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append((self.path, dict(self.headers), json.loads(body)))
        cls = type(self)
        status, cls.first_status = cls.first_status or cls.status, None
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_sink() -> Iterator[tuple[str, type[_Sink]]]:
    handler = type("Sink", (_Sink,), {"received": [], "status": 202, "first_status": None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/api/v1/events", handler
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_sink_gets_one_batch_with_its_headers(db: str, capsys, http_sink) -> None:
    url, handler = http_sink
    code, _, err = _export(
        capsys, "--db", db, "--sink", url, "--since", "2023-11-01", "--header", "Authorization: Bearer t0k"
    )
    assert code == 0, err
    ((path, headers, batch),) = handler.received
    assert path == "/api/v1/events" and headers["Content-Type"] == "application/cloudevents-batch+json"
    assert headers["Authorization"] == "Bearer t0k"
    assert [e["id"] for e in batch] == ["A", "B", "C"]


def test_a_sink_that_refuses_fails_the_export_with_its_answer(db: str, capsys, http_sink) -> None:
    url, handler = http_sink
    handler.status = 400
    code, _, err = _export(capsys, "--db", db, "--sink", url, "--since", "2023-11-01")
    assert code != 0 and f"--sink {url} answered 400" in err


def test_a_sink_that_is_briefly_unavailable_gets_the_batch_again(db: str, capsys, http_sink) -> None:
    url, handler = http_sink
    handler.first_status = 503
    code, _, err = _export(capsys, "--db", db, "--sink", url, "--since", "2023-11-01")
    assert code == 0, err
    assert [[e["id"] for e in batch] for _, _, batch in handler.received] == [["A", "B", "C"]] * 2


def test_bad_arguments_are_one_line(db: str, capsys) -> None:
    code, _, err = _export(capsys, "--db", db, "--sink", "-", "--header", "no-colon")
    assert code == 2 and "expected NAME:VALUE" in err
    code, _, err = _export(capsys, "--db", db, "--sink", "-", "--every", "0")
    assert code == 2 and "--every must be a positive" in err
