"""`fastpgcache bench` at a tiny size: the report's structure, outputs and cleanup (never its timings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from fastpgcache import bench

TINY = bench.Settings(rounds=2, calls=3, budget_s=0.05, threads=2, thread_ops=3, batch_sizes=(10,))
LOAD = f"load {TINY.threads}x{TINY.thread_ops}"
REDIS_URL = "redis://127.0.0.1:6379"
DJANGO = "Django DatabaseCache"
ONLY_FLOOR_AND_LIBRARY = {DJANGO, "Redis", "Cache(session)", "FastPgCache, guard off", "psycopg2 LOGGED",
                          "FastPgCache LOGGED"}


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
    # The default layout, or "same" when this machine lets the process use one CPU only.
    assert report.meta["layout"] == ("split" if len(os.sched_getaffinity(0)) >= 2 else "same")
    assert table.splitlines()[0].endswith(f"layout {report.meta['layout']}")
    assert f"note: layout {report.meta['layout']}" in table
    assert all(r.contender in table for r in report.results)
    path = tmp_path / "bench.json"
    bench.write_json(report, str(path))
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "results", "goals", "notes"}
    assert data["meta"]["layout"] == report.meta["layout"]
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


def test_django_database_cache_is_measured_on_the_same_server_in_every_run_of_a_process(pg_url, tmp_path):
    # Two runs in one process, as benchmarks/goals.py does (one per layout): Django is configured once.
    script = textwrap.dedent(f"""
        from fastpgcache import bench
        for layout in ("split", "same"):
            settings = bench.Settings(rounds=1, calls=2, budget_s=0.05, threads=2, thread_ops=2,
                                      batch_sizes=(10,), layout=layout)
            report = bench.run_bench({pg_url!r}, settings=settings, progress=False,
                                     exclude={{"FastPgCache, guard off", "psycopg2 LOGGED", "FastPgCache LOGGED"}})
            bench.write_json(report, {str(tmp_path)!r} + f"/django-{{layout}}.json")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    for layout in ("split", "same"):
        data = json.loads((tmp_path / f"django-{layout}.json").read_text())
        django_rows = [r for r in data["results"] if r["contender"] == DJANGO]
        assert {r["workload"] for r in django_rows} == {"get hit", "get miss", "set", "set ttl", "incr",
                                                         "set_many(10)", "get_many(10)", "load 2x2"}, data["notes"]
        goal = next(g for g in data["goals"] if g["goal"] == "set throughput, FastPgCache / Django DatabaseCache")
        assert goal["ratio"] > 0


def _repinnable_postmaster(engine) -> int | None:
    """The local postmaster behind `engine` when this process may change its affinity, else None."""
    with engine.connect() as connection:
        backend = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        postmaster = bench.layout._local_parent(backend, "postgres")
    if postmaster and os.geteuid() not in (0, os.stat(f"/proc/{postmaster}").st_uid):
        return None  # a local server we may not re-pin: only this process is pinned
    return postmaster


def _backend_pid(connection) -> int:
    """The server process behind `connection`, whose affinity the pinning tests read."""
    return connection.execute(text("SELECT pg_backend_pid()")).scalar()


def test_local_backend_finds_a_server_process_on_this_machine_and_nothing_else(engine, pg_url):
    # floor_loop.py reads the CPU of these processes from /proc, so anything else must not pass.
    with engine.connect() as connection:
        backend = _backend_pid(connection)
    on_this_machine = make_url(pg_url).host in (None, "", "127.0.0.1", "localhost", "::1")
    assert bench.layout.local_backend(backend) is on_this_machine
    assert bench.layout.local_backend(os.getpid()) is False
    assert bench.layout.local_backend(2**22 + 1) is False  # above Linux's largest pid: no such process


