"""Every command fails as one line that names what was wrong and what to do, with a non-zero exit and no traceback.

The servers (``serve``, ``meter``) run as real processes (their stderr is what an operator sees); the database
commands run in-process through the same ``main``. A mistyped SQLite path must not create an empty database for the
readers (``report``, ``keys``): the file must still not exist afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main as cli_main

from .conftest import REPO_ROOT, free_port


def _nvml_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def _process(*argv: str, cwd: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "HOME": str(cwd)},
    )
    return proc.returncode, proc.stderr


def _one_error_line(err: str, command: str) -> str:
    """The error line (log lines, JSON, may precede it): exactly one, and no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"joulegate {command}: ")]
    assert len(lines) == 1, err
    return lines[0]


def _unreachable_pg() -> str:
    return f"postgresql://joulegate:s3cret@127.0.0.1:{free_port()}/joulegate"


SERVE = ("serve", "--backend", "http://127.0.0.1:9", "--grpc-listen", "127.0.0.1:0", "--http-listen", "off")


@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [
        # (serve with an unreachable database starts and reports NOT_SERVING: tests/integration/test_database_outage.py)
        ((*SERVE, "--meter", "none", "--db", "mysql://u@db/jg"), 2, "'mysql' is not supported"),
        ((*SERVE, "--meter", "none", "--db", "not a url"), 2, "is not a URL: expected sqlite:///PATH or postgresql://"),
        ((*SERVE, "--meter", "none", "--db", "sqlite:///no/such/dir/jg.db"), 2, "directory no/such/dir does not exist"),
        pytest.param(
            (*SERVE, "--meter", "nvml", "--db", "sqlite:///jg.db"),
            1,
            "--meter nvml: NVML could not be initialised",
            marks=pytest.mark.skipif(_nvml_present(), reason="this host has NVML"),
        ),
        pytest.param(
            ("meter", "--source", "nvml", "--config", "meter.toml"),
            1,
            "meter source nvml: NVML could not be initialised",
            marks=pytest.mark.skipif(_nvml_present(), reason="this host has NVML"),
        ),
        (("meter", "--source", "sim", "--config", "meter.toml", "--db", "unreachable"), 1, "cannot use the database"),
        ((*SERVE, "--meter", "none", "--tls-cert-path", "c.pem"), 2, "cert_path and key_path go together"),
        ((*SERVE, "--meter", "none", "--tls-cert-path", "no.pem", "--tls-key-path", "no.key"), 2, "no.pem is not a"),
        ((*SERVE, "--meter", "none", "--tls-cert-path", "meter.toml", "--tls-key-path", "meter.toml"), 2, "TLS:"),
        (("meter", "--source", "sim", "--config", "meter.toml", "--db", "mysql://u@db/jg"), 2, "is not supported"),
    ],
)
def test_servers_fail_in_one_line(tmp_path: Path, argv: tuple[str, ...], code: int, expected: str) -> None:
    (tmp_path / "meter.toml").write_text('[[models]]\nmodel_id = "m"\nbackends = [{url = "http://127.0.0.1:9"}]\n')
    argv = tuple(_unreachable_pg() if a == "unreachable" else a for a in argv)
    rc, err = _process(*argv, cwd=tmp_path)
    line = _one_error_line(err, argv[0])
    assert rc == code and expected in line, err
    assert "s3cret" not in err


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("command", [("report", "usage"), ("report", "backends"), ("keys", "list"), ("migrate",)])
def test_database_commands_fail_in_one_line(
    command: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JOULEGATE_DB__URL", raising=False)
    name = command[0]
    for url, code, expected in [
        ("mysql://u@db/jg", 2, "'mysql' is not supported; joulegate stores its data in sqlite:///PATH or postgresql"),
        ("postgresql+asyncpg://u@db/jg", 2, "driver 'postgresql+asyncpg' is not available"),
        ("::", 2, "is not a URL"),
        (_unreachable_pg(), 1, "Connection refused"),
        ("sqlite:///missing/jg.db", 2, "directory missing does not exist"),
    ]:
        rc, out, err = _run(capsys, *command, "--db", url)
        assert rc == code and out == "", (url, err)
        assert expected in _one_error_line(err, name) and "s3cret" not in err, (url, err)
    # the environment names the database just as well, and is named in the error too
    monkeypatch.setenv("JOULEGATE_DB__URL", "mysql://u@db/jg")
    rc, _, err = _run(capsys, *command)
    assert rc == 2 and "JOULEGATE_DB__URL" in _one_error_line(err, name)


@pytest.mark.parametrize("command", [("report", "usage"), ("report", "requests"), ("keys", "list")])
def test_readers_refuse_a_sqlite_file_that_does_not_exist(
    command: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "joulgate.db"
    rc, out, err = _run(capsys, *command, "--db", f"sqlite:///{typo}")
    line = _one_error_line(err, command[0])
    assert rc == 1 and out == "" and f"no database file at {typo}" in line and "joulegate migrate" in line
    assert not typo.exists()


def test_migrate_creates_a_new_sqlite_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "new.db"
    rc, out, _ = _run(capsys, "migrate", "--db", f"sqlite:///{path}")
    assert rc == 0 and path.is_file() and "upgraded from an empty database" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"joulegate {version('joulegate')}"
    rc, err = _process("--version", cwd=REPO_ROOT)
    assert rc == 0 and err == ""


def test_an_unexpected_error_is_one_line_and_its_traceback_is_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.commands.migrate as migrate

    def broken(_args: object) -> int:
        raise KeyError("boom")

    monkeypatch.setattr(migrate, "run", broken)
    rc, _, err = _run(capsys, "migrate")
    assert rc == 1 and _one_error_line(err, "migrate").startswith("joulegate migrate: unexpected error: KeyError")
    rc, _, err = _run(capsys, "--traceback", "migrate")
    assert rc == 1 and "Traceback" in err and "KeyError: 'boom'" in err
