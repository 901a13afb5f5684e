"""The negative-lookup guard: never a false miss, across connections, processes and restarts."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from fastpgcache import Cache, FastPgCache
from fastpgcache.guard import NegativeLookupGuard, _Listener, listen_sql
from fastpgcache.identity import RECENT_KEYS, Identity


def eventually(check, timeout: float = 5.0):
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.001)
    pytest.fail(f"condition not met within {timeout} s")


def start_guard(cache: Cache, capacity: int = 10_000) -> NegativeLookupGuard:
    cache.guard = NegativeLookupGuard(cache, capacity).start()
    return cache.guard


@pytest.fixture
def guarded(engine, schema):
    """A Cache whose guard is trusted."""
    cache = Cache(engine, schema=schema)
    assert start_guard(cache).wait_until_trusted(10)
    yield cache
    cache.guard.stop()


@pytest.fixture
def writer(engine, schema):
    """Another client of the same table, with no guard: writes the guarded cache has never seen."""
    return Cache(engine, schema=schema)


def url_string(pg_url) -> str:
    return make_url(pg_url).render_as_string(hide_password=False)


def test_notifications_carry_keyed_hashes_on_the_role_s_own_channel(engine, schema, writer):
    identity = writer._identity_now()
    pool = engine.pool.recreate()
    listener = _Listener(pool)
    try:
        listener.run(listen_sql(identity.channel))
        writer.set_many({"user:1": 1, "ключ": 2})
        payloads = eventually(lambda: listener.receive(0.1))
    finally:
        listener.close()
    assert sorted(" ".join(payloads).split()) == sorted([identity.token("user:1"), identity.token("ключ")])
    assert "user:1" not in payloads[0] and identity.user not in payloads[0]
    assert identity.channel.startswith("fastpgcache_") and identity.secret.hex()[:8] not in identity.channel


def test_tokens_of_keys_used_lately_are_kept_within_a_bound():
    identity = Identity("alice", b"s" * 32)
    expected = hashlib.sha256(b"s" * 32 + "ключ".encode()).hexdigest()[:16]
    assert identity.token("ключ") == identity.token("ключ") == identity.digest("ключ") == expected
    tokens = {f"k{i}": identity.token(f"k{i}") for i in range(3 * RECENT_KEYS)}
    assert all(identity.digest(key) == token for key, token in tokens.items())
    assert len(identity._recent) <= RECENT_KEYS
    assert "s" * 8 not in repr(identity) and identity == Identity("alice", b"s" * 32)


def test_a_trusted_guard_answers_misses_without_touching_the_database(engine, guarded):
    checkouts = []

    def count(*args):
        checkouts.append(1)

    event.listen(engine, "checkout", count)
    try:
        answers = [guarded.get(f"missing:{i}") for i in range(100)]
        answers += [guarded.exists("missing:x"), guarded.get_many(["missing:y", "missing:z"])]
    finally:
        event.remove(engine, "checkout", count)
    assert answers == [None] * 100 + [False, {}]
    stats = guarded.stats()
    assert stats["guard"] == "trusted" and stats["guard_skips"] >= 100
    assert len(checkouts) <= 3  # the odd false positive may go to the database; the rest never do


def test_this_process_reads_its_own_writes_at_once(guarded):
    guarded.set("plain", 1)
    assert guarded.set("only-if-new", 2, nx=True)
    guarded.set_many({"batch:1": 3, "batch:2": 4})
    guarded.incr("counter")
    assert guarded.get("plain") == 1 and guarded.get("only-if-new") == 2 and guarded.get("counter") == 1
    assert guarded.get_many(["batch:1", "batch:2", "nope"]) == {"batch:1": 3, "batch:2": 4}
    assert guarded.exists("plain")


def test_another_connection_s_insert_is_seen_within_the_notification_window(guarded, writer):
    assert guarded.get("elsewhere") is None
    writer.set("elsewhere", "hello")
    assert eventually(lambda: guarded.get("elsewhere"), timeout=2) == "hello"
    assert guarded.stats()["guard"] == "trusted"


def test_warm_up_holds_expired_rows_so_a_revived_key_is_not_missed(engine, schema, writer):
    writer.set("revived", "old", ttl=0.2)
    time.sleep(0.3)
    cache = Cache(engine, schema=schema)
    assert start_guard(cache).wait_until_trusted(10)
    try:
        assert cache.get("revived") is None
        writer.set("revived", "new")  # ON CONFLICT DO UPDATE: no insert notification
        assert cache.get("revived") == "new"
    finally:
        cache.guard.stop()


def test_a_key_written_again_skips_the_filter_only_while_the_same_filters_hold_it(guarded, engine):
    # remember() skips keys it put in the same filters lately (a filter never loses a key). A rebuilt
    # filter holds the table's keys only, so keys remembered before the rebuild must go into it again.
    guard = guarded.guard
    keys = [f"not-in-the-table:{i}" for i in range(20)]
    guard.remember(keys)
    guard.remember(keys)  # again: nothing to add
    assert not any(guard.definitely_absent(key) for key in keys)
    before = guard.warm_ups
    with engine.connect() as connection:  # what a statement too big to list sends
        connection.execute(text("SELECT pg_notify(:channel, 'reset')"), {"channel": guard.channel})
        connection.commit()
    eventually(lambda: guard.warm_ups > before)  # the reset has untrusted the filters: a new one is filling
    assert guard.wait_until_trusted(10)
    assert sum(guard.definitely_absent(key) for key in keys) >= 18  # a bloom filter's odd false positive
    guard.remember(keys)
    assert not any(guard.definitely_absent(key) for key in keys)


def test_a_statement_too_big_to_list_resets_every_guard(guarded, writer):
    keys = [f"bulk:{i}" for i in range(30_000)]  # more than the trigger lists (28,800)
    writer.set_many(dict.fromkeys(keys, 1))
    assert eventually(lambda: guarded.guard.state == "trusted" and len(guarded.get_many(keys)) == len(keys))


def test_the_filter_is_rebuilt_larger_when_it_passes_its_capacity(engine, schema, writer):
    cache = Cache(engine, schema=schema)
    guard = start_guard(cache, capacity=100)
    assert guard.wait_until_trusted(10)
    try:
        keys = [f"k{i}" for i in range(300)]
        writer.set_many(dict.fromkeys(keys, "v"))
        eventually(lambda: guard.stats()["filter_capacity"] >= 300 and guard.state == "trusted")
        assert len(cache.get_many(keys)) == 300
    finally:
        guard.stop()


def test_on_a_table_without_write_functions_the_guard_turns_off_with_one_log_line(engine, schema, writer, caplog):
    writer.set("present", 1)
    with engine.begin() as connection:  # as an older table, before migration 0004
        connection.execute(text(f'DROP FUNCTION "{schema}".cache_set'))
    cache = Cache(engine, schema=schema)
    with caplog.at_level(logging.WARNING, logger="fastpgcache.guard"):
        guard = start_guard(cache)
        assert guard.wait_until_trusted(5) is False
    assert guard.state.startswith(f"off: {schema}.cache has no write function cache_set")
    assert [r.getMessage() for r in caplog.records if "fastpgcache-admin" in r.getMessage()] != []
    assert len(caplog.records) == 1
    assert cache.get("present") == 1 and cache.get("absent") is None
    assert cache.stats()["guard_skips"] == 0


def test_without_pybloomfiltermmap3_the_guard_turns_off(engine, schema, writer, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pybloomfilter", None)  # makes `import pybloomfilter` fail
    writer.set("present", 1)
    cache = Cache(engine, schema=schema)
    with caplog.at_level(logging.WARNING, logger="fastpgcache.guard"):
        guard = start_guard(cache)
    assert "pip install 'fastpgcache[bloom]'" in guard.state and len(caplog.records) == 1
    assert cache.get("present") == 1


def listening(engine, pid: int) -> bool:
    """Whether the guard's listener backend is still there."""
    with engine.connect() as connection:
        alive = connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid})
        return alive.scalar() == 1


