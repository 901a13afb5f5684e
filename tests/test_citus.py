"""The cache on a real Citus cluster (coordinator + 2 workers): every public call on a table distributed on
`key`, through the coordinator and through a worker; isolation between real roles; the caller's transaction
across workers (two-phase commit); expiry, cleanup, trimming and culling; the stampede claim; failsafe with a
worker down; the shards each call touches; the guard switching off; clients entering through several nodes."""
from __future__ import annotations

import logging
import re
import threading
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from fastpgcache import Cache, CacheError, CacheLimitError, CachePermissionError, FastPgCache, escape_glob, setup_cache
from fastpgcache.distributed import multi_host_url
from fastpgcache.guard import NegativeLookupGuard

pytestmark = [pytest.mark.citus, pytest.mark.own_server]

ENTRIES = ("coordinator", "worker0")


@pytest.fixture(scope="module")
def app(citus_role):
    """A LOGIN role used by most tests here: (name, urls)."""
    return citus_role("app")


@pytest.fixture
def engines():
    made = []

    def make(url, **options):
        made.append(create_engine(url, **options))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


def shard_of(admin, schema: str, key: str) -> int:
    with admin.connect() as connection:
        return connection.execute(text("SELECT get_shard_id_for_distribution_column(:t, :k)"),
                                  {"t": f"{schema}.cache", "k": key}).scalar()


def port_of(admin, shard: int) -> int:
    with admin.connect() as connection:
        return connection.execute(text(
            "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n ON n.groupid = p.groupid"
            " WHERE p.shardid = :s"), {"s": shard}).scalar()


def entry_of(citus, port: int) -> str:
    """The `citus_role` URL name of the worker listening on `port`."""
    return f"worker{[make_url(url).port for url in citus.worker_urls].index(port)}"


def keys_on(admin, schema: str, port: int, count: int, prefix: str = "k") -> list[str]:
    """`count` keys whose shard is on the worker listening on `port`."""
    found, i = [], 0
    while len(found) < count:
        key = f"{prefix}{i}"
        if port_of(admin, shard_of(admin, schema, key)) == port:
            found.append(key)
        i += 1
    return found


# -- every public call -----------------------------------------------------------------------

@pytest.mark.parametrize("entry", ENTRIES)
def test_every_public_call_on_the_distributed_table(citus_shared, app, engines, entry):
    name, urls = app
    cache = Cache(engines(urls[entry]), schema=citus_shared, expire_every=None)
    tag = f"{entry}:"
    cache.clear(escape_glob(tag) + "*")
    assert cache.set(tag + "a", {"n": 1}) is True and cache.get(tag + "a") == {"n": 1}
    assert cache.set(tag + "a", 2, nx=True) is False and cache.get(tag + "a") == {"n": 1}
    assert cache.set(tag + "b", "two", nx=True) is True
    assert cache.set(tag + "a", 3, xx=True) is True and cache.get(tag + "a") == 3
    assert cache.set(tag + "none", 1, xx=True) is False and cache.exists(tag + "none") is False
    many = {f"{tag}m{i}": [i] for i in range(40)}  # 40 keys: every one of the 8 shards
    assert cache.set_many(many, ttl=300) == 40
    assert cache.get_many([*many, tag + "missing"]) == many
    assert cache.delete(tag + "b") is True and cache.delete(tag + "b") is False
    assert cache.delete_many([f"{tag}m{i}" for i in range(10)] + [tag + "missing"]) == 10
    assert cache.ttl(tag + "m10") == 300 and cache.ttl(tag + "a") == -1 and cache.ttl(tag + "missing") == -2
    assert cache.expire(tag + "a", 60) is True and cache.ttl(tag + "a") == 60
    assert cache.persist(tag + "a") is True and cache.ttl(tag + "a") == -1 and cache.persist(tag + "a") is False
    assert cache.incr(tag + "n", 5) == 5 and cache.decr(tag + "n", 2) == 3 and cache.incr(tag + "n") == 4
    assert cache.incr(tag + "never", create=False) is None and cache.exists(tag + "never") is False
    assert cache.set(tag + "a", "x")
    with pytest.raises(ValueError, match="not an integer"):
        cache.incr(tag + "a")
    expected = sorted([tag + "a", tag + "n", *(f"{tag}m{i}" for i in range(10, 40))])
    assert cache.keys(escape_glob(tag) + "*") == expected
    assert list(cache.scan_iter(escape_glob(tag) + "*", batch_size=7)) == expected
    assert cache.clear(escape_glob(tag) + "m1?") == 10
    assert cache.set(tag + "short", 1, ttl=0.05) and cache.set(tag + "short2", 1, ttl=0.05)
    time.sleep(0.1)
    assert cache.get(tag + "short") is None and cache.exists(tag + "short2") is False
    stats = cache.stats()
    assert stats["entries"] >= 22 and stats["expired"] >= 2 and stats["guard"] == "off"
    assert cache.cleanup(batch_size=1) >= 2 and cache.cleanup() == 0
    calls = []
    assert cache.get_or_set(tag + "computed", lambda: calls.append(1) or "fresh", ttl=60) == "fresh"
    assert cache.get_or_set(tag + "computed", lambda: calls.append(1) or "again", ttl=60) == "fresh"
    assert calls == [1]
    assert cache.clear(escape_glob(tag) + "*") == 23 and cache.keys(escape_glob(tag) + "*") == []


