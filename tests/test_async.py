"""psycopg 3 against the real server: AsyncCache (the sync facade's behaviour, awaited) and prepared statements."""
from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import inspect
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from fastpgcache import (
    AsyncFastPgCache,
    Cache,
    CacheLimitError,
    CacheNotSetUpError,
    CachePermissionError,
    CacheTimeoutError,
    FastPgCache,
    setup_cache,
)
from fastpgcache.aio import AsyncCache
from fastpgcache.client import PREPARE_THRESHOLD


def async_url(url, driver="psycopg"):
    return make_url(url).set(drivername=f"postgresql+{driver}")


@pytest_asyncio.fixture(params=["psycopg", "asyncpg"])
async def aengine(pg_url, request):
    """An AsyncEngine on each async driver AsyncCache supports."""
    engine = create_async_engine(async_url(pg_url, request.param), pool_size=10, max_overflow=10)
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture
async def acache(aengine, schema):
    return AsyncCache(aengine, schema=schema)


# -- the API is the sync one, awaited -------------------------------------------------


def test_every_public_method_is_awaitable_or_a_decorator():
    public = {name for name in dir(Cache) if not name.startswith("_") and callable(getattr(Cache, name))}
    for name in public - {"cached"}:
        method = getattr(AsyncCache, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name


def test_every_public_method_takes_the_sync_arguments():
    public = {name for name in dir(Cache) if not name.startswith("_") and callable(getattr(Cache, name))}
    def arguments(function):
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    for name in public:
        assert arguments(getattr(AsyncCache, name)) == arguments(getattr(Cache, name)), name


@pytest.mark.asyncio
async def test_get_or_set_computes_once_under_a_stampede(acache):
    calls = []

    async def slow():
        calls.append(1)
        await asyncio.sleep(0.2)
        return {"computed": len(calls)}

    results = await asyncio.gather(*(acache.get_or_set("hot", slow, ttl=60) for _ in range(8)))
    assert calls == [1]
    assert results == [{"computed": 1}] * 8


def test_rejects_a_sync_bind(engine):
    with pytest.raises(TypeError, match="AsyncEngine, not Engine"):
        AsyncCache(engine)


@pytest.mark.asyncio
async def test_values_round_trip_to_the_same_type(acache):
    values = {"s": "123", "b": b"\x00\xff", "d": {"a": [1, 2]}, "l": [1, "x"], "i": 7, "f": 1.5,
              "t": True, "n": None, "u": "naïve ☃"}
    for key, value in values.items():
        assert await acache.set(key, value) is True
    for key, value in values.items():
        got = await acache.get(key)
        assert got == value and type(got) is type(value)
    raw = await acache.get("d", parse_json=False)
    assert isinstance(raw, str) and raw.replace(" ", "") == '{"a":[1,2]}'


@pytest.mark.asyncio
async def test_missing_key_returns_default(acache):
    assert await acache.get("nope") is None
    assert await acache.get("nope", "fallback") == "fallback"
    assert await acache.exists("nope") is False
    assert await acache.ttl("nope") == -2


@pytest.mark.asyncio
async def test_nx_and_xx(acache):
    assert await acache.set("lock", "me", nx=True) is True
    assert await acache.set("lock", "you", nx=True) is False
    assert await acache.get("lock") == "me"
    assert await acache.set("absent", 1, xx=True) is False
    assert await acache.set("lock", "them", xx=True) is True
    assert await acache.get("lock") == "them"
    with pytest.raises(ValueError, match="mutually exclusive"):
        await acache.set("lock", 1, nx=True, xx=True)


@pytest.mark.asyncio
async def test_ttl_expire_persist(acache):
    await acache.set("k", 1, ttl=dt.timedelta(seconds=100))
    assert await acache.ttl("k") == 100
    assert await acache.expire("k", 50) is True
    assert await acache.ttl("k") == 50
    assert await acache.persist("k") is True
    assert await acache.ttl("k") == -1
    assert await acache.persist("k") is False
    assert await acache.expire("missing", 5) is False


@pytest.mark.asyncio
async def test_expired_values_are_invisible_and_cleaned_up(acache):
    await acache.set("short", "x", ttl=0.2)
    await acache.set("long", "y", ttl=100)
    await asyncio.sleep(0.35)
    assert await acache.get("short") is None
    assert await acache.exists("short") is False
    stats = await acache.stats()
    assert (stats["entries"], stats["expired"]) == (1, 1)
    assert await acache.set("short", "again", nx=True) is True
    await acache.expire("short", 0.1)
    await asyncio.sleep(0.25)
    assert await acache.cleanup(batch_size=1) == 1
    stats = await acache.stats()
    assert (stats["entries"], stats["expired"]) == (1, 0)


@pytest.mark.asyncio
async def test_incr_and_decr(acache):
    assert await acache.incr("n") == 1
    assert await acache.incr("n", 10) == 11
    assert await acache.decr("n", 2) == 9
    assert await acache.get("n") == 9
    await acache.set("word", "abc")
    with pytest.raises(ValueError, match="not an integer"):
        await acache.incr("word")
    await acache.set("big", 2**63 - 1)
    with pytest.raises(ValueError, match="overflows"):
        await acache.incr("big")
    with pytest.raises(TypeError, match="amount must be an int"):
        await acache.decr("n", 1.5)


@pytest.mark.asyncio
async def test_batches(acache):
    assert await acache.set_many({"a": 1, "b": [2], "c": "3"}, ttl=60) == 3
    assert await acache.get_many(["a", "b", "c", "zzz"]) == {"a": 1, "b": [2], "c": "3"}
    assert await acache.delete_many(["a", "b", "zzz"]) == 2
    assert await acache.delete("c") is True
    assert await acache.delete("c") is False
    assert await acache.set_many({}) == 0
    assert await acache.get_many([]) == {}


@pytest.mark.asyncio
async def test_keys_and_scan_iter(acache):
    await acache.set_many({f"user:{i:02}": i for i in range(7)} | {"other": 0, "100%_x": 1})
    assert await acache.keys("user:0[0-2]") == ["user:00", "user:01", "user:02"]
    assert await acache.keys("100%_?") == ["100%_x"]
    scanned = [key async for key in acache.scan_iter("user:*", batch_size=3)]
    assert scanned == [f"user:{i:02}" for i in range(7)]
    with pytest.raises(ValueError, match="batch_size"):
        [key async for key in acache.scan_iter(batch_size=0)]
    assert await acache.clear() == 9
    assert await acache.keys() == []


@pytest.mark.asyncio
async def test_bad_input_raises_before_the_database(acache):
    with pytest.raises(TypeError, match="invalid key type"):
        await acache.get(["list"])
    with pytest.raises(ValueError, match="positive number of seconds"):
        await acache.set("k", 1, ttl=-1)
    with pytest.raises(TypeError, match="set"):
        await acache.set("k", {1, 2})
    with pytest.raises(TypeError, match="mapping"):
        await acache.set_many([("a", 1)])


@pytest.mark.asyncio
async def test_missing_table_says_how_to_create_it(aengine):
    cache = AsyncCache(aengine, schema="no_such_schema_here")
    with pytest.raises(CacheNotSetUpError, match="fastpgcache-admin"):
        await cache.get("k")


# -- caller's transaction -------------------------------------------------------------


@pytest.mark.asyncio
async def test_rolled_back_session_leaves_nothing(aengine, acache, schema):
    async with AsyncSession(aengine) as session:
        in_tx = AsyncCache(session, schema=schema)
        await in_tx.set("tx", "value")
        assert await in_tx.get("tx") == "value"
        assert await acache.get("tx") is None  # not visible outside before commit
        await session.rollback()
    assert await acache.get("tx") is None


@pytest.mark.asyncio
async def test_committed_session_is_visible(aengine, acache, schema):
    async with AsyncSession(aengine) as session:
        await AsyncCache(session, schema=schema).set("tx", "value")
        await session.commit()
    assert await acache.get("tx") == "value"


@pytest.mark.asyncio
async def test_connection_bind_runs_in_its_transaction(aengine, acache, schema):
    async with aengine.connect() as connection:
        cache = AsyncCache(connection, schema=schema)
        await cache.incr("counter", 5)
        assert await cache.get("counter") == 5
        await connection.rollback()
    assert await acache.get("counter") is None


@pytest.mark.asyncio
async def test_200_concurrent_incr_on_one_key_is_exact(acache):
    results = await asyncio.gather(*(acache.incr("hits") for _ in range(200)))
    assert await acache.get("hits") == 200
    assert sorted(results) == list(range(1, 201))


# -- isolation ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_roles_only_see_their_own_rows(acache, schema, make_role, engine):
    alice, alice_url = make_role("alice")
    with engine.begin() as connection:
        connection.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{alice}"'))
        connection.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON "{schema}".cache TO "{alice}"'))
    await acache.set("secret", "admin's")
    alice_engine = create_async_engine(async_url(alice_url))
    try:
        as_alice = AsyncCache(alice_engine, schema=schema)
        assert await as_alice.get("secret") is None
        await as_alice.set("secret", "alice's")
        assert await as_alice.get("secret") == "alice's"
        assert await acache.get("secret") == "admin's"
        spoofing = AsyncCache(alice_engine, schema=schema, user_id="postgres")
        with pytest.raises(CachePermissionError):
            await spoofing.set("x", 1)
    finally:
        await alice_engine.dispose()


# -- helpers for callers ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_or_set_computes_once(acache):
    calls = []

    async def slow():
        calls.append(1)
        return {"v": len(calls)}

    assert await acache.get_or_set("g", slow, ttl=60) == {"v": 1}
    assert await acache.get_or_set("g", slow, ttl=60) == {"v": 1}
    assert await acache.get_or_set("plain", lambda: "sync fn") == "sync fn"
    assert calls == [1]


@pytest.mark.asyncio
async def test_cached_decorator(acache):
    calls = []

    @acache.cached(ttl=60)
    async def square(x):
        calls.append(x)
        return x * x

    assert [await square(3), await square(3), await square(4)] == [9, 9, 16]
    assert calls == [3, 4]

    @acache.cached(key=lambda day: f"report:{day}")
    async def report(day):
        return f"report for {day}"

    assert await report("mon") == "report for mon"
    assert await acache.get("report:mon") == "report for mon"
    with pytest.raises(TypeError, match="async functions"):
        acache.cached()(lambda: 1)


# -- psycopg 3 prepared statements in the sync client ---------------------------------


def prepared_count(client: FastPgCache) -> int:
    # maxconn=1: this is the very connection the client's calls ran on.
    with client.bind.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar()


@pytest.mark.parametrize("threshold, prepared", [(0, True), (PREPARE_THRESHOLD, True), (None, False)])
def test_psycopg3_client_prepares_statements_unless_told_not_to(pg_url, schema, threshold, prepared):
    url = async_url(pg_url).render_as_string(hide_password=False)
    with FastPgCache(url=url, schema=schema, minconn=1, maxconn=1, prepare_threshold=threshold) as client:
        for i in range(PREPARE_THRESHOLD + 2):
            assert client.set("k", i) is True
            assert client.get("k") == i
        assert (prepared_count(client) >= 2) is prepared


def test_prepare_threshold_is_checked():
    with pytest.raises(ValueError, match="psycopg 3"):
        FastPgCache(url="postgresql+psycopg2://u@localhost/db", prepare_threshold=1)
    with pytest.raises(ValueError, match="int >= 0, or None"):
        FastPgCache(url="postgresql+psycopg://u@localhost/db", prepare_threshold=-1)


# -- the ASGI example -------------------------------------------------------------------


def load_example(name: str):
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_asgi_example_serves_the_slow_call_from_the_cache(pg_url, engine, schema):
    from starlette.testclient import TestClient

    example = load_example("asgi_app")
    with TestClient(example.create_app(pg_url, schema=schema)) as client:
        first = client.get("/forecast/Paris")
        second = client.get("/forecast/Paris")
        other = client.get("/forecast/Oslo")
        assert first.status_code == second.status_code == other.status_code == 200
        assert first.json()["city"] == "Paris" and other.json()["city"] == "Oslo"
        assert second.json() == first.json()  # same computed_at: served from the cache
        assert client.app.state.upstream_calls == 2
    assert 0 < Cache(engine, schema=schema).ttl("forecast:Paris") <= example.FORECAST_TTL


@pytest.mark.asyncio
async def test_failsafe_answers_like_a_miss_when_the_database_fails(aengine):
    cache = AsyncCache(aengine, schema="no_such_schema_here", failsafe=True, on_error=lambda error, op: None)
    assert await cache.get("k", "default") == "default"
    assert await cache.set("k", 1) is False
    assert await cache.get_many(["a"]) == {}


def test_async_cache_refuses_a_guard(aengine):
    with pytest.raises(ValueError, match="no negative-lookup guard"):
        AsyncCache(aengine, guard=object())


# -- AsyncFastPgCache: an engine of its own, leased connections, the guard ---------------------

def _async_client_url(pg_url, driver, application_name=None):
    url = async_url(pg_url, driver)
    return url.update_query_dict({"application_name": application_name}) if application_name else url


async def _eventually(check, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.005)
    pytest.fail(f"condition not met within {timeout} s")


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_the_async_client_answers_misses_locally_and_hears_other_writes(pg_url, engine, schema, driver):
    async with AsyncFastPgCache(url=async_url(pg_url, driver), schema=schema) as cache:
        assert await asyncio.to_thread(cache.guard.wait_until_trusted, 10)
        before = (await cache.stats())["guard_skips"]
        assert [await cache.get(f"missing:{i}") for i in range(100)] == [None] * 100
        assert (await cache.stats())["guard_skips"] - before >= 98  # a false positive may still ask the database
        await cache.set("mine", 1)
        assert await cache.get("mine") == 1  # its own write, known at once
        Cache(engine, schema=schema).set("elsewhere", "hello")  # another client, in this test the superuser...
        assert await _eventually(lambda: cache.get("elsewhere")) == "hello"  # ... with its own role's channel
        assert (await cache.stats())["guard"] == "trusted"


@pytest.mark.asyncio
async def test_the_async_client_waits_pool_timeout_then_fails_naming_maxconn(pg_url, schema):
    async with AsyncFastPgCache(url=async_url(pg_url), schema=schema, maxconn=2, pool_timeout=0.3,
                                use_cuckoo_filter=False) as cache:
        held = [await cache.bind.connect() for _ in range(2)]  # takes back the idle leased connection too
        try:
            with pytest.raises(CacheTimeoutError, match=r"all 2 pooled connections \(maxconn\) stayed busy for 0.3 s"):
                await cache.get("k")
        finally:
            for connection in held:
                await connection.close()
        assert await cache.set("k", 1) is True


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_callers_cancelled_while_waiting_for_a_connection_lose_none(pg_url, schema, driver):
    # A waiter cancelled just as a connection is handed to it must pass that connection on: lost ones
    # would leave the next callers waiting out pool_timeout.
    async with AsyncFastPgCache(url=async_url(pg_url, driver), schema=schema, maxconn=2, pool_timeout=2,
                                use_cuckoo_filter=False) as cache:
        for round_ in range(20):
            tasks = [asyncio.ensure_future(cache.set(f"c{round_}:{i}", i)) for i in range(12)]
            await asyncio.sleep(0.001 * (round_ % 5))
            for task in tasks[1::2]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        started = asyncio.get_running_loop().time()
        assert await asyncio.gather(*(cache.set(f"after:{i}", i) for i in range(8))) == [True] * 8
        assert asyncio.get_running_loop().time() - started < 1.5  # no caller waited out the 2 s pool timeout
        assert await cache.get("after:7") == 7


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_hundred_tasks_share_ten_connections(pg_url, engine, schema, driver):
    name = f"async_{uuid.uuid4().hex[:10]}"
    async with AsyncFastPgCache(url=_async_client_url(pg_url, driver, name), schema=schema, maxconn=10,
                                use_cuckoo_filter=False) as cache:
        async def task(index):
            for i in range(20):
                assert await cache.set(f"t{index}:{i}", [index, i]) is True
                assert await cache.get(f"t{index}:{i}") == [index, i]
            return await cache.incr("total", 20)

        totals = await asyncio.gather(*(task(index) for index in range(100)))
        assert sorted(totals) == list(range(20, 2001, 20))
        with engine.connect() as connection:
            opened = connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                                        {"n": name}).scalar()
        assert 1 <= opened <= 10


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_error_texts_carry_no_values(pg_url, schema, driver):
    async with AsyncFastPgCache(url=async_url(pg_url, driver), schema=schema, use_cuckoo_filter=False) as cache:
        with pytest.raises(CacheLimitError) as raised:
            await cache.set("big", "secret-value-" + "x" * 2_000_000)
        texts = [str(raised.value), str(raised.value.__cause__)]
        assert all("secret-value" not in text_ and "7365637265742d76616c7565" not in text_ for text_ in texts)
        assert "SQL parameters hidden" in texts[1]


