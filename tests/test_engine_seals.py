"""The seal write (``meter.engine.writer.write_seals_of``): every backend of a pass in one transaction, on
PostgreSQL one ``INSERT ... SELECT`` that sums in the server. A seal is the sum of its request's rows, written once:
sealing again (a retried pass, another meter) neither doubles nor moves it, and no request of a large batch is lost.
"""

from __future__ import annotations

import sqlalchemy as sa

from meter.engine import sql
from meter.engine.writer import write_seals_of
from tests.engine_helpers import T0, S, rows


def _energy(db: sa.Engine, energy: list[sql.RequestEnergyRow]) -> None:
    with db.begin() as conn:
        sql.insert_request_energy(conn, energy)


def test_seals_are_the_sums_of_their_rows_and_sealing_twice_changes_nothing(db: sa.Engine) -> None:
    e0, e1 = T0, T0 + 10 * S
    _energy(
        db,
        [
            sql.RequestEnergyRow("a", e0, "b1", 100, 200, 5, 7, 11),
            sql.RequestEnergyRow("a", e1, "b1", 1, 2, 3, 4, 5),  # a request over two epochs: both rows count
            sql.RequestEnergyRow("b", e0, "b2", 30, 40, 6, 8, 9),
            sql.RequestEnergyRow("x", e0, "b1", 999, 999, 9, 9, 9),  # not sealed: must not leak into another's seal
        ],
    )
    write_seals_of(db, {"b1": {"a": T0 + 12 * S, "c": T0 + 3 * S}, "b2": {"b": T0 + 4 * S}}, sealed_ns=T0 + 60 * S)
    want = {
        "a": ("b1", T0 + 12 * S, T0 + 60 * S, 101, 202, 11, 16),
        "b": ("b2", T0 + 4 * S, T0 + 60 * S, 30, 40, 8, 9),
        "c": ("b1", T0 + 3 * S, T0 + 60 * S, 0, 0, 0, 0),  # no rows (no GPU work): sealed at zero
    }
    q = (
        "SELECT request_id, backend, done_ns, sealed_ns, prefill_mj, decode_mj, idle_time_mj, idle_tokens_mj "
        "FROM request_seals ORDER BY request_id"
    )
    got = {r[0]: tuple(int(v) if isinstance(v, int) else v for v in r[1:]) for r in rows(db, q)}
    assert got == want

    # Sealed again (a pass retried after a commit it did not see, or a second meter), with rows changed since: the
    # seals stay exactly as they were, one each.
    _energy(db, [sql.RequestEnergyRow("c", e1, "b1", 50, 50, 1, 1, 1)])
    write_seals_of(db, {"b1": {"a": T0 + 12 * S, "c": T0 + 3 * S}, "b2": {"b": T0 + 4 * S}}, sealed_ns=T0 + 99 * S)
    again = {r[0]: tuple(r[1:]) for r in rows(db, q)}
    assert again == got
    assert rows(db, "SELECT COUNT(*) FROM request_seals")[0][0] == 3


def test_a_large_seal_batch_loses_no_request(db: sa.Engine) -> None:
    n = 1234  # more than one chunk of ids on SQLite
    _energy(db, [sql.RequestEnergyRow(f"r{i:05d}", T0, f"b{i % 3}", i, 2 * i, 0, 1, 1) for i in range(n)])
    todo: dict[str, dict[str, int]] = {}
    for i in range(n):
        todo.setdefault(f"b{i % 3}", {})[f"r{i:05d}"] = T0 + i
    write_seals_of(db, todo, sealed_ns=T0 + 3600 * S)
    got = rows(db, "SELECT COUNT(*), SUM(prefill_mj), SUM(decode_mj), SUM(idle_time_mj) FROM request_seals")[0]
    assert tuple(int(v) for v in got) == (n, n * (n - 1) // 2, n * (n - 1), n)
    write_seals_of(db, todo, sealed_ns=T0 + 7200 * S)
    assert rows(db, "SELECT COUNT(*), MAX(sealed_ns) FROM request_seals")[0] == (n, T0 + 3600 * S)