def test_a_dropped_listener_stops_answering_until_it_has_re_warmed(engine, guarded, writer):
    guard = guarded.guard
    first = guard._listener.pid
    with engine.begin() as connection:
        killed = connection.execute(text("SELECT pg_terminate_backend(:p)"), {"p": first}).scalar()
    assert killed
    eventually(lambda: guard.state != "trusted", timeout=2)
    writer.set("while-away", 1)
    # Nobody listens now (the reconnect waits 0.5 s), so no notification of this key
    # will ever arrive: only the re-warm can put it in the filter.
    assert not listening(engine, first) and guard._listener.pid == first
    assert not guard.definitely_absent("while-away") and not guard.definitely_absent("never-written")
    skips = guarded.stats()["guard_skips"]
    assert guarded.get("while-away") == 1 and guarded.get("never-written") is None
    assert guarded.stats()["guard_skips"] == skips  # untrusted: both went to the database
    assert guard.wait_until_trusted(10)
    assert guard._listener.pid != first and listening(engine, guard._listener.pid)
    assert not guard.definitely_absent("while-away") and guarded.get("while-away") == 1
    assert guard.definitely_absent("never-written") or guard.definitely_absent("never-written-2")


def test_a_guard_hears_only_its_own_role(schema, role_engine):
    (alice, alice_engine), (_, bob_engine) = role_engine("alice"), role_engine("bob")
    alice_writer, bob_writer = Cache(alice_engine, schema=schema), Cache(bob_engine, schema=schema)
    alice_writer.set("before", 1)
    cache = Cache(alice_engine, schema=schema, user_id=alice)
    guard = start_guard(cache)
    assert guard.wait_until_trusted(10)
    try:
        assert not guard.definitely_absent("before") and cache.get("before") == 1
        alice_writer.set("after", 2)
        bob_writer.set("bob-only", 3)
        assert eventually(lambda: cache.get("after"), timeout=2) == 2
        cache.set("own", 4)
        assert cache.get("own") == 4
        # bob's channel and hashes are his own: alice's guard never hears of his key
        assert cache.get("bob-only") is None and bob_writer.get("bob-only") == 3
        assert guard.state == "trusted" and guard.definitely_absent("bob-only")
    finally:
        guard.stop()


