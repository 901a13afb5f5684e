"""FastPgCache against the floor in one loop: set and get hit, guard off and on, and nothing else running.

    python benchmarks/floor_loop.py                                   # FASTPGCACHE_URL, or an embedded server
    python benchmarks/floor_loop.py --url postgresql://postgres@127.0.0.1:5432/postgres --layout split
    python benchmarks/floor_loop.py --connections shared              # every contender on one connection

The floor is the bench's own contender (`Psycopg2Floor`): raw psycopg2 in
autocommit sending the plain SQL of a hand-written cache (`floor_sql`) to a
plain UNLOGGED table of the cache's shape, encoding and decoding values as the
library does. Beside it run the library's own SQL replayed by raw psycopg2
(`capture_sql`, on the library's table) and two FastPgCache clients (the guard
off, and on), in blocks of 200 calls, the order rotating each round, with
expiry on write off. Prints the median of the rounds' per-call means, each
contender's ratio to the floor, and where the time went: the client process's
CPU per call and, for a server on this machine, the CPU its backends used per
call (from /proc/<pid>/schedstat). The replay sends the library's SQL with
none of its Python, so the replay's server CPU against the floor's is what
the library's SQL costs the server, and the library's client CPU against the
replay's is what its Python costs the client.

The "new key" rows write keys never written before: inserts, which the write
function announces to the role's guards. The guard-on client's listener, in
this process, hears the replay's and the guard-off client's inserts as well
as its own (the floor's table announces nothing), as a guard beside other
writers of its role would.

`--connections shared` runs every contender on one server connection, the
guard-on client's own (the guard-off client is the same client without its
guard, the raw contenders send their SQL on its connection), so one backend
serves them all and its CPU is read per block. Unpinned, the scheduler puts
each backend near the client or on the other CPU and mostly keeps it there:
with a connection each (the default, `own`), the same code measured a get hit
0.68x and 1.95x the floor in two runs, as each contender's backend landed. On
one connection, every contender meets the same placement.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import statistics
import time

import psycopg2
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fastpgcache import FastPgCache
from fastpgcache.bench.contenders import Psycopg2Floor, sample_value
from fastpgcache.bench.floors import capture_sql, floor_sql, scratch_schema
from fastpgcache.bench.layout import LAYOUTS, apply_layout, local_backend
from fastpgcache.embedded import default_url

VALUE = sample_value(100)  # the bench's value: a JSON object of 100 bytes
KEYS = [f"k{i}" for i in range(200)]
NAMES = ("floor", "library SQL", "guard off", "guard on")


def contenders(url, schema: str, floor_table: str, connections: str) -> tuple[dict, list, dict]:
    """name -> one call taking a key; what to close afterwards; contender -> what each of its blocks runs
    in. Each contender connects under its own application_name (the schema, and the name's place in NAMES),
    which is how its backends are found; with `connections="shared"` all of them run on the guard-on client's."""
    def dsn(name: str) -> str:
        tagged = url.set(drivername="postgresql").update_query_dict({"application_name": application(schema, name)})
        return tagged.render_as_string(hide_password=False)

    floor_sql_, replay_sql = floor_sql(floor_table), capture_sql(url, schema)
    if connections == "shared":
        on = FastPgCache(dsn("guard on"), schema=schema, expire_every=None, maxconn=1)
        off = copy.copy(on)  # the same client and connection, without the guard
        off.guard = None
        floor = Psycopg2Floor("psycopg2", unusable, floor_sql_)
        replay = Psycopg2Floor("psycopg2, library SQL", unusable, replay_sql, text_values=True)
        blocks = {"floor": functools.partial(holding, on, floor), "library SQL": functools.partial(holding, on, replay)}
        opened = [on]
    else:
        floor = Psycopg2Floor("psycopg2", lambda: psycopg2.connect(dsn("floor")), floor_sql_)
        replay = Psycopg2Floor("psycopg2, library SQL", lambda: psycopg2.connect(dsn("library SQL")), replay_sql,
                               text_values=True)
        off = FastPgCache(dsn("guard off"), schema=schema, use_cuckoo_filter=False, expire_every=None)
        on = FastPgCache(dsn("guard on"), schema=schema, expire_every=None)
        blocks, opened = {}, [on, off, replay, floor]
    for name, client in (("floor", floor), ("library SQL", replay), ("guard on", on)):
        with blocks.get(name, contextlib.nullcontext)():
            for key in KEYS:
                client.set(key, VALUE)
    if not on.guard.wait_until_trusted(10):
        raise SystemExit(f"the guard did not start: {on.guard.state}")
    clients = dict(zip(NAMES, (floor, replay, off, on), strict=True))
    calls = {f"set, {name}": lambda key, client=client: client.set(key, VALUE) for name, client in clients.items()}
    calls.update({f"get, {name}": client.get for name, client in clients.items()})
    calls.update({f"new key, {name}": functools.partial(set_new_key, client, f"new:{place}:", itertools.count())
                  for place, (name, client) in enumerate(clients.items())})
    return calls, opened, blocks


def set_new_key(client, prefix: str, numbers, key: str) -> None:
    # A set of a key never written before (an insert, announced to the role's guards); `key` is ignored.
    client.set(f"{prefix}{next(numbers)}", VALUE)


@contextlib.contextmanager
def holding(cache, contender):
    """`contender` sends its SQL on `cache`'s connection, held meanwhile as the cache holds it for a call:
    idle, the guard's heartbeat could take it and find a reply of the contender's on its socket."""
    lease = cache._leases.acquire()
    try:
        contender.use(lease.driver)
        yield
    finally:
        cache._leases.release(lease)


def unusable():
    raise RuntimeError("with --connections shared, a raw contender runs only inside holding()")


def application(schema: str, name: str) -> str:
    return f"{schema}:{NAMES.index(name)}"


def server_clock(admin, schema: str, connections: str) -> dict:
    """contender -> a function giving the CPU ns its backends have used so far, for a server on this machine
    (on a shared connection, every contender's are the guard-on client's, read around its own blocks)."""
    with admin.connect() as connection:
        rows = connection.execute(text("SELECT application_name, pid FROM pg_stat_activity")).all()
    backends: dict[str, list[int]] = {}
    for tag, pid in rows:
        if (tag or "").startswith(f"{schema}:") and local_backend(pid):
            backends.setdefault(NAMES[int(tag.split(":", 1)[1])], []).append(pid)
    if connections == "shared" and "guard on" in backends:
        backends = dict.fromkeys(NAMES, backends["guard on"])

    def used(pid: int) -> int:
        with open(f"/proc/{pid}/schedstat") as schedstat:  # ns on a CPU, waiting time, timeslices
            return int(schedstat.read().split()[0])

    def clock(pids):
        return lambda: sum(used(pid) for pid in pids)

    return {name: clock(pids) for name, pids in backends.items()}


def contender_of(call: str) -> str:
    # "set, guard off" -> "guard off": the key of `servers` and `blocks` for a call of `calls`.
    return call.split(", ", 1)[1]


def measure(calls: dict, servers: dict, rounds: int, blocks: dict) -> dict:
    """Per call, the median over `rounds` of (wall µs, client CPU µs, server CPU µs or None), the order
    rotating per round; each block inside `blocks[contender]()` where there is one (entered untimed)."""
    names = list(calls)

    def block(name: str):
        return blocks.get(contender_of(name), contextlib.nullcontext)()

    for name, call in calls.items():
        with block(name):
            for key in KEYS:
                call(key)
    measured: dict[str, list[tuple]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            call, server = calls[name], servers.get(contender_of(name))
            with block(name):
                server_before = server() if server else 0
                cpu_before, started = time.process_time_ns(), time.perf_counter_ns()
                for key in KEYS:
                    call(key)
                wall, cpu = time.perf_counter_ns() - started, time.process_time_ns() - cpu_before
                server_used = server() - server_before if server else None
            measured[name].append((wall, cpu, server_used))
    per_call = len(KEYS) * 1000

    def median(values):
        return None if None in values else statistics.median(values) / per_call

    return {name: tuple(median([sample[i] for sample in samples]) for i in range(3))
            for name, samples in measured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: FASTPGCACHE_URL, else an embedded server)")
    parser.add_argument("--layout", choices=LAYOUTS, default="none", help="CPU layout (default none: unpinned)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--connections", choices=("own", "shared"), default="own",
                        help="own (default): a server connection per contender; shared: all on one")
    args = parser.parse_args()
    url = make_url(args.url or default_url()).set(drivername="postgresql+psycopg2")
    with scratch_schema(url, "floor_loop") as (admin, schema, floor_table):
        calls, opened, blocks = contenders(url, schema, floor_table, args.connections)
        pinned = apply_layout(args.layout, admin)
        try:
            results = measure(calls, server_clock(admin, schema, args.connections), args.rounds, blocks)
        finally:
            pinned.undo()
            for thing in opened:
                thing.close()
    print(f"{pinned.note}; connections {args.connections}; {args.rounds} rounds of {len(KEYS)} calls; µs per call"
          " (CPU: client process, server backends)")
    for name, (wall, client, server) in results.items():
        ratio = wall / results[f"{name.split(',')[0]}, floor"][0]
        on_server = "n/a (not a local server)" if server is None else f"{server:5.1f}"
        print(f"  {name:18s} {wall:7.1f} µs  {ratio:.2f}x the floor   CPU: client {client:5.1f}  server {on_server}")


if __name__ == "__main__":
    main()
