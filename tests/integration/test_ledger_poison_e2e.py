"""The outside tester's critical finding, end to end: one non-UTF-8 header byte (``x-correlation-id: \\xff``, raw
bytes over a real socket) used to stop every later ledger write, across restarts. Whatever the front door makes of
the byte, the ledger stays available and every later request gets its row, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import sqlalchemy as sa

from .harness import running_stack


async def _raw_post(port: int, key: str, correlation: bytes) -> tuple[int, dict[str, str]]:
    """POST /generate with a header value given as raw bytes; returns (status, lower-cased headers)."""
    body = json.dumps({"inputs": "hello there", "parameters": {"max_new_tokens": 3}}).encode()
    head = (
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n".encode()
        + b"x-correlation-id: "
        + correlation
        + b"\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    headers = {}
    for line in rest.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
    return int(status_line.split()[1]), headers


async def test_a_non_utf8_header_byte_never_stops_the_ledger(tmp_path: Path, db_url: str) -> None:
    async with running_stack(tmp_path, http=True, db_url=db_url) as s:
        ids = []
        for correlation in (b"\xff", b"ok-1", b"\xc3\x28", b"ok-2"):
            status, headers = await _raw_post(s.app.http_port, s.key, correlation)
            assert status < 500, (status, correlation)
            if status == 200:
                ids.append(headers["x-request-id"])
        assert await asyncio.to_thread(s.app.ledger.flush, 10.0)
        stats = s.app.ledger.stats
        assert stats.db_available and not stats.journal_pending, stats
        engine = sa.create_engine(db_url)
        try:
            with engine.connect() as conn:
                rows = {r.request_id: r.correlation_id for r in conn.execute(sa.text("SELECT * FROM requests"))}
        finally:
            engine.dispose()
        print(f"\nstored correlation ids: {sorted(rows.values())}")
        assert set(ids) <= set(rows) and len(ids) >= 2  # the clean requests at least
        for rid, cid in rows.items():
            cid.encode("utf-8")  # whatever was stored is text every database holds
            assert "\x00" not in cid, rid