def test_no_false_absent_while_the_filter_is_rebuilt_for_size(engine, schema, writer):
    cache = Cache(engine, schema=schema)
    guard = start_guard(cache, capacity=50)
    assert guard.wait_until_trusted(10)
    try:
        own, theirs = [], []
        for batch in range(60):
            keys = [f"own:{batch}:{i}" for i in range(10)]
            cache.set_many(dict.fromkeys(keys, batch))
            own += keys
            # this process's writes are in every filter, old and new, before set_many returns
            assert len(cache.get_many(own)) == len(own), f"false absent in batch {batch} ({guard.state})"
            writer.set(f"theirs:{batch}", batch)
            theirs.append(f"theirs:{batch}")
        assert guard.stats()["filter_capacity"] >= 600  # rebuilt several times meanwhile
        assert eventually(lambda: guard.state == "trusted" and len(cache.get_many(theirs)) == len(theirs))
        assert all(not guard.definitely_absent(key) for key in own + theirs)
    finally:
        guard.stop()


@pytest.fixture
def replica_writer(pg_url, schema):
    """A client whose sessions run with session_replication_role = replica (bulk loads, logical replication)."""
    engine = create_engine(pg_url, connect_args={"options": "-c session_replication_role=replica"})
    yield Cache(engine, schema=schema)
    engine.dispose()


