"""The embedded server: who stops it, what stop leaves behind, restarts and crashes."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from fastpgcache.embedded import EmbeddedPostgres

pytestmark = pytest.mark.own_server


def _select(url: str, sql: str):
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def _postmaster_pid(pg: EmbeddedPostgres) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split()[0])


def _gone(pid: int) -> bool:
    # A zombie counts as gone: the postmaster's parent (pg_ctl) has exited, and in a
    # container nobody may reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@pytest.fixture
def persistent_dir():
    # Not tmp_path: pytest resets its base dir to 0700, which the server's own account cannot enter.
    path = Path(tempfile.mkdtemp(prefix="fastpgcache-test-"))
    yield path / "pg"
    shutil.rmtree(path, ignore_errors=True)


def test_a_process_that_reused_a_running_server_leaves_it_running(persistent_dir):
    owner = EmbeddedPostgres(persistent_dir).start()
    try:
        # Another process reuses the server (start() and a `with` block), then exits.
        code = ("import sys; from fastpgcache.embedded import EmbeddedPostgres as E\n"
                "E(sys.argv[1]).start()\n"
                "with E(sys.argv[1]) as pg: print(pg.port)\n")
        done = subprocess.run([sys.executable, "-c", code, str(owner.data_dir)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert int(done.stdout.split()[-1]) == owner.port
        assert owner.is_running()
        assert _select(owner.url, "SELECT 1") == 1
    finally:
        owner.stop()
    assert not owner.is_running() and (persistent_dir / "PG_VERSION").exists()  # persistent: data kept


def test_stop_leaves_no_process_and_removes_the_throwaway_dir():
    pg = EmbeddedPostgres().start()
    pid = _postmaster_pid(pg)
    pg.stop()
    assert _gone(pid)
    assert not pg.data_dir.exists()


def test_a_stop_that_fails_raises_and_keeps_the_data_dir():
    pg = EmbeddedPostgres(stop_timeout=1).start()
    engine = create_engine(pg.url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            # `smart` waits for clients; ours stays connected, so pg_ctl gives up after 1 s.
            with pytest.raises(RuntimeError, match="did not stop"):
                pg.stop(mode="smart")
            assert pg.data_dir.exists() and (pg.data_dir / "PG_VERSION").exists()
    finally:
        engine.dispose()
        pg.stop()
    assert not pg.data_dir.exists()


def test_restart_keeps_the_port_and_immediate_stop_then_start_works():
    pg = EmbeddedPostgres().start()
    try:
        port = pg.port
        _select(pg.url, "CREATE TABLE kept AS SELECT 7 AS n")
        pg.restart()
        assert pg.port == port and _select(pg.url, "SELECT n FROM kept") == 7
        pid = _postmaster_pid(pg)
        pg.stop(mode="immediate")
        assert _gone(pid) and not pg.is_running()
        pg.start()
        assert pg.port == port and _select(pg.url, "SELECT n FROM kept") == 7
    finally:
        pg.stop()
    assert not pg.data_dir.exists()


@pytest.fixture
def no_temp_dir(monkeypatch):
    """Bad arguments are refused before the throwaway data dir is made, so nothing is left behind."""

    def refuse(*args, **kwargs):
        raise AssertionError("a throwaway data dir was made for arguments that are refused")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


def test_stop_timeout_must_be_whole_seconds(no_temp_dir):
    with pytest.raises(ValueError, match="whole number of seconds"):
        EmbeddedPostgres(stop_timeout=0)


def test_settings_reach_the_server_and_survive_a_restart():
    pg = EmbeddedPostgres(settings={"work_mem": "7MB", "cluster_name": "two 'words'", "max_connections": 50})
    try:
        pg.start()
        assert _select(pg.url, "SHOW work_mem") == "7MB"
        assert _select(pg.url, "SHOW max_connections") == "50"  # wins over the default 200
        pg.restart()
        assert _select(pg.url, "SHOW cluster_name") == "two 'words'"  # quoted for pg_ctl's shell
    finally:
        pg.stop()


@pytest.mark.parametrize("settings", [{"bad name": "1"}, {"work_mem": None}, {"fsync": True}])
def test_settings_must_be_names_and_plain_values(settings, no_temp_dir):
    with pytest.raises(ValueError, match="settings must map"):
        EmbeddedPostgres(settings=settings)