def test_cleanup_of_every_role_by_the_superuser_through_any_node(citus, citus_schema, citus_role, engines, citus_admin):
    schema = citus_schema()
    for prefix in ("alice", "bob"):
        _, urls = citus_role(prefix)
        Cache(engines(urls["worker1"]), schema=schema, expire_every=None).set_many(
            {f"k{i}": i for i in range(12)}, ttl=0.05)
    time.sleep(0.1)
    assert Cache(engines(citus.worker_urls[0]), schema=schema).cleanup(batch_size=5, all_users=True) == 24
    assert Cache(citus_admin, schema=schema).cleanup(all_users=True) == 0


def test_limits_and_quotas_hold_on_every_node(citus_admin, citus_schema, citus_role, engines):
    schema = citus_schema(quota_entries=5, max_value_bytes=100)
    _, urls = citus_role("quota")
    through = {entry: Cache(engines(urls[entry]), schema=schema, expire_every=None)
               for entry in ("coordinator", "worker1")}
    assert through["coordinator"].set_many({"a": 1, "b": 2, "c": 3}) == 3
    assert through["worker1"].set("d", 4) and through["worker1"].incr("e") == 1  # delegated calls: on the key's worker
    for cache in through.values():
        with pytest.raises(CacheLimitError, match="quota exceeded"):
            cache.set("f", 6)
        with pytest.raises(CacheLimitError, match="at most 100 bytes"):
            cache.set("a", "x" * 200)
    assert through["worker1"].delete("a") and through["coordinator"].set("f", 6)
    with through["coordinator"].bind.connect() as connection:
        usage = connection.execute(text(f'SELECT entries FROM "{schema}".cache_usage')).scalar()
    assert usage == 5 and sorted(through["worker1"].keys()) == ["b", "c", "d", "e", "f"]


def test_limits_changed_after_setup_hold_on_every_node(citus_admin, citus_schema, citus_role, engines):
    # The limits are constant functions on every node (migration 0006): a change must reach the
    # workers' copies, which the calls delegated to a key's worker read.
    schema = citus_schema()
    _, urls = citus_role("relimit")
    through = {entry: Cache(engines(urls[entry]), schema=schema, expire_every=None)
               for entry in ("coordinator", "worker1")}
    for cache in through.values():
        assert cache.set("a", "x" * 300) and cache.incr("n") >= 1  # every node's plans hold today's limits
    setup_cache(engine=citus_admin, schema=schema, max_value_bytes=200, quota_entries=2)
    for cache in through.values():
        with pytest.raises(CacheLimitError, match="at most 200 bytes"):
            cache.set("a", "y" * 300)
        with pytest.raises(CacheLimitError, match="quota exceeded"):
            cache.set("b", 1)
    setup_cache(engine=citus_admin, schema=schema, max_value_bytes=1000, quota_entries=0)
    assert all(cache.set("a", "y" * 300) and cache.set(f"b-{entry}", 1) for entry, cache in through.items())


