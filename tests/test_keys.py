"""API keys: create, look up, list, revoke, malformed keys; and the `joulegate keys` command (SQLite and PG)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.cli import main as cli_main
from meter.store import create_key, list_keys, lookup_key, make_engine, revoke_key, upgrade
from meter.store.keys import KEY_RE, parse_key_id
from meter.store.models import ApiKey, Tenant


def test_created_key_looks_up_to_its_tenant_and_is_stored_only_hashed(db: sa.Engine) -> None:
    created = create_key(db, "acme", default_class="batch", label="ci")
    assert KEY_RE.fullmatch(created.key) and created.key.startswith(f"jg_{created.key_id}_")
    info = lookup_key(db, created.key)
    assert info is not None
    assert (info.key_id, info.tenant, info.admin, info.default_class) == (created.key_id, "acme", False, "batch")
    with db.connect() as conn:
        stored = conn.execute(sa.select(ApiKey.__table__)).mappings().one()
    assert stored["key_hash"] == hashlib.sha256(created.key.encode()).hexdigest()
    secret = created.key[len(f"jg_{created.key_id}_") :]
    assert all(secret not in str(v) for v in stored.values()), "the secret must not be stored"


def test_keys_share_a_tenant_and_admin_flag_is_kept(db: sa.Engine) -> None:
    a = create_key(db, "acme")
    b = create_key(db, "acme", admin=True)
    c = create_key(db, "globex")
    assert len({a.key, b.key, c.key}) == 3 and len({a.key_id, b.key_id, c.key_id}) == 3
    with db.connect() as conn:
        assert sorted(conn.execute(sa.select(Tenant.name)).scalars()) == ["acme", "globex"]
    infos = [lookup_key(db, k.key) for k in (a, b, c)]
    assert [(i.tenant, i.admin) for i in infos if i] == [("acme", False), ("acme", True), ("globex", False)]
    listed = list_keys(db)
    assert [k.key_id for k in listed] == [a.key_id, b.key_id, c.key_id]
    assert all(k.active for k in listed)


def test_revoked_key_no_longer_looks_up(db: sa.Engine) -> None:
    keep = create_key(db, "acme")
    gone = create_key(db, "acme")
    assert revoke_key(db, gone.key_id) is True
    assert revoke_key(db, gone.key_id) is False  # already revoked
    assert revoke_key(db, "000000000000") is False  # unknown
    assert lookup_key(db, gone.key) is None
    assert lookup_key(db, keep.key) is not None
    listed = {k.key_id: k for k in list_keys(db)}
    assert listed[gone.key_id].revoked_ns is not None and listed[keep.key_id].revoked_ns is None
    assert [k.key_id for k in list_keys(db, include_revoked=False)] == [keep.key_id]


def test_malformed_and_unknown_keys_are_refused(db: sa.Engine) -> None:
    real = create_key(db, "acme").key
    key_id = real.split("_")[1]
    secret = real[len(f"jg_{key_id}_") :]
    other_id = "f" * 12 if key_id != "f" * 12 else "e" * 12
    off_by_one = real[:-1] + ("A" if real[-1] != "A" else "B")
    malformed = [
        "",
        "jg_",
        "Bearer " + real,
        real + "x",
        real[:-1],
        real.upper(),
        f"jg_{key_id}{secret}",
        f"xx_{key_id}_{secret}",
        " " + real,
        real + "\n",
    ]
    for bad in malformed:
        assert parse_key_id(bad) is None, bad
        assert lookup_key(db, bad) is None, bad
    for unknown in (f"jg_{other_id}_{secret}", off_by_one):  # well formed, but no such key
        assert parse_key_id(unknown) is not None
        assert lookup_key(db, unknown) is None, unknown
    assert lookup_key(db, real) is not None


def test_create_key_rejects_an_empty_tenant(db: sa.Engine) -> None:
    with pytest.raises(ValueError):
        create_key(db, "")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    rc = cli_main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out.strip().splitlines(), captured.err


def test_keys_command_on_a_fresh_sqlite_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOULEGATE_DB__URL", raising=False)
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    # a SQLite file that does not exist is a typo until `migrate` creates it
    rc, out, err = _run(capsys, "keys", "create", "--tenant", "acme", "--db", url)
    assert rc == 1 and out == [] and "no database file" in err and "joulegate migrate" in err
    assert not (tmp_path / "fresh.db").exists()
    assert _run(capsys, "migrate", "--db", url)[0] == 0
    config = tmp_path / "jg.toml"
    config.write_text(
        '[[models]]\nmodel_id = "m"\nbackends = [{url = "http://tgi:80"}]\n'
        '[models.shaping]\nclasses = {default = {}, batch = {policy = "batch"}}\n'
    )
    rc, out, _ = _run(
        capsys, "keys", "create", "--tenant", "acme", "--admin", "--class", "batch", "--label", "ops", "--db", url,
        "--config", str(config),
    )  # fmt: skip
    assert rc == 0 and len(out) == 2 and "acme" in out[0]
    key = out[-1]
    engine = make_engine(url)
    info = lookup_key(engine, key)
    assert info is not None and (info.tenant, info.admin, info.default_class) == ("acme", True, "batch")

    rc, out, _ = _run(capsys, "keys", "list", "--db", url)
    assert rc == 0 and out[0].split() == ["KEY_ID", "TENANT", "ADMIN", "CLASS", "LABEL", "CREATED", "REVOKED"]
    assert out[1].split()[:5] == [info.key_id, "acme", "yes", "batch", "ops"] and out[1].split()[-1] == "-"
    assert key not in "\n".join(out)

    rc, out, _ = _run(capsys, "keys", "revoke", info.key_id, "--db", url)
    assert rc == 0 and lookup_key(engine, key) is None
    rc, _, err = _run(capsys, "keys", "revoke", info.key_id, "--db", url)
    assert rc == 1 and info.key_id in err
    rc, out, _ = _run(capsys, "keys", "list", "--active", "--db", url)
    assert rc == 0 and out == ["KEY_ID  TENANT  ADMIN  CLASS  LABEL  CREATED  REVOKED"]
    engine.dispose()


def test_keys_command_reads_the_database_from_config_and_env(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade(db_url)  # the keys command refuses a SQLite file that does not exist
    config = tmp_path / "jg.toml"
    config.write_text(f'[db]\nurl = "{db_url}"\n')
    monkeypatch.delenv("JOULEGATE_DB__URL", raising=False)
    rc, out, _ = _run(capsys, "keys", "create", "--tenant", "cfg", "--config", str(config))
    assert rc == 0
    engine = make_engine(db_url)
    assert (info := lookup_key(engine, out[-1])) is not None and info.tenant == "cfg"
    monkeypatch.setenv("JOULEGATE_DB__URL", db_url)
    rc, out, _ = _run(capsys, "keys", "create", "--tenant", "env")
    assert rc == 0 and (info := lookup_key(engine, out[-1])) is not None and info.tenant == "env"
    engine.dispose()


def test_keys_command_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "keys", "list", "--config", str(tmp_path / "missing.toml"))
    assert rc == 2 and "missing.toml" in err
