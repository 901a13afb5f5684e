"""The `fastpgcache` command: output, exit codes (0 found, 1 missing, 2 error), one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from fastpgcache import Cache
from fastpgcache.cli import build_parser, main

COMMANDS = ["get", "set", "del", "ttl", "expire", "keys", "stats", "cleanup", "flush", "bench"]


@pytest.fixture
def run(pg_url, schema, capsys, monkeypatch):
    """Run the command in-process against the test schema; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("FASTPGCACHE_URL", pg_url)

    def invoke(*argv: str):
        code = main(["--schema", schema, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def test_set_json_then_get_prints_it_indented(run):
    assert run("set", "user:1", '{"name": "Alice", "tags": [1, 2]}', "--json") == (0, "OK\n", "")
    code, out, err = run("get", "user:1")
    assert code == 0 and err == ""
    assert out == json.dumps({"name": "Alice", "tags": [1, 2]}, indent=2) + "\n"


def test_get_raw_prints_json_as_stored(run):
    run("set", "n", "[1, 2]", "--json")
    assert run("get", "n", "--raw") == (0, "[1,2]\n", "")


def test_a_value_without_json_flag_stays_a_string(run, cache):
    run("set", "s", "123")
    assert cache.get("s") == "123"
    assert run("get", "s") == (0, "123\n", "")


def test_missing_key_exits_1_with_a_note_on_stderr(run):
    code, out, err = run("get", "nope")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "'nope' is missing" in err


def test_nx_reports_not_stored_with_exit_1(run, cache):
    assert run("set", "lock", "me", "--nx")[0] == 0
    assert run("set", "lock", "you", "--nx") == (1, "not stored\n", "")
    assert cache.get("lock") == "me"
    assert run("set", "absent", "x", "--xx") == (1, "not stored\n", "")


def test_set_reads_the_value_from_stdin_with_dash(run, cache, monkeypatch):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("from stdin"))
    assert run("set", "piped", "-")[0] == 0
    assert cache.get("piped") == "from stdin"


def test_del_counts_existing_keys_and_exits_1_when_none_existed(run):
    run("set", "a", "1")
    assert run("del", "a", "b") == (0, "1\n", "")
    assert run("del", "a", "b") == (1, "0\n", "")


def test_ttl_and_expire(run):
    run("set", "t", "v", "--ttl", "60")
    code, out, _ = run("ttl", "t")
    assert code == 0 and 55 <= int(out) <= 60
    run("set", "forever", "v")
    assert run("ttl", "forever") == (0, "-1\n", "")
    assert run("ttl", "missing") == (1, "-2\n", "")
    assert run("expire", "forever", "30")[:2] == (0, "OK\n")
    assert 25 <= int(run("ttl", "forever")[1]) <= 30
    assert run("expire", "missing", "30")[0] == 1


def test_keys_lists_matches_one_per_line_in_order(run):
    for key in ("user:2", "user:1", "order:1", "user_x"):
        run("set", key, "v")
    assert run("keys", "user:*") == (0, "user:1\nuser:2\n", "")
    assert run("keys", "nothing*") == (0, "", "")


def test_stats_cleanup_and_flush_print_json(run, cache):
    run("set", "a", "1")
    run("set", "b", "2")
    code, out, _ = run("stats")
    assert code == 0 and json.loads(out)["entries"] == 2
    code, out, _ = run("cleanup")
    assert code == 0 and json.loads(out) == {"removed": 0}
    assert run("flush", "--yes")[:2] == (0, json.dumps({"removed": 2}, indent=2) + "\n")
    assert cache.get_many(["a", "b"]) == {}


def test_flush_without_yes_refuses_and_keeps_everything(run, cache):
    run("set", "keep", "me")
    code, out, err = run("flush")
    assert (code, out) == (2, "")
    assert "--yes" in err and err.count("\n") == 1
    assert cache.get("keep") == "me"


def test_connection_options_work_after_the_command_too(pg_url, schema, capsys, monkeypatch, cache):
    monkeypatch.delenv("FASTPGCACHE_URL", raising=False)
    cache.set("k", "v")
    assert main(["get", "k", "--url", pg_url, "--schema", schema]) == 0
    assert capsys.readouterr().out == "v\n"


def test_no_database_given_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.delenv("FASTPGCACHE_URL", raising=False)
    assert main(["get", "k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--url" in err and "FASTPGCACHE_URL" in err


def test_bad_input_is_a_one_line_error_not_a_traceback(run):
    for argv, hint in ((["set", "k", "v", "--ttl", "-3"], "positive"),
                       (["set", "k", "{nope", "--json"], "not valid JSON"),
                       (["set", "k" * 2000, "v"], "limit")):
        code, out, err = run(*argv)
        assert (code, out) == (2, "")
        assert err.count("\n") == 1 and hint in err and "Traceback" not in err


def test_missing_table_says_how_to_create_it(pg_url, capsys):
    assert main(["--url", pg_url, "--schema", "no_such_schema_here", "get", "k"]) == 2
    err = capsys.readouterr().err
    assert "fastpgcache-admin" in err and err.count("\n") == 1


def test_unreachable_server_never_shows_the_password(pg_url, capsys):
    url = make_url(pg_url).set(password="hunter2-secret", port=1).render_as_string(hide_password=False)
    assert main(["--url", url, "get", "k"]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "cannot connect" in err and err.count("\n") == 1


def test_malformed_url_is_reported_plainly(capsys):
    assert main(["--url", "not a url", "get", "k"]) == 2
    assert "not valid" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: fastpgcache {command}" in capsys.readouterr().out


def test_usage_mistakes_exit_2_in_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["get"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key" in err


def test_console_script_exit_codes(pg_url, schema, engine):
    script = Path(sys.executable).with_name("fastpgcache")
    env = {"FASTPGCACHE_URL": pg_url, "PATH": str(script.parent)}
    Cache(engine, schema=schema).set("there", {"n": 1})
    found = subprocess.run([str(script), "--schema", schema, "get", "there"], capture_output=True, text=True,
                           env=env, timeout=60)
    missing = subprocess.run([str(script), "--schema", schema, "get", "gone"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert (found.returncode, json.loads(found.stdout)) == (0, {"n": 1})
    assert (missing.returncode, missing.stdout) == (1, "")


@pytest.mark.parametrize("url", ["sqlite:///cache.db", "mysql://u@h/db", "postgresql+asyncpg://u@h/db"])
def test_a_url_for_another_database_or_driver_is_one_line_exit_2(url, capsys):
    assert main(["--url", url, "get", "k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "postgresql+psycopg2://" in err and "Traceback" not in err


def test_closed_pipe_ends_quietly(pg_url, schema, cache):
    cache.set_many({f"k{i:05d}": i for i in range(20_000)})
    script = Path(sys.executable).with_name("fastpgcache")
    done = subprocess.run(f"'{script}' --url '{pg_url}' --schema {schema} keys | head -1", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "k00000\n"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
