"""FastPgCache: the seed-compatible client owning its pool."""
import io
import logging
import threading
from contextlib import redirect_stdout

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fastpgcache import CacheConnectionError, CacheNotSetUpError, FastPgCache
from fastpgcache.client import build_url
from fastpgcache.execution import scalar
from fastpgcache.leases import LOST_PREPARED_LIMIT


@pytest.fixture
def client(pg_url, schema):
    with FastPgCache(url=pg_url, schema=schema) as cache:
        yield cache


def test_seed_constructor_parts(pg_url, schema):
    url = make_url(pg_url)
    with FastPgCache(host=url.host, port=url.port or 5432, database=url.database, user=url.username,
                     password=url.password or "", schema=schema, minconn=2, maxconn=3,
                     use_cuckoo_filter=False) as cache:
        cache.set("k", "v")
        assert cache.get("k") == "v"
        assert cache.bind.pool.size() == 3
        # minconn opened up front; the one the calls used stays checked out, idle, for the next call
        assert (cache.bind.pool.checkedin(), cache.bind.pool.checkedout()) == (1, 1)


def test_connection_string_forms(pg_url, schema):
    url = make_url(pg_url)
    dsn = f"host={url.host} port={url.port or 5432} dbname={url.database} user={url.username}"
    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    for form in (dsn, plain):
        with FastPgCache(form, schema=schema) as cache:
            cache.set("k", form)
            assert cache.get("k") == form


def test_build_url_hides_password():
    url = build_url(host="db", user="alice", password="hunter2-secret")
    assert "hunter2-secret" not in repr(url) and "hunter2-secret" not in str(url)
    assert url.password == "hunter2-secret"
    dsn = build_url("host=db user=alice password=hunter2-secret dbname=app sslmode=require")
    assert dsn.query == {"sslmode": "require"} and "hunter2-secret" not in repr(dsn)


def test_wrong_password_or_host_fails_in_constructor_without_leaking(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CacheConnectionError) as raised:
        FastPgCache(host="127.0.0.1", port=1, user="nobody", password="hunter2-secret")
    assert "reachable" in str(raised.value)
    assert "hunter2-secret" not in str(raised.value) and "hunter2-secret" not in caplog.text
    assert raised.value.__cause__ is None  # no driver traceback chained with the DSN in it


def test_repr_hides_password(pg_url, schema):
    url = make_url(pg_url).set(password="hunter2-secret")
    cache = FastPgCache(url=url, schema=schema, minconn=0)
    try:
        assert "hunter2-secret" not in repr(cache)
    finally:
        cache.close()


@pytest.mark.parametrize("minconn, maxconn", [(-1, 5), (6, 5), (1, 0), ("1", 5)])
def test_bad_pool_sizes(minconn, maxconn):
    with pytest.raises(ValueError, match="minconn"):
        FastPgCache(minconn=minconn, maxconn=maxconn)


def test_missing_table_raises_setup_hint(pg_url):
    with FastPgCache(url=pg_url, schema="no_cache_here") as cache:
        with pytest.raises(CacheNotSetUpError, match="fastpgcache-admin"):
            cache.get("k")


def test_close_disposes_pool_and_context_manager(pg_url, schema):
    cache = FastPgCache(url=pg_url, schema=schema, minconn=2, use_cuckoo_filter=False)
    assert cache.bind.pool.checkedin() == 2
    cache.close()
    assert cache.bind.pool.checkedin() == 0


def test_threads_share_one_client(client):
    errors = []

    def work(n):
        try:
            for i in range(50):
                client.set(f"t{n}:{i}", {"n": n, "i": i})
                assert client.get(f"t{n}:{i}") == {"n": n, "i": i}
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(client.keys("t*")) == 1000
    assert client.bind.pool.size() == 10


