"""fastpgcache-admin against a server that really checks passwords (scram-sha-256)."""
import getpass
import secrets

import pytest

from fastpgcache.admin import main
from fastpgcache.embedded import EmbeddedPostgres

pytestmark = pytest.mark.own_server

PASSWORD = "adm-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def server():
    pg = EmbeddedPostgres(password=PASSWORD).start()
    yield pg
    pg.stop()


def args(server, *extra):
    return ["--host", "127.0.0.1", "--port", str(server.port), "--user", "postgres", *extra]


def test_wrong_password_is_one_line_exit_2_without_the_password(server, capsys, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    assert main(args(server, "--password", "wrong-" + PASSWORD, "--check")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "password authentication failed" in err and "check the password" in err
    assert PASSWORD not in err and "Traceback" not in err


def test_pgpassword_works_and_nothing_prints_it(server, capsys, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    assert main(args(server, "--schema", "via_env")) == 0
    assert main(args(server, "--schema", "via_env", "--check")) == 0
    captured = capsys.readouterr()
    assert "via_env.cache: exists, UNLOGGED" in captured.out
    assert PASSWORD not in captured.out + captured.err


def test_password_flag_without_value_prompts(server, capsys, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    asked = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt: asked.append(prompt) or PASSWORD)
    assert main(args(server, "--password", "--schema", "via_prompt")) == 0
    assert asked == ["password for postgres: "]
    captured = capsys.readouterr()
    assert PASSWORD not in captured.out + captured.err


def test_missing_password_says_so(server, capsys, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    assert main(args(server, "--check")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "password" in err