def test_expiry_on_write_trimming_and_culling_in_bounded_batches(citus_admin, citus_schema, citus_role, engines):
    schema = citus_schema()
    _, urls = citus_role("trim")
    engine = engines(urls["coordinator"])
    writer = Cache(engine, schema=schema, expire_every=1)
    writer.set_many({f"old{i}": i for i in range(30)}, ttl=0.05)
    time.sleep(0.1)
    writer.set_many({f"new{i}": i for i in range(15)})  # due: up to twice the 15 rows written, on 8 shards
    assert writer.stats()["expired_on_write"] == 30 and writer.stats()["expired"] == 0
    capped = Cache(engine, schema=schema, expire_every=1, max_entries=10)
    for i in range(15):
        capped.set(f"t{i:02d}", i)
    # The role's 10 newest entries stay: the new* ones, older, went first.
    assert capped.stats()["trimmed"] == 20 and capped.keys() == [f"t{i:02d}" for i in range(5, 15)]
    capped.clear()
    culled = Cache(engine, schema=schema, expire_every=None, cull_max_entries=6, cull_frequency=2)
    for i in range(8):
        culled.set(f"c{i}", i)
    # The 8th write found 7 entries (more than 6): half of them, oldest first, made room.
    assert culled.keys() == ["c3", "c4", "c5", "c6", "c7"]


# -- isolation between real roles --------------------------------------------------------------

def test_roles_see_and_write_only_their_own_rows_on_every_node(citus, citus_shared, citus_role, engines, citus_admin):
    alice, alice_urls = citus_role("alice")
    mallory, mallory_urls = citus_role("mallory")
    Cache(engines(alice_urls["coordinator"]), schema=citus_shared).set_many(
        {f"secret{i}": "alice's" for i in range(16)})
    for entry in ("coordinator", "worker0", "worker1"):
        spy = Cache(engines(mallory_urls[entry]), schema=citus_shared)
        assert spy.get_many([f"secret{i}" for i in range(16)]) == {} and spy.keys() == []
        with pytest.raises(CachePermissionError):
            Cache(spy.bind, schema=citus_shared, user_id=alice).set("secret0", "forged")
        with spy.bind.connect() as connection:
            assert connection.execute(text(f'SELECT count(*) FROM "{citus_shared}".cache_secrets'
                                           " WHERE user_id <> current_user")).scalar() == 0
            with pytest.raises(sa_exc.ProgrammingError, match="permission denied"):
                connection.execute(text(f"INSERT INTO \"{citus_shared}\".cache (user_id, key, value) "
                                        f"VALUES ('{alice}', 'secret0', 'x')"))
    # A worker's shard, read or locked by name, is no way around it either.
    shard = shard_of(citus_admin, citus_shared, "secret0")
    on_worker = engines(mallory_urls[entry_of(citus, port_of(citus_admin, shard))])
    with on_worker.connect() as connection:
        assert connection.execute(text(f'SELECT count(*) FROM "{citus_shared}".cache_{shard}')).scalar() == 0
    for statement in (f"UPDATE \"{citus_shared}\".cache_{shard} SET value = 'x'",
                      f"LOCK TABLE \"{citus_shared}\".cache_{shard} IN EXCLUSIVE MODE NOWAIT"):
        with on_worker.begin() as connection:
            # Citus refuses changes to a shard by name; with that switched off, PostgreSQL's privileges still do.
            connection.execute(text("SET LOCAL citus.enable_manual_changes_to_shards = on"))
            with pytest.raises(sa_exc.ProgrammingError, match="permission denied"):
                connection.execute(text(statement))
    assert Cache(engines(alice_urls["worker1"]), schema=citus_shared).get("secret0") == "alice's"


# -- the caller's transaction ------------------------------------------------------------------