def test_a_writer_in_replica_mode_still_notifies_the_guard(guarded, replica_writer):
    with replica_writer.bind.connect() as connection:
        assert connection.execute(text("SHOW session_replication_role")).scalar() == "replica"
    assert guarded.get("replicated") is None
    replica_writer.set("replicated", "applied")
    assert eventually(lambda: guarded.get("replicated"), timeout=2) == "applied"
    assert guarded.guard.state == "trusted"


@pytest.mark.parametrize("change, reason", [
    ("GRANT INSERT ON {table} TO PUBLIC", "may write"),
    ('ALTER FUNCTION "{schema}".cache_set SECURITY INVOKER', "SECURITY DEFINER"),
    ('DROP FUNCTION "{schema}".cache_set_many', "no write function"),
])
def test_a_way_around_the_write_functions_turns_the_guard_off_within_a_heartbeat(
        engine, schema, writer, caplog, change, reason):
    cache = Cache(engine, schema=schema)
    cache.guard = NegativeLookupGuard(cache, 1000, heartbeat=0.2).start()
    assert cache.guard.wait_until_trusted(10)
    with caplog.at_level(logging.WARNING, logger="fastpgcache.guard"):
        with engine.begin() as connection:
            connection.execute(text(change.format(table=f'"{schema}".cache', schema=schema)))
        eventually(lambda: cache.guard.state.startswith("off"), timeout=2)
        writer.set("unannounced", 1)
        assert cache.get("unannounced") == 1 and not cache.guard.definitely_absent("unannounced")
    assert reason in cache.guard.state
    assert len([r for r in caplog.records if "negative-lookup guard" in r.getMessage()]) == 1
    cache.guard.stop()


def test_the_heartbeat_must_be_a_positive_number(engine, schema):
    with pytest.raises(ValueError, match="heartbeat must be a positive number of seconds"):
        NegativeLookupGuard(Cache(engine, schema=schema), heartbeat=0)


def test_an_old_psycopg_3_turns_the_guard_off(pg_url, schema, writer, monkeypatch, caplog):
    import psycopg

    monkeypatch.setattr(psycopg, "__version__", "3.2.9")
    engine = create_engine(make_url(pg_url).set(drivername="postgresql+psycopg"))
    writer.set("present", 1)
    cache = Cache(engine, schema=schema)
    try:
        with caplog.at_level(logging.WARNING, logger="fastpgcache.guard"):
            guard = start_guard(cache)
            assert guard.wait_until_trusted(5) is False
        assert "psycopg 3.2.9" in guard.state and "psycopg[binary]>=3.3" in guard.state
        assert len(caplog.records) == 1
        assert cache.get("present") == 1 and cache.stats()["guard_skips"] == 0
    finally:
        guard.stop()
        engine.dispose()


def test_a_current_psycopg_3_guard_learns_other_connections_inserts(pg_url, schema, writer):
    engine = create_engine(make_url(pg_url).set(drivername="postgresql+psycopg"))
    cache = Cache(engine, schema=schema)
    try:
        assert start_guard(cache).wait_until_trusted(10)
        assert cache.get("via-psycopg3") is None
        writer.set("via-psycopg3", 1)
        assert eventually(lambda: cache.get("via-psycopg3"), timeout=2) == 1
    finally:
        cache.guard.stop()
        engine.dispose()


def test_close_stops_the_listener_thread(pg_url, schema):
    client = FastPgCache(url=url_string(pg_url), schema=schema)
    assert client.guard.wait_until_trusted(10)
    client.close()
    assert not client.guard._thread.is_alive() and client.guard.state == "stopped"
    off = FastPgCache(url=url_string(pg_url), schema=schema, use_cuckoo_filter=False)
    assert off.guard is None and off.stats()["guard"] == "off"
    off.close()


