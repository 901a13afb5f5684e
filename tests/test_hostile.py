"""Isolation against a hostile role: every attack an ordinary LOGIN role (no superuser, no BYPASSRLS)
can make around the table, made for real against another role, and what it must not achieve."""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from fastpgcache import Cache, CacheError, CacheLimitError, CachePermissionError, FastPgCache, escape_glob, setup_cache
from fastpgcache.admin import cache_status, describe, main

LOCK_MODES = ["ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE",
              "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"]


def client(engine, schema, **options) -> FastPgCache:
    """A role's own client, quick to give up: a call blocked by anyone else fails within a second."""
    return FastPgCache(url=engine.url, schema=schema, lock_timeout=0.5, statement_timeout=3, **options)


def every_call(cache: Cache, tag: str) -> None:
    """Every kind of call a victim makes, each checked; raises if any is blocked or wrong."""
    assert cache.set(f"{tag}:a", {"n": 1}) is True
    assert cache.get(f"{tag}:a") == {"n": 1}
    assert cache.set(f"{tag}:a", 2, ttl=60, xx=True) and cache.ttl(f"{tag}:a") == 60
    assert cache.set(f"{tag}:new", 1, nx=True)
    assert cache.set_many({f"{tag}:b": 1, f"{tag}:c": [2]}) == 2
    assert cache.get_many([f"{tag}:b", f"{tag}:c", f"{tag}:zz"]) == {f"{tag}:b": 1, f"{tag}:c": [2]}
    assert cache.incr(f"{tag}:n", 5) == 5 and cache.decr(f"{tag}:n") == 4
    assert cache.expire(f"{tag}:b", 30) and cache.persist(f"{tag}:b") and cache.exists(f"{tag}:b")
    assert cache.delete(f"{tag}:b") and cache.delete_many([f"{tag}:c", f"{tag}:zz"]) == 1
    assert cache.keys(f"{escape_glob(tag)}:*") == sorted([f"{tag}:a", f"{tag}:n", f"{tag}:new"])
    assert cache.get_or_set(f"{tag}:computed", lambda: "fresh", ttl=60) == "fresh"
    assert cache.clear(f"{escape_glob(tag)}:*") == 4 and cache.cleanup() == 0


@pytest.fixture
def victim(schema, role_engine):
    name, engine = role_engine("victim")
    cache = client(engine, schema, use_cuckoo_filter=False)
    cache.set("warm", 1)
    yield name, engine, cache
    cache.close()


@pytest.fixture
def mallory(role_engine):
    return role_engine("mallory")


# -- locks --------------------------------------------------------------------------------

@pytest.mark.parametrize("relation", ["cache", "cache_secrets", "cache_settings", "cache_usage"])
def test_no_lock_mode_on_any_of_the_cache_s_tables_delays_another_role(schema, victim, mallory, relation):
    _, _, cache = victim
    taken = []
    with mallory[1].connect() as connection:
        for mode in LOCK_MODES:
            with connection.begin():
                try:
                    with connection.begin_nested():
                        connection.execute(text(f'LOCK TABLE "{schema}".{relation} IN {mode} MODE NOWAIT'))
                    taken.append(mode)
                except sa_exc.ProgrammingError as error:
                    assert "permission denied" in str(error)
                every_call(cache, f"{relation}-{mode}")  # mallory's transaction stays open meanwhile
    # SELECT allows ACCESS SHARE, enrolling a secret ROW EXCLUSIVE: neither conflicts with a write.
    assert set(taken) <= {"ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE"}
    assert "ACCESS EXCLUSIVE" not in taken and "SHARE" not in taken


def test_no_row_lock_foreign_key_or_trigger_reaches_another_role(engine, schema, victim, mallory):
    name, _, cache = victim
    mallory_name, mallory_engine = mallory
    own = f"own_{uuid.uuid4().hex[:8]}"
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA {own} AUTHORIZATION "{mallory_name}"'))
    try:
        with mallory_engine.connect() as connection:
            for statement in (f'SELECT * FROM "{schema}".cache FOR UPDATE',
                              f'SELECT * FROM "{schema}".cache FOR KEY SHARE',
                              f'SELECT * FROM "{schema}".cache_secrets FOR SHARE',
                              f'CREATE UNLOGGED TABLE {own}.pin (u text, k text, '
                              f'FOREIGN KEY (u, k) REFERENCES "{schema}".cache)',
                              f'CREATE TRIGGER spy AFTER INSERT ON "{schema}".cache FOR EACH ROW EXECUTE FUNCTION '
                              "pg_catalog.suppress_redundant_updates_trigger()",
                              f'TRUNCATE "{schema}".cache', f'REINDEX TABLE "{schema}".cache',
                              f'ALTER TABLE "{schema}".cache ADD COLUMN spy text'):
                with pytest.raises(sa_exc.DBAPIError, match="permission denied|must be owner"):
                    connection.execute(text(statement))
                    connection.commit()
                connection.rollback()
        every_call(cache, "after-attempts")
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {own} CASCADE"))


