"""Faults: restarts, crashes, killed backends, an exhausted pool, timeouts. Real servers, really broken."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from fastpgcache import Cache, CacheConnectionError, CacheTimeoutError, FastPgCache, setup_cache
from fastpgcache.embedded import EmbeddedPostgres


@pytest.fixture(scope="module")
def server():
    """A server of this module's own, so its tests can restart and crash it."""
    pg = EmbeddedPostgres().start()
    yield pg
    pg.stop(mode="immediate")
    pg.stop()


@pytest.fixture
def own_schema(server):
    name = f"t_{uuid.uuid4().hex[:12]}"
    setup_cache(url=server.url, schema=name)
    return name


def _eventually(read, expected, seconds=3.0):
    # The guard may need a notification's delay to learn of another process's write.
    deadline = time.monotonic() + seconds
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


@pytest.mark.own_server
def test_every_call_after_a_restart_succeeds(server, own_schema, in_threads):
    with FastPgCache(url=server.url, schema=own_schema, minconn=4, maxconn=4) as cache:
        cache.set("k", "v")
        assert cache.incr("n") == 1
        server.restart(mode="fast")
        assert cache.get("k") == "v"  # a clean shutdown keeps an UNLOGGED table
        assert cache.set("k2", 2) is True
        assert cache.incr("n") == 2  # not retried: the dead connection was dropped before it was sent
        server.restart(mode="fast")

        def busy(i):
            for j in range(5):
                cache.set(f"t{i}:{j}", j)
                assert cache.get(f"t{i}:{j}") == j
                cache.incr("shared")

        assert in_threads(busy, 8, timeout=30) == []
        assert cache.get("shared") == 40


@pytest.mark.own_server
@pytest.mark.parametrize("pool_size", [1, 4])
def test_a_plain_cache_on_an_engine_recovers_its_pool_after_a_restart(server, own_schema, pool_size):
    # Every pooled connection dies with the server: one retried read must not meet another dead one.
    engine = create_engine(server.url, pool_size=pool_size)
    try:
        cache = Cache(engine, schema=own_schema)
        cache.set("k", "v")
        held = [engine.connect() for _ in range(pool_size)]  # fill the pool with connections of the old server
        for connection in held:
            connection.close()
        server.restart(mode="fast")
        assert [cache.get("k") for _ in range(3)] == ["v", "v", "v"]
    finally:
        engine.dispose()


@pytest.mark.own_server
def test_after_a_crash_the_cache_is_empty_and_works(server, own_schema):
    with FastPgCache(url=server.url, schema=own_schema, minconn=2, maxconn=4) as cache, \
            FastPgCache(url=server.url, schema=own_schema, use_cuckoo_filter=False) as other:
        cache.set_many({f"k{i}": i for i in range(100)})
        server.restart(mode="immediate")
        assert cache.get("k1") is None  # crash recovery resets an UNLOGGED table
        assert cache.exists("k2") is False
        assert cache.get_many(["k1", "k2"]) == {}
        assert cache.set("k1", "after") is True
        assert cache.get("k1") == "after"
        assert cache.incr("n") == 1
        other.set("written-elsewhere", "fresh")
        assert _eventually(lambda: cache.get("written-elsewhere"), "fresh") == "fresh"
        assert cache.stats()["entries"] == 3


@pytest.mark.own_server
def test_a_stopped_server_gives_a_clear_error_or_a_failsafe_miss(server, own_schema):
    with FastPgCache(url=server.url, schema=own_schema, use_cuckoo_filter=False) as cache, \
            FastPgCache(url=server.url, schema=own_schema, use_cuckoo_filter=False, failsafe=True) as safe:
        cache.set("k", "v")
        server.stop(mode="immediate")
        try:
            with pytest.raises(CacheConnectionError, match="database") as raised:
                cache.get("k")
            assert "Traceback" not in str(raised.value)
            assert safe.get("k", "default") == "default"
            assert safe.set("k", "v") is False
        finally:
            server.start()
        assert cache.get("k") is None
        assert safe.set("k", "back") is True
        assert cache.get("k") == "back"


# -- on the server under test -------------------------------------------------------


def _backend_waiting_on_a_lock(engine, schema, outcome, seconds=15.0) -> int:
    # The pid of this test's cache statement once it waits on the lock: its SQL names the test's own schema,
    # or it runs as one of the cache's prepared statements (psycopg2 on FastPgCache's Engine).
    deadline = time.monotonic() + seconds
    # AUTOCOMMIT: pg_stat_activity is a snapshot taken once per transaction; each poll needs a fresh one.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        while time.monotonic() < deadline:
            pid = connection.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid() "
                "AND (position(:schema in query) > 0 OR query LIKE 'EXECUTE fastpgcache\\_%')"),
                {"schema": schema}).scalar()
            if pid:
                return pid
            time.sleep(0.02)
    raise AssertionError(f"the cache's statement never waited on the lock; the call gave {outcome}")


