"""get/set through this library on psycopg2 and on psycopg 3, as ratios to raw psycopg2 in the same run.

    python benchmarks/bench_drivers.py            # FASTPGCACHE_URL, or a throwaway embedded server
    python benchmarks/bench_drivers.py --quick
    python benchmarks/bench_drivers.py --layout same   # client and server on one CPU (default split)

The floor is raw psycopg2 (autocommit) replaying the exact SQL text and
parameters this library sends, on the same table. Contenders run interleaved,
round by round in rotating order, so machine drift hits all of them alike.
A ratio below 1.0 means faster than that floor.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import psycopg
import psycopg2
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from fastpgcache import FastPgCache, codec, setup_cache
from fastpgcache.aio import AsyncCache
from fastpgcache.bench import LAYOUTS, apply_layout, capture_sql
from fastpgcache.embedded import default_url

VALUE = {"name": "Alice", "roles": ["admin", "dev"], "pad": "x" * 60}
KEYS = [f"user:{i}" for i in range(1000)]


def driver_url(url: URL, driver: str) -> str:
    return url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def libpq_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class RawReplay:
    """A raw driver connection in autocommit replaying the library's captured statements."""

    def __init__(self, connection, sent: dict, **execute_options):
        self.cursor = connection.cursor()
        self.sent = sent
        self.options = execute_options
        self.encoded = codec.serialize(VALUE)

    def get(self, key):
        statement, params = self.sent["get"]
        self.cursor.execute(statement, {**params, "k": key}, **self.options)
        return self.cursor.fetchone()

    def set(self, key, value, ttl=None):
        statement, params = self.sent["set"]
        flags, data = self.encoded
        self.cursor.execute(statement, {**params, "k": key, "val": data, "flg": flags, "ttl": ttl}, **self.options)


class AsyncRunner:
    """Runs AsyncCache calls one at a time on a private event loop, to compare per-call latency."""

    def __init__(self, url: str, schema: str):
        self.loop = asyncio.new_event_loop()
        self.engine = create_async_engine(url, pool_size=1)
        self.cache = AsyncCache(self.engine, schema=schema)

    def get(self, key):
        return self.loop.run_until_complete(self.cache.get(key))

    def set(self, key, value, ttl=None):
        return self.loop.run_until_complete(self.cache.set(key, value, ttl))

    def close(self):
        self.loop.run_until_complete(self.engine.dispose())
        self.loop.close()


def time_calls(call, calls: int) -> list[float]:
    samples = []
    for i in range(calls):
        key = KEYS[i % len(KEYS)]
        started = time.perf_counter_ns()
        call(key)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def measure(contenders: dict, rounds: int, calls: int) -> dict:
    """{(workload, contender): [latency µs]} over interleaved rounds."""
    workloads = {"get": lambda c: c.get, "set": lambda c: (lambda key: c.set(key, VALUE, 3600))}
    samples = {(w, name): [] for w in workloads for name in contenders}
    names = list(contenders)
    for round_no in range(rounds):
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        for workload, bind in workloads.items():
            for name in order:
                call = bind(contenders[name])
                time_calls(call, 20)  # warm: pool, prepared statements, caches
                samples[(workload, name)] += time_calls(call, calls)
    return samples


def report(samples: dict, floor: str) -> None:
    print(f"{'workload':8} {'contender':34} {'p50 µs':>8} {'mean µs':>8} {'p50/floor':>10}")
    for workload in ("get", "set"):
        base = statistics.median(samples[(workload, floor)])
        for (w, name), values in samples.items():
            if w == workload:
                p50 = statistics.median(values)
                print(f"{workload:8} {name:34} {p50:8.1f} {statistics.fmean(values):8.1f} {p50 / base:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls (a smoke run)")
    parser.add_argument("--layout", choices=LAYOUTS, default="split",
                        help="CPU layout of client and local server, as in `fastpgcache bench` (default split)")
    args = parser.parse_args()
    rounds, calls = (2, 100) if args.quick else (5, 500)

    url = make_url(default_url())
    schema = f"bench_drivers_{uuid.uuid4().hex[:8]}"
    setup_cache(url=driver_url(url, "psycopg2"), schema=schema)
    on_psycopg2 = FastPgCache(url=driver_url(url, "psycopg2"), schema=schema, minconn=1, maxconn=1)
    on_psycopg2.set_many({key: VALUE for key in KEYS}, ttl=3600)
    on_psycopg = FastPgCache(url=driver_url(url, "psycopg"), schema=schema, minconn=1, maxconn=1,
                             prepare_threshold=None)
    prepared = FastPgCache(url=driver_url(url, "psycopg"), schema=schema, minconn=1, maxconn=1,
                           prepare_threshold=0)
    raw2 = psycopg2.connect(libpq_dsn(url))
    raw2.autocommit = True
    raw3 = psycopg.connect(libpq_dsn(url), autocommit=True)
    on_async = AsyncRunner(driver_url(url, "psycopg"), schema)
    sent = capture_sql(url.set(drivername="postgresql+psycopg2"), schema)  # the exact SQL the library sends
    contenders = {
        "raw psycopg2 (floor)": RawReplay(raw2, sent),
        "raw psycopg 3, prepared": RawReplay(raw3, sent, prepare=True),
        "fastpgcache psycopg2": on_psycopg2,
        "fastpgcache psycopg 3, unprepared": on_psycopg,
        "fastpgcache psycopg 3, prepared": prepared,
        "fastpgcache AsyncCache psycopg 3": on_async,
    }
    # An engine for pinning and cleanup: each client keeps its pool's one connection (maxconn=1) between calls.
    admin = create_engine(driver_url(url, "psycopg2"), poolclass=NullPool)
    pinned = apply_layout(args.layout, admin)  # one placement for every contender (bench.py)
    try:
        print(f"server {on_psycopg2.bind.dialect.server_version_info}, {rounds} rounds x {calls} calls, "
              f"value {len(str(VALUE))} chars; {pinned.note}")
        report(measure(contenders, rounds, calls), "raw psycopg2 (floor)")
    finally:
        pinned.undo()
        on_async.close()
        raw2.close()
        raw3.close()
        for client in (on_psycopg, prepared):
            client.close()
        on_psycopg2.close()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