def test_seed_readme_usage_example(client):
    """The seed README's usage example (without the Databricks token lines), run as written."""
    cache = client
    out = io.StringIO()
    with redirect_stdout(out):
        cache.set("test:key1", "value1", ttl=3600)
        cache.set("test:key2", {"name": "Alice", "age": 30})
        cache.set("test:key3", [1, 2, 3, 4, 5])
        test_data = {"user": {"id": 123, "name": "Alice", "tags": ["admin", "developer"],
                              "settings": {"theme": "dark", "notifications": True}}}
        cache.set("json:complex", test_data)
        test_list = [1, 2, 3, {"nested": "value"}, [4, 5, 6]]
        cache.set("json:list", test_list)
        cache.set("user:123", {"name": "Alice", "role": "admin"}, ttl=3600)
        cache.set("user:456", {"name": "Bob", "role": "user"}, ttl=3600)
        cache.set("session:abc", {"user_id": 123, "ip": "192.168.1.1"}, ttl=1800)
        print("✓ Values set\n")
        user123 = cache.get("user:123")
        print(f"user:123 = {user123}")
        session = cache.get("session:abc")
        print(f"session:abc = {session}\n")
        print(f"user:123 exists: {cache.exists('user:123')}")
        print(f"user:999 exists: {cache.exists('user:999')}\n")
        ttl = cache.ttl("user:123")
        print(f"user:123 expires in {ttl} seconds\n")
        cache.set("config:app", {"theme": "dark", "language": "en"})
        config_ttl = cache.ttl("config:app")
        print(f"config:app TTL: {config_ttl} (-1 = no expiry)\n")
        test_value = cache.get("user:123")
        print(f"user:123 = {test_value}")
    printed = out.getvalue()
    assert "user:123 = {'name': 'Alice', 'role': 'admin'}" in printed
    assert "session:abc = {'user_id': 123, 'ip': '192.168.1.1'}" in printed
    assert "user:123 exists: True" in printed and "user:999 exists: False" in printed
    assert "user:123 expires in 3600 seconds" in printed
    assert "config:app TTL: -1 (-1 = no expiry)" in printed
    assert cache.get("json:complex") == test_data and cache.get("json:list") == test_list
    assert cache.get("test:key1") == "value1" and cache.get("test:key3") == [1, 2, 3, 4, 5]
    assert cache.set_many({"user:789": {"name": "Charlie"}}, ttl=3600) == 1
    assert cache.cleanup() == 0


@pytest.mark.parametrize("statement", ["DEALLOCATE fastpgcache_nonexistent",
                                       "PREPARE twice AS SELECT 1; PREPARE twice AS SELECT 1"])
def test_prepared_statement_errors_point_at_the_pooler_setting(engine, statement):
    from sqlalchemy import exc as sa_exc

    from fastpgcache.errors import translate

    with engine.connect() as connection:
        with pytest.raises(sa_exc.DBAPIError) as raised:
            connection.exec_driver_sql(statement)
    assert "prepare_threshold=None" in str(translate(raised.value, "public.cache"))


# -- psycopg2's statements PREPAREd on FastPgCache's own connections ---------------------------

