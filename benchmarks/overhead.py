"""The library's own Python work per call: get and set with a driver cursor whose execute() does nothing.

    python benchmarks/overhead.py                 # FASTPGCACHE_URL, or a throwaway embedded server
    python benchmarks/overhead.py --driver psycopg

The client is pinned to one CPU. A psycopg2 (or psycopg 3) cursor subclass
answers every statement from memory once the cache is set up, so the time per
call is what the library itself does: validation, encoding, the step protocol,
the connection lease, the driver call's own Python layer. That cursor's cost
(a Python execute() and fetchone()) is measured alone and subtracted. Reports
the minimum and median over 7 runs of 20,000 calls.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fastpgcache import Cache, setup_cache
from fastpgcache.client import cache_engine
from fastpgcache.embedded import default_url

VALUE = {"user": "u-42", "items": [1, 2, 3], "note": "x" * 60}
ROW = (json.dumps(VALUE, separators=(",", ":")).encode(), 2)
CALLS, RUNS = 20_000, 7


def answering_cursor(base):
    """A cursor class that runs real statements until `offline` is set, then answers from memory."""

    class Answering(base):
        offline = False

        def execute(self, query, params=None, *args, **kwargs):
            if not Answering.offline:
                return super().execute(query, params, *args, **kwargs)
            self._answer = (True,) if "_set(" in query else ROW

        def fetchone(self):
            return self._answer if Answering.offline else super().fetchone()

    return Answering


def per_call_us(call) -> tuple[float, float]:
    for _ in range(2000):
        call()
    runs = []
    for _ in range(RUNS):
        started = time.perf_counter_ns()
        for _ in range(CALLS):
            call()
        runs.append((time.perf_counter_ns() - started) / CALLS / 1000)
    return min(runs), statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: FASTPGCACHE_URL, else an embedded server)")
    parser.add_argument("--driver", choices=("psycopg2", "psycopg"), default="psycopg2")
    args = parser.parse_args()
    url = make_url(args.url or default_url()).set(drivername=f"postgresql+{args.driver}")
    if args.driver == "psycopg2":
        import psycopg2.extensions

        cursor_class = answering_cursor(psycopg2.extensions.cursor)
        connect_args = {"cursor_factory": cursor_class}
    else:
        import psycopg

        cursor_class = answering_cursor(psycopg.Cursor)
        connect_args = {"cursor_factory": cursor_class}
    schema = f"overhead_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url.set(drivername="postgresql+psycopg2"))
    setup_cache(engine=admin, schema=schema)
    engine = cache_engine(url, connect_args=connect_args)
    cache = Cache(engine, schema=schema, expire_every=None)
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        cache.set("k", VALUE)  # the role's secret is read, the statements compiled, a connection leased
        cache.get("k")
        cursor_class.offline = True
        lease = cache._leases.acquire()
        cursor, sql = lease.cursor, cache._compiled[cache._s.get].sql
        cursor_cost = per_call_us(lambda: (cursor.execute(sql, {"k": "k"}), cursor.fetchone()))
        cache._leases.release(lease)
        get = per_call_us(lambda: cache.get("k"))
        set_ = per_call_us(lambda: cache.set("k", VALUE))
        cursor_class.offline = False
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    print(f"{args.driver}: the stand-in cursor's own execute()+fetchone(): min {cursor_cost[0]:.2f} µs")
    for name, (low, middle) in (("get", get), ("set", set_)):
        print(f"  {name}: {low - cursor_cost[0]:.2f} µs of the library's own work (min; median "
              f"{middle - cursor_cost[0]:.2f}), {low:.2f} µs with the stand-in cursor")


if __name__ == "__main__":
    main()
