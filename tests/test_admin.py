"""`fastpgcache-admin` and the shipped migrations, as an admin would use them."""
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fastpgcache import Cache
from fastpgcache.admin import cache_status, main

ROOT = Path(__file__).resolve().parent.parent


def test_setup_then_check_reports_unlogged(pg_url, empty_schema, capsys):
    assert main(["--url", pg_url, "--check", "--schema", empty_schema]) == 1
    assert "not set up" in capsys.readouterr().out
    assert main(["--url", pg_url, "--schema", empty_schema]) == 0
    assert main(["--url", pg_url, "--check", "--schema", empty_schema]) == 0
    out = capsys.readouterr().out
    assert f"{empty_schema}.cache: exists, UNLOGGED, row-level security on, revision 0" in out


def test_admin_is_idempotent_and_force_empties(engine, pg_url, empty_schema):
    assert main(["--url", pg_url, "--schema", empty_schema]) == 0
    Cache(engine, schema=empty_schema).set("k", "v")
    assert main(["--url", pg_url, "--schema", empty_schema]) == 0
    assert Cache(engine, schema=empty_schema).get("k") == "v"
    assert main(["--url", pg_url, "--schema", empty_schema, "--force"]) == 0
    assert Cache(engine, schema=empty_schema).get("k") is None


def persistence(engine, schema: str) -> dict:
    """relpersistence of the cache table and of its roles' secrets."""
    with engine.connect() as connection:
        return dict(connection.execute(text(
            "SELECT c.relname, c.relpersistence FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = :s AND c.relname IN ('cache', 'cache_secrets')"), {"s": schema}).all())


def test_logged_and_unlogged_flags_switch_and_keep_rows(engine, pg_url, empty_schema, capsys):
    main(["--url", pg_url, "--schema", empty_schema])
    # The secrets follow the entries, so the row lock of an expiry batch writes no WAL on an UNLOGGED cache.
    assert persistence(engine, empty_schema) == {"cache": "u", "cache_secrets": "u"}
    Cache(engine, schema=empty_schema).set("k", [1, 2])
    assert main(["--url", pg_url, "--schema", empty_schema, "--logged"]) == 0
    assert "exists, LOGGED" in capsys.readouterr().out
    assert persistence(engine, empty_schema) == {"cache": "p", "cache_secrets": "p"}
    assert main(["--url", pg_url, "--schema", empty_schema, "--unlogged"]) == 0
    assert "exists, UNLOGGED" in capsys.readouterr().out
    assert persistence(engine, empty_schema) == {"cache": "u", "cache_secrets": "u"}
    assert Cache(engine, schema=empty_schema).get("k") == [1, 2]
    assert Cache(engine, schema=empty_schema).set("k2", 3) is True  # the secret came through both rewrites


def test_a_table_created_logged_keeps_its_secrets_logged(engine, pg_url, empty_schema):
    assert main(["--url", pg_url, "--schema", empty_schema, "--logged"]) == 0
    assert persistence(engine, empty_schema) == {"cache": "p", "cache_secrets": "p"}


def test_url_parts_and_fastpgcache_url_env(pg_url, empty_schema, monkeypatch):
    url = make_url(pg_url)
    assert main(["--host", url.host, "--port", str(url.port or 5432), "--user", url.username,
                 "--database", url.database, "--schema", empty_schema]) == 0
    monkeypatch.setenv("FASTPGCACHE_URL", pg_url)
    assert main(["--check", "--schema", empty_schema]) == 0


def test_cleanup_flag_removes_every_roles_expired_rows(engine, pg_url, schema, capsys):
    with engine.begin() as connection:
        connection.execute(text(
            f'INSERT INTO "{schema}".cache (user_id, key, value, expires_at) VALUES '
            "('alice', 'a', 'x', now() - interval '1 minute'), ('bob', 'b', 'x', now() - interval '1 minute'), "
            "('bob', 'live', 'x', NULL)"))
    assert main(["--url", pg_url, "--schema", schema, "--cleanup"]) == 0
    assert "removed 2 expired entries" in capsys.readouterr().out
    with engine.connect() as connection:
        assert connection.execute(text(f'SELECT key FROM "{schema}".cache')).scalars().all() == ["live"]


def test_unreachable_host_is_one_line_exit_2(capsys):
    code = main(["--host", "127.0.0.1", "--port", "1", "--user", "nobody", "--password", "s3cret-pw", "--check"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastpgcache-admin: cannot connect")
    assert "reachable" in err
    assert "s3cret-pw" not in err and "Traceback" not in err


def test_role_without_create_privilege_gets_one_line(make_role, pg_url, capsys):
    name, url = make_role("weak")
    code = main(["--url", url.render_as_string(hide_password=False), "--schema", f"s_{uuid.uuid4().hex[:6]}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "permission denied" in err
    assert url.password not in err


def test_databricks_flag_without_instance_name_is_a_clear_error(capsys):
    assert main(["--databricks", "--host", "127.0.0.1", "--port", "1"]) == 2
    assert "--instance-name" in capsys.readouterr().err


def test_console_script_runs(pg_url, empty_schema):
    script = Path(sys.executable).with_name("fastpgcache-admin")
    done = subprocess.run([str(script), "--url", pg_url, "--schema", empty_schema], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "UNLOGGED" in done.stdout


def test_wheel_ships_migrations_and_admin_runs_from_it(tmp_path, pg_url, engine, empty_schema):
    """Built wheel, unpacked away from the checkout: the admin finds its migrations inside it."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("fastpgcache-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "fastpgcache" / "_migrations" / "env.py").exists()
    assert list((site / "fastpgcache" / "_migrations" / "versions").glob("0001_*.py"))
    code = ("import fastpgcache, fastpgcache.admin as a, sys; "
            "assert fastpgcache.__file__.startswith(sys.argv[1]), fastpgcache.__file__; "
            "print(a.migrations_dir()); sys.exit(a.main(['--url', sys.argv[2], '--schema', sys.argv[3]]))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code, str(site), pg_url, empty_schema], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(str(site))
    assert cache_status(engine, empty_schema)["unlogged"]


def test_any_sqlalchemy_error_is_one_line_exit_2(pg_url, empty_schema, capsys):
    # A role name the statement layer cannot take as written: no traceback, one line.
    code = main(["--url", pg_url, "--schema", empty_schema, "--grant-to", "a :x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastpgcache-admin: ") and "Traceback" not in err


def test_bad_table_name_is_one_line_saying_what_is_accepted(pg_url, empty_schema, capsys):
    assert main(["--url", pg_url, "--schema", empty_schema, "--table", "c%t"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "A-Za-z" in err


def test_force_from_the_command_line_keeps_the_schema(engine, pg_url, schema):
    with engine.begin() as connection:
        connection.execute(text(f'CREATE FUNCTION "{schema}".answer() RETURNS int LANGUAGE sql AS \'SELECT 42\''))
    assert main(["--url", pg_url, "--schema", schema, "--force"]) == 0
    with engine.connect() as connection:
        assert connection.execute(text(f'SELECT "{schema}".answer()')).scalar() == 42


def test_help_does_not_recommend_a_password_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "PGPASSWORD" in out and "FASTPGCACHE_URL" in out and "visible in ps" in out
