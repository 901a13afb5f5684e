"""`AsyncCache` and `AsyncFastPgCache`: the `Cache` API for asyncio, awaiting the very same statement steps.

As the blocking facade runs its statements on the driver's cursor, these run
them on the async driver's own connection (psycopg 3's `AsyncConnection`, or
asyncpg's), not through SQLAlchemy's async layer and its greenlet bridge: on a
connection of an AsyncEngine held between calls (the pool still creates,
counts and limits them), or on the caller's AsyncSession/AsyncConnection, in
its transaction. Watched engines (echo, logging, cursor listeners) go through
SQLAlchemy's execution, as in `Cache`.

Needs SQLAlchemy's asyncio support and an async driver: the `asyncio` extra
(`pip install 'fastpgcache[asyncio]'`) brings greenlet and psycopg 3.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

try:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
    from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool
    from sqlalchemy.util import greenlet_spawn
except ImportError as missing:  # greenlet is not installed
    raise ImportError("AsyncCache needs the `asyncio` extra: pip install 'fastpgcache[asyncio]'") from missing

from .cache import _MISSING, BaseCache, Cache, _call_key, _check_wait, _negate
from .errors import (
    CacheConnectionError,
    check_positive_int,
    check_positive_seconds,
    connection_hint,
    pool_timeout_error,
    raise_translated,
)
from .execution import _is_read, compile_for, watched
from .failsafe import DATABASE_ERRORS
from .keys import normalize_key, normalize_ttl, pattern_regex
from .leases import ConnectionLeases, Lease, LeasingQueuePool, leases_for
from .model import DEFAULT_SCHEMA


class Buffered:
    """A statement's rows, fetched: what the steps' consume functions read (fetchone, fetchall, rowcount)."""

    __slots__ = ("rows", "rowcount", "_next")

    def __init__(self, rows, rowcount):
        self.rows, self.rowcount, self._next = rows, rowcount, 0

    def fetchone(self):
        if self._next >= len(self.rows):
            return None
        self._next += 1
        return self.rows[self._next - 1]

    def fetchall(self):
        rows, self._next = self.rows[self._next:], len(self.rows)
        return rows


_TUPLES_OK = 2  # libpq's PGRES_TUPLES_OK: a result with rows


class _Psycopg:
    """psycopg 3's AsyncConnection: its own cursor, pyformat parameters, the autocommit switch."""

    @staticmethod
    def errors():
        import psycopg

        return psycopg.Error

    @staticmethod
    async def run(lease_or_driver, sql: str, values) -> Buffered:
        cursor = lease_or_driver.cursor if isinstance(lease_or_driver, Lease) else lease_or_driver.cursor()
        await cursor.execute(sql, values)
        # The result's status, not cursor.description: that builds a Column object per column, every call.
        result = cursor.pgresult
        rows = await cursor.fetchall() if result is not None and result.status == _TUPLES_OK else []
        return Buffered(rows, cursor.rowcount)

    @staticmethod
    def gone(driver) -> bool:
        return bool(driver.broken or driver.closed)