def test_a_session_s_writes_commit_on_both_workers_by_two_phase_commit_or_not_at_all(citus, citus_shared, app, engines,
                                                                                      citus_admin):
    _, urls = app
    engine = engines(urls["coordinator"])
    ports = [make_url(url).port for url in citus.worker_urls]
    keys = keys_on(citus_admin, citus_shared, ports[0], 3, "tx") + keys_on(citus_admin, citus_shared, ports[1], 3, "tx")
    with Session(engine) as session:
        cache = Cache(session, schema=citus_shared)
        assert cache.get_many(keys) == {} and cache.set_many({key: key for key in keys}) == 6
        session.rollback()
    assert Cache(engine, schema=citus_shared).get_many(keys) == {}
    with Session(engine) as session:
        raw = session.connection().connection.dbapi_connection
        session.execute(text("SET LOCAL citus.log_remote_commands = on"))
        cache = Cache(session, schema=citus_shared)
        cache.set_many({key: key for key in keys})
        cache.delete(keys[0])
        del raw.notices[:]
        session.commit()
        prepared = [note for note in raw.notices if "PREPARE TRANSACTION" in note]
    # One prepared transaction per worker connection the statements used (a batch may use several per worker).
    assert {int(re.search(r":(\d+) connectionId", note).group(1)) for note in prepared} == set(ports)
    assert len([note for note in raw.notices if "COMMIT PREPARED" in note]) == len(prepared)
    assert Cache(engines(urls["worker1"]), schema=citus_shared).get_many(keys) == {key: key for key in keys[1:]}


def test_reading_a_shard_the_transaction_wrote_fails_clearly_and_other_shards_read(citus, citus_shared, app, engines,
                                                                                      citus_admin):
    # Citus cannot read, as this role, a shard that the write functions (running as the owner) wrote in this
    # transaction: the error says so, and what to do.
    _, urls = app
    ports = [make_url(url).port for url in citus.worker_urls]
    written, other = (keys_on(citus_admin, citus_shared, port, 1, "rw")[0] for port in ports)
    Cache(engines(urls["coordinator"]), schema=citus_shared).set(other, "committed")
    with Session(engines(urls["coordinator"])) as session:
        cache = Cache(session, schema=citus_shared)
        assert cache.set(written, 1) and cache.get(other) == "committed"
        with pytest.raises(CacheError, match=r"distributed by Citus\): in one transaction, read a key before"):
            cache.get(written)

# -- the stampede claim ---------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ENTRIES)
def test_a_stampede_computes_once_whichever_node_the_callers_enter_through(citus_shared, app, engines, in_threads,
                                                                           entry):
    _, urls = app
    cache = Cache(engines(urls[entry], pool_size=10), schema=citus_shared)
    key = f"stampede:{entry}"
    cache.delete(key)
    calls, results = [], []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return "computed"

    assert in_threads(lambda _: results.append(cache.get_or_set(key, slow, ttl=60)), 8, timeout=30) == []
    assert calls == [1] and results == ["computed"] * 8


def test_a_waiter_gives_up_after_its_wait_and_computes_for_itself(citus_shared, app, engines):
    _, urls = app
    cache = Cache(engines(urls["coordinator"], pool_size=4), schema=citus_shared)
    key = "stampede:held"
    cache.delete(key)
    holding, release = threading.Event(), threading.Event()

    def hold():
        holding.set()
        release.wait(10)
        return "holder"

    holder = threading.Thread(target=lambda: cache.get_or_set(key, hold, ttl=60))
    holder.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        assert cache.get_or_set(key, lambda: "waiter", ttl=60, wait=0.5) == "waiter"
        # lock_timeout stays on the coordinator, whose backend waits on the worker's answer, not on a lock;
        # the statement_timeout the claim sets (wait + 1 s) ends the wait there.
        assert 0.5 <= time.monotonic() - started < 3
    finally:
        release.set()
        holder.join(10)
    assert cache.get(key) == "holder"


# -- the shards each call touches ----------------------------------------------------------------