def test_a_long_transaction_of_another_role_delays_nothing_even_while_the_admin_waits(engine, schema, victim,
                                                                                   mallory):
    _, _, cache = victim
    with mallory[1].connect() as connection:
        connection.begin()
        theirs = Cache(connection, schema=schema)
        theirs.set_many({"shared:a": 1, "report": "mallory's"})  # same key names, her own rows, uncommitted
        theirs.get_or_set("computed", lambda: "hers")
        every_call(cache, "during")
        assert cache.get_or_set("report", lambda: "victim's", wait=3) == "victim's"
        # The admin switching the table to LOGGED needs it to itself, which mallory's open transaction
        # prevents. A setup waiting in the lock queue would queue every other role's call behind it.
        outcome = {}
        admin = threading.Thread(target=lambda: outcome.setdefault("error", _raised(
            lambda: setup_cache(engine=engine, schema=schema, logged=True, lock_wait=2))))
        admin.start()
        time.sleep(0.3)
        every_call(cache, "while-the-admin-waits")
        admin.join(30)
        assert isinstance(outcome["error"], CacheError) and "stayed in use" in str(outcome["error"])
        connection.rollback()
    assert setup_cache(engine=engine, schema=schema, logged=True)["unlogged"] is False


def _raised(call):
    try:
        call()
    except Exception as error:
        return error
    return None