class _Asyncpg:
    """asyncpg: no cursor, $n parameters in order, statements prepared and cached by the driver."""

    @staticmethod
    def errors():
        import asyncpg

        return (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

    @staticmethod
    async def run(lease_or_driver, sql: str, values) -> Buffered:
        driver = lease_or_driver.driver if isinstance(lease_or_driver, Lease) else lease_or_driver
        return Buffered(await driver.fetch(sql, *values), None)

    @staticmethod
    def gone(driver) -> bool:
        return driver.is_closed()


def _driver_for(dialect):
    # The raw driver behind SQLAlchemy's async dialect.
    if dialect.driver == "asyncpg":
        return _Asyncpg
    if dialect.driver == "psycopg":
        return _Psycopg
    raise ValueError(f"AsyncCache needs postgresql+psycopg:// or postgresql+asyncpg://, not {dialect.driver}")


class AsyncLeases(ConnectionLeases):
    """`ConnectionLeases` for an AsyncEngine. Idle connections are taken and kept without awaiting; once
    every connection it may hold is busy, a caller waits for the next one given back, handed over
    directly (no pool round trip); whatever may talk to the server (a new connection, closing one)
    runs through SQLAlchemy's greenlet bridge, as SQLAlchemy's own pool does."""

    def __init__(self, engine, keep: int = 0):
        super().__init__(engine, keep)
        self._held = 0  # connections checked out of the pool for this stack: busy or idle
        # Callers waiting for a busy one, first come first served: (future, deadline on the loop's clock).
        self._takers: collections.deque = collections.deque()
        self._timer: asyncio.TimerHandle | None = None  # fires at the first waiter's deadline

    def take_idle(self) -> Lease | None:
        """The idle connection on top, if its server has not hung up, without awaiting; else None: `take()`."""
        if self._idle and not self._idle[-1].hung_up():
            return self._idle.pop()
        return None

    async def take(self) -> Lease:
        while True:
            try:
                lease = self._idle.pop()
            except IndexError:
                if self.keep and self._held >= self.keep:
                    lease = await self._handed_over()
                else:
                    self._held += 1
                    try:
                        return Lease(await greenlet_spawn(self._from_pool))
                    except BaseException:
                        self._held -= 1
                        raise
            if not lease.hung_up():
                return lease
            self._held -= 1
            await greenlet_spawn(lease.invalidate)

    async def _handed_over(self) -> Lease:
        # Every held connection is busy: wait (at most the pool's timeout) for one given back. One timer
        # for all waiters rather than asyncio.wait_for or a timer each: wait_for costs the waiter a second
        # trip round the event loop, and 100 tasks on 10 connections ran at 0.57 of a raw driver's rate.
        loop = asyncio.get_running_loop()
        taker = loop.create_future()
        pool = self.engine.pool
        # Only a pool of fixed size (a QueuePool) keeps connections, so only its callers wait here.
        self._takers.append((taker, loop.time() + (pool.timeout() if isinstance(pool, QueuePool) else 30)))
        if self._timer is None:
            self._timer = loop.call_at(self._takers[0][1], self._time_up)
        try:
            return await taker
        except asyncio.CancelledError:
            if taker.done() and not taker.cancelled() and taker.exception() is None:
                await self.give_back(taker.result())  # handed a connection just as the caller gave up
            raise

    def _time_up(self) -> None:
        # Fail the waiters whose deadline passed with every connection still busy; wake at the next one's.
        loop = asyncio.get_running_loop()
        self._timer = None
        while self._takers and (self._takers[0][0].done() or self._takers[0][1] <= loop.time()):
            taker, _ = self._takers.popleft()
            if not taker.done():
                taker.set_exception(sa_exc.TimeoutError("no connection was given back in time"))
        if self._takers:
            self._timer = loop.call_at(self._takers[0][1], self._time_up)

    def pass_on(self, lease: Lease) -> bool:
        """Hand `lease` to the first caller waiting, else keep it idle, without awaiting; False: `give_back()` it."""
        if self._waiting or self._closed or not lease.is_valid:
            return False
        while self._takers:
            taker, _ = self._takers.popleft()
            if not taker.done():
                taker.set_result(lease)
                return True
        if len(self._idle) < self.keep:
            self._idle.append(lease)
            return True
        return False

    async def give_back(self, lease: Lease) -> None:
        if not self.pass_on(lease):
            self._held -= 1
            await greenlet_spawn(self.release, lease)  # closed or invalidated, in the pool's own ways

    async def lose(self, lease: Lease, error: BaseException) -> None:
        self._held -= 1
        await greenlet_spawn(self.lost, lease, error)

    def drain(self, count: int | None = None) -> None:
        before = len(self._idle)
        super().drain(count)
        self._held -= before - len(self._idle)


class AsyncLeasingQueuePool(AsyncAdaptedQueuePool, LeasingQueuePool):
    """`LeasingQueuePool` for asyncio engines: a checkout from the pool itself may take back an idle
    connection a cache holds."""


def _awaitable(operation):
    """The async twin of one `Cache` operation: same steps, awaited instead of blocked on."""
    steps, fallback = operation.steps, operation.fallback

    @functools.wraps(operation)
    async def run(self, *args, **kwargs):
        # Drives the steps itself, as execution.py's blocking run() does, awaited: every coroutine layer here is
        # crossed again at each resume, and with 100 tasks on 10 connections each call resumes twice.
        try:
            walk = steps(self, *args, **kwargs)
            try:
                request = next(walk)
                while True:
                    try:
                        answer = await self._execute(*request)
                    except Exception as error:
                        request = walk.throw(error)
                    else:
                        request = walk.send(answer)
            except StopIteration as done:
                result = done.value
        except DATABASE_ERRORS as error:
            return self._fall_back(run, error, args, kwargs)
        if self._failsafe.failing:
            self._failsafe.succeeded()
        return result

    run.steps, run.fallback = steps, fallback
    return run


class AsyncCache(BaseCache):
    """`Cache` for asyncio: the same methods, semantics and errors, each one awaited.

    Binds to an `AsyncEngine` (each call its own short transaction), an
    `AsyncConnection` or an `AsyncSession` (the caller commits or rolls back)::

        from sqlalchemy.ext.asyncio import create_async_engine
        from fastpgcache.aio import AsyncCache

        cache = AsyncCache(create_async_engine("postgresql+psycopg://app@localhost/app"))
        await cache.set("user:1", {"name": "Alice"}, ttl=3600)
        await cache.get("user:1")          # {'name': 'Alice'}

    Options are those of `Cache`. A negative-lookup guard comes with
    `AsyncFastPgCache`, which owns the engine it listens on.
    """

    _bind_types: tuple = (AsyncSession, AsyncConnection, AsyncEngine)
    _engine_type: type = AsyncEngine
    _leases: AsyncLeases | None

    def __init__(self, bind, **options):
        guard = options.pop("guard", None)
        if guard is not None and not isinstance(self, AsyncFastPgCache):
            raise ValueError("AsyncCache has no negative-lookup guard of its own (its listener needs a blocking "
                             "connection): use AsyncFastPgCache, which owns one")
        super().__init__(bind, **options)
        self.guard = guard
        self._driver = _driver_for(self._sync_engine().dialect)
        if isinstance(bind, AsyncEngine):
            self._leases = leases_for(bind.sync_engine, kind=AsyncLeases)

    def _sync_engine(self):
        bind = self.bind
        return bind.sync_engine if isinstance(bind, AsyncEngine) else bind.bind.sync_engine if isinstance(
            bind, AsyncSession) else bind.sync_engine

    # -- running steps -----------------------------------------------------------------

    async def _execute(self, statement, params: dict, consume: Callable[[Any], Any]):
        """Run one statement and consume its (fetched) rows; driver errors become cache errors.

        On an Engine, as in `Cache`: autocommit, one retry of a read on a connection found dead, never of a
        write (in this one coroutine rather than two: see `_awaitable`).
        """
        if self.user_id:
            params = {"user_id": self.user_id, **params}
        leases = self._leases
        try:
            if leases is None:
                return await self._execute_in_transaction(statement, params, consume)
            engine = self.bind.sync_engine
            if watched(engine):
                async with self.bind.connect() as connection:
                    connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
                    return consume(await connection.execute(statement, params))
            for attempt in (1, 2):
                lease = leases.take_idle() or await leases.take()
                lost = False
                # psycopg 3 connections of an engine that is not AUTOCOMMIT are switched for the call (asyncpg
                # has no such switch: outside a transaction block every statement commits itself).
                switch = self._driver is _Psycopg and not leases.autocommit and not lease.driver.autocommit
                try:
                    if switch:
                        await lease.driver.set_autocommit(True)
                    return consume(await self._send(lease, engine.dialect, statement, params))
                except sa_exc.DBAPIError as error:
                    if error.connection_invalidated:
                        lost = True
                        await leases.lose(lease, error)
                    if attempt == 2 or not error.connection_invalidated or not _is_read(statement):
                        raise
                finally:
                    if not lost:
                        if switch and lease.is_valid:
                            await lease.driver.set_autocommit(False)
                        if not leases.pass_on(lease):
                            await leases.give_back(lease)
        except sa_exc.DBAPIError as error:
            raise_translated(error, self._where)
        except sa_exc.TimeoutError:
            if leases is None:
                raise
            raise pool_timeout_error(self.bind.sync_engine.pool) from None

    async def _execute_in_transaction(self, statement, params, consume):
        # The caller's AsyncSession or AsyncConnection: its transaction, begun if need be.
        connection = await self.bind.connection() if isinstance(self.bind, AsyncSession) else self.bind
        if not connection.in_transaction():
            await connection.begin()
        if watched(connection.sync_engine) or self._driver is _Asyncpg:
            # Watched, or asyncpg, whose adapter begins the caller's transaction only when a statement goes
            # through it: SQLAlchemy's execution (a statement sent around it would commit on its own).
            return consume(await connection.execute(statement, params))
        fairy = await connection.get_raw_connection()
        try:
            return consume(await self._send(fairy.driver_connection, connection.dialect, statement, params))
        except sa_exc.DBAPIError as error:
            if error.connection_invalidated:
                await connection.invalidate()
            raise

    async def _send(self, lease_or_driver, dialect, statement, params) -> Buffered:
        # One statement on the async driver, its rows fetched; driver errors as SQLAlchemy's, parameters hidden.
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = compile_for(statement, dialect)
        values = compiled.values(params)
        driver = self._driver
        try:
            return await driver.run(lease_or_driver, compiled.sql, values)
        except driver.errors() as error:
            raw = lease_or_driver.driver if isinstance(lease_or_driver, Lease) else lease_or_driver
            # hide_parameters: cached values never reach an error message, as on the blocking path.
            raise sa_exc.DBAPIError.instance(compiled.sql, values, error, driver.errors(), hide_parameters=True,
                                             connection_invalidated=driver.gone(raw), dialect=dialect) from None

    # -- what is not a single operation ---------------------------------------------

    async def decr(self, key, amount: int = 1, *, create: bool = True) -> int | None:
        """Subtract `amount` from the integer at `key`: `await cache.decr("stock")`."""
        return await self.incr(key, _negate(amount), create=create)

    async def keys(self, pattern: str = "*") -> list[str]:
        """Live keys matching a Redis glob pattern, sorted: `await cache.keys("user:*")`."""
        return await self._keys_matching(pattern_regex(pattern))

    async def clear(self, pattern: str | None = None) -> int | None:
        """Remove every entry of this role, or those matching a glob: `await cache.clear("session:*")`."""
        return await self._clear(None if pattern is None else pattern_regex(pattern))

    async def scan_iter(self, pattern: str = "*", batch_size: int = 1000) -> AsyncIterator[str]:
        """Iterate over matching live keys in key order::

            async for key in cache.scan_iter("user:*"):
                ...
        """
        regex, after = pattern_regex(pattern), ""
        check_positive_int("batch_size", batch_size)
        while True:
            batch = await self._scan_batch(regex, after, batch_size)
            for key in batch:
                yield key
            if len(batch) < batch_size:
                return
            after = batch[-1]

    async def get_or_set(self, key, fn: Callable[[], Any], ttl=None, *, lock: bool = True, wait: float = 5.0):
        """The cached value of `key`, else `fn()` (awaited if it is a coroutine) stored and returned::

            profile = await cache.get_or_set(f"profile:{uid}", lambda: load_profile(uid), ttl=300)

        `lock` and `wait` protect against stampedes exactly as in `Cache.get_or_set`.
        """
        normalize_ttl(ttl)
        _check_wait(wait)
        value = await self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        if lock and isinstance(self.bind, AsyncEngine):
            return await self._fill_claimed(key, fn, ttl, wait)
        return await self._fill(key, fn, ttl)

    async def _fill(self, key, fn, ttl):
        value = await _computed(fn)
        await self.set(key, value, ttl)
        return value

    async def _fill_claimed(self, key, fn, ttl, wait):
        # As Cache._fill_claimed: the first caller computes under its claim on the key, the rest read its result.
        if self._identity is None and await self._identity_now() is None:
            return await self._fill(key, fn, ttl)  # failsafe answered for an unreachable database
        try:
            async with self.bind.connect() as connection:
                await connection.execution_options(isolation_level="READ COMMITTED")
                async with connection.begin():
                    twin = self._bound_to(connection)
                    claimed = await twin._claim(key, wait)
                    if claimed is None:  # waited `wait` for another caller: compute, and leave storing to it
                        return await _computed(fn)
                    if claimed:
                        value = await twin._fill(key, fn, ttl)
                        self._remember([normalize_key(key)])
                        return value
            # A live value is there: read once the claim's transaction is over (Citus: see Cache._fill_claimed).
            value = await self._unguarded().get(key, _MISSING)
            if value is not _MISSING:
                return value
        except (sa_exc.DBAPIError, sa_exc.TimeoutError) as error:  # connecting or committing; statements translate
            self._absorb_connect_error(error)
        return await self._fill(key, fn, ttl)

    def _absorb_connect_error(self, error) -> None:
        """Failsafe's answer to a connection get_or_set could not get (the async engine's pool)."""
        if isinstance(error, sa_exc.TimeoutError):
            error = pool_timeout_error(self.bind.sync_engine.pool)
        super()._absorb_connect_error(error)

    def cached(self, ttl=None, key: str | Callable[..., str] | None = None, *, lock: bool = True):
        """Decorator caching an async function's result per arguments::

            @cache.cached(ttl=60)
            async def report(day): ...

        `key` works as in `Cache.cached`.
        """
        normalize_ttl(ttl)

        def decorate(fn):
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"AsyncCache.cached() decorates async functions; {fn.__qualname__} is not one "
                                "(use Cache.cached for plain functions)")

            @functools.wraps(fn)
            async def wrapper(*args, **kwargs):
                cache_key = _call_key(fn, key, args, kwargs)
                return await self.get_or_set(cache_key, lambda: fn(*args, **kwargs), ttl, lock=lock)

            return wrapper

        return decorate


