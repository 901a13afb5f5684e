"""get/set through this library on each driver, against the raw driver replaying the same SQL, in one run.

    python benchmarks/bench_drivers.py                       # FASTPGCACHE_URL, or a throwaway embedded server
    python benchmarks/bench_drivers.py --layout none         # unpinned (split: client and server on two CPUs)
    python benchmarks/bench_drivers.py --interleave call     # contenders take turns call by call, not in blocks
    python benchmarks/bench_drivers.py --redis redis://127.0.0.1:6379 --json out.json

Contenders, every one on the same server in the same run:

- psycopg2 on a plain table: raw psycopg2 (autocommit) with the plain SQL of a hand-written cache on a
  table of the cache's shape without row-level security or write functions (fastpgcache.bench.floor_sql);
- each driver replaying this library's own SQL (the statements it compiles, the parameters it sends) on
  the library's table: psycopg2 (PREPARE/EXECUTE, as the library), psycopg 3 prepared, async psycopg 3
  prepared, asyncpg;
- the library on each of them: FastPgCache (psycopg2; psycopg 3 prepared), AsyncFastPgCache (psycopg 3
  prepared; asyncpg), guard off so every call is a round trip;
- Redis (redis-py, redis.asyncio) when --redis answers.

Every contender encodes and decodes values with fastpgcache.codec, so the ratios show the rest of the work.

Workloads: `get` of existing keys, `set` overwriting existing keys (a 100-byte JSON value), one call at a
time; an async negative lookup with a warm guard; and 100 asyncio tasks sharing 10 connections (median ops/s
of 2 x rounds + 1 rounds). Each contender runs in every round, in rotating order. Ratios are to the row named
in the table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import psycopg
import psycopg2
from sqlalchemy.engine import URL, make_url

from fastpgcache import AsyncFastPgCache, FastPgCache
from fastpgcache.bench import LAYOUTS, apply_layout, floor_sql, scratch_schema
from fastpgcache.codec import JSON, as_text, decode_json, encode_json
from fastpgcache.embedded import default_url
from fastpgcache.execution import compile_for

VALUE = {"name": "Alice", "roles": ["admin", "dev"], "pad": "x" * 60}
ENCODED = encode_json(VALUE)
KEYS = [f"user:{i}" for i in range(1000)]
TASKS, TASK_CONNECTIONS, TASK_OPS = 100, 10, 20


def driver_url(url: URL, driver: str) -> URL:
    return url.set(drivername=f"postgresql+{driver}")


def libpq_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def library_sql(cache, dialect) -> dict:
    """The library's compiled get and set for `dialect`, and the fixed parameters it sends with them
    (`cache`, a blocking one, gives the statements and the role's identity)."""
    identity = cache._identity_now()
    caller = {"credential": identity.credential}
    return {"get": (compile_for(cache._s.get, dialect), {}),
            "set": (compile_for(cache._s.set, dialect), {**caller, "ttl": None, **cache._cull})}


# -- blocking contenders ------------------------------------------------------------------------

class Floor:
    """Raw psycopg2 on the plain table: what a hand-written cache would send."""

    def __init__(self, connection, table: str):
        self.cursor = connection.cursor()
        self.sql = floor_sql(table)

    def get(self, key):
        statement, _, _ = self.sql["get"]
        self.cursor.execute(statement, {"k": key})
        row = self.cursor.fetchone()
        return decode_json(str(row[0], "utf-8"))

    def set(self, key, value):
        statement, _, _ = self.sql["set"]
        self.cursor.execute(statement, {"k": key, "val": encode_json(value),
                                        "flg": 2, "ttl": None})


class Replay:
    """A raw blocking driver connection in autocommit sending the library's own statements (on psycopg2
    PREPAREd once and then EXECUTEd, as the library runs them on its own Engine)."""

    def __init__(self, cursor, sql: dict, **options):
        self.cursor, self.sql, self.options = cursor, sql, options
        for compiled, _ in sql.values():
            if compiled.prepared is not None:
                cursor.execute(compiled.prepared.prepare)

    def _send(self, compiled, params):
        if compiled.prepared is None:
            self.cursor.execute(compiled.sql, compiled.values(params), **self.options)
        else:
            self.cursor.execute(compiled.prepared.execute, compiled.prepared.arguments(compiled.values(params)),
                                **self.options)

    def get(self, key):
        compiled, fixed = self.sql["get"]
        self._send(compiled, {**fixed, "k": key})
        return decode_json(str(self.cursor.fetchone()[0], "utf-8"))

    def set(self, key, value):
        compiled, fixed = self.sql["set"]
        self._send(compiled, {**fixed, "k": key, "val": as_text(JSON, encode_json(value))})
        self.cursor.fetchone()


class RedisBlocking:
    def __init__(self, client, prefix: str):
        self.r, self.prefix = client, prefix

    def get(self, key):
        return decode_json(self.r.get(self.prefix + key).decode())

    def set(self, key, value):
        self.r.set(self.prefix + key, encode_json(value))


# -- async contenders ---------------------------------------------------------------------------

class AsyncReplayPsycopg:
    """A raw psycopg 3 AsyncConnection (autocommit, prepared) sending the library's own statements."""

    def __init__(self, connection, sql: dict):
        self.connection, self.cursor, self.sql = connection, connection.cursor(), sql

    async def get(self, key):
        compiled, fixed = self.sql["get"]
        await self.cursor.execute(compiled.sql, compiled.values({**fixed, "k": key}), prepare=True)
        return decode_json(str((await self.cursor.fetchone())[0], "utf-8"))

    async def set(self, key, value):
        compiled, fixed = self.sql["set"]
        data = as_text(JSON, encode_json(value))
        await self.cursor.execute(compiled.sql, compiled.values({**fixed, "k": key, "val": data}), prepare=True)
        await self.cursor.fetchone()


class AsyncReplayAsyncpg:
    """A raw asyncpg connection sending the library's own statements (asyncpg prepares them itself)."""

    def __init__(self, connection, sql: dict):
        self.connection, self.sql = connection, sql

    async def get(self, key):
        compiled, fixed = self.sql["get"]
        row = await self.connection.fetchrow(compiled.sql, *compiled.values({**fixed, "k": key}))
        return decode_json(str(row[0], "utf-8"))

    async def set(self, key, value):
        compiled, fixed = self.sql["set"]
        data = as_text(JSON, encode_json(value))
        await self.connection.fetchrow(compiled.sql, *compiled.values({**fixed, "k": key, "val": data}))


class RedisAsync:
    def __init__(self, client, prefix: str):
        self.r, self.prefix = client, prefix

    async def get(self, key):
        return decode_json((await self.r.get(self.prefix + key)).decode())

    async def set(self, key, value):
        await self.r.set(self.prefix + key, encode_json(value))


# -- timing -------------------------------------------------------------------------------------

def timed(call, keys) -> list[float]:
    clock, samples = time.perf_counter_ns, []
    for key in keys:
        started = clock()
        call(key)
        samples.append((clock() - started) / 1000)
    return samples


async def timed_async(call, keys) -> list[float]:
    clock, samples = time.perf_counter_ns, []
    for key in keys:
        started = clock()
        await call(key)
        samples.append((clock() - started) / 1000)
    return samples


def workloads(contender) -> dict:
    return {"get": contender.get, "set": lambda key: contender.set(key, VALUE)}


def run_rounds(blocking: dict, async_: dict, loop, rounds: int, calls: int, interleave: str) -> dict:
    """{(workload, contender): [µs]}: blocks of `calls` per contender per round, or call by call in turn."""
    samples: dict = {}
    everyone = [(name, False) for name in blocking] + [(name, True) for name in async_]
    for round_no in range(rounds):
        shift = round_no % len(everyone)
        order = everyone[shift:] + everyone[:shift]
        for workload in ("get", "set"):
            keys = [KEYS[(round_no * calls + i) % len(KEYS)] for i in range(calls)]
            if interleave == "call":
                for key in keys:
                    for name, is_async in order:
                        call = workloads((async_ if is_async else blocking)[name])[workload]
                        sample = (loop.run_until_complete(timed_async(call, [key])) if is_async
                                  else timed(call, [key]))
                        samples.setdefault((workload, name), []).extend(sample)
                continue
            for name, is_async in order:
                call = workloads((async_ if is_async else blocking)[name])[workload]
                if is_async:
                    loop.run_until_complete(timed_async(call, keys[:20]))  # warm-up
                    sample = loop.run_until_complete(timed_async(call, keys))
                else:
                    timed(call, keys[:20])
                    sample = timed(call, keys)
                samples.setdefault((workload, name), []).extend(sample)
    return samples


async def throughput(worker, tasks: int, ops: int) -> float:
    """ops/s of `tasks` tasks doing get then set `ops` times, sharing `worker`."""
    async def task(index):
        for i in range(ops):
            key = KEYS[(index * ops + i) % len(KEYS)]
            await worker.get(key)
            await worker.set(key, VALUE)

    started = time.perf_counter()
    await asyncio.gather(*(task(index) for index in range(tasks)))
    return tasks * ops * 2 / (time.perf_counter() - started)


class SharedConnections:
    """Raw async connections shared by many tasks, each call taking one from a queue (a minimal pool)."""

    def __init__(self, connections, wrap):
        self.queue = asyncio.Queue()
        for connection in connections:
            self.queue.put_nowait(wrap(connection))

    async def get(self, key):
        worker = await self.queue.get()
        try:
            return await worker.get(key)
        finally:
            self.queue.put_nowait(worker)

    async def set(self, key, value):
        worker = await self.queue.get()
        try:
            return await worker.set(key, value)
        finally:
            self.queue.put_nowait(worker)


def summarise(samples: dict) -> dict:
    return {f"{workload} | {name}": statistics.median(values) for (workload, name), values in samples.items()}


def ratio(p50: dict, workload: str, top: str, bottom: str):
    a, b = p50.get(f"{workload} | {top}"), p50.get(f"{workload} | {bottom}")
    return None if a is None or b is None else a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: FASTPGCACHE_URL, else an embedded server)")
    parser.add_argument("--redis", help="Redis URL, to measure redis-py beside")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls (a smoke run)")
    parser.add_argument("--layout", choices=LAYOUTS, default="split", help="CPU layout (default split)")
    parser.add_argument("--interleave", choices=("block", "call"), default="block",
                        help="contenders in blocks of calls per round (default), or taking turns call by call")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rounds, calls = (2, 100) if args.quick else (5, 400)

    url = make_url(args.url or default_url())
    with scratch_schema(url, "bench_drivers") as (admin, schema, table):
        loop = asyncio.new_event_loop()
        closers = []
        try:
            lib2 = FastPgCache(url=driver_url(url, "psycopg2"), schema=schema, maxconn=1, use_cuckoo_filter=False,
                               expire_every=None)
            lib3 = FastPgCache(url=driver_url(url, "psycopg"), schema=schema, maxconn=1, use_cuckoo_filter=False,
                               prepare_threshold=0, expire_every=None)
            closers += [lib2.close, lib3.close]
            lib2.set_many(dict.fromkeys(KEYS, VALUE))
            floor_connection = psycopg2.connect(libpq_dsn(url))
            floor_connection.autocommit = True
            Floor(floor_connection, table).cursor.execute(
                "INSERT INTO " + table + " (key, value, flags) SELECT k, %s, 2 FROM unnest(%s) AS k", (ENCODED, KEYS))
            raw2 = psycopg2.connect(libpq_dsn(url))
            raw2.autocommit = True
            raw3 = psycopg.connect(libpq_dsn(url), autocommit=True)
            closers += [floor_connection.close, raw2.close, raw3.close]
            blocking = {
                "psycopg2, plain table": Floor(floor_connection, table),
                "psycopg2, library SQL": Replay(raw2.cursor(), library_sql(lib2, lib2.bind.dialect)),
                "FastPgCache psycopg2": lib2,
                "psycopg 3 prepared, library SQL": Replay(raw3.cursor(), library_sql(lib3, lib3.bind.dialect),
                                                          prepare=True),
                "FastPgCache psycopg 3 prepared": lib3,
            }
            async_ = {}

            async def async_setup():
                for driver, label in (("psycopg", "psycopg 3"), ("asyncpg", "asyncpg")):
                    client = AsyncFastPgCache(url=driver_url(url, driver), schema=schema, maxconn=1,
                                              use_cuckoo_filter=False, prepare_threshold=0, expire_every=None)
                    await client.open()
                    closers.append(lambda client=client: loop.run_until_complete(client.close()))
                    sql = library_sql(lib2, client.bind.sync_engine.dialect)
                    if driver == "psycopg":
                        connection = await psycopg.AsyncConnection.connect(libpq_dsn(url), autocommit=True)
                        replay = AsyncReplayPsycopg(connection, sql)
                    else:
                        import asyncpg

                        connection = await asyncpg.connect(libpq_dsn(url))
                        replay = AsyncReplayAsyncpg(connection, sql)
                    closers.append(lambda connection=connection: loop.run_until_complete(connection.close()))
                    async_[f"async {label}, library SQL"] = replay
                    async_[f"AsyncFastPgCache {label}"] = client

            loop.run_until_complete(async_setup())
            redis_blocking = redis_async = None
            if args.redis:
                import redis
                import redis.asyncio

                prefix = f"bench_drivers:{schema}:"
                redis_blocking = redis.Redis.from_url(args.redis)
                redis_blocking.mset({prefix + key: ENCODED for key in KEYS})
                blocking["Redis (redis-py)"] = RedisBlocking(redis_blocking, prefix)
                redis_async = redis.asyncio.Redis.from_url(args.redis)
                async_["Redis (redis.asyncio)"] = RedisAsync(redis_async, prefix)
            pinned = apply_layout(args.layout, admin, args.redis)
            try:
                samples = run_rounds(blocking, async_, loop, rounds, calls, args.interleave)
                p50 = summarise(samples)
                negative = loop.run_until_complete(_async_negative_lookup(url, schema, calls))
                tasks = loop.run_until_complete(_tasks(url, schema, args.redis, lib2, 2 * rounds + 1))
            finally:
                pinned.undo()
            _print(p50, negative, tasks, pinned.note, args, lib2.bind.dialect.server_version_info)
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump({"p50_us": p50, "async_negative_lookup_p50_us": negative, "tasks_ops_per_s": tasks,
                               "layout": args.layout, "interleave": args.interleave, "note": pinned.note}, handle,
                              indent=2)
        finally:
            for close in reversed(closers):
                close()
            loop.close()