def test_a_single_key_read_is_one_task_and_a_batch_one_task_per_shard_it_touches(citus_shared, app, engines,
                                                                                 citus_admin):
    _, urls = app
    cache = Cache(engines(urls["coordinator"]), schema=citus_shared)

    def tasks(statement, params) -> int:
        compiled = cache._compile(statement, cache.bind.dialect)
        with cache.bind.connect() as connection:
            plan = "\n".join(row[0] for row in connection.exec_driver_sql(
                f"EXPLAIN {compiled.string}", compiled.construct_params(params)))
        return int(re.search(r"Task Count: (\d+)", plan).group(1))

    assert tasks(cache._s.get, {"k": "one"}) == 1
    assert tasks(cache._s.exists, {"k": "one"}) == 1 and tasks(cache._s.ttl, {"k": "one"}) == 1
    keys = [f"batch{i}" for i in range(5)]
    shards = {shard_of(citus_admin, citus_shared, key) for key in keys}
    assert 1 < len(shards) < 8
    from fastpgcache.statements import text_array

    assert tasks(cache._s.get_many, {"ks": text_array(keys)}) == len(shards)


def _shards_written(engine, schema, work, *, autocommit: bool) -> tuple[set[int], list[str]]:
    # The shards of the cache table that work(cache) wrote, read from Citus's log of the commands it sent to
    # the nodes (the write functions' own statements; EXPLAIN sees only the call). Rolled back unless autocommit.
    with engine.connect() as connection:
        if autocommit:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        raw = connection.connection.dbapi_connection
        cache = Cache(connection, schema=schema, expire_every=None)
        cache._identity_now()
        connection.exec_driver_sql("SET citus.log_remote_commands = on")
        del raw.notices[:]
        try:
            work(cache)
        finally:
            notes = list(raw.notices)
            connection.rollback()
            connection.exec_driver_sql("RESET citus.log_remote_commands")
    pattern = re.compile(rf"issuing (?:INSERT INTO|DELETE FROM|UPDATE) {schema}\.cache_(\d+)\b")
    return {int(shard) for note in notes for shard in pattern.findall(note)}, notes


def test_a_single_key_write_touches_one_shard_and_a_batch_one_per_shard(citus_shared, app, engines, citus_admin):
    _, urls = app
    engine = engines(urls["coordinator"])
    one = shard_of(citus_admin, citus_shared, "w:one")
    assert _shards_written(engine, citus_shared, lambda c: c.set("w:one", 1), autocommit=False)[0] == {one}
    assert _shards_written(engine, citus_shared, lambda c: c.incr("w:one"), autocommit=False)[0] == {one}
    keys = [f"w:batch{i}" for i in range(5)]
    shards = {shard_of(citus_admin, citus_shared, key) for key in keys}
    written = _shards_written(engine, citus_shared, lambda c: c.set_many({k: 1 for k in keys}), autocommit=False)
    assert written[0] == shards
    assert _shards_written(engine, citus_shared, lambda c: c.delete_many(keys), autocommit=False)[0] == shards
    # Outside a transaction Citus hands the whole call to the key's worker: one command, nothing else.
    _, notes = _shards_written(engine, citus_shared, lambda c: c.set("w:one", 2), autocommit=True)
    issued = [note for note in notes if "issuing" in note]
    assert len(issued) == 1 and "_set(" in issued[0] and f":{port_of(citus_admin, one)} " in issued[0]


# -- the negative-lookup guard -------------------------------------------------------------------

def test_the_guard_is_off_on_a_distributed_table_and_never_answers_absent(citus_shared, app, caplog):
    _, urls = app
    with caplog.at_level(logging.WARNING, logger="fastpgcache.guard"):
        client = FastPgCache(url=urls["coordinator"], schema=citus_shared, use_cuckoo_filter=True)
        try:
            deadline = time.monotonic() + 10
            while not client.guard.state.startswith("off") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert "distributed by Citus" in client.guard.state
            assert client.guard.definitely_absent("anything") is False
            client.set("g:present", 1)
            assert client.get("g:present") == 1 and client.stats()["guard_skips"] == 0
        finally:
            client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "fastpgcache.guard"]
    assert len(lines) == 1 and "Citus" in lines[0]


def test_distributing_a_table_turns_its_guards_off_at_once(citus_admin, citus_role, engines):
    from uuid import uuid4

    schema = f"c_{uuid4().hex[:10]}"
    setup_cache(engine=citus_admin, schema=schema)  # a plain table on the coordinator: the guard works
    _, urls = citus_role("guarded")
    cache = Cache(engines(urls["coordinator"]), schema=schema)
    cache.set("k", 1)
    guard = NegativeLookupGuard(cache, heartbeat=60).start()
    try:
        assert guard.wait_until_trusted(10) and guard.definitely_absent("nope")
        setup_cache(engine=citus_admin, schema=schema, distributed=True, shard_count=4)
        deadline = time.monotonic() + 2  # the heartbeat (60 s) is far off: the conversion's own notice did it
        while not guard.state.startswith("off") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "now distributed by Citus" in guard.state and guard.definitely_absent("nope") is False
    finally:
        guard.stop()
        with citus_admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