ASYNC_DRIVERS = ("psycopg", "asyncpg")


class AsyncFastPgCache(AsyncCache):
    """An asyncio client owning its engine (and, with the `bloom` extra, a negative-lookup guard)::

        from fastpgcache import AsyncFastPgCache

        async with AsyncFastPgCache(url="postgresql+psycopg://app@db/app") as cache:
            await cache.set("session", {"user": "Alice"}, ttl=3600)
            await cache.get("session")        # {'user': 'Alice'}
            await cache.get("never-written")  # answered by the guard, no round trip

    A bare `postgresql://` URL uses psycopg 3; `postgresql+asyncpg://` uses
    asyncpg. The pool holds up to `maxconn` connections; `statement_timeout`
    (5 s) and `lock_timeout` (1 s) hold on each of them; a caller waits at most
    `pool_timeout` for one. The guard listens on a blocking psycopg 3
    connection of its own, in a thread, so its answers need no await.
    """

    _leases: AsyncLeases  # the engine is its own, so every call leases

    def __init__(self, url: str | URL | None = None, *, schema: str = DEFAULT_SCHEMA, table: str | None = None,
                 maxconn: int = 10, pool_timeout: float = 30.0, prepare_threshold: int | None = 5,
                 statement_timeout: float | None = 5.0, lock_timeout: float | None = 1.0,
                 use_cuckoo_filter: bool = True, cuckoo_capacity: int = 1_000_000, **options):
        from .client import _secrets_apart, _timeout_options, cache_engine

        check_positive_int("maxconn", maxconn)
        check_positive_seconds("pool_timeout", pool_timeout)
        target, secret = _secrets_apart(_async_url(url))
        settings = _timeout_options(target, statement_timeout, lock_timeout)
        if target.get_driver_name() == "asyncpg":
            # asyncpg takes server settings as such (application_name among them), and prepares (and
            # caches) every statement itself.
            server_settings = _as_server_settings(settings.get("options", ""))
            if "application_name" in target.query:
                server_settings["application_name"] = target.query["application_name"]
                target = target.difference_update_query(["application_name"])
            connect_args = {**secret, "server_settings": server_settings}
        else:
            connect_args = {**secret, **settings, "prepare_threshold": prepare_threshold}
        engine = create_async_engine(target, isolation_level="AUTOCOMMIT", pool_reset_on_return=None,
                                     poolclass=AsyncLeasingQueuePool, pool_size=maxconn, max_overflow=0,
                                     pool_timeout=pool_timeout, connect_args=connect_args)
        self._guard_engine = None
        guard = None
        if use_cuckoo_filter:
            from .guard import NegativeLookupGuard

            # The guard's own blocking engine: two connections at most (its listener, its warm-up reads).
            self._guard_engine = cache_engine(target.set(drivername="postgresql+psycopg"), pool_size=2,
                                              max_overflow=0, connect_args={**secret, **settings})
            guard = NegativeLookupGuard(Cache(self._guard_engine, schema=schema, table=table,
                                              user_id=options.get("user_id")), cuckoo_capacity).start()
        super().__init__(engine, schema=schema, table=table, guard=guard, **options)
        leases_for(engine.sync_engine, keep=maxconn, kind=AsyncLeases)

    def __repr__(self) -> str:
        from .client import hide_secrets

        return f"<AsyncFastPgCache {hide_secrets(repr(self.bind.url))} {self._where}>"

    async def open(self, minconn: int = 1) -> AsyncFastPgCache:
        """Open `minconn` connections now, so a wrong host or password fails here; returns self."""
        leases = []
        try:
            for _ in range(minconn):
                leases.append(await self._leases.take())
        except sa_exc.DBAPIError as error:
            failure = CacheConnectionError(f"cannot connect to the database: {connection_hint(error)}")
            if not self._failsafe.absorb(failure, "connect"):
                raise failure from None
        finally:
            for lease in leases:
                await self._leases.give_back(lease)
        return self

    async def close(self) -> None:
        """Close every connection, and stop the guard."""
        if self.guard is not None:
            self.guard.stop()
        self._leases.close()
        await self.bind.dispose()
        if self._guard_engine is not None:
            self._guard_engine.dispose()

    async def __aenter__(self) -> AsyncFastPgCache:
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _async_url(url: str | URL | None) -> URL:
    # A bare postgresql:// is psycopg 3's async dialect; FASTPGCACHE_URL-style defaults otherwise.
    from sqlalchemy.engine import make_url

    target = make_url(url or "postgresql://postgres@localhost/postgres")
    if target.get_backend_name() != "postgresql":
        raise ValueError(f"AsyncFastPgCache needs a postgresql:// URL, not {target.drivername}://")
    if target.drivername in ("postgresql", "postgres"):
        return target.set(drivername="postgresql+psycopg")
    if target.get_driver_name() not in ASYNC_DRIVERS:
        raise ValueError(f"AsyncFastPgCache needs postgresql+psycopg:// or postgresql+asyncpg://, "
                         f"not {target.drivername}://")
    return target


def _as_server_settings(options: str) -> dict:
    # libpq's "-c name=value" options as asyncpg's server_settings.
    parts = options.split()
    return dict(part.split("=", 1) for flag, part in zip(parts, parts[1:], strict=False) if flag == "-c")


async def _computed(fn):
    # fn() awaited when it is a coroutine function (get_or_set takes both kinds).
    value = fn()
    return await value if inspect.isawaitable(value) else value


def _adopt_operations() -> None:
    # Every Cache operation, present and future, gets its awaited twin here.
    for name, member in vars(BaseCache).items():
        if hasattr(member, "steps") and name not in vars(AsyncCache):
            setattr(AsyncCache, name, _awaitable(member))


_adopt_operations()