def test_bad_capacity_is_refused(pg_url, schema):
    with pytest.raises(ValueError, match="cuckoo_capacity must be a positive int"):
        FastPgCache(url=url_string(pg_url), schema=schema, cuckoo_capacity=0)


# -- two OS processes -------------------------------------------------------------------

WRITER = """
import os, sys, time
from fastpgcache import FastPgCache
cache = FastPgCache(url=os.environ["FPC_URL"], schema=os.environ["FPC_SCHEMA"], use_cuckoo_filter=False, maxconn=1)
if sys.argv[1] == "one":
    cache.set(sys.argv[2], "from B")
else:
    cache.set_many({f"b:{i}": i for i in range(int(sys.argv[2]))})
print(time.time(), flush=True)
cache.close()
"""


def run_writer(pg_url, schema, *args) -> subprocess.Popen:
    # The URL travels in the environment, never on a command line.
    env = {**os.environ, "FPC_URL": url_string(pg_url), "FPC_SCHEMA": schema}
    return subprocess.Popen([sys.executable, "-c", WRITER, *args], env=env, stdout=subprocess.PIPE, text=True)


def test_a_key_written_by_another_process_is_read_within_100_ms(pg_url, schema):
    reader = FastPgCache(url=url_string(pg_url), schema=schema)
    try:
        assert reader.guard.wait_until_trusted(10)
        assert reader.get("from-b") is None
        writer = run_writer(pg_url, schema, "one", "from-b")
        value = eventually(lambda: reader.get("from-b"), timeout=15)
        seen = time.time()
        committed = float(writer.communicate(timeout=15)[0])
        assert value == "from B"
        assert seen - committed < 0.1, f"seen {1000 * (seen - committed):.1f} ms after the commit"
        print(f"another process's key read {1000 * (seen - committed):.1f} ms after its commit")

        writer = run_writer(pg_url, schema, "many", "10000")
        assert writer.wait(timeout=30) == 0
        keys = [f"b:{i}" for i in range(10_000)]
        found = eventually(lambda: len(reader.get_many(keys)) == 10_000 and reader.get_many(keys), timeout=2)
        assert found == {key: i for i, key in enumerate(keys)}
        assert reader.stats()["guard"] == "trusted"
    finally:
        reader.close()


def test_a_restarted_process_sees_keys_written_before_it_started(pg_url, schema):
    assert run_writer(pg_url, schema, "many", "5000").wait(timeout=30) == 0
    restarted = FastPgCache(url=url_string(pg_url), schema=schema)
    try:
        assert restarted.guard.wait_until_trusted(10)
        keys = [f"b:{i}" for i in range(5000)]
        assert len(restarted.get_many(keys)) == 5000
        assert all(restarted.get(key) is not None for key in keys[:500])
        assert restarted.stats()["misses"] == 0
    finally:
        restarted.close()


# -- behind a transaction-mode pooler -----------------------------------------------------

@pytest.fixture
def pgbouncer(start_pgbouncer):
    return start_pgbouncer()


def test_behind_pgbouncer_in_transaction_mode_the_guard_turns_off_and_reads_stay_right(
        pgbouncer, schema, writer, caplog):
    writer.set("before", 1)
    with caplog.at_level(logging.WARNING, logger="fastpgcache.guard"):
        pooled = FastPgCache(url=pgbouncer, schema=schema, prepare_threshold=None)
        try:
            assert pooled.guard.wait_until_trusted(10) is False
            assert pooled.guard.state.startswith("off: notifications do not reach this process")
            writer.set("after", 2)
            assert pooled.get("before") == 1 and pooled.get("after") == 2 and pooled.get("never") is None
            assert pooled.get_many(["before", "after", "never"]) == {"before": 1, "after": 2}
            assert pooled.stats()["guard_skips"] == 0
        finally:
            pooled.close()
    assert len([r for r in caplog.records if "pgbouncer" in r.getMessage()]) == 1