def test_advisory_locks_neither_stall_nor_defeat_another_role_s_stampede_lock(schema, victim, mallory):
    name, _, cache = victim
    keys = ["report", "profile:1"]
    with mallory[1].connect() as connection:
        # The ids the lock once used (a hash of role, table and key, guessable), held exclusively and shared,
        # plus a spread of other ids: none of them is the victim's lock any more.
        connection.begin()  # transaction-level locks: released with the test's transaction, not the pooled session
        for key in keys:
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtextextended("
                                    "concat_ws('/', CAST(:u AS text), 'cache', CAST(:k AS text)), 0))"),
                               {"u": name, "k": key})
        connection.execute(text("SELECT pg_advisory_xact_lock_shared(g) FROM generate_series(1, 1000) AS g"))
        runs = []

        def compute():
            runs.append(1)
            time.sleep(0.2)
            return "computed once"

        started = time.monotonic()
        results, workers = [], [threading.Thread(target=lambda: results.append(
            cache.get_or_set("report", compute, wait=3))) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        elapsed = time.monotonic() - started
        assert results == ["computed once"] * 8 and len(runs) == 1
        assert elapsed < 2.5, f"the victim waited {elapsed:.1f} s"  # a stall would have waited `wait` (3 s)
        seen = connection.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()")).scalar()
        assert seen == 0  # nothing of the victim's shows there to observe or copy


# -- code run as another role -------------------------------------------------------------

HIJACKS = [  # what a role may plant where it can CREATE, to run as whoever resolves these names
    ("now()", "timestamptz", "RETURN pg_catalog.now();"),
    ("convert_to(text, text)", "bytea", "RETURN pg_catalog.convert_to($1, pg_catalog.name($2));"),
    ("convert_from(bytea, text)", "text", "RETURN pg_catalog.convert_from($1, pg_catalog.name($2));"),
    ("decode(text, text)", "bytea", "RETURN pg_catalog.decode($1, $2);"),
    ("encode(bytea, text)", "text", "RETURN pg_catalog.encode($1, $2);"),
    ("sha256(bytea)", "bytea", "RETURN pg_catalog.sha256($1);"),
    ("set_config(text, text, boolean)", "text", "RETURN pg_catalog.set_config($1, $2, $3);"),
    ("date_part(text, interval)", "double precision", "RETURN pg_catalog.date_part($1, $2);"),
    ("ceil(double precision)", "double precision", "RETURN pg_catalog.ceil($1);"),
    ("pg_notify(text, text)", "void", "PERFORM pg_catalog.pg_notify($1, $2);"),
    ("texteq_evil(text, text)", "boolean", "RETURN $1 OPERATOR(pg_catalog.=) $2;"),
    ("textgt_evil(text, text)", "boolean", "RETURN $1 OPERATOR(pg_catalog.>) $2;"),
    ("tsgt_evil(timestamptz, timestamptz)", "boolean", "RETURN $1 OPERATOR(pg_catalog.>) $2;"),
]
OPERATORS = [("=", "text", "texteq_evil"), (">", "text", "textgt_evil"), (">", "timestamptz", "tsgt_evil")]


@pytest.fixture
def planted(engine, schema, mallory):
    """PUBLIC may CREATE in `public` and the cache's schema (PostgreSQL 14's default, and many upgraded
    databases); mallory plants look-alike functions and operators in both that log who ran them."""
    name, mallory_engine = mallory
    with engine.begin() as connection:
        for target in ("public", schema):
            connection.execute(text(f'GRANT CREATE ON SCHEMA "{target}" TO PUBLIC'))
    with mallory_engine.begin() as connection:
        connection.execute(text("CREATE TABLE public.ran_as (who text, what text)"))
        connection.execute(text("GRANT INSERT ON public.ran_as TO PUBLIC"))
        for target in ("public", schema):
            for signature, returns, body in HIJACKS:
                connection.execute(text(
                    f'CREATE FUNCTION "{target}".{signature} RETURNS {returns} LANGUAGE plpgsql AS $$ BEGIN '
                    f"INSERT INTO public.ran_as VALUES (current_user, '{signature}'); {body} END $$"))
            for symbol, kind, function in OPERATORS:
                connection.execute(text(f'CREATE OPERATOR "{target}".{symbol} (LEFTARG = {kind}, RIGHTARG = {kind}, '
                                        f'FUNCTION = "{target}".{function})'))
    yield mallory_engine
    with engine.begin() as connection:
        for target in ("public", schema):
            connection.execute(text(f'REVOKE CREATE ON SCHEMA "{target}" FROM PUBLIC'))
        connection.execute(text("DROP TABLE public.ran_as"))
        connection.execute(text("DROP FUNCTION IF EXISTS " + ", ".join(
            f"public.{signature.split('(')[0]}({signature.split('(')[1]}" for signature, _, _ in HIJACKS) + " CASCADE"))


def test_look_alike_functions_and_operators_never_run(engine, schema, victim, planted, pg_url):
    _, victim_engine, cache = victim
    every_call(cache, "default-path")
    with victim_engine.connect() as connection:  # a victim whose search path even puts the planted schemas first
        connection.execute(text(f'SET search_path = public, "{schema}", pg_catalog'))
        every_call(Cache(connection, schema=schema), "hostile-path")
        connection.commit()
    with FastPgCache(url=make_url(pg_url), schema=schema, use_cuckoo_filter=False) as admin:  # the quickstart as admin
        every_call(admin, "admin")
    setup_cache(engine=engine, schema=schema)
    with planted.connect() as connection:
        assert connection.execute(text("SELECT who, what FROM public.ran_as")).all() == []
        assert connection.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar() is False


def test_setup_and_check_warn_when_public_may_create_in_the_schema(engine, schema, planted):
    status = cache_status(engine, schema)
    assert any(f"REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC" in warning for warning in status["warnings"])
    assert f"REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC" in describe(status)


# -- objects planted before setup ---------------------------------------------------------

def _plantable(engine, schema: str) -> str:
    # A fresh schema where PUBLIC may CREATE, as `public` was before PostgreSQL 15; returns it quoted.
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        connection.execute(text(f'GRANT CREATE, USAGE ON SCHEMA "{schema}" TO PUBLIC'))
    return f'"{schema}"'


def test_setup_refuses_objects_another_role_planted_before_it(engine, empty_schema, mallory, capsys, pg_url):
    name, mallory_engine = mallory
    q = _plantable(engine, empty_schema)
    with mallory_engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {q}.ran_as_planted (who text)"))
        connection.execute(text(f"GRANT INSERT ON {q}.ran_as_planted TO PUBLIC"))
        connection.execute(text(
            f"CREATE UNLOGGED TABLE {q}.cache (user_id text DEFAULT current_user, key text, value bytea,"
            " flags smallint DEFAULT 0, expires_at timestamptz, created_at timestamptz DEFAULT now(),"
            " PRIMARY KEY (user_id, key))"))
        connection.execute(text(f"ALTER TABLE {q}.cache ENABLE ROW LEVEL SECURITY"))
        connection.execute(text(f"CREATE TABLE {q}.fastpgcache_alembic_version (version_num text)"))
        connection.execute(text(f"INSERT INTO {q}.fastpgcache_alembic_version VALUES ('0003_fillfactor')"))
        connection.execute(text(
            f"CREATE FUNCTION {q}.spy() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"INSERT INTO {q}.ran_as_planted VALUES (current_user); RETURN NULL; END $$"))
        connection.execute(text(f"CREATE TRIGGER spy AFTER UPDATE ON {q}.fastpgcache_alembic_version"
                                f" FOR EACH STATEMENT EXECUTE FUNCTION {q}.spy()"))
    with pytest.raises(CacheError, match=rf"refusing to set up: .*owned by {name}"):
        setup_cache(engine=engine, schema=empty_schema)
    assert main(["--url", pg_url, "--schema", empty_schema, "--check"]) == 1
    out = capsys.readouterr().out
    assert f"problem: {empty_schema}.cache is owned by {name}" in out and "revision 0003" not in out
    with mallory_engine.connect() as connection:  # her trigger never ran as the admin
        assert connection.execute(text(f"SELECT count(*) FROM {q}.ran_as_planted")).scalar() == 0


def test_a_planted_view_of_the_version_table_is_never_read(engine, empty_schema, mallory):
    name, mallory_engine = mallory
    q = _plantable(engine, empty_schema)
    with mallory_engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {q}.ran_as_view (who text)"))
        connection.execute(text(f"GRANT INSERT ON {q}.ran_as_view TO PUBLIC"))
        connection.execute(text(
            f"CREATE FUNCTION {q}.peek() RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
            f"INSERT INTO {q}.ran_as_view VALUES (current_user); RETURN '0003_fillfactor'; END $$"))
        connection.execute(text(f"CREATE VIEW {q}.fastpgcache_alembic_version AS SELECT {q}.peek() AS version_num"))
        connection.execute(text(f"GRANT SELECT ON {q}.fastpgcache_alembic_version TO PUBLIC"))
    status = cache_status(engine, empty_schema)
    assert status["revision"] is None and any("is not a table" in problem for problem in status["problems"])
    with pytest.raises(CacheError, match="is not a table"):
        setup_cache(engine=engine, schema=empty_schema)
    with mallory_engine.connect() as connection:
        assert connection.execute(text(f"SELECT count(*) FROM {q}.ran_as_view")).scalar() == 0


# -- observing another role ---------------------------------------------------------------

def pending_notifications(raw) -> list:
    """Notifications that reached a raw driver connection, on psycopg2 or psycopg 3."""
    if hasattr(raw, "poll"):  # psycopg2
        raw.poll()
        return list(raw.notifies)
    return list(raw.notifies(timeout=0))


def test_nothing_another_role_can_listen_to_or_read_confirms_a_key(engine, schema, victim, mallory):
    name, _, cache = victim
    guarded = client(victim[1], schema)
    assert guarded.guard.wait_until_trusted(10)
    try:
        with mallory[1].connect() as connection:
            raw = connection.connection.dbapi_connection
            raw.autocommit = True
            cursor = raw.cursor()
            # The channel the trigger once used (a hash of schema and table), and mallory's own channel.
            old_channel = "fastpgcache_" + __import__("hashlib").sha256(f"{schema}\x00cache".encode()).hexdigest()[:24]
            cursor.execute(f"LISTEN {old_channel}")
            theirs = Cache(connection, schema=schema)._identity_now()
            cursor.execute(f"LISTEN {theirs.channel}")
            guarded.set("user:31337:email", "victim@example.com")
            guarded.set_many({f"user:{i}:email": i for i in range(20)})
            time.sleep(0.3)
            assert pending_notifications(raw) == []
            cursor.execute(f'SELECT user_id FROM "{schema}".cache_secrets')
            assert cursor.fetchall() == [(theirs.user,)]  # her own secret only
            cursor.execute("SELECT query FROM pg_stat_activity WHERE usename = %s", (name,))
            assert all(query == "<insufficient privilege>" for (query,) in cursor.fetchall())
            cursor.execute(f'SELECT count(*) FROM "{schema}".cache')
            assert cursor.fetchone() == (0,)
    finally:
        guarded.close()


def test_forged_messages_and_resets_cannot_reach_another_role_s_guard(schema, victim, mallory):
    guarded = client(victim[1], schema)
    assert guarded.guard.wait_until_trusted(10)
    try:
        before = guarded.guard.stats()
        with mallory[1].connect() as connection:
            raw = connection.connection.dbapi_connection
            raw.autocommit = True
            cursor = raw.cursor()
            old_channel = "fastpgcache_" + __import__("hashlib").sha256(f"{schema}\x00cache".encode()).hexdigest()[:24]
            for _ in range(20):
                cursor.execute("SELECT pg_notify(%s, 'reset'), pg_notify(%s, %s)",
                               (old_channel, old_channel, " ".join(f"{i:016x}" for i in range(450))))
        time.sleep(0.5)
        after = guarded.guard.stats()
        assert after["state"] == "trusted" and after["warm_ups"] == before["warm_ups"]
        assert after["filter_keys"] == before["filter_keys"]
        assert guarded.get("never-written") is None and guarded.stats()["guard_skips"] >= 1
    finally:
        guarded.close()


def test_a_role_s_own_resets_re_read_the_table_at_most_once_a_second(schema, victim):
    guarded = client(victim[1], schema)
    assert guarded.guard.wait_until_trusted(10)
    try:
        before = guarded.guard.stats()["warm_ups"]
        with victim[1].connect() as connection:  # the victim's own role, on its own channel
            raw = connection.connection.dbapi_connection
            raw.autocommit = True
            cursor = raw.cursor()
            started = time.monotonic()
            while time.monotonic() - started < 2.0:
                cursor.execute("SELECT pg_notify(%s, 'reset')", (guarded.guard.channel,))
                time.sleep(0.05)
        assert guarded.guard.wait_until_trusted(10)
        warm_ups = guarded.guard.stats()["warm_ups"] - before
        assert 1 <= warm_ups <= 4, warm_ups  # 40 resets in 2 s: at most one re-read per second
    finally:
        guarded.close()


# -- limits -------------------------------------------------------------------------------

def test_values_past_the_server_s_limit_fail_clearly_and_change_nothing(engine, schema, victim, mallory):
    _, _, cache = victim
    mallory_cache = client(mallory[1], schema, use_cuckoo_filter=False)
    try:
        mallory_cache.set("big", "small")
        for attempt in (lambda: mallory_cache.set("big", "x" * (1024 * 1024 + 1)),
                        lambda: mallory_cache.set_many({"big": "x" * 2_000_000, "other": 1})):
            with pytest.raises(CacheLimitError, match="1048576 bytes per value") as raised:
                attempt()
            assert isinstance(raised.value, ValueError)
        assert mallory_cache.get("big") == "small" and mallory_cache.get("other") is None
        with mallory[1].connect() as connection:  # the functions check what the client skips
            identity = Cache(connection, schema=schema)._identity_now()
            with pytest.raises(sa_exc.DBAPIError, match="limit is 1024 bytes"):
                call = f'SELECT "{schema}".cache_set(:u, :s, :k, :v, 1::int2, NULL, 0::int2, NULL, NULL)'
                connection.execute(text(call), {"u": identity.user, "s": identity.secret, "k": "k" * 5000, "v": b"x"})
        every_call(cache, "unaffected")
    finally:
        mallory_cache.close()


def test_limits_the_admin_changes_hold_at_once_in_sessions_already_running(engine, schema, mallory):
    # The write functions fold the limits into each session's cached plans (migration 0006): changing a
    # limit must reach a session that has already run every statement, without reconnecting.
    single = create_engine(mallory[1].url, pool_size=1, max_overflow=0)
    try:
        cache = Cache(single, schema=schema, expire_every=None)
        with single.connect() as connection:
            session = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        assert cache.set("a", "x" * 300) and cache.set_many({"b": 1, "c": 2}) == 2 and cache.incr("n") == 1
        setup_cache(engine=engine, schema=schema, max_value_bytes=200, quota_entries=5)
        with pytest.raises(CacheLimitError, match="at most 200 bytes"):
            cache.set("a", "y" * 300)
        with pytest.raises(CacheLimitError, match="at most 200 bytes"):
            cache.set_many({"d": "y" * 300})
        with pytest.raises(CacheLimitError, match="quota exceeded"):
            cache.set_many({"d": 1, "e": 2})
        assert cache.set("d", 1) and cache.get("a") == "x" * 300
        with pytest.raises(CacheLimitError, match="quota exceeded"):
            cache.incr("m")
        setup_cache(engine=engine, schema=schema, max_value_bytes=1000, quota_entries=0)
        assert cache.set("a", "y" * 300) and cache.set_many({f"f{i}": i for i in range(10)}) == 10
        with single.connect() as connection:
            assert connection.execute(text("SELECT pg_backend_pid()")).scalar() == session
    finally:
        single.dispose()


def test_a_settings_row_changed_by_hand_is_reported_and_a_setup_rerun_enforces_it(engine, schema, victim):
    _, _, cache = victim
    with engine.begin() as connection:
        connection.execute(text(f'UPDATE "{schema}".cache_settings SET max_value_bytes = 100'))
    assert any("does not hold the settings row's limit" in warning
               for warning in cache_status(engine, schema)["warnings"])
    assert cache.set("k", "x" * 300)  # the write functions still hold the limit the admin last set
    setup_cache(engine=engine, schema=schema)
    assert not any("settings row" in warning for warning in cache_status(engine, schema)["warnings"])
    with pytest.raises(CacheLimitError, match="at most 100 bytes"):
        cache.set("k", "x" * 300)


def test_without_a_quota_writes_never_read_the_settings_table(engine, schema, victim):
    # The limits are constants in the writes' plans: with the settings row locked by the admin, every
    # write still goes through (reading the row on each write cost about 6 µs of a set).
    _, _, cache = victim
    with engine.connect() as admin, admin.begin():
        admin.execute(text(f'LOCK TABLE "{schema}".cache_settings IN ACCESS EXCLUSIVE MODE'))
        every_call(cache, "settings-locked")


def test_a_quota_stops_a_role_from_crowding_out_the_others(engine, schema, victim, mallory):
    _, _, cache = victim
    setup_cache(engine=engine, schema=schema, quota_entries=10, quota_bytes=20_000)
    mallory_cache = client(mallory[1], schema, use_cuckoo_filter=False)
    try:
        assert mallory_cache.set_many({f"k{i}": i for i in range(10)}) == 10
        with pytest.raises(CacheLimitError, match="quota exceeded"):
            mallory_cache.set("k10", 10)
        with pytest.raises(CacheLimitError, match="quota exceeded"):
            mallory_cache.set_many({"k10": 10, "k11": 11})
        with pytest.raises(CacheLimitError, match="quota exceeded"):
            mallory_cache.incr("counter")
        assert mallory_cache.set("k0", "overwriting is fine") and mallory_cache.stats()["entries"] == 10
        assert mallory_cache.delete("k0") and mallory_cache.set("k10", 10)
        with pytest.raises(CacheLimitError, match="quota exceeded"):
            mallory_cache.set("k1", "x" * 25_000)  # bytes
        assert mallory_cache.get("k1") == 1
        mallory_cache.clear()
        assert mallory_cache.set_many({f"t{i}": i for i in range(10)}, ttl=0.2) == 10
        time.sleep(0.3)
        assert mallory_cache.set_many({f"n{i}": i for i in range(10)}) == 10  # expired rows give way
        every_call(cache, "beside-a-full-quota")  # another role's own quota is untouched
        limits = cache_status(engine, schema)["limits"]
        assert (limits["quota_entries"], limits["quota_bytes"]) == (10, 20_000)
        assert "quota per role: 10 entries, 20000 bytes" in describe(cache_status(engine, schema))
        setup_cache(engine=engine, schema=schema, quota_entries=0, quota_bytes=0)
        assert mallory_cache.set_many({f"m{i}": i for i in range(20)}) == 20
    finally:
        mallory_cache.close()


# -- the notification queue ---------------------------------------------------------------

@pytest.mark.own_server
def test_a_full_notification_queue_never_fails_a_write_and_pauses_the_guard(monkeypatch, caplog):
    from fastpgcache import guard as guard_module
    from fastpgcache.embedded import EmbeddedPostgres

    # The smallest queue PostgreSQL allows (64 pages, 512 kB) fills in a moment; 8 GB would take minutes.
    monkeypatch.setattr(guard_module, "MIN_QUEUE_MARGIN_BYTES", 0)
    with EmbeddedPostgres(settings={"max_notify_queue_pages": "64"}) as server:
        admin = create_engine(server.url)
        try:
            setup_cache(engine=admin, schema="hostile")
            with admin.begin() as connection:
                for role in ("victim_q", "mallory_q"):
                    connection.execute(text(f"CREATE ROLE {role} LOGIN"))
            url = make_url(server.url)
            victim = FastPgCache(url=url.set(username="victim_q"), schema="hostile", lock_timeout=0.5)
            assert victim.guard.wait_until_trusted(10)
            stalled = create_engine(url.set(username="mallory_q")).connect()
            raw = stalled.connection.dbapi_connection
            raw.autocommit = True
            raw.cursor().execute("LISTEN flood")
            raw.autocommit = False
            raw.cursor().execute("SELECT 1")  # ... and never reads again: idle inside an open transaction
            with create_engine(url.set(username="mallory_q"), isolation_level="AUTOCOMMIT").connect() as flood:
                with caplog.at_level(logging.WARNING, logger="fastpgcache.guard"):
                    for _ in range(100):
                        if flood.execute(text("SELECT pg_notification_queue_usage()")).scalar() >= 0.6:
                            break
                        flood.execute(text("SELECT pg_notify('flood', repeat('x', 7990)) FROM generate_series(1, 8)"))
                    assert flood.execute(text("SELECT pg_notification_queue_usage()")).scalar() >= 0.6
                    for i in range(50):  # new keys: each would NOTIFY, and a NOTIFY into a full queue fails
                        assert victim.set(f"new:{i}", i) is True
                    assert victim.set_many({f"batch:{i}": i for i in range(100)}) == 100
                    deadline = time.monotonic() + 5
                    while not victim.guard.state.startswith("paused") and time.monotonic() < deadline:
                        time.sleep(0.05)
            assert victim.guard.state.startswith("paused: the notification queue is")
            assert victim.get("new:7") == 7 and victim.get("never") is None and victim.get_many(["batch:3"]) == {
                "batch:3": 3}
            assert any("notification queue" in record.getMessage() for record in caplog.records)
            stalled.close()  # the stalled listener goes: the queue drains, the guard re-warms
            assert victim.guard.wait_until_trusted(15)
            assert victim.get("new:49") == 49 and not victim.guard.definitely_absent("batch:99")
            victim.close()
        finally:
            admin.dispose()


# -- pickles ------------------------------------------------------------------------------

class _Detonator:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fastpgcache-pwned-by-pickle",))


def test_a_pickle_planted_by_a_member_of_the_owner_role_is_never_unpickled(engine, schema, victim, make_role, caplog):
    import pickle

    name, victim_engine, _ = victim
    insider, insider_url = make_role("insider")
    with engine.begin() as connection:
        connection.execute(text(f'GRANT fastpgcache_owner TO "{insider}"'))
    victim_cache = Cache(victim_engine, schema=schema, pickle="the-application-secret-key")
    victim_cache.set("profile", {"set": {1, 2}})
    insider_engine = create_engine(insider_url)
    try:
        with insider_engine.begin() as connection:  # a member of the owner role bypasses row-level security
            connection.execute(text(f'UPDATE "{schema}".cache SET value = :v, flags = 3 WHERE user_id = :u'),
                               {"v": pickle.dumps(_Detonator()), "u": name})
        if os.path.exists("/tmp/fastpgcache-pwned-by-pickle"):
            os.unlink("/tmp/fastpgcache-pwned-by-pickle")
        with caplog.at_level(logging.WARNING, logger="fastpgcache"):
            assert victim_cache.get("profile", "a miss") == "a miss"
            assert victim_cache.get_many(["profile"]) == {}
        assert not os.path.exists("/tmp/fastpgcache-pwned-by-pickle")
        assert "refused to unpickle" in caplog.text
    finally:
        insider_engine.dispose()


# -- secrets ------------------------------------------------------------------------------

def test_passwords_given_in_a_url_s_query_never_show(make_role, schema, caplog):
    role, url = make_role("querypw")
    password = url.password
    in_query = url.set(password=None).update_query_dict({"password": password, "sslpassword": "ssl-s3cret-value"})
    caplog.set_level(logging.DEBUG)
    with FastPgCache(url=in_query.render_as_string(hide_password=False), schema=schema) as cache:
        cache.set("k", "v")
        seen = [repr(cache), str(cache), repr(cache.bind), repr(cache.bind.url), str(cache.bind.url),
                repr(cache.bind.pool), caplog.text]
    assert all(password not in item and "ssl-s3cret-value" not in item for item in seen)
    if cache.bind.dialect.driver == "psycopg2":  # its connection repr shows the DSN; psycopg 3's shows none
        assert "sslpassword=xxx" in caplog.text  # the pool's DEBUG records still say it was there


# -- patterns -----------------------------------------------------------------------------

def test_patterns_are_capped_checked_and_never_absorbed_by_failsafe(engine, schema):
    cache = Cache(engine, schema=schema, failsafe=True)
    cache.set_many({"a": 1, "m": 2, "z": 3})
    assert cache.keys("[z-a]") == ["a", "m", "z"]  # a range written backwards is swapped, as Redis does
    for pattern in ("a*" * 2048, "*a" * 40, "?" * 300):
        with pytest.raises(ValueError, match="narrow it|limit is"):
            cache.keys(pattern)
        with pytest.raises(ValueError, match="narrow it|limit is"):
            cache.clear(pattern)
    uid = "*"  # a user-supplied part of a pattern
    cache.set_many({"session:*:x": 1, "session:7:x": 2})
    assert cache.clear(escape_glob(f"session:{uid}") + ":*") == 1
    assert cache.keys("session:*") == ["session:7:x"]


# -- who a session is ---------------------------------------------------------------------

def test_a_login_serving_several_roles_writes_as_the_role_it_set(engine, schema, make_role, role_engine):
    (u1, _), (u2, _) = make_role("u1", login=False), make_role("u2", login=False)
    app, app_engine = role_engine("app")
    with engine.begin() as connection:
        connection.execute(text(f'GRANT "{u1}", "{u2}" TO "{app}"'))
    with app_engine.connect() as connection:
        shared = Cache(connection, schema=schema)  # one Cache for every request, as an app would keep it
        for role, value in ((u1, "one"), (u2, "two")):
            connection.execute(text(f'SET ROLE "{role}"'))
            assert shared.get("cart") is None
            shared.set("cart", value)
            assert shared.get("cart") == value
        connection.execute(text(f'SET ROLE "{u1}"'))
        assert shared.get("cart") == "one" and shared.incr("n") == 1
        connection.execute(text("RESET ROLE"))
        assert shared.get("cart") is None
        connection.commit()
    with engine.connect() as connection:
        owners = dict(connection.execute(text(f'SELECT user_id, convert_from(value, \'UTF8\') FROM "{schema}".cache'
                                              " WHERE key = 'cart'")).all())
    assert owners == {u1: "one", u2: "two"}


def test_code_of_another_role_cannot_write_as_its_caller(engine, schema, victim, mallory):
    name, victim_engine, cache = victim
    mallory_name, mallory_engine = mallory
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "trap_{mallory_name}" AUTHORIZATION "{mallory_name}"'))
        connection.execute(text(f'GRANT USAGE ON SCHEMA "trap_{mallory_name}" TO PUBLIC'))
    try:
        with mallory_engine.begin() as connection:
            identity = Cache(connection, schema=schema)._identity_now()
            # SECURITY DEFINER: runs as mallory whoever calls it; it tries to write as its caller.
            connection.execute(text(
                f'CREATE FUNCTION "trap_{mallory_name}".helpful() RETURNS text LANGUAGE plpgsql SECURITY DEFINER AS $$'
                f" DECLARE mine boolean; theirs text; BEGIN"
                f" mine := \"{schema}\".cache_set('{identity.user}', '\\x{identity.secret.hex()}'::bytea, 'planted',"
                f" 'x'::bytea, 1::int2, NULL, 0::int2, NULL, NULL);"
                # Every mode, on a key the caller has and one it has not, and with culling to zero entries.
                f" SELECT string_agg(coalesce(\"{schema}\".cache_set(session_user::text, '\\x00'::bytea, k, 'x'::bytea,"
                f" 1::int2, NULL, m::int2, c, 0)::text, 'refused'), ' ') INTO theirs FROM (VALUES ('warm', 0, NULL),"
                f" ('warm', 1, NULL), ('planted', 1, NULL), ('warm', 2, NULL), ('planted', 2, NULL), ('planted', 0, 0))"
                f" AS attempt (k, m, c);"
                f" RETURN coalesce(mine::text, 'refused') || ' ' || theirs; END $$"))
            connection.execute(text(f'GRANT EXECUTE ON FUNCTION "trap_{mallory_name}".helpful() TO PUBLIC'))
        with victim_engine.begin() as connection:
            answer = connection.execute(text(f'SELECT "trap_{mallory_name}".helpful()')).scalar()
        assert answer == "refused" + " refused" * 6
        assert cache.get("planted") is None and cache.get("warm") == 1
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "trap_{mallory_name}" CASCADE'))


# -- the admin ----------------------------------------------------------------------------

def test_grant_to_a_role_takes_public_s_use_away_and_names_with_percent_work(engine, empty_schema, make_role,
                                                                            role_engine):
    grantee, _ = make_role("app%s", login=False)
    setup_cache(engine=engine, schema=empty_schema)
    status = setup_cache(engine=engine, schema=empty_schema, grant_to=grantee)
    assert f'"{grantee}"=r/' in status["grants"] and "=r/" not in status["grants"].replace(f'"{grantee}"=r/', "")
    _, stranger = role_engine("stranger")
    with pytest.raises(CachePermissionError):
        Cache(stranger, schema=empty_schema).get("k")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT has_table_privilege(:r, :t, 'SELECT')"),
                                  {"r": grantee, "t": f"{empty_schema}.cache"}).scalar()
        assert not connection.execute(text("SELECT has_table_privilege('public', :t, 'SELECT')"),
                                      {"t": f"{empty_schema}.cache"}).scalar()
        assert not connection.execute(text("SELECT has_table_privilege(:r, :t, 'INSERT')"),
                                      {"r": grantee, "t": f"{empty_schema}.cache"}).scalar()


def test_an_advisory_lock_held_by_anyone_cannot_hang_the_admin(engine, empty_schema, mallory, pg_url, capsys):
    with mallory[1].connect() as connection, connection.begin():
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('fastpgcache-admin'))"))
        started = time.monotonic()
        with pytest.raises(CacheError, match=f"role {mallory[0]}"):
            setup_cache(engine=engine, schema=empty_schema, lock_wait=1.0)
        assert time.monotonic() - started < 5
    setup_cache(engine=engine, schema=empty_schema)  # free again


def test_a_reader_holding_the_table_cannot_hang_setup(engine, schema, victim, mallory):
    _, _, cache = victim
    with mallory[1].connect() as connection:
        connection.execute(text(f'SELECT count(*) FROM "{schema}".cache'))  # ACCESS SHARE, held until the end
        with pytest.raises(CacheError, match=f"stayed in use for 1 s .*{mallory[0]}"):
            setup_cache(engine=engine, schema=schema, lock_wait=1.0)
        every_call(cache, "while-setup-waited")
    assert setup_cache(engine=engine, schema=schema)["revision"]
