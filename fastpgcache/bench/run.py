"""Running the bench: settings, workloads, interleaved measurement, and the whole run."""
from __future__ import annotations

import platform
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from ..admin import setup_cache
from ..client import FastPgCache, build_url
from .contenders import (
    DJANGO_SCHEMA,
    Contender,
    DjangoContender,
    LibraryContender,
    Psycopg2Floor,
    RedisContender,
    SessionContender,
    _django_cache,
    sample_value,
)
from .floors import capture_sql, create_floor_table, floor_sql
from .layout import apply_layout, check_layout, cpu_count
from .report import FLOOR, LIB, LIB_SQL, Report, Result, goals

LOGGED_TABLE = "cache_logged"


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
    def quick(cls) -> Settings:
        return cls(rounds=2, calls=60, budget_s=0.02, thread_ops=30)


@dataclass
class Workload:
    """A named unit of work: `prepare(contender)` (untimed) returns the timed call `op(i)`."""

    name: str
    items: int
    prepare: Callable[[Contender], Callable[[int], Any] | None]  # None: the workload runs its own loop
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
                                           text_values=True),
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
        contenders: list[Contender] = []
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
        from ..embedded import EmbeddedPostgres

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
            "machine": f"{platform.machine()}, {cpu_count()} CPUs", "layout": layout,
            "contenders": [c.name for c in contenders],
            "settings": asdict(settings), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