def psycopg2_client(pg_url, schema, **options) -> FastPgCache:
    # maxconn=1: every call, and bind.connect() below, runs on the one connection.
    url = make_url(pg_url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return FastPgCache(url=url, schema=schema, minconn=1, maxconn=1, use_cuckoo_filter=False, **options)


def prepared_runs(client: FastPgCache) -> dict:
    """The client connection's prepared statements: text -> how many times each was planned (= run)."""
    with client.bind.connect() as connection:
        return dict(connection.execute(text(
            "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements")).all())


def test_psycopg2_client_runs_its_statements_prepared(pg_url, schema):
    with psycopg2_client(pg_url, schema) as client:
        for i in range(10):
            assert client.set("k", i) is True and client.get("k") == i
        runs = prepared_runs(client)
    assert [n for statement, n in runs.items() if "_set(" in statement] == [10]
    assert [n for statement, n in runs.items() if statement.startswith("PREPARE fastpgcache_") and
            f"FROM {schema}.cache " in statement and "value" in statement] == [10]


def test_psycopg2_client_prepares_nothing_with_prepare_threshold_none(pg_url, schema):
    with psycopg2_client(pg_url, schema, prepare_threshold=None) as client:
        for i in range(10):
            assert client.set("k", i) is True and client.get("k") == i
        assert prepared_runs(client) == {}


def test_prepared_statements_the_server_lost_are_prepared_again_then_given_up(pg_url, schema, caplog):
    with psycopg2_client(pg_url, schema) as client, caplog.at_level(logging.WARNING, logger="fastpgcache"):
        assert client.set("k", "v") is True and client.incr("n") == 1  # both prepared
        for lost in range(1, LOST_PREPARED_LIMIT + 1):
            with client.bind.connect() as connection:
                connection.exec_driver_sql("DEALLOCATE ALL")  # as a pooler's DISCARD ALL would
            assert client.incr("n") == lost + 1  # the failed EXECUTE ran nothing: the retry counts once
            assert client.get("k") == "v"
            assert client.bind.pool.checkedout() == 1 and client.stats()["errors"] == 0
        assert prepared_runs(client) == {}  # the third loss turned preparing off
        assert client.incr("n") == LOST_PREPARED_LIMIT + 2
    assert len([r for r in caplog.records if "running unprepared from now on" in r.getMessage()]) == 1


def test_a_prepared_read_survives_a_migration_changing_its_columns(pg_url, schema, engine):
    with psycopg2_client(pg_url, schema) as client:
        client.set("k", "v")
        assert client.get("k") == "v"
        with engine.begin() as connection:  # "cached plan must not change result type" for the prepared read
            connection.exec_driver_sql(f'ALTER TABLE "{schema}".cache ALTER COLUMN flags TYPE integer')
        assert client.get("k") == "v"
        assert client.set("k", "w") is True and client.get("k") == "w"


def test_a_statement_postgresql_cannot_prepare_runs_unprepared(pg_url, schema):
    with psycopg2_client(pg_url, schema) as client:
        untyped = text("SELECT :x IS NULL")  # PREPARE: could not determine data type of parameter $1
        assert client._execute(untyped, {"x": None}, scalar) is True
        assert client._execute(untyped, {"x": 1}, scalar) is False
        assert client._compiled[untyped].prepared is None


def test_prepared_statements_take_their_arguments_by_position(pg_url, schema):
    from fastpgcache.execution import prepared_form

    repeated = prepared_form("SELECT %(b)s, %(a)s, %(b)s, '100%%'")
    assert repeated.prepare.endswith("AS SELECT $1, $2, $1, '100%'") and repeated.names == ("b", "a")
    assert repeated.execute == f"EXECUTE {repeated.name}(%s, %s)"
    assert repeated.arguments({"a": 1, "b": 2, "c": 3}) == (2, 1)
    assert prepared_form("SELECT %(k)s").arguments({"k": "x", "z": 0}) == ("x",)
    bare = prepared_form("SELECT 1")
    assert bare.execute == f"EXECUTE {bare.name}" and bare.arguments({"z": 0}) is None
    with psycopg2_client(pg_url, schema) as client:  # the library's own, run prepared with those arguments
        statement = text("SELECT CAST(:b AS text) || CAST(:a AS text) || CAST(:b AS text)")
        assert client._execute(statement, {"a": "1", "b": "2"}, scalar) == "212"
        assert client._execute(statement, {"a": "x", "b": "y"}, scalar) == "yxy"
        assert client._compiled[statement].prepared is not None
        defaulted = text("SELECT CAST(:a AS text) || CAST(:b AS text)").bindparams(b="-default")
        assert client._execute(defaulted, {"a": "x"}, scalar) == "x-default"  # the statement's own value
        assert client._execute(defaulted, {"a": "x", "b": "-given"}, scalar) == "x-given"
        assert client._compiled[defaulted].prepared is not None


def test_behind_pgbouncer_prepared_psycopg2_calls_stay_exact(start_pgbouncer, schema):
    # Transaction mode hands each call any server connection: an EXECUTE may land where nothing was
    # PREPAREd. Every call must still run exactly once.
    pooled = start_pgbouncer().render_as_string(hide_password=False)
    with FastPgCache(url=pooled, schema=schema, maxconn=4, use_cuckoo_filter=False) as client:
        def count(worker: int):
            for i in range(100):
                client.incr(f"n{worker}")
                assert client.set(f"k{worker}", i) is True and client.get(f"k{worker}") == i

        threads = [threading.Thread(target=count, args=(worker,)) for worker in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert client.get_many([f"n{worker}" for worker in range(6)]) == {f"n{worker}": 100 for worker in range(6)}
        assert client.stats()["errors"] == 0


def test_behind_a_default_pgbouncer_the_error_names_the_timeout_options(start_pgbouncer, schema):
    refusing = start_pgbouncer(ignore="extra_float_digits")  # pgbouncer's default: libpq options refused
    with pytest.raises(CacheConnectionError, match="statement_timeout=None, lock_timeout=None"):
        FastPgCache(url=refusing, schema=schema)
    with FastPgCache(url=refusing, schema=schema, statement_timeout=None, lock_timeout=None,
                     use_cuckoo_filter=False, prepare_threshold=None) as cache:
        assert cache.set("k", "v") and cache.get("k") == "v"
