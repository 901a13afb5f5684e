"""`AsyncCache`: the `Cache` API for asyncio, awaiting the very same statement steps.

Needs SQLAlchemy's asyncio support and an async driver: the `asyncio` extra
(`pip install 'fastpgcache[asyncio]'`) brings greenlet and psycopg 3.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, AsyncIterator, Callable

from sqlalchemy import exc as sa_exc
try:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
except ImportError as missing:  # greenlet is not installed
    raise ImportError("AsyncCache needs the `asyncio` extra: pip install 'fastpgcache[asyncio]'") from missing

from .cache import _MISSING, Cache, _call_key, _check_wait, _negate
from .keys import normalize_ttl, pattern_regex
from .errors import check_positive_int, pool_timeout_error, raise_translated
from .execution import _is_read
from .failsafe import DATABASE_ERRORS


def _awaitable(operation):
    """The async twin of one `Cache` operation: same steps, awaited instead of blocked on."""
    steps, fallback = operation.steps, operation.fallback

    @functools.wraps(operation)
    async def run(self, *args, **kwargs):
        try:
            result = await self._drive(steps(self, *args, **kwargs))
        except DATABASE_ERRORS as error:
            return self._fall_back(run, error, args, kwargs)
        self._failsafe.succeeded()
        return result

    run.steps, run.fallback = steps, fallback
    return run


class AsyncCache(Cache):
    """`Cache` for asyncio: the same methods, semantics and errors, each one awaited.

    Binds to an `AsyncEngine` (each call its own short transaction), an
    `AsyncConnection` or an `AsyncSession` (the caller commits or rolls back)::

        from sqlalchemy.ext.asyncio import create_async_engine
        from fastpgcache.aio import AsyncCache

        cache = AsyncCache(create_async_engine("postgresql+psycopg://app@localhost/app"))
        await cache.set("user:1", {"name": "Alice"}, ttl=3600)
        await cache.get("user:1")          # {'name': 'Alice'}

    Options are those of `Cache` (schema, table, user_id, pickle, failsafe,
    on_error, expire_every, max_entries), except that there is no
    negative-lookup guard here: every `get` asks the database.
    """

    _bind_types: tuple = (AsyncSession, AsyncConnection, AsyncEngine)
    _engine_type: type = AsyncEngine

    def __init__(self, bind, **options):
        if options.get("guard") is not None:
            raise ValueError("AsyncCache has no negative-lookup guard (its filter is fed by blocking calls); "
                             "leave guard unset")
        super().__init__(bind, **options)
        if isinstance(bind, AsyncEngine):
            # As in Cache: one statement is atomic, so skip the BEGIN/COMMIT round trips.
            self._engine = bind.execution_options(isolation_level="AUTOCOMMIT")

    # -- running steps -----------------------------------------------------------------

    async def _drive(self, steps):
        try:
            request = next(steps)
            while True:
                try:
                    result = await self._execute(*request)
                except Exception as error:
                    request = steps.throw(error)
                else:
                    request = steps.send(result)
        except StopIteration as done:
            return done.value

    async def _execute(self, statement, params: dict, consume: Callable[[Any], Any]):
        """Run one statement and consume its (buffered) result; driver errors become cache errors."""
        params = self._params(params)
        try:
            if isinstance(self.bind, AsyncEngine):
                return await self._execute_on_engine(statement, params, consume)
            connection = await self.bind.connection() if isinstance(self.bind, AsyncSession) else self.bind
            return consume(await connection.execute(statement, params, ))
        except sa_exc.DBAPIError as error:
            raise_translated(error, self._where)
        except sa_exc.TimeoutError:
            if not isinstance(self.bind, AsyncEngine):
                raise
            raise pool_timeout_error(self.bind.pool) from None

    async def _execute_on_engine(self, statement, params, consume):
        # As Cache: one retry of a read on a connection found dead (server restarted);
        # never of a write, which may have committed before the connection dropped.
        for attempt in (1, 2):
            try:
                async with self._engine.connect() as connection:
                    return consume(await connection.execute(statement, params, ))
            except sa_exc.DBAPIError as error:
                if attempt == 2 or not error.connection_invalidated or not _is_read(statement):
                    raise

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
                    value = _MISSING if claimed else await twin.get(key, _MISSING)
                    return value if value is not _MISSING else await twin._fill(key, fn, ttl)
        except (sa_exc.DBAPIError, sa_exc.TimeoutError) as error:  # connecting or committing; statements translate
            self._absorb_connect_error(error)
        return await self._fill(key, fn, ttl)

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


async def _computed(fn):
    # fn() awaited when it is a coroutine function (get_or_set takes both kinds).
    value = fn()
    return await value if inspect.isawaitable(value) else value


def _adopt_operations() -> None:
    # Every Cache operation, present and future, gets its awaited twin here.
    for name, member in vars(Cache).items():
        if hasattr(member, "steps") and name not in vars(AsyncCache):
            setattr(AsyncCache, name, _awaitable(member))


_adopt_operations()