@pytest.fixture
def forking_engine(pg_url):
    """An engine without a pool, so that each connect() forks a fresh backend from the postmaster."""
    engine = create_engine(pg_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def test_same_cpu_pinning_puts_client_and_local_server_on_one_cpu_and_restores_them(forking_engine):
    engine = forking_engine
    postmaster = _repinnable_postmaster(engine)
    mine, server = os.sched_getaffinity(0), os.sched_getaffinity(postmaster) if postmaster else None
    undo, note = bench.pin_to_cpu(0, engine)
    try:
        assert os.sched_getaffinity(0) == {0}
        if postmaster:  # a local server (always so for the embedded one)
            assert os.sched_getaffinity(postmaster) == {0}
            with engine.connect() as connection:  # a backend forked now inherits the CPU
                assert os.sched_getaffinity(_backend_pid(connection)) == {0}
            assert "PostgreSQL" in note and "pinned to CPU 0" in note
    finally:
        undo()
    assert os.sched_getaffinity(0) == mine
    if postmaster:
        assert os.sched_getaffinity(postmaster) == server


def test_split_layout_puts_the_local_server_on_another_cpu_and_restores_every_affinity(forking_engine):
    engine = forking_engine
    postmaster = _repinnable_postmaster(engine)
    usable = sorted(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    server = os.sched_getaffinity(postmaster) if postmaster else None
    older = engine.connect()  # a backend that exists before pinning and lives through it
    try:
        older_pid = _backend_pid(older)
        older_cpus = os.sched_getaffinity(older_pid)
        pinned = bench.apply_layout("split", engine)
        try:
            if len(usable) >= 2:
                client_cpu, server_cpu = usable[0], usable[1]  # CPUs 0 and 1 unless a cpuset says otherwise
                assert pinned.layout == "split" and pinned.note.startswith("layout split: ")
            else:
                client_cpu = server_cpu = usable[0]
                assert pinned.layout == "same" and "fell back to same" in pinned.note
            assert os.sched_getaffinity(0) == {client_cpu}
            if postmaster:
                assert f"pinned to CPU {server_cpu}" in pinned.note and "PostgreSQL" in pinned.note
                assert os.sched_getaffinity(postmaster) == {server_cpu}
                assert os.sched_getaffinity(older_pid) == {server_cpu}
            forked = engine.connect()  # forked while pinned: inherits the server's CPU, and must get it back
            forked_pid = _backend_pid(forked)
            if postmaster:
                assert os.sched_getaffinity(forked_pid) == {server_cpu}
        finally:
            pinned.undo()
        assert os.sched_getaffinity(0) == mine
        if postmaster:
            assert os.sched_getaffinity(postmaster) == server
            assert os.sched_getaffinity(older_pid) == older_cpus
            assert os.sched_getaffinity(forked_pid) == server
        forked.close()
    finally:
        older.close()


def test_split_layout_falls_back_to_same_with_one_usable_cpu(forking_engine):
    mine = os.sched_getaffinity(0)
    only = min(mine)
    os.sched_setaffinity(0, {only})  # this process may use one CPU, as under taskset or a one-CPU cpuset
    try:
        pinned = bench.apply_layout("split", forking_engine)
        try:
            assert pinned.layout == "same"
            assert pinned.note.startswith("layout same (split asked for") and "fell back to same" in pinned.note
            assert os.sched_getaffinity(0) == {only}
            postmaster = _repinnable_postmaster(forking_engine)
            if postmaster:
                assert os.sched_getaffinity(postmaster) == {only}
        finally:
            pinned.undo()
    finally:
        os.sched_setaffinity(0, mine)


def test_none_layout_pins_nothing_and_says_so(forking_engine):
    postmaster = _repinnable_postmaster(forking_engine)
    mine = os.sched_getaffinity(0)
    server = os.sched_getaffinity(postmaster) if postmaster else None
    pinned = bench.apply_layout("none", forking_engine)
    assert pinned.layout == "none" and pinned.note.startswith("layout none: nothing pinned")
    assert os.sched_getaffinity(0) == mine
    if postmaster:
        assert os.sched_getaffinity(postmaster) == server
    pinned.undo()
    assert os.sched_getaffinity(0) == mine


def test_a_run_in_the_none_layout_never_pins(pg_url, monkeypatch):
    calls = []
    monkeypatch.setattr(bench.layout, "pin_to_cpu", lambda *args, **kwargs: calls.append(args))
    settings = bench.Settings(rounds=1, calls=2, budget_s=0.05, threads=2, thread_ops=2, batch_sizes=(10,),
                              layout="none")
    report = bench.run_bench(pg_url, settings=settings, progress=False, exclude=ONLY_FLOOR_AND_LIBRARY)
    assert calls == []
    assert report.meta["layout"] == "none" and report.meta["settings"]["layout"] == "none"
    assert any(note.startswith("layout none: nothing pinned") for note in report.notes)
    assert bench.format_table(report).splitlines()[0].endswith("layout none")


def test_an_unknown_layout_is_refused_with_the_valid_ones_named(forking_engine):
    with pytest.raises(ValueError, match="split, same, none"):
        bench.Settings(layout="both")
    with pytest.raises(ValueError, match="unknown CPU layout 'shared'"):
        bench.apply_layout("shared", forking_engine)


def test_the_cli_takes_a_layout_and_no_pin_means_none(capsys):
    from fastpgcache import cli

    parse = cli.build_parser().parse_args
    assert parse(["bench"]).layout == "split"
    assert parse(["bench", "--layout", "same"]).layout == "same"
    assert parse(["bench", "--no-pin"]).layout == "none"
    for layout in bench.LAYOUTS:
        assert parse(["bench", "--layout", layout]).layout == layout
    with pytest.raises(SystemExit) as exited:
        parse(["bench", "--layout", "both"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1  # argparse's own one-line error


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
    monkeypatch.setattr(bench.layout, "pin_to_cpu", lambda client_cpu, engine, redis_url=None, *, server_cpu=None: (
        lambda: done.append("unpinned"), None))
    monkeypatch.setattr(bench._Scratch, "close", failing_close)
    monkeypatch.setattr(bench.run, "build_workloads", no_workloads)
    with pytest.raises(RuntimeError, match="close failed"):
        bench.run_bench(settings=TINY, progress=False, exclude={DJANGO})
    assert done == ["unpinned", "server stopped"]


def test_the_floor_s_table_is_unlogged_as_the_cache_s_is_and_its_logged_twin_is_not(engine, empty_schema):
    # A LOGGED floor made every floor write wait for a WAL flush (fsync=on: 323 µs against 218 µs for
    # the library's own UNLOGGED table on PostgreSQL 15), flattering the library's set ratios.
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{empty_schema}"'))
        unlogged = bench.create_floor_table(connection, empty_schema)
        connection.execute(text(f'CREATE SCHEMA "{empty_schema}_logged"'))
        logged = bench.create_floor_table(connection, f"{empty_schema}_logged", logged=True)
        kinds = [connection.execute(text(f"SELECT relpersistence FROM pg_class WHERE oid = '{name}'::regclass"))
                 .scalar() for name in (unlogged, logged)]
        connection.execute(text(f'DROP SCHEMA "{empty_schema}_logged" CASCADE'))
    assert kinds == ["u", "p"]


def test_the_library_sql_contender_replays_the_library_s_prepared_statements(pg_url, schema):
    import psycopg2
    from sqlalchemy.engine import make_url

    from fastpgcache import FastPgCache
    from fastpgcache.bench.contenders import Psycopg2Floor

    sql = bench.capture_sql(make_url(pg_url), schema)
    prepared = {statement.split()[1] for statement in sql["prepare"]}  # PREPARE <name> AS ...
    for call in ("get", "set", "incr"):
        verb, name = sql[call][0].split("(")[0].split()
        assert verb == "EXECUTE" and name in prepared
    url = make_url(pg_url)
    replay = Psycopg2Floor(bench.LIB_SQL, lambda: psycopg2.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database), sql, text_values=True)
    try:
        replay.set("replayed", {"n": 1})
        assert replay.incr("counted") == 1 and replay.incr("counted") == 2
        with FastPgCache(url=pg_url, schema=schema, use_cuckoo_filter=False) as cache:
            assert cache.get("replayed") == {"n": 1} and cache.get("counted") == 2
            cache.set("written", [1, 2])
        assert replay.get("written") == [1, 2] and replay.get("missing") is None
    finally:
        replay.close()


def test_a_raw_contender_can_run_on_the_library_s_own_connection(pg_url, schema):
    # floor_loop.py --connections shared: the replay's PREPAREs meet the library's, already made there.
    from sqlalchemy.engine import make_url

    from fastpgcache import FastPgCache
    from fastpgcache.bench.contenders import Psycopg2Floor

    def refuse():
        raise AssertionError("a contender given a connection must not open its own")

    sql = bench.capture_sql(make_url(pg_url), schema)
    replay = Psycopg2Floor(bench.LIB_SQL, refuse, sql, text_values=True)
    with FastPgCache(url=pg_url, schema=schema, use_cuckoo_filter=False, maxconn=1) as cache:
        cache.set("first", 1)
        assert cache.incr("counted") == 1 and cache.get("first") == 1  # get, set and incr prepared here
        lease = cache._leases.acquire()
        try:
            replay.use(lease.driver)
            replay.set("replayed", {"n": 1})
            assert replay.incr("counted") == 2 and replay.get("first") == 1
            replay.use(lease.driver)  # the same connection again: nothing to redo
            assert replay.get("replayed") == {"n": 1}
            backend = lease.driver.get_backend_pid()
        finally:
            cache._leases.release(lease)
        replay.close()  # closes only connections it opened: none
        assert cache.get("replayed") == {"n": 1} and cache.incr("counted") == 3
        lease = cache._leases.acquire()
        assert lease.driver.get_backend_pid() == backend
        cache._leases.release(lease)
