"""API keys: create, look up, list, revoke, malformed keys; and the `joulegate keys` command (SQLite and PG)."""

from __future__ import annotations

import hashlib
import time
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
    assert all(k.active_at(time.time_ns()) for k in listed)


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
    assert rc == 0 and out[0].split()[:7] == ["KEY_ID", "TENANT", "ADMIN", "SCOPES", "CLASS", "LABEL", "CREATED"]
    row = out[1].split()
    assert row[:6] == [info.key_id, "acme", "yes", "generate,reports", "batch", "ops"] and row[-1] == "-"
    assert key not in "\n".join(out)

    rc, out, _ = _run(capsys, "keys", "revoke", info.key_id, "--db", url)
    assert rc == 0 and lookup_key(engine, key) is None
    rc, _, err = _run(capsys, "keys", "revoke", info.key_id, "--db", url)
    assert rc == 1 and info.key_id in err
    rc, out, _ = _run(capsys, "keys", "list", "--active", "--db", url)
    assert rc == 0 and len(out) == 1 and out[0].startswith("KEY_ID  TENANT")
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


# -- expiry, scopes, last use, rotation, audit ------------------------------------------------------------------------


def test_an_expired_key_looks_up_as_nothing(db: sa.Engine) -> None:
    soon = create_key(db, "acme", expires_ns=time.time_ns() + 200_000_000)
    later = create_key(db, "acme", expires_ns=time.time_ns() + 3600 * 10**9)
    assert lookup_key(db, soon.key) is not None
    time.sleep(0.25)  # the scenario: the key's lifetime runs out
    assert lookup_key(db, soon.key) is None
    info = lookup_key(db, later.key)
    assert info is not None and info.expires_ns is not None


def test_scopes_are_kept_and_checked(db: sa.Engine) -> None:
    gen = create_key(db, "acme", scopes=frozenset({"generate"}))
    info = lookup_key(db, gen.key)
    assert info is not None and info.scopes == frozenset({"generate"})
    with pytest.raises(ValueError, match="subset of generate, reports"):
        create_key(db, "acme", scopes=frozenset({"admin"}))
    with pytest.raises(ValueError):
        create_key(db, "acme", scopes=frozenset())


def test_last_use_is_recorded_at_lookup_at_most_once_a_minute(db: sa.Engine) -> None:
    created = create_key(db, "acme")
    assert list_keys(db)[0].last_used_ns is None
    before = time.time_ns()
    lookup_key(db, created.key)
    first = list_keys(db)[0].last_used_ns
    assert first is not None and first >= before
    lookup_key(db, created.key)
    assert list_keys(db)[0].last_used_ns == first  # within the minute: no write per lookup


def test_rotation_issues_a_twin_and_the_old_key_works_for_the_grace_period(db: sa.Engine) -> None:
    from meter.store.keys import rotate_key

    old = create_key(db, "acme", admin=True, default_class="batch", label="ci", scopes=frozenset({"reports"}))
    new = rotate_key(db, old.key_id, grace_ns=300_000_000, actor="cli:ops@host")
    assert new is not None and new.key_id != old.key_id and new.tenant == "acme"
    old_info, new_info = lookup_key(db, old.key), lookup_key(db, new.key)
    assert old_info is not None and new_info is not None
    assert (new_info.admin, new_info.default_class, new_info.scopes) == (True, "batch", frozenset({"reports"}))
    assert new_info.expires_ns is None and old_info.expires_ns is not None
    records = {k.key_id: k for k in list_keys(db)}
    assert records[new.key_id].rotated_from == old.key_id and records[new.key_id].label == "ci"
    time.sleep(0.35)  # the scenario: the grace period runs out
    assert lookup_key(db, old.key) is None and lookup_key(db, new.key) is not None
    assert rotate_key(db, old.key_id, grace_ns=0) is None  # an expired key cannot be rotated again
    # a second rotation never extends an earlier expiry
    third = rotate_key(db, new.key_id, grace_ns=10**12)
    fourth = rotate_key(db, new.key_id, grace_ns=10**15)
    assert third is not None and fourth is not None
    assert {k.key_id: k for k in list_keys(db)}[new.key_id].expires_ns < time.time_ns() + 10**12 + 10**9


def test_key_changes_and_settings_changes_are_audited_with_their_actor(db: sa.Engine) -> None:
    from meter.reports import BillingSettings, IdlePolicy, add_settings
    from meter.store.audit import list_events
    from meter.store.keys import rotate_key

    a = create_key(db, "acme", actor="cli:alice@box")
    rotated = rotate_key(db, a.key_id, grace_ns=10**9, actor="cli:bob@box")
    assert rotated is not None
    assert revoke_key(db, rotated.key_id, actor="cli:carol@box")
    assert not revoke_key(db, rotated.key_id, actor="cli:carol@box")  # nothing revoked: nothing recorded
    add_settings(db, BillingSettings(IdlePolicy.TIME, 300.0, 1.2), effective_ns=None, source="test", actor="cli:dan")
    events = list_events(db)
    assert [(e.action, e.target, e.actor) for e in events] == [
        ("key.create", a.key_id, "cli:alice@box"),
        ("key.rotate", rotated.key_id, "cli:bob@box"),
        ("key.revoke", rotated.key_id, "cli:carol@box"),
        ("settings.set", "billing_settings", "cli:dan"),
    ]
    assert events[1].detail["rotated_from"] == a.key_id and events[0].detail["tenant"] == "acme"
    assert events[3].detail["grid_g_co2e_per_kwh"] == 300.0
    assert [e.action for e in list_events(db, action="key.")] == ["key.create", "key.rotate", "key.revoke"]
    assert secret_free(events, a.key)


def secret_free(events, key: str) -> bool:
    match = KEY_RE.fullmatch(key)
    assert match is not None, key
    secret = match.group(2)  # the whole secret: it may hold "_" itself
    return all(secret not in repr(e) for e in events)


def test_keys_command_creates_rotates_and_lists_with_expiry_and_scopes(tmp_path: Path, capsys) -> None:
    db_url = f"sqlite:///{tmp_path / 'k.db'}"
    assert cli_main(["migrate", "--db", db_url]) == 0
    capsys.readouterr()
    assert cli_main(["keys", "create", "--db", db_url, "--tenant", "acme", "--expires-in", "30d", "--scope",
                     "generate"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    key_id = out.split()[2]
    assert ", expires 20" in out
    assert cli_main(["keys", "rotate", "--db", db_url, key_id, "--grace", "1h"]) == 0
    out = capsys.readouterr().out
    assert f"replacing {key_id}" in out
    new_id = out.split()[2]
    assert cli_main(["keys", "list", "--db", db_url]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["KEY_ID", "TENANT", "ADMIN", "SCOPES", "CLASS", "LABEL", "CREATED", "EXPIRES",
                                  "REVOKED", "LAST_USED", "REPLACES"]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert rows[new_id][3] == "generate" and rows[new_id][-1] == key_id and rows[key_id][7] != "-"
    assert cli_main(["keys", "create", "--db", db_url, "--tenant", "acme", "--expires-in", "soon"]) == 2
    assert "expected a whole number and a unit" in capsys.readouterr().err
    assert cli_main(["audit", "--db", db_url, "--action", "key.", "--json"]) == 0
    import json

    actions = [json.loads(line)["action"] for line in capsys.readouterr().out.splitlines()]
    assert actions == ["key.create", "key.rotate"]
