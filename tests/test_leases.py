"""Connections kept idle between calls (leases.py): limits, hand-offs, hang-ups, close and fork."""
from __future__ import annotations

import os
import threading
import time
import uuid

from sqlalchemy import text
from sqlalchemy.engine import make_url

from fastpgcache import Cache, FastPgCache


def _named(pg_url: str) -> tuple[str, str]:
    # A URL whose connections carry their own application_name, so the server can count them.
    name = f"leases_{uuid.uuid4().hex[:10]}"
    return make_url(pg_url).update_query_dict({"application_name": name}).render_as_string(hide_password=False), name


def _backends(engine, name: str) -> list[int]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = :n"),
                                       {"n": name}).scalars())


def test_the_client_keeps_one_idle_connection_checked_out_and_close_returns_it(engine, pg_url, schema):
    url, name = _named(pg_url)
    cache = FastPgCache(url=url, schema=schema, minconn=2, maxconn=3, use_cuckoo_filter=False)
    cache.set("k", "v")
    assert cache.get("k") == "v"
    pool = cache.bind.pool
    assert (pool.checkedout(), pool.checkedin()) == (1, 1)  # the call's connection waits, checked out, for the next
    assert len(_backends(engine, name)) == 2
    cache.close()
    assert pool.checkedout() == 0
    deadline = time.monotonic() + 5
    while _backends(engine, name) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _backends(engine, name) == []


def test_a_cache_on_your_own_engine_gives_every_connection_back(engine, schema, in_threads):
    cache = Cache(engine, schema=schema)

    def work(i):
        for j in range(20):
            cache.set(f"t{i}:{j}", j)
            assert cache.get(f"t{i}:{j}") == j

    assert in_threads(work, 6, timeout=60) == []
    assert engine.pool.checkedout() == 0  # nothing of the application's pool is held between calls


def test_the_framework_backends_engine_keeps_its_idle_connections_too(engine, pg_url, schema, in_threads):
    from fastpgcache.contrib import shared_engine

    url, name = _named(pg_url)
    framework_engine = shared_engine(url, {"pool_size": 2, "max_overflow": 0})
    cache = Cache(framework_engine, schema=schema)
    errors = in_threads(lambda i: [cache.set(f"f{i}:{j}", j) for j in range(30)], 6, timeout=60)
    assert errors == []
    assert framework_engine.pool.checkedout() <= 2 and len(_backends(engine, name)) <= 2
    assert cache.get("f5:29") == 29
    assert framework_engine.pool.checkedout() >= 1  # idle, kept for the next call
    framework_engine.dispose()


def test_more_threads_than_connections_each_get_one_in_turn(engine, pg_url, schema, in_threads):
    # Callers blocked in the pool must be handed connections that other calls release; a short
    # pool_timeout turns a starved waiter into a CacheTimeoutError this test would collect.
    url, name = _named(pg_url)
    seen = []
    with FastPgCache(url=url, schema=schema, maxconn=2, pool_timeout=3, use_cuckoo_filter=False) as cache:
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                seen.append(len(_backends(engine, name)))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()

        def work(i):
            for j in range(40):
                cache.set(f"w{i}:{j}", j)
                assert cache.get(f"w{i}:{j}") == j
                cache.incr("total")

        try:
            errors = in_threads(work, 12, timeout=60)
        finally:
            stop.set()
            watcher.join()
        assert errors == []
        assert cache.get("total") == 12 * 40
        assert max(seen) <= 2


def test_the_clients_engine_hands_out_its_idle_connection_to_anyone(pg_url, schema, in_threads):
    # cache.bind.connect() and the calls of the cache take turns on maxconn=1, neither waiting for
    # pool_timeout: a checkout from the pool takes the idle connection back, and while someone waits
    # in the pool, released connections go there instead of to the idle stack.
    with FastPgCache(url=pg_url, schema=schema, maxconn=1, pool_timeout=2, use_cuckoo_filter=False) as cache:
        cache.set("k", 0)
        with cache.bind.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
        stop = threading.Event()

        def calls(i):
            j = 0
            while not stop.is_set():
                cache.set("k", j)
                assert cache.get("k") == j
                j += 1

        def direct(i):
            try:
                for _ in range(30):
                    with cache.bind.connect() as connection:
                        assert connection.execute(text("SELECT 2")).scalar() == 2
            finally:
                stop.set()

        assert in_threads(lambda i: calls(i) if i else direct(i), 3, timeout=60) == []
        assert cache.get_or_set("fresh", lambda: "computed") == "computed"  # its lock takes a pooled connection


def test_a_connection_the_server_closed_while_idle_is_replaced_before_a_write(engine, pg_url, schema):
    url, name = _named(pg_url)
    with FastPgCache(url=url, schema=schema, minconn=2, maxconn=2, use_cuckoo_filter=False) as cache:
        assert cache.incr("n") == 1
        victims = _backends(engine, name)
        assert len(victims) == 2
        with engine.connect() as connection:
            for pid in victims:
                connection.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        deadline = time.monotonic() + 5
        while set(_backends(engine, name)) & set(victims) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Writes are never retried (incr could count twice), so this only works if the dead
        # idle connection is noticed before the statement is sent.
        assert cache.incr("n") == 2
        assert not set(_backends(engine, name)) & set(victims)


def test_the_guard_shares_the_clients_only_connection(pg_url, schema):
    # The guard's own queries (trigger check, warm-up) use the client's pool; with maxconn=1 they
    # must take the idle connection rather than wait for the pool behind it.
    with FastPgCache(url=pg_url, schema=schema, maxconn=1, pool_timeout=2) as cache:
        cache.set("k", "v")
        assert cache.guard.wait_until_trusted(10), cache.guard.state
        assert cache.get("k") == "v"
        assert cache.get("missing") is None
        assert cache.stats()["guard_skips"] == 1


def test_a_forked_child_never_uses_the_parents_connections(pg_url, schema):
    # Had the child inherited the idle connection, both processes would talk on one socket at once
    # and read each other's answers.
    with FastPgCache(url=pg_url, schema=schema, maxconn=2, use_cuckoo_filter=False) as cache:
        cache.set("shared", "before")
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            status = 1
            try:
                os.close(reader)
                ok = cache.get("shared") == "before"
                for j in range(200):
                    cache.set(f"child:{j}", j)
                    ok = ok and cache.get(f"child:{j}") == j
                os.write(writer, b"ok" if ok else b"wrong")
                status = 0
            finally:
                os._exit(status)
        os.close(writer)
        for j in range(200):
            cache.set(f"parent:{j}", j)
            assert cache.get(f"parent:{j}") == j
        with os.fdopen(reader, "rb") as answer:
            assert answer.read() == b"ok"
        assert os.waitpid(pid, 0)[1] == 0
        assert cache.get("child:199") == 199 and cache.get("parent:199") == 199