# -- any node as the entry point -------------------------------------------------------------------

def test_a_client_spreads_its_connections_over_every_node_it_is_given(citus_shared, app, engines):
    _, urls = app
    url = multi_host_url([urls["coordinator"], urls["worker0"], urls["worker1"]])
    engine = engines(url, pool_size=20, max_overflow=0)
    ports = set()
    connections = [engine.connect() for _ in range(20)]
    try:
        for connection in connections:
            ports.add(connection.exec_driver_sql("SELECT inet_server_port()").scalar())
    finally:
        for connection in connections:
            connection.close()
    assert len(ports) >= 2  # libpq picks a random host per connection: all 20 on one node is 3 in 3**20
    client = FastPgCache(url=url, schema=citus_shared, use_cuckoo_filter=False)
    try:
        assert client.set_many({f"mh{i}": i for i in range(30)}) == 30
        assert client.get_many([f"mh{i}" for i in range(30)]) == {f"mh{i}": i for i in range(30)}
    finally:
        client.close()


def test_a_node_that_is_down_is_skipped_by_a_multi_host_url(citus_shared, app, engines):
    _, urls = app
    dead = urls["coordinator"].set(port=1)  # nothing listens there
    cache = Cache(engines(multi_host_url([dead, urls["worker1"]], load_balance=False)), schema=citus_shared)
    assert cache.set("mh:alive", 1) and cache.get("mh:alive") == 1


def test_multi_host_url_refuses_lists_it_cannot_merge():
    with pytest.raises(ValueError, match="same driver, user and database"):
        multi_host_url(["postgresql+psycopg2://a@h1/db", "postgresql+psycopg2://b@h2/db"])
    with pytest.raises(ValueError, match="list of one or more URLs"):
        multi_host_url("postgresql+psycopg2://a@h1/db")
    merged = multi_host_url(["postgresql+psycopg2://a@h1:5433/db?sslmode=require", "postgresql+psycopg2://a@h2/db"])
    assert merged.query == {"sslmode": "require", "host": ("h1:5433", "h2"), "load_balance_hosts": "random"}
    assert merged.host is None and merged.port is None  # only the query names hosts


# -- failsafe with a worker down (last: it restarts a worker of the session's cluster) ------------------

def test_failsafe_answers_misses_for_the_keys_of_a_worker_that_is_down(citus, citus_shared, app, engines, citus_admin):
    _, urls = app
    down, up = citus.workers[1], citus.workers[0]
    on_down = keys_on(citus_admin, citus_shared, down.port, 2, "fs")
    on_up = keys_on(citus_admin, citus_shared, up.port, 2, "fs")
    writer = Cache(engines(urls["coordinator"]), schema=citus_shared, expire_every=None)
    writer.set_many({key: key for key in on_down + on_up})
    errors = []
    cache = Cache(engines(urls["coordinator"]), schema=citus_shared, failsafe=True, expire_every=None,
                  on_error=lambda error, operation: errors.append(operation))
    down._stop_server("fast")
    try:
        assert cache.get(on_down[0], "default") == "default" and cache.set(on_down[1], "new") is False
        assert cache.get(on_up[0]) == on_up[0] and cache.set(on_up[1], "new") is True
        assert errors == ["get", "set"]
        assert cache.stats()["entries"] is None and errors[-1] == "stats"  # a count needs every shard
    finally:
        down.start()
        # Backends that held a connection to the stopped worker fail their next distributed statement:
        # the session's admin Engine starts over with new ones.
        citus_admin.dispose()
    deadline = time.monotonic() + 15
    while cache.get(on_down[0], "default") == "default" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cache.get(on_down[0]) == on_down[0] and cache.get(on_up[1]) == "new"