@pytest.mark.asyncio
async def test_a_watched_async_engine_shows_every_cache_statement(aengine, schema):
    from sqlalchemy import event

    seen = []
    event.listen(aengine.sync_engine, "before_cursor_execute", lambda c, cur, statement, *rest: seen.append(statement))
    cache = AsyncCache(aengine, schema=schema)
    await cache.set("k", 1)
    assert await cache.get("k") == 1
    assert any(f"{schema}.cache_set(" in statement for statement in seen)
    assert any("cache.value" in statement for statement in seen)


@pytest.mark.own_server
@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_a_server_restart_between_calls_is_survived(driver):
    from fastpgcache.embedded import EmbeddedPostgres

    with EmbeddedPostgres() as server:
        from sqlalchemy import create_engine

        admin = create_engine(server.url)
        setup_cache(engine=admin, schema="restart")
        admin.dispose()
        async with AsyncFastPgCache(url=async_url(server.url, driver), schema="restart", maxconn=3,
                                    use_cuckoo_filter=False) as cache:
            await asyncio.gather(*(cache.set(f"k{i}", i) for i in range(6)))  # several connections leased
            await asyncio.to_thread(server.restart)
            assert await cache.get("k1") == 1  # a read on a dead connection: replaced before use (or retried)
            assert await cache.set("after", 1) is True and await cache.get("after") == 1  # a write too