async def _async_negative_lookup(url: URL, schema: str, calls: int) -> float:
    """p50 µs of `await get()` of keys never written, with AsyncFastPgCache's guard warm."""
    async with AsyncFastPgCache(url=driver_url(url, "psycopg"), schema=schema, maxconn=1) as client:
        await asyncio.to_thread(client.guard.wait_until_trusted, 30)
        keys = [f"never:{i}" for i in range(calls * 5)]
        await timed_async(client.get, keys[:100])
        return statistics.median(await timed_async(client.get, keys))


async def _tasks(url: URL, schema: str, redis_url: str | None, statements, rounds: int) -> dict:
    """Median ops/s of TASKS tasks sharing TASK_CONNECTIONS connections, over `rounds` rounds in which every
    contender (the library and each raw driver) runs once, in rotating order."""
    import asyncpg

    results, clients, dialects = {}, [], {}

    async def library(driver):
        client = AsyncFastPgCache(url=driver_url(url, driver), schema=schema, maxconn=TASK_CONNECTIONS,
                                  use_cuckoo_filter=False, prepare_threshold=0, expire_every=None)
        clients.append(client)
        dialects[driver] = client.bind.sync_engine.dialect
        return await client.open(TASK_CONNECTIONS)

    async def raw_psycopg():
        sql = library_sql(statements, dialects["psycopg"])
        connections = [await psycopg.AsyncConnection.connect(libpq_dsn(url), autocommit=True)
                       for _ in range(TASK_CONNECTIONS)]
        clients.extend(connections)
        return SharedConnections(connections, lambda connection: AsyncReplayPsycopg(connection, sql))

    async def raw_asyncpg():
        sql = library_sql(statements, dialects["asyncpg"])
        connections = [await asyncpg.connect(libpq_dsn(url)) for _ in range(TASK_CONNECTIONS)]
        clients.extend(connections)
        return SharedConnections(connections, lambda connection: AsyncReplayAsyncpg(connection, sql))

    try:
        workers = {"AsyncFastPgCache psycopg 3": await library("psycopg"),
                   "async psycopg 3, library SQL": await raw_psycopg(),
                   "AsyncFastPgCache asyncpg": await library("asyncpg"),
                   "asyncpg, library SQL": await raw_asyncpg()}
        if redis_url:
            import redis.asyncio

            pool = redis.asyncio.BlockingConnectionPool.from_url(redis_url, max_connections=TASK_CONNECTIONS)
            client = redis.asyncio.Redis(connection_pool=pool)  # waits for a connection, as the others do
            clients.append(client)
            workers["redis.asyncio"] = RedisAsync(client, f"bench_drivers:{schema}:")
        names = list(workers)
        for round_ in range(rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                results.setdefault(name, []).append(await throughput(workers[name], TASKS, TASK_OPS))
    finally:
        for client in clients:
            await (client.aclose() if hasattr(client, "aclose") else client.close())
    return {name: statistics.median(values) for name, values in results.items()}


def _print(p50: dict, negative: float, tasks: dict, note: str, args, version) -> None:
    print(f"PostgreSQL {'.'.join(map(str, version))}, layout {args.layout}, interleave {args.interleave}; {note}")
    print(f"{'workload | contender':52} {'p50 µs':>8}")
    for name, value in p50.items():
        print(f"{name:52} {value:8.1f}")
    floor, goals = "psycopg2, plain table", []
    for workload in ("get", "set"):
        goals += [
            (f"{workload}: FastPgCache psycopg2 / psycopg2 on a plain table (#19: <= 1.15)",
             ratio(p50, workload, "FastPgCache psycopg2", floor)),
            (f"{workload}: FastPgCache psycopg2 / psycopg2 replaying the library's SQL",
             ratio(p50, workload, "FastPgCache psycopg2", "psycopg2, library SQL")),
            (f"{workload}: FastPgCache psycopg 3 / raw psycopg 3, same SQL, prepared (#17: <= 1.10)",
             ratio(p50, workload, "FastPgCache psycopg 3 prepared", "psycopg 3 prepared, library SQL")),
            (f"{workload}: AsyncFastPgCache psycopg 3 / raw async psycopg 3, same SQL (#17: <= 1.25)",
             ratio(p50, workload, "AsyncFastPgCache psycopg 3", "async psycopg 3, library SQL")),
            (f"{workload}: AsyncFastPgCache asyncpg / raw asyncpg, same SQL (#17: <= 1.25)",
             ratio(p50, workload, "AsyncFastPgCache asyncpg", "async asyncpg, library SQL")),
            (f"{workload}: FastPgCache psycopg 3 / redis-py (stretch: <= 1.0)",
             ratio(p50, workload, "FastPgCache psycopg 3 prepared", "Redis (redis-py)")),
        ]
    print("\nratios of p50 (this run):")
    for name, value in goals:
        print(f"  {name:90} {'n/a' if value is None else f'{value:.2f}'}")
    print(f"\nasync negative lookup, warm guard, p50: {negative:.1f} µs (#17: < 5)")
    print(f"{TASKS} tasks sharing {TASK_CONNECTIONS} connections (ops/s):")
    for name, value in tasks.items():
        print(f"  {name:40} {value:10.0f}")
    for library, raw in (("AsyncFastPgCache psycopg 3", "async psycopg 3, library SQL"),
                         ("AsyncFastPgCache asyncpg", "asyncpg, library SQL")):
        print(f"  {library} / {raw}: {tasks[library] / tasks[raw]:.2f} (#17: >= 0.8)")


if __name__ == "__main__":
    main()
