"""The engine behind `fastpgcache bench`: same-run comparisons against the raw driver, Django and Redis.

Every contender runs every workload in the same process, interleaved round by
round (the contender order rotates each round) so machine drift hits all of
them alike. The floor is raw psycopg2 in autocommit on a plain table of the
cache's shape (same columns, index, fillfactor, UNLOGGED; no row-level
security, no write functions), with the plain SQL any hand-written cache
would send: each ratio shows what the library and its isolation add. A second
raw contender replays the library's own SQL on the library's table, which
separates the client's cost from the server's::

    from fastpgcache.bench import run_bench, format_table

    report = run_bench("postgresql://postgres@127.0.0.1/postgres", redis_url="redis://127.0.0.1:6379")
    print(format_table(report))
"""
from __future__ import annotations

import copy
import json
import platform
import re
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, NamedTuple

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .admin import setup_cache
from .cache import Cache
from .client import FastPgCache, build_url

FLOOR = "psycopg2"
LIB_SQL = "psycopg2, library SQL"
LIB = "FastPgCache"
LOGGED_TABLE = "cache_logged"
LAYOUTS = ("split", "same", "none")
"""Where the client and a local server run: split CPUs, the same CPU, or wherever the scheduler puts them."""


@dataclass(frozen=True)
class Settings:
    """How much to measure (rounds, calls per round per contender, the load test's shape) and the CPU layout.

    `layout` is one of LAYOUTS (see `pin_to_cpu` for why both pinned layouts exist)::

        Settings(layout="same")       # client and local servers share CPU 0
        Settings(layout="bogus")      # ValueError naming the valid layouts
    """

    rounds: int = 5
    calls: int = 200
    budget_s: float = 0.06
    threads: int = 10
    thread_ops: int = 100
    value_bytes: int = 100
    batch_sizes: tuple = (10, 100, 1000)
    layout: str = "split"

    def __post_init__(self):
        check_layout(self.layout)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(rounds=2, calls=60, budget_s=0.02, thread_ops=30)


@dataclass
class Result:
    """Latencies of one contender on one workload, summarised."""

    workload: str
    contender: str
    items_per_call: int
    samples: int
    p50_us: float
    p95_us: float
    p99_us: float
    mean_us: float
    ops_per_s: float
    p50_vs_floor: float | None = None
    ops_vs_floor: float | None = None


@dataclass
class Goal:
    """One speed goal of issues #3 and #8, as a ratio measured in this run."""

    goal: str
    ratio: float | None
    target: str
    met: bool | None


@dataclass
class Report:
    meta: dict
    results: list[Result] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def result(self, workload: str, contender: str) -> Result | None:
        """The result of one cell of the table, or None when that contender did not run it."""
        return next((r for r in self.results if r.workload == workload and r.contender == contender), None)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "results": [asdict(r) for r in self.results],
                "goals": [asdict(g) for g in self.goals], "notes": self.notes}


def sample_value(size: int) -> dict:
    """A JSON object whose compact encoding is `size` bytes, like the seed's load test values."""
    value = {"user": "u-42", "items": [1, 2, 3], "note": ""}
    padding = size - len(json.dumps(value, separators=(",", ":")))
    value["note"] = "x" * max(0, padding)
    return value


