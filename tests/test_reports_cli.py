"""``joulegate report usage|requests|backends|settings``: tables and CSV from a small hand-built database; the bill
it prints depends on the stored settings, not on the config it is run with."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.cli import main as cli_main

from .test_reports import TIME_IDLE, TOKENS_IDLE, scenario
from .test_reports_oracle import insert, open_store, seal


@pytest.fixture
def db(db_url: str) -> Iterator[str]:
    for engine in open_store(db_url):
        insert(engine, *scenario())
        seal(engine, "ABC")
    yield db_url


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "joulegate.toml"
    path.write_text('[meter]\nidle_policy = "time"\n\n[carbon]\ngrid_g_co2e_per_kwh = 500\npue = 1.5\n')
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(["report", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_usage_csv_has_every_figure_at_full_precision(db: str, config: str, capsys) -> None:
    # Nothing stored yet: the config stands in (its idle policy is time)
    code, out, err = run(capsys, "usage", "--db", db, "--config", config, "--start", "2023-11-13", "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["key"] for r in rows] == ["tenant-a", "tenant-b", "total"]
    a = rows[0]
    assert (a["requests"], a["prompt_tokens"], a["generated_tokens"], a["prefill_j"], a["decode_j"]) == (
        "2", "30", "50", "0.5", "2.3",
    )  # fmt: skip
    idle_j = (TIME_IDLE["A"] + TIME_IDLE["C"]) / 1000
    assert math.isclose(float(a["idle_j"]), idle_j) and math.isclose(float(a["total_j"]), 2.8 + idle_j)
    assert math.isclose(float(a["co2e_g"]), (2.8 + idle_j) * 1.5 * 500 / 3.6e6)
    assert (a["idle_policy"], a["grid_g_co2e_per_kwh"], a["pue"]) == ("time", "500.0", "1.5")
    assert (a["provisional_requests"], a["estimated_prompt_requests"], a["idle_policy_asked"]) == ("0", "0", "False")
    assert rows[2]["requests"] == "4" and math.isclose(float(rows[2]["total_j"]), 4.0)


def test_usage_table_by_hour_names_policy_grid_and_pue(db: str, config: str, capsys) -> None:
    code, out, _ = run(capsys, "usage", "--db", db, "--config", config, "--group-by", "hour",
                       "--start", "2023-11-13T23:00:00Z", "--end", "2023-11-14T01:00:00+00:00")  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (
        "usage by hour, requests received in [2023-11-13T23:00:00Z, 2023-11-14T01:00:00Z) | idle policy time, "
        "grid 500 gCO2e/kWh, PUE 1.5 (from this config: none stored in the database yet)"
    )
    assert lines[1].split()[:4] == ["KEY", "REQUESTS", "PROMPT_TOKENS", "GENERATED_TOKENS"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["2023-11-13T23:00:00Z", "2"], ["2023-11-14T00:00:00Z", "1"], ["total", "3"],
    ]  # fmt: skip
    assert lines[2].split()[4:6] == ["0.800", "1.800"]  # A + B: prefill, decode in J


def test_requests_and_backends(db: str, config: str, capsys) -> None:
    code, out, _ = run(capsys, "requests", "--db", db, "--config", config, "--tenant", "tenant-a", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["request_id"], r["final"]) for r in rows] == [("C", "True"), ("A", "True")]
    assert rows[1]["received"] == "2023-11-13T23:59:59.3Z" and rows[1]["prefill_j"] == "0.3"

    code, out, _ = run(capsys, "requests", "--db", db, "--limit", "3")
    assert code == 0 and "(3 shown, more exist)" in out.splitlines()[0]
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["D", "C", "B"]

    code, out, _ = run(capsys, "backends", "--db", db)
    assert code == 0
    lines = out.splitlines()
    assert lines[2].split() == ["b1", "5.000", "3.400", "1.000", "2.400", "1.600", "0.000", "0", "3", "30", "0",
                                "2023-11-14T00:00:02Z"]  # fmt: skip
    assert lines[-1].startswith("conservation check: ok on 1 backend(s)")


def test_backends_exit_1_when_conservation_fails(db: str, capsys) -> None:
    engine = sa.create_engine(db)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE backend_epochs SET counter_mj = counter_mj + 7"))
    engine.dispose()
    code, out, err = run(capsys, "backends", "--db", db, "--format", "csv")
    assert code == 1 and "conservation check FAILED" in err and "on: b1" in err
    (row,) = csv.DictReader(io.StringIO(out))
    assert row["conservation_error_mj"] == "21"  # 7 mJ in each of 3 epochs


def test_bad_arguments(tmp_path: Path, db: str, capsys) -> None:
    code, _, err = run(capsys, "usage", "--db", db, "--start", "yesterday")
    assert code == 2 and "--start: not an ISO 8601" in err
    code, _, err = run(capsys, "usage", "--db", db, "--start", "2024-01-02", "--end", "2024-01-01")
    assert code == 2 and "--end must be after --start" in err
    empty = tmp_path / "empty.db"
    code, _, err = run(capsys, "requests", "--db", f"sqlite:///{empty}")
    assert code == 1 and "no database file" in err and not empty.exists()  # a typo never becomes an empty report
    empty.touch()
    code, _, err = run(capsys, "requests", "--db", f"sqlite:///{empty}")
    assert code == 1 and "no joulegate schema" in err


def test_the_bill_is_the_stored_one_whoever_prints_it(db: str, config: str, tmp_path: Path, capsys) -> None:
    """Issue 9: two readers with different configs printed different bills. Once settings are stored, every reader
    prints the same, and a reader that asks for another policy is told so."""
    other = tmp_path / "other.toml"
    other.write_text('[meter]\nidle_policy = "none"\n\n[carbon]\ngrid_g_co2e_per_kwh = 50\npue = 1.0\n')
    code, out, err = run(capsys, "settings", "--db", db, "--config", config, "--set", "--policy", "tokens")
    assert code == 0, err
    assert "tokens" in out and "joulegate report settings" in out and "none stored" not in out
    bills = []
    for cfg in (config, str(other)):
        code, out, err = run(capsys, "usage", "--db", db, "--config", cfg, "--start", "2023-11-13", "--format", "csv")
        assert code == 0, err
        bills.append(list(csv.DictReader(io.StringIO(out))))
    assert bills[0] == bills[1]
    a = bills[0][0]
    # --set with only --policy keeps the grid and PUE in force (the config's, 500 and 1.5); from the beginning, since
    # nothing was stored before, and effective now
    assert math.isclose(float(a["idle_j"]), (TOKENS_IDLE["A"] + TOKENS_IDLE["C"]) / 1000)
    assert (a["grid_g_co2e_per_kwh"], a["pue"], a["idle_policy_asked"]) == ("500.0", "1.5", "False")
    code, out, _ = run(capsys, "usage", "--db", db, "--config", str(other), "--idle-policy", "none")
    assert code == 0 and "idle shares shown under the policy asked for: none (not the bill's)" in out.splitlines()[0]
    code, out, _ = run(capsys, "requests", "--db", db, "--format", "csv")
    rows = {r["request_id"]: r for r in csv.DictReader(io.StringIO(out))}
    assert rows["A"]["idle_policy"] == "tokens" and rows["A"]["final"] == "True"


def test_settings_cannot_be_changed_retroactively(db: str, capsys) -> None:
    code, _, err = run(capsys, "settings", "--db", db, "--set", "--pue", "1.3", "--effective", "2020-01-01")
    assert code == 2 and "never changed retroactively" in err
    code, _, err = run(capsys, "settings", "--db", db, "--set")
    assert code == 2 and "--set: name at least one of" in err
    code, _, err = run(capsys, "settings", "--db", db, "--set", "--pue", "0.5")
    assert code == 2 and "pue: must be >= 1" in err
    code, out, _ = run(capsys, "settings", "--db", db, "--format", "csv")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 1  # the config's default, not stored


@pytest.mark.parametrize("report", ["usage", "requests", "backends", "settings"])
def test_json_and_parquet_carry_the_csv_rows(db: str, config: str, capsys, tmp_path: Path, report: str) -> None:
    """The machine formats say the same thing: every column and row of the CSV, typed (no lossy strings)."""
    import json

    import pyarrow.parquet as pq

    args = (report, "--db", db, "--config", config) + (
        ("--start", "2023-11-13", "--end", "2023-11-15") if report != "settings" else ()
    )
    code, out, err = run(capsys, *args, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    code, out, err = run(capsys, *args, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["columns"] == list(rows[0]) and len(doc["rows"]) == len(rows)
    parquet = tmp_path / "out.parquet"
    code, _, err = run(capsys, *args, "--format", "parquet", "--output", str(parquet))
    assert code == 0, err
    table = pq.read_table(parquet)
    assert table.column_names == doc["columns"] and table.to_pylist() == doc["rows"]
    assert table.schema.metadata[b"joulegate.title"].decode() == doc["title"]
    for as_text, typed in zip(rows, doc["rows"], strict=True):
        for key, value in typed.items():
            if isinstance(value, float):
                assert math.isclose(float(as_text[key]), value), key
            elif value is not None and not isinstance(value, bool):
                assert as_text[key] == str(value), key


def test_parquet_needs_a_file(db: str, capsys) -> None:
    code, _, err = run(capsys, "usage", "--db", db, "--format", "parquet")
    assert code == 2 and "--output PATH" in err
