"""FastPgCache against the floor in one loop: set and get hit, guard off and on, and nothing else running.

    python benchmarks/floor_loop.py                                   # FASTPGCACHE_URL, or an embedded server
    python benchmarks/floor_loop.py --url postgresql://postgres@127.0.0.1:5432/postgres --layout split

The floor is the bench's own contender (`Psycopg2Floor`): raw psycopg2 in
autocommit sending the plain SQL of a hand-written cache (`floor_sql`) to a
plain UNLOGGED table of the cache's shape, encoding and decoding values as the
library does. `fastpgcache bench` runs ten contenders and eleven
workloads in one process; here only the floor and two FastPgCache clients
(the guard off, and on) take turns, in blocks of 200 calls, the order rotating
each round, with expiry on write off. Prints the median of the rounds' per-call
means, and each client's ratio to the floor.
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg2
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fastpgcache import FastPgCache, setup_cache
from fastpgcache.bench.contenders import Psycopg2Floor, sample_value
from fastpgcache.bench.floors import create_floor_table, floor_sql
from fastpgcache.bench.layout import LAYOUTS, apply_layout
from fastpgcache.embedded import default_url

VALUE = sample_value(100)  # the bench's value: a JSON object of 100 bytes
KEYS = [f"k{i}" for i in range(200)]


def contenders(dsn: str, schema: str, floor_table: str) -> tuple[dict, list]:
    """name -> one call taking a key, and what to close afterwards."""
    off = FastPgCache(dsn, schema=schema, use_cuckoo_filter=False, expire_every=None)
    on = FastPgCache(dsn, schema=schema, expire_every=None)
    floor = Psycopg2Floor("psycopg2", lambda: psycopg2.connect(dsn), floor_sql(floor_table))
    for key in KEYS:
        floor.set(key, VALUE)
        on.set(key, VALUE)
    if not on.guard.wait_until_trusted(10):
        raise SystemExit(f"the guard did not start: {on.guard.state}")
    calls = {"set, floor": lambda key: floor.set(key, VALUE), "set, guard off": lambda key: off.set(key, VALUE),
             "set, guard on": lambda key: on.set(key, VALUE),
             "get, floor": floor.get, "get, guard off": off.get, "get, guard on": on.get}
    return calls, [on, off, floor]


def measure(calls: dict, rounds: int) -> dict:
    """Median over `rounds` of each call's mean µs over the 200 keys, the order rotating per round."""
    names = list(calls)
    for call in calls.values():
        for key in KEYS:
            call(key)
    means: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            call = calls[name]
            started = time.perf_counter_ns()
            for key in KEYS:
                call(key)
            means[name].append((time.perf_counter_ns() - started) / len(KEYS) / 1000)
    return {name: statistics.median(values) for name, values in means.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: FASTPGCACHE_URL, else an embedded server)")
    parser.add_argument("--layout", choices=LAYOUTS, default="none", help="CPU layout (default none: unpinned)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    url = make_url(args.url or default_url()).set(drivername="postgresql+psycopg2")
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = create_engine(url)
    schema = f"floor_loop_{uuid.uuid4().hex[:8]}"
    setup_cache(engine=admin, schema=schema)
    with admin.begin() as connection:
        floor_table = create_floor_table(connection, schema)
    calls, opened = contenders(dsn, schema, floor_table)
    pinned = apply_layout(args.layout, admin)
    try:
        medians = measure(calls, args.rounds)
    finally:
        pinned.undo()
        for thing in opened:
            thing.close()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    print(f"{pinned.note}; {args.rounds} rounds of {len(KEYS)} calls")
    for name, micros in medians.items():
        workload = name.split(",")[0]
        ratio = micros / medians[f"{workload}, floor"]
        print(f"  {name:16s} {micros:7.1f} µs  {ratio:.2f}x the floor")


if __name__ == "__main__":
    main()