def _encode(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# -- contenders --------------------------------------------------------------------------

class Contender:
    """One way to talk to a cache. Subclasses bind get/set/... to the client's own calls."""

    name = "?"
    workloads: set | None = None  # None: every workload

    def runs(self, workload: str) -> bool:
        return self.workloads is None or workload in self.workloads

    def worker(self) -> "Contender":
        """What one load-test thread uses; shared clients return themselves."""
        return self

    def end_unit(self) -> None:
        """Called after each timed unit of work (untimed); Cache(session) commits here."""

    def close(self) -> None:
        pass


class Psycopg2Floor(Contender):
    """Raw psycopg2 in autocommit, one connection per thread, running the SQL it is given.

    `sql` maps each call to (statement, fixed params); `hex_values` sends values as hex text, as the
    library's write functions take them."""

    def __init__(self, name: str, connect: Callable, sql: dict, workloads: set | None = None,
                 hex_values: bool = False):
        self.name, self.workloads, self._connect, self._sql = name, workloads, connect, sql
        self._hex = hex_values
        self._local = threading.local()
        self._all = []

    @property
    def _cursor(self):
        # One connection per thread: the load test's "each thread its own connection".
        local = self._local
        if not hasattr(local, "cursor"):
            connection = self._connect()
            connection.autocommit = True
            self._all.append(connection)
            local.cursor = connection.cursor()
        return local.cursor

    def _value(self, value):
        data = _encode(value)
        return data.hex() if self._hex else data

    def get(self, key):
        sql, params = self._sql["get"]
        cursor = self._cursor
        cursor.execute(sql, {**params, "k": key})
        row = cursor.fetchone()
        return None if row is None else json.loads(bytes(row[0]))

    def set(self, key, value, ttl=None):
        sql, params = self._sql["set"]
        self._cursor.execute(sql, {**params, "k": key, "val": self._value(value), "flg": 2, "ttl": ttl})

    def set_many(self, mapping):
        from psycopg2.extras import execute_values

        if "set_values" not in self._sql:  # the library's SQL has no multi-row form: only used untimed
            for key, value in mapping.items():
                self.set(key, value)
            return
        sql, template, params = self._sql["set_values"]
        rows = [{**params, "k": k, "val": self._value(v), "flg": 2, "ttl": None} for k, v in mapping.items()]
        execute_values(self._cursor, sql, rows, template=template, page_size=len(rows))

    def get_many(self, keys):
        sql, params = self._sql["get_many"]
        cursor = self._cursor
        cursor.execute(sql, {**params, "ks": list(keys)})
        return {row[0]: json.loads(bytes(row[1])) for row in cursor.fetchall()}

    def incr(self, key):
        sql, params = self._sql["incr"]
        cursor = self._cursor
        cursor.execute(sql, {**params, "k": key, "amount": 1})
        result = cursor.fetchone()[0]
        return int(result[0] if isinstance(result, list) else result)  # the library's incr answers {n}

    def close(self):
        for connection in self._all:
            connection.close()


class LibraryContender(Contender):
    """This library's `Cache` (or `FastPgCache`), called exactly as an application would."""

    def __init__(self, name: str, cache: Cache, workloads: set | None = None, on_close=None):
        self.name, self.cache, self.workloads, self._on_close = name, cache, workloads, on_close
        self.get, self.set, self.incr = cache.get, cache.set, cache.incr
        self.set_many, self.get_many = cache.set_many, cache.get_many

    def close(self):
        if self._on_close:
            self._on_close()


class SessionContender(LibraryContender):
    """`Cache(session)`: the marginal cost of cache calls inside the caller's open transaction."""

    def __init__(self, engine, schema: str, table: str | None = None):
        self._engine, self._schema, self._table = engine, schema, table
        self.session = Session(engine)
        self._threads = threading.local()
        super().__init__("Cache(session)", Cache(self.session, schema=schema, table=table),
                         on_close=self.session.close)

    def worker(self):
        local = self._threads
        if not hasattr(local, "contender"):
            local.contender = SessionContender(self._engine, self._schema, self._table)
        return local.contender

    def end_unit(self):
        self.session.commit()


class DjangoContender(Contender):
    """Django's built-in `DatabaseCache` on the same server (its own table, in the bench schema)."""

    name = "Django DatabaseCache"

    def __init__(self, django_cache):
        from django.db import connections

        self._cache, self._connections = django_cache, connections
        self.get, self.get_many, self.incr = django_cache.get, django_cache.get_many, django_cache.incr

    def set(self, key, value, ttl=None):
        self._cache.set(key, value, timeout=ttl)

    def set_many(self, mapping):
        self._cache.set_many(mapping, timeout=None)

    def close(self):
        self._connections.close_all()


class RedisContender(Contender):
    """redis-py against Redis, values JSON-encoded client-side as the other contenders do."""

    name = "Redis"

    def __init__(self, client, prefix: str):
        self._r, self._prefix = client, prefix

    def get(self, key):
        data = self._r.get(self._prefix + key)
        return None if data is None else json.loads(data)

    def set(self, key, value, ttl=None):
        self._r.set(self._prefix + key, _encode(value), ex=None if ttl is None else int(ttl))

    def set_many(self, mapping):
        self._r.mset({self._prefix + k: _encode(v) for k, v in mapping.items()})

    def get_many(self, keys):
        names = list(keys)
        found = self._r.mget([self._prefix + k for k in names])
        return {k: json.loads(v) for k, v in zip(names, found) if v is not None}

    def incr(self, key):
        return self._r.incr(self._prefix + key)

    def close(self):
        keys = list(self._r.scan_iter(match=self._prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            self._r.delete(*keys[start:start + 1000])
        self._r.close()


# -- the floors' SQL ------------------------------------------------------------------------

FLOOR_TABLE = "floor"
"""The floor's plain table in the bench schema: the cache's columns, index and fillfactor, nothing else."""

_FLOOR_UPSERT = ("INSERT INTO {t} (user_id, key, value, flags, expires_at) VALUES {values} ON CONFLICT (user_id, key)"
                 " DO UPDATE SET value = excluded.value, flags = excluded.flags, expires_at = excluded.expires_at,"
                 " created_at = now()")
_FLOOR_ROW = "(current_user, %(k)s, %(val)s, %(flg)s, now() + %(ttl)s * interval '1 second')"
_FLOOR_MINE = "user_id = CAST(current_user AS text) COLLATE \"default\" AND (expires_at IS NULL OR expires_at > now())"


def floor_sql(qualified_table: str) -> dict:
    """The plain SQL of a hand-written cache on `qualified_table`: what every ratio is measured against."""
    t = qualified_table
    return {
        "get": (f"SELECT value, flags FROM {t} WHERE {_FLOOR_MINE} AND key = %(k)s", {}),
        "get_many": (f"SELECT key, value, flags FROM {t} WHERE {_FLOOR_MINE} AND key = ANY(%(ks)s)", {}),
        "set": (_FLOOR_UPSERT.format(t=t, values=_FLOOR_ROW), {}),
        "set_values": (_FLOOR_UPSERT.format(t=t, values="%s"), _FLOOR_ROW, {}),
        "incr": (f"INSERT INTO {t} AS c (user_id, key, value, flags) VALUES (current_user, %(k)s,"
                 " convert_to(CAST(%(amount)s AS text), 'UTF8'), 2) ON CONFLICT (user_id, key) DO UPDATE SET"
                 " value = convert_to(CAST(CAST(convert_from(c.value, 'UTF8') AS bigint) + %(amount)s AS text),"
                 " 'UTF8') RETURNING convert_from(c.value, 'UTF8')", {}),
    }


def create_floor_table(connection, schema: str, logged: bool = False) -> str:
    """The floor's table in `schema`, shaped as the cache's; returns its qualified name."""
    from sqlalchemy import MetaData

    from .model import cache_table

    table = cache_table(FLOOR_TABLE).to_metadata(MetaData(), schema=schema)
    table.create(connection)
    qualified = f'"{schema}"."{FLOOR_TABLE}"'
    connection.execute(text(f"ALTER TABLE {qualified} SET (fillfactor = 70)"))
    if logged:
        connection.execute(text(f"ALTER TABLE {qualified} SET LOGGED"))
    return qualified


def capture_sql(url: URL, schema: str, table: str | None = None) -> dict:
    """The exact SQL text and literal parameters the library sends for get, get_many, set and incr.

    Recorded at the driver's cursor, below however the library executes, so the
    replaying contender sends the very same strings (function calls included).
    """
    import psycopg2.extensions

    seen: list = []

    class RecordingCursor(psycopg2.extensions.cursor):
        def execute(self, query, vars=None):
            seen.append((query, dict(vars or {})))
            return super().execute(query, vars)

    engine = create_engine(url, connect_args={"cursor_factory": RecordingCursor}, poolclass=NullPool)
    cache = Cache(engine, schema=schema, table=table, expire_every=None)
    calls = {"set": ("_set(", lambda: cache.set("bench:capture", 1)),
             "get": ("SELECT", lambda: cache.get("bench:capture")),
             "get_many": ("SELECT", lambda: cache.get_many(["bench:capture"])),
             "incr": ("_incr(", lambda: cache.incr("bench:capture:n"))}
    sql = {}
    try:
        for name, (mark, call) in calls.items():
            seen.clear()
            call()
            sql[name] = next(item for item in seen if _is_cache_sql(item[0], mark))
        cache.delete_many(["bench:capture", "bench:capture:n"])
    finally:
        engine.dispose()
    return sql


def _is_cache_sql(query, mark: str) -> bool:
    # Skips what the pool, the dialect or the identity lookup send around the call itself.
    text_ = query.decode() if isinstance(query, bytes) else str(query)
    return mark in text_ and ".cache" in text_ and "_secrets" not in text_


# -- workloads ---------------------------------------------------------------------------

@dataclass
class Workload:
    """A named unit of work: `prepare(contender)` (untimed) returns the timed call `op(i)`."""

    name: str
    items: int
    prepare: Callable[[Contender], Callable[[int], Any]]
    threaded: bool = False


def _keys(prefix: str, count: int) -> list[str]:
    return [f"{prefix}:{i}" for i in range(count)]


def build_workloads(settings: Settings) -> list[Workload]:
    """Every workload of issue #8, in the order the table shows them."""
    value = sample_value(settings.value_bytes)
    hits = _keys("hit", 200)

    def get_hit(c):
        c.set_many({k: value for k in hits})
        c.end_unit()
        return lambda i: c.get(hits[i % len(hits)])

    def get_miss(c):
        return lambda i: c.get(f"miss:{i}")

    def set_(c):
        return lambda i: c.set(f"set:{i % 200}", value)

    def set_ttl(c):
        return lambda i: c.set(f"ttl:{i % 200}", value, 300)

    def incr(c):
        c.set("counter", 0)
        c.end_unit()
        return lambda i: c.incr("counter")

    def set_many(size):
        def prepare(c):
            mapping = {k: value for k in _keys(f"many{size}", size)}
            return lambda i: c.set_many(mapping)
        return prepare

    def get_many(size):
        def prepare(c):
            keys = _keys(f"gmany{size}", size)
            c.set_many({k: value for k in keys})
            c.end_unit()
            return lambda i: c.get_many(keys)
        return prepare

    workloads = [Workload("get hit", 1, get_hit), Workload("get miss", 1, get_miss),
                 Workload("set", 1, set_), Workload("set ttl", 1, set_ttl), Workload("incr", 1, incr)]
    for size in settings.batch_sizes:
        workloads.append(Workload(f"set_many({size})", size, set_many(size)))
    for size in settings.batch_sizes:
        workloads.append(Workload(f"get_many({size})", size, get_many(size)))
    workloads.append(Workload(f"load {settings.threads}x{settings.thread_ops}", 1, lambda c: None, threaded=True))
    return workloads


# -- measuring ---------------------------------------------------------------------------

class Recorder:
    """Collects raw latencies (ns) and elapsed time per (workload, contender)."""

    def __init__(self):
        self.latencies: dict = {}
        self.elapsed: dict = {}
        self.calls: dict = {}

    def add(self, cell: tuple, latencies: list[int], elapsed_ns: int) -> None:
        self.latencies.setdefault(cell, []).extend(latencies)
        self.elapsed[cell] = self.elapsed.get(cell, 0) + elapsed_ns
        self.calls[cell] = self.calls.get(cell, 0) + len(latencies)


def _timed_calls(op, start: int, calls: int, budget_s: float) -> tuple[list[int], int]:
    clock = time.perf_counter_ns
    deadline = clock() + int(budget_s * 1e9)
    latencies = []
    for i in range(start, start + calls):
        before = clock()
        op(i)
        latencies.append(clock() - before)
        if latencies[-1] and clock() > deadline:
            break
    return latencies, sum(latencies)


def _load_run(contender: Contender, pool: ThreadPoolExecutor, settings: Settings, tag: str):
    """The seed's load test: N threads, each `thread_ops` x (set then get) of a 100-byte JSON value."""
    value = sample_value(settings.value_bytes)
    barrier = threading.Barrier(settings.threads)

    def thread(index: int) -> list[int]:
        worker = contender.worker()
        clock, latencies = time.perf_counter_ns, []
        barrier.wait()
        for i in range(settings.thread_ops):
            key = f"load:{tag}:{index}:{i}"
            before = clock()
            worker.set(key, value)
            middle = clock()
            worker.get(key)
            latencies += [middle - before, clock() - middle]
        worker.end_unit()
        return latencies

    started = time.perf_counter_ns()
    futures = [pool.submit(thread, index) for index in range(settings.threads)]
    latencies = [lat for future in futures for lat in future.result()]
    return latencies, time.perf_counter_ns() - started


def summarise(recorder: Recorder, workloads: list[Workload], contenders: list[Contender]) -> list[Result]:
    """Percentiles and ops/s per cell, each with its ratio to the floor of the same workload."""
    results = []
    for workload in workloads:
        floor = None
        for contender in contenders:
            cell = (workload.name, contender.name)
            if cell not in recorder.latencies:
                continue
            lat = sorted(recorder.latencies[cell])
            result = Result(workload.name, contender.name, workload.items, len(lat), _pct(lat, 50) / 1e3,
                            _pct(lat, 95) / 1e3, _pct(lat, 99) / 1e3, statistics.fmean(lat) / 1e3,
                            recorder.calls[cell] / (recorder.elapsed[cell] / 1e9))
            if contender.name == FLOOR:
                floor = result
            if floor is not None:
                result.p50_vs_floor = result.p50_us / floor.p50_us
                result.ops_vs_floor = result.ops_per_s / floor.ops_per_s
            results.append(result)
    return results


def _pct(sorted_values: list[int], percent: float) -> float:
    # Nearest-rank percentile: a reported p99 is a latency that really happened.
    index = max(0, min(len(sorted_values) - 1, int(round(percent / 100 * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[index])


# -- the run -----------------------------------------------------------------------------

class _Scratch:
    """Throwaway schemas (UNLOGGED and LOGGED tables), a Django table and Redis keys for one run."""

    def __init__(self, url: URL, redis_url: str | None):
        self.url, self.redis_url = url, redis_url
        self.run_id = uuid.uuid4().hex[:8]
        self.schema = f"fastpgcache_bench_{self.run_id}"
        self.logged_schema = f"{self.schema}_logged"
        self.engine = create_engine(url)
        self.notes: list[str] = []
        self._cleanups: list[Callable] = []

    def setup(self) -> None:
        self._cleanups.append(self._drop_schemas)
        setup_cache(engine=self.engine, schema=self.schema)
        setup_cache(engine=self.engine, schema=self.logged_schema, logged=True)
        with self.engine.begin() as connection:
            self.floor_table = create_floor_table(connection, self.schema)
            self.logged_floor_table = create_floor_table(connection, self.logged_schema, logged=True)

    def _drop_schemas(self) -> None:
        with self.engine.begin() as connection:
            for name in (self.schema, self.logged_schema):
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))

    def contenders(self, settings: Settings, exclude: frozenset = frozenset()) -> list[Contender]:
        """The floor first (ratios are to it), then the library, then Django and Redis when available.

        Contenders named in `exclude` are never built (Django's, for one, configures
        Django for the whole process).
        """
        import psycopg2

        dsn = {**self.url.translate_connect_args(username="user", database="dbname"), **self.url.query}
        connect = lambda: psycopg2.connect(**dsn)  # noqa: E731
        # Guard off on hits and writes too: shows what the guard itself costs where it cannot help.
        guard_off = {"get hit", "get miss", "set"}
        library_sql = {"get hit", "get miss", "set", "set ttl", "incr"}
        logged_only = {"set", f"load {settings.threads}x{settings.thread_ops}"}
        factories = {
            FLOOR: lambda: Psycopg2Floor(FLOOR, connect, floor_sql(self.floor_table)),
            LIB_SQL: lambda: Psycopg2Floor(LIB_SQL, connect, capture_sql(self.url, self.schema), library_sql,
                                           hex_values=True),
            LIB: lambda: self._client(LIB, self.schema, settings),
            f"{LIB}, guard off": lambda: self._client(f"{LIB}, guard off", self.schema, settings, guard_off,
                                                      use_cuckoo_filter=False),
            "Cache(session)": lambda: SessionContender(self.engine, self.schema),
            DjangoContender.name: self._django,
            RedisContender.name: self._redis,
            f"{FLOOR} LOGGED": lambda: Psycopg2Floor(f"{FLOOR} LOGGED", connect,
                                                     floor_sql(self.logged_floor_table), logged_only),
            f"{LIB} LOGGED": lambda: self._client(f"{LIB} LOGGED", self.logged_schema, settings, logged_only),
        }
        if FLOOR in exclude:
            raise ValueError(f"the {FLOOR} floor cannot be excluded: every ratio is to it")
        contenders = []
        for name, build in factories.items():
            contender = None if name in exclude else build()
            if contender is not None:
                self._cleanups.insert(len(contenders), contender.close)
                contenders.append(contender)
        return contenders

    def _client(self, name, schema, settings, workloads=None, **options) -> LibraryContender:
        client = FastPgCache(url=self.url, schema=schema, maxconn=settings.threads, **options)
        return LibraryContender(name, client, workloads, on_close=client.close)

    def _django(self) -> Contender | None:
        table = f"django_cache_{self.run_id}"
        with self.engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{DJANGO_SCHEMA}"'))
        self._cleanups.append(lambda: self._drop_django_table(table))
        try:
            django_cache = _django_cache(self.url, table)
        except ImportError:
            self.notes.append("Django is not installed (pip install 'fastpgcache[django]'): skipped")
            return None
        except RuntimeError as error:
            self.notes.append(f"Django DatabaseCache skipped: {error}")
            return None
        return DjangoContender(django_cache)

    def _drop_django_table(self, table: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(text(f'DROP TABLE IF EXISTS "{DJANGO_SCHEMA}"."{table}"'))
        with self.engine.begin() as connection:
            # Another run in progress keeps its table, and then the schema stays.
            if connection.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = :s"),
                                  {"s": DJANGO_SCHEMA}).scalar() == 0:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{DJANGO_SCHEMA}"'))

    def _redis(self) -> Contender | None:
        if not self.redis_url:
            self.notes.append("Redis not measured: pass --redis URL to compare")
            return None
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
            client.ping()
        except ImportError:
            self.notes.append("redis-py is not installed (pip install 'fastpgcache[bench]'): Redis skipped")
            return None
        except Exception as error:  # any failure to reach Redis only drops that contender
            self.notes.append(f"Redis at the given URL did not answer ({type(error).__name__}): skipped")
            return None
        return RedisContender(client, f"fastpgcache_bench:{self.run_id}:")

    def close(self) -> None:
        """Close every client and drop everything the run created, even when one step fails."""
        failure = None
        for cleanup in self._cleanups:
            try:
                cleanup()
            except Exception as error:  # keep cleaning; report the first failure at the end
                failure = failure or error
        self.engine.dispose()
        if failure is not None:
            raise failure


DJANGO_SCHEMA = "fastpgcache_bench_django"
"""Django's tables live here: its search_path is fixed when settings are configured, once per process."""

_django_database: dict | None = None


def _django_cache(url: URL, table: str):
    """A DatabaseCache on its own table, configuring Django in-process on first use."""
    global _django_database
    import django
    from django.conf import settings
    from django.core.cache.backends.db import DatabaseCache

    database = {"ENGINE": "django.db.backends.postgresql", "NAME": url.database or "postgres",
                "USER": url.username or "", "PASSWORD": url.password or "", "HOST": url.host or "",
                "PORT": str(url.port or ""), "OPTIONS": {"options": f"-c search_path={DJANGO_SCHEMA}"}}
    if not settings.configured:
        settings.configure(DATABASES={"default": database}, USE_TZ=True, INSTALLED_APPS=[])
        django.setup()
        _django_database = copy.deepcopy(database)  # Django fills defaults into the dict it was given
    elif _django_database != database:
        raise RuntimeError("Django settings are already configured for another database in this process")
    cache = DatabaseCache(table, {"TIMEOUT": None, "OPTIONS": {"MAX_ENTRIES": 10_000_000}})
    _create_django_table(table)
    return cache


def _create_django_table(name: str) -> None:
    # Django's own createcachetable logic, for a table that is not in settings.CACHES.
    from django.core.management.commands.createcachetable import Command

    command = Command()
    command.verbosity = 0
    command.create_table("default", name, dry_run=False)


def run_bench(url: str | URL | None = None, *, redis_url: str | None = None, settings: Settings | None = None,
              progress: bool = True, exclude=()) -> Report:
    """Run every workload against every contender, interleaved, and return the report.

    With no `url` a throwaway embedded PostgreSQL is started (and stopped);
    `exclude` names contenders to leave out::

        report = run_bench(settings=Settings.quick())
        report.result("get hit", "FastPgCache").p50_vs_floor   # e.g. 1.1
    """
    settings = settings or Settings()
    server = None
    if url is None:
        from .embedded import EmbeddedPostgres

        server = EmbeddedPostgres().start()
        url = server.url
    scratch = _Scratch(build_url(url=url), redis_url)
    pinned = None
    try:
        scratch.setup()
        pinned = apply_layout(settings.layout, scratch.engine, scratch.redis_url)
        scratch.notes.append(pinned.note)
        contenders = scratch.contenders(settings, frozenset(exclude))
        workloads = build_workloads(settings)
        recorder = _measure(contenders, workloads, settings, progress)
        report = Report(meta=_meta(scratch, contenders, settings, server is not None, pinned.layout),
                        notes=scratch.notes)
        report.results = summarise(recorder, workloads, contenders)
        report.goals = goals(report, settings)
        return report
    finally:
        # Nested so that each step runs even when the one before it raises.
        try:
            scratch.close()
        finally:
            try:
                if pinned is not None:
                    pinned.undo()
            finally:
                if server is not None:
                    server.stop()


def check_layout(layout: str) -> str:
    """Return `layout` when it is one of LAYOUTS, else raise a ValueError naming them::

        check_layout("split")   # "split"
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown CPU layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


class Pinned(NamedTuple):
    """What `apply_layout` did: the layout in effect, how to undo it, and the line for the report's notes."""

    layout: str
    undo: Callable[[], None]
    note: str


def apply_layout(layout: str, engine, redis_url: str | None = None) -> Pinned:
    """Pin this process and the local servers behind `engine` and `redis_url` as `layout` says.

    "split": the client on the first CPU this process may use, a local PostgreSQL
    and Redis on the second (with fewer than two usable CPUs it falls back to
    "same" and the note says so); "same": all of them on the first CPU; "none":
    nothing pinned. Call `undo` when done, also after a failure::

        pinned = apply_layout("split", engine, "redis://127.0.0.1:6379")
        try:
            ...                # measure
        finally:
            pinned.undo()
        print(pinned.note)     # e.g. "layout split: client pinned to CPU 0; PostgreSQL (...) pinned to CPU 1"
    """
    check_layout(layout)
    if layout == "none":
        return Pinned("none", lambda: None, "layout none: nothing pinned, the scheduler places client and servers")
    cpus = _usable_cpus()
    fallback = ""
    if layout == "split" and len(cpus) < 2:
        fallback = f" (split asked for, but this process may use {len(cpus)} CPU only: fell back to same)"
        layout = "same"
    client = cpus[0]
    undo, what = pin_to_cpu(client, engine, redis_url, server_cpu=cpus[1] if layout == "split" else client)
    return Pinned(layout, undo, f"layout {layout}{fallback}: {what or 'nothing could be pinned'}")


def _usable_cpus() -> list[int]:
    # The CPUs this process may run on (a cpuset or taskset can exclude some); all of them where unknown.
    import os

    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity calls on this platform: nothing will be pinned anyway
        return list(range(_cpu_count()))


def pin_to_cpu(client_cpu: int, engine, redis_url: str | None = None, *,
               server_cpu: int | None = None) -> tuple[Callable[[], None], str | None]:
    """Pin this process to `client_cpu`, and a local PostgreSQL and Redis to `server_cpu` (default: the same).

    Returns the undo and a line saying what was pinned where (None when nothing
    could be). Processes that are not local or not ours to change are left alone::

        undo, note = pin_to_cpu(0, engine, "redis://127.0.0.1:6379", server_cpu=1)
        try:
            ...     # measure
        finally:
            undo()  # every affinity back, including backends forked meanwhile

    Unpinned, the scheduler decides per connection whether client and backend
    share a core, and ratios swung 2x between runs on a 2-vCPU machine. Both
    pinned layouts remove that luck but measure different things:

    - server on another CPU (the "split" layout): how deployments run, the
      application and PostgreSQL never sharing a core. Every round trip pays a
      cross-CPU wake-up (about 85-100 µs here against 40-50 µs on one core), yet
      the ratios were just as stable between runs (get hit 1.10, then 1.05).
    - one CPU for all (the "same" layout): the cheapest round trip, but client
      and backend take turns on one core and evict each other's cache lines, so
      client-side work that touches memory is charged extra: 6.4 µs of JSON
      encoding per call added 12 µs to a raw psycopg2 loop, while 2 µs of pure
      arithmetic added about nothing. This layout magnifies what the library
      does in Python; it is kept as the harsher of the two views.
    """
    import os

    server_cpu = client_cpu if server_cpu is None else server_cpu
    with engine.connect() as connection:  # read the parent while the backend lives (a NullPool ends it at close)
        backend = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        postmaster = _local_parent(backend, "postgres")
    saved: dict = {}

    def pin(pid: int, cpu: int) -> None:
        try:
            saved[pid] = os.sched_getaffinity(pid)
            os.sched_setaffinity(pid, {cpu})
        except (OSError, AttributeError):  # not permitted, gone, or no such call on this platform
            saved.pop(pid, None)

    pin(0, client_cpu)
    children = []
    if postmaster:
        pin(postmaster, server_cpu)
        # Listed only now: a backend forked from here on inherits the postmaster's new CPU.
        children = _local_children(postmaster) if postmaster in saved else []
        for pid in children:
            pin(pid, server_cpu)
    redis = _local_redis_pid(redis_url) if redis_url else []
    for pid in redis:
        pin(pid, server_cpu)

    def undo():
        if postmaster in saved:
            _set_affinity(postmaster, saved[postmaster])
            # Listed after the postmaster is restored, so backends forked while pinned get its old CPUs too.
            for pid in _local_children(postmaster):
                _set_affinity(pid, saved.get(pid, saved[postmaster]))
        for pid, cpus in saved.items():
            _set_affinity(pid, cpus)

    return undo, _pinned_note(saved, client_cpu, server_cpu, postmaster, children, redis)


def _set_affinity(pid: int, cpus: set) -> None:
    # Undo is best effort: a backend may have exited since it was pinned.
    import os

    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        pass


def _pinned_note(saved: dict, client_cpu: int, server_cpu: int, postmaster: int | None, children: list,
                 redis: list) -> str | None:
    # Names only what was really pinned: a remote or foreign server is said to be left alone.
    servers = []
    if postmaster in saved:
        servers.append(f"PostgreSQL (postmaster and {sum(pid in saved for pid in children)} processes)")
    if any(pid in saved for pid in redis):
        servers.append("Redis")
    names, client = " and ".join(servers), 0 in saved
    if not client and not servers:
        return None
    if not servers:
        return f"client pinned to CPU {client_cpu}; no local PostgreSQL or Redis could be pinned"
    if not client:
        return f"{names} pinned to CPU {server_cpu} (the client could not be)"
    if client_cpu == server_cpu:
        return f"client, {names} pinned to CPU {client_cpu}"
    return f"client pinned to CPU {client_cpu}; {names} pinned to CPU {server_cpu}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    # (command name, parent pid) from /proc, or None when the process is not visible here.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    name = stat[stat.index("(") + 1: stat.rindex(")")]
    return name, int(stat[stat.rindex(")") + 2:].split()[1])


def _local_parent(pid: int, name: str) -> int | None:
    # The parent of a local process called `name` (a server's backend); None for a remote server.
    stat = _proc_stat(pid)
    return stat[1] if stat and stat[0] == name else None


def _local_children(parent: int) -> list[int]:
    import os

    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and (_proc_stat(int(pid)) or ("", 0))[1] == parent]


def _local_redis_pid(redis_url: str) -> list[int]:
    try:
        import redis

        pid = int(redis.Redis.from_url(redis_url, socket_connect_timeout=2).info("server")["process_id"])
    except Exception:  # no Redis, or an answer without a pid: nothing to pin
        return []
    stat = _proc_stat(pid)
    return [pid] if stat and stat[0].startswith("redis") else []


def _measure(contenders, workloads, settings: Settings, progress: bool) -> Recorder:
    """Warm every cell up once (untimed), then run the rounds with the contender order rotating."""
    from tqdm import tqdm

    cells = [(w, c) for w in workloads for c in contenders if c.runs(w.name)]
    recorder = Recorder()
    with ThreadPoolExecutor(settings.threads) as pool, \
            tqdm(total=len(cells) * (settings.rounds + 1), desc="fastpgcache bench", unit="cell",
                 disable=not progress, leave=False) as bar:
        ops = {}
        for workload, contender in cells:
            ops[workload.name, contender.name] = _warm(workload, contender, pool, settings)
            bar.update()
        for round_index in range(settings.rounds):
            for workload in workloads:
                shift = round_index % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    if not contender.runs(workload.name):
                        continue
                    cell = (workload.name, contender.name)
                    if workload.threaded:
                        recorder.add(cell, *_load_run(contender, pool, settings, f"r{round_index}"))
                    else:
                        start = (round_index + 1) * settings.calls
                        recorder.add(cell, *_timed_calls(ops[cell], start, settings.calls, settings.budget_s))
                    contender.end_unit()
                    bar.update()
    return recorder


def _warm(workload: Workload, contender: Contender, pool, settings: Settings):
    # Opens connections, fills prepared-statement and plan caches, creates the rows reads need.
    if workload.threaded:
        _load_run(contender, pool, settings, "warm")
        return None
    op = workload.prepare(contender)
    _timed_calls(op, 0, 1 if workload.items >= 100 else 3, settings.budget_s)
    contender.end_unit()
    return op


def _meta(scratch: _Scratch, contenders: list[Contender], settings: Settings, embedded: bool, layout: str) -> dict:
    import psycopg2
    import sqlalchemy

    with scratch.engine.connect() as connection:
        server = connection.execute(text("SHOW server_version")).scalar()
        fsync = connection.execute(text("SHOW fsync")).scalar()
        sync_commit = connection.execute(text("SHOW synchronous_commit")).scalar()
    return {"server": f"PostgreSQL {server}" + (" (embedded)" if embedded else ""), "run_id": scratch.run_id,
            "fsync": fsync, "synchronous_commit": sync_commit, "python": platform.python_version(),
            "sqlalchemy": sqlalchemy.__version__, "psycopg2": psycopg2.__version__.split()[0],
            "machine": f"{platform.machine()}, {_cpu_count()} CPUs", "layout": layout,
            "contenders": [c.name for c in contenders],
            "settings": asdict(settings), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


# -- goals ----------------------------------------------------------------------------------


def goals(report: Report, settings: Settings) -> list[Goal]:
    """The speed goals of issues #3 and #8 as ratios from this run (None: not measured here)."""
    load = f"load {settings.threads}x{settings.thread_ops}"
    p50 = lambda w, c: _field(report, w, c, "p50_us")  # noqa: E731
    ops = lambda w, c: _field(report, w, c, "ops_per_s")  # noqa: E731
    return [
        _goal("get hit p50, FastPgCache / psycopg2", _div(p50("get hit", LIB), p50("get hit", FLOOR)), "<=", 1.25),
        _goal("set p50, FastPgCache / psycopg2", _div(p50("set", LIB), p50("set", FLOOR)), "<=", 1.25),
        _goal("set_many(1000) p50, FastPgCache / psycopg2 execute_values",
              _div(p50("set_many(1000)", LIB), p50("set_many(1000)", FLOOR)), "<=", 2),
        _goal("1000 x set() p50 / one set_many(1000) p50, FastPgCache",
              _div(_times(p50("set", LIB), 1000), p50("set_many(1000)", LIB)), ">=", 15),
        _goal("get_many(100) p50 / get hit p50, FastPgCache",
              _div(p50("get_many(100)", LIB), p50("get hit", LIB)), "<", 3),
        _goal(f"{load} throughput, shared FastPgCache / psycopg2 connection per thread",
              _div(ops(load, LIB), ops(load, FLOOR)), ">=", 0.8),
        _goal("get hit throughput, FastPgCache / Django DatabaseCache",
              _div(ops("get hit", LIB), ops("get hit", "Django DatabaseCache")), ">=", 3),
        _goal("set throughput, FastPgCache / Django DatabaseCache",
              _div(ops("set", LIB), ops("set", "Django DatabaseCache")), ">=", 3),
        _goal("set_many(1000) p50, FastPgCache / Redis MSET",
              _div(p50("set_many(1000)", LIB), p50("set_many(1000)", "Redis")), "<=", 1.5),
        _goal("set p50, FastPgCache LOGGED / UNLOGGED (information)",
              _div(p50("set", f"{LIB} LOGGED"), p50("set", LIB)), None, None),
        _goal(f"{load} throughput, FastPgCache UNLOGGED / LOGGED (information)",
              _div(ops(load, LIB), ops(load, f"{LIB} LOGGED")), None, None),
    ]


def _field(report: Report, workload: str, contender: str, name: str) -> float | None:
    result = report.result(workload, contender)
    return None if result is None else getattr(result, name)


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _times(a: float | None, factor: float) -> float | None:
    return None if a is None else a * factor


def _goal(name: str, ratio: float | None, op: str | None, target: float | None) -> Goal:
    checks = {"<=": lambda r: r <= target, "<": lambda r: r < target, ">=": lambda r: r >= target}
    met = None if ratio is None or op is None else checks[op](ratio)
    return Goal(name, ratio, f"{op} {target:g}" if op else "-", met)


# -- output ---------------------------------------------------------------------------------

def format_table(report: Report) -> str:
    """The results as a fixed-width text table, then the goals, then the notes."""
    head = f"{'workload':<17} {'contender':<24} {'p50 µs':>9} {'p95 µs':>9} {'p99 µs':>9} {'ops/s':>9} {'p50 x floor':>11}"
    lines = [f"{report.meta['server']}, fsync={report.meta['fsync']}, {report.meta['machine']}, "
             f"layout {report.meta['layout']}", "", head,
             "-" * len(head)]
    previous = None
    for r in report.results:
        if previous and previous != r.workload:
            lines.append("")
        previous = r.workload
        ratio = "" if r.p50_vs_floor is None else f"{r.p50_vs_floor:.2f}"
        lines.append(f"{r.workload:<17} {r.contender:<24} {r.p50_us:>9.1f} {r.p95_us:>9.1f} {r.p99_us:>9.1f} "
                     f"{r.ops_per_s:>9.0f} {ratio:>11}")
    lines += ["", "goals (ratios from this run):"]
    for g in report.goals:
        verdict = {True: "met", False: "MISSED", None: ""}[g.met]
        ratio = "n/a" if g.ratio is None else f"{g.ratio:.2f}"
        lines.append(f"  {g.goal:<72} {ratio:>7} {g.target:>7} {verdict}")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def write_json(report: Report, path: str) -> None:
    """Write the whole report (meta, every cell, goals, notes) as indented JSON."""
    with open(path, "w") as handle:
        json.dump(report.to_dict(), handle, indent=2)
        handle.write("\n")


def plot(report: Report, path: str) -> None:
    """Draw p50 (bar) and p95 (whisker) per workload and contender, log scale, into a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastpgcache[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in report.results))
    contenders = list(dict.fromkeys(r.contender for r in report.results))
    height = 0.8 / len(contenders)
    figure, axes = plt.subplots(figsize=(11, 0.55 * len(workloads) * max(2, len(contenders) / 2.5)))
    for index, contender in enumerate(contenders):
        rows = [(workloads.index(r.workload), r) for r in report.results if r.contender == contender]
        y = [pos + index * height for pos, _ in rows]
        p50 = [r.p50_us for _, r in rows]
        spread = [[0] * len(rows), [r.p95_us - r.p50_us for _, r in rows]]
        axes.barh(y, p50, height=height, xerr=spread, label=contender, capsize=2)
    axes.set_yticks([pos + 0.4 - height / 2 for pos in range(len(workloads))], workloads)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("latency per call, µs (bar p50, whisker p95; log scale)")
    axes.set_title(f"fastpgcache bench: {report.meta['server']}, {report.meta['machine']}, "
                   f"layout {report.meta['layout']}")
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(axis="x", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
