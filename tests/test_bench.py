"""`fastpgcache bench` at a tiny size: the report's structure, outputs and cleanup (never its timings)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import text

from fastpgcache import bench

TINY = bench.Settings(rounds=2, calls=3, budget_s=0.05, threads=2, thread_ops=3, batch_sizes=(10,))
LOAD = f"load {TINY.threads}x{TINY.thread_ops}"
REDIS_URL = "redis://127.0.0.1:6379"
DJANGO = "Django DatabaseCache"


def _redis_answers() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="module")
def report(pg_url):
    # Django's contender configures Django for the whole process; it runs in a subprocess below.
    return bench.run_bench(pg_url, redis_url=REDIS_URL, settings=TINY, progress=False, exclude={DJANGO})


def test_every_workload_has_the_floor_and_the_library(report):
    workloads = ["get hit", "get miss", "set", "set ttl", "incr", "set_many(10)", "get_many(10)", LOAD]
    assert list(dict.fromkeys(r.workload for r in report.results)) == workloads
    for workload in workloads:
        assert report.result(workload, bench.FLOOR) is not None
        assert report.result(workload, "FastPgCache") is not None
        assert report.result(workload, "Cache(session)") is not None


def test_each_cell_is_summarised_consistently(report):
    for r in report.results:
        assert r.samples > 0
        assert 0 < r.p50_us <= r.p95_us <= r.p99_us
        assert r.ops_per_s > 0
        floor = report.result(r.workload, bench.FLOOR)
        assert r.p50_vs_floor == pytest.approx(r.p50_us / floor.p50_us)
        assert r.ops_vs_floor == pytest.approx(r.ops_per_s / floor.ops_per_s)
    assert report.result("get hit", bench.FLOOR).p50_vs_floor == 1.0
    assert report.result(LOAD, "FastPgCache").samples == TINY.rounds * TINY.threads * TINY.thread_ops * 2


def test_logged_table_and_guard_off_run_only_their_workloads(report):
    logged = {r.workload for r in report.results if r.contender == "FastPgCache LOGGED"}
    assert logged == {"set", LOAD} == {r.workload for r in report.results if r.contender == "psycopg2 LOGGED"}
    assert {r.workload for r in report.results if r.contender == "FastPgCache, guard off"} == {
        "get hit", "get miss", "set"}


def test_redis_is_measured_when_it_answers_and_noted_when_not(report):
    if _redis_answers():
        assert report.result("set_many(10)", "Redis") is not None
        assert "Redis" in report.meta["contenders"]
    else:
        assert any("Redis" in note for note in report.notes)
        assert all(r.contender != "Redis" for r in report.results)


def test_goals_are_listed_with_ratios_or_none_when_not_measured(report):
    by_name = {g.goal: g for g in report.goals}
    get_goal = by_name["get hit p50, FastPgCache / psycopg2"]
    assert get_goal.target == "<= 1.25"
    assert get_goal.ratio == pytest.approx(report.result("get hit", "FastPgCache").p50_vs_floor)
    assert get_goal.met == (get_goal.ratio <= 1.25)
    # set_many(1000) was not part of this tiny run, and Django was excluded.
    assert by_name["set_many(1000) p50, FastPgCache / psycopg2 execute_values"].ratio is None
    assert by_name["set throughput, FastPgCache / Django DatabaseCache"].met is None


def test_table_json_and_plot(report, tmp_path):
    table = bench.format_table(report)
    assert "p50 µs" in table and "p50 x floor" in table and "goals" in table
    assert all(r.contender in table for r in report.results)
    path = tmp_path / "bench.json"
    bench.write_json(report, str(path))
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "results", "goals", "notes"}
    assert len(data["results"]) == len(report.results)
    assert {"workload", "contender", "p50_us", "p95_us", "p99_us", "ops_per_s", "p50_vs_floor"} <= set(
        data["results"][0])
    png = tmp_path / "bench.png"
    bench.plot(report, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_leaves_nothing_behind(report, engine):
    run_id = report.meta["run_id"]
    with engine.connect() as connection:
        left = connection.execute(text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :p"),
                                  {"p": f"fastpgcache_bench_{run_id}%"}).scalars().all()
    assert left == []
    if _redis_answers():
        import redis

        assert list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"fastpgcache_bench:{run_id}:*")) == []


def test_the_floor_cannot_be_excluded(pg_url):
    with pytest.raises(ValueError, match="floor"):
        bench.run_bench(pg_url, settings=TINY, progress=False, exclude={bench.FLOOR})


def test_django_database_cache_is_measured_on_the_same_server(pg_url, tmp_path):
    out = tmp_path / "django.json"
    script = textwrap.dedent(f"""
        from fastpgcache import bench
        settings = bench.Settings(rounds=1, calls=2, budget_s=0.05, threads=2, thread_ops=2, batch_sizes=(10,))
        report = bench.run_bench({pg_url!r}, settings=settings, progress=False,
                                 exclude={{"FastPgCache, guard off", "psycopg2 LOGGED", "FastPgCache LOGGED"}})
        bench.write_json(report, {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    data = json.loads(out.read_text())
    django_rows = [r for r in data["results"] if r["contender"] == DJANGO]
    assert {r["workload"] for r in django_rows} == {"get hit", "get miss", "set", "set ttl", "incr",
                                                     "set_many(10)", "get_many(10)", "load 2x2"}
    goal = next(g for g in data["goals"] if g["goal"] == "set throughput, FastPgCache / Django DatabaseCache")
    assert goal["ratio"] > 0


def test_pinning_puts_client_and_local_server_on_one_cpu_and_restores_them(pg_url):
    import os

    from sqlalchemy import create_engine, text

    from sqlalchemy.pool import NullPool

    engine = create_engine(pg_url, poolclass=NullPool)  # every connect() forks a new backend
    with engine.connect() as connection:
        backend = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        postmaster = bench._local_parent(backend, "postgres")
    if postmaster and os.geteuid() not in (0, os.stat(f"/proc/{postmaster}").st_uid):
        postmaster = None  # a local server we may not re-pin: only this process is pinned
    mine, server = os.sched_getaffinity(0), os.sched_getaffinity(postmaster) if postmaster else None
    try:
        undo, note = bench.pin_to_cpu(0, engine)
        assert os.sched_getaffinity(0) == {0}
        if postmaster:  # a local server (always so for the embedded one)
            assert os.sched_getaffinity(postmaster) == {0}
            with engine.connect() as connection:  # a backend forked now inherits the CPU
                fresh = connection.execute(text("SELECT pg_backend_pid()")).scalar()
                assert fresh != backend and os.sched_getaffinity(fresh) == {0}
            assert "pinned to CPU 0" in note
        undo()
        assert os.sched_getaffinity(0) == mine
        if postmaster:
            assert os.sched_getaffinity(postmaster) == server
    finally:
        engine.dispose()


def test_cleanup_steps_each_run_when_an_earlier_one_fails(pg_url, monkeypatch):
    import fastpgcache.embedded

    done = []

    class Server:  # the embedded server's start/stop, on the test server
        url = pg_url

        def start(self):
            return self

        def stop(self):
            done.append("server stopped")

    def failing_close(scratch, close=bench._Scratch.close):
        close(scratch)
        raise RuntimeError("close failed")

    def no_workloads(settings):
        raise KeyboardInterrupt  # stop the run before measuring: only its cleanup is under test

    monkeypatch.setattr(fastpgcache.embedded, "EmbeddedPostgres", Server)
    monkeypatch.setattr(bench, "pin_to_cpu", lambda cpu, engine, redis_url: (lambda: done.append("unpinned"), None))
    monkeypatch.setattr(bench._Scratch, "close", failing_close)
    monkeypatch.setattr(bench, "build_workloads", no_workloads)
    with pytest.raises(RuntimeError, match="close failed"):
        bench.run_bench(settings=TINY, progress=False, exclude={DJANGO})
    assert done == ["unpinned", "server stopped"]