def _in_thread(call):
    # Run `call` in a thread; returns (thread, outcome) where outcome fills with its result or error.
    outcome = {}

    def run():
        try:
            outcome["result"] = call()
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_set_many_killed_midway_raises_clearly_and_writes_nothing(pg_url, engine, schema):
    batch = {f"k{i:04d}": i for i in range(1000)}
    with FastPgCache(url=pg_url, schema=schema, lock_timeout=20, statement_timeout=20,
                     use_cuckoo_filter=False) as cache, \
            Session(engine) as blocker:
        cache.set("enrolled", 1)  # the role's secret exists before the blocker's transaction starts
        Cache(blocker, schema=schema).set("k0500", "held by another transaction")  # not committed
        assert cache.get("k0500") is None, "the blocking row must still be uncommitted"
        thread, outcome = _in_thread(lambda: cache.set_many(batch))
        victim = _backend_waiting_on_a_lock(engine, schema, outcome)  # rows k0000..k0499 are written, k0500 waits
        with engine.connect() as admin:
            assert admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": victim}).scalar() is True
        thread.join(10)
        blocker.rollback()
        assert isinstance(outcome.get("error"), CacheConnectionError), outcome
        assert "lost the database connection during the call" in str(outcome["error"])
        assert cache.get_many(list(batch)) == {}  # all or nothing
        assert cache.set_many(batch) == 1000  # and the next call works


def test_a_killed_incr_is_not_run_twice(pg_url, engine, schema):
    with FastPgCache(url=pg_url, schema=schema, lock_timeout=20, statement_timeout=20,
                     use_cuckoo_filter=False) as cache, \
            Session(engine) as blocker:
        cache.set("n", 10)
        Cache(blocker, schema=schema).incr("n", 100)  # holds the row, not committed
        thread, outcome = _in_thread(lambda: cache.incr("n"))
        victim = _backend_waiting_on_a_lock(engine, schema, outcome)
        with engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": victim})
        thread.join(10)
        blocker.rollback()
        assert isinstance(outcome.get("error"), CacheConnectionError), outcome
        assert cache.get("n") == 10


def test_an_exhausted_pool_makes_callers_wait_then_fail_clearly(pg_url, schema):
    with FastPgCache(url=pg_url, schema=schema, minconn=0, maxconn=2, pool_timeout=0.3,
                     use_cuckoo_filter=False) as cache:
        held = [cache.bind.connect() for _ in range(2)]
        try:
            with pytest.raises(CacheTimeoutError, match=r"all 2 pooled connections \(maxconn\) stayed busy for 0.3 s"):
                cache.get("k")
            with pytest.raises(CacheTimeoutError):
                cache.get_or_set("k", lambda: 1)
        finally:
            for connection in held:
                connection.close()
        assert cache.set("k", 1) is True


def test_more_threads_than_connections_all_finish(pg_url, schema, in_threads):
    with FastPgCache(url=pg_url, schema=schema, minconn=1, maxconn=2, pool_timeout=20,
                     use_cuckoo_filter=False) as cache:
        def work(i):
            for j in range(10):
                cache.set(f"{i}:{j}", j)
                cache.get_or_set(f"shared:{j}", lambda j=j: j)
                cache.incr("total")

        assert in_threads(work, 12, timeout=60) == []
        assert cache.get("total") == 120


def test_failsafe_answers_while_the_pool_is_exhausted(pg_url, schema):
    with FastPgCache(url=pg_url, schema=schema, minconn=0, maxconn=1, pool_timeout=0.2,
                     use_cuckoo_filter=False, failsafe=True) as cache:
        held = cache.bind.connect()
        try:
            assert cache.get("k", "default") == "default"
            assert cache.stats()["last_error"].startswith("CacheTimeoutError")
        finally:
            held.close()


def test_default_timeouts_are_set_on_every_connection(pg_url, schema):
    with FastPgCache(url=pg_url, schema=schema, use_cuckoo_filter=False) as cache:
        with cache.bind.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "5s"
            assert connection.execute(text("SHOW lock_timeout")).scalar() == "1s"


def test_url_options_are_kept_beside_the_timeouts(pg_url, schema):
    url = make_url(pg_url).update_query_dict({"options": "-c work_mem=8MB"})
    with FastPgCache(url=url.render_as_string(hide_password=False), schema=schema, statement_timeout=2.5,
                     lock_timeout=None, use_cuckoo_filter=False) as cache:
        with cache.bind.connect() as connection:
            assert connection.execute(text("SHOW work_mem")).scalar() == "8MB"
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "2500ms"
            assert connection.execute(text("SHOW lock_timeout")).scalar() == "0"


def test_lock_timeout_stops_a_write_stuck_behind_a_lock(pg_url, engine, schema):
    with FastPgCache(url=pg_url, schema=schema, lock_timeout=0.2, use_cuckoo_filter=False) as cache, \
            Session(engine) as blocker:
        Cache(blocker, schema=schema).set("k", "held")
        try:
            with pytest.raises(CacheTimeoutError, match="lock_timeout"):
                cache.set("k", "mine")
        finally:
            blocker.rollback()
        assert cache.set("k", "mine") is True


def test_statement_timeout_stops_a_call_that_would_hang(pg_url, engine, schema):
    with FastPgCache(url=pg_url, schema=schema, statement_timeout=0.3, lock_timeout=None,
                     use_cuckoo_filter=False) as cache, engine.connect() as blocker:
        blocker.execute(text(f'LOCK TABLE "{schema}".cache IN ACCESS EXCLUSIVE MODE'))
        try:
            with pytest.raises(CacheTimeoutError, match="statement_timeout"):
                cache.get("k")
        finally:
            blocker.rollback()
        assert cache.get("k") is None


@pytest.mark.parametrize("options", [{"statement_timeout": 0}, {"lock_timeout": -1}, {"statement_timeout": "5s"},
                                     {"pool_timeout": 0}])
def test_bad_timeouts_are_refused(pg_url, options):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        FastPgCache(url=pg_url, use_cuckoo_filter=False, **options)
