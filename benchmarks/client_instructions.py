"""Instructions the client executes per call, counted by valgrind's callgrind: repeatable, unlike time.

    python benchmarks/client_instructions.py                 # FASTPGCACHE_URL, or a throwaway embedded server
    python benchmarks/client_instructions.py --url postgresql://postgres@127.0.0.1:5432/postgres

Each contender runs in a child Python under `valgrind --tool=callgrind`, once
with 300 calls and once with 1,300 over the same 200 keys; the difference of
the two totals over 1,000 is what one call costs the client (interpreter,
driver, libpq; not the kernel, not the server). PYTHONHASHSEED is fixed, so a
rerun gives the same counts within about 1%. Contenders: the floor's set and
get (`Psycopg2Floor`, the bench's own), the library's SQL replayed by raw
psycopg2, and `FastPgCache` (guard off): set, set with a ttl, get hit.

Why it exists: after a round trip the client's CPU caches are cold, and the
time of the client's work follows the instructions it runs more closely than
any timing loop can show (about 2,600 instructions per µs on the split layout
of a 2-vCPU VM). Every instruction saved here showed up as time in
`floor_loop.py`. Needs valgrind (any Linux package manager); takes ~3 minutes.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import uuid

CONTENDERS = ("floor set", "replay set", "library set", "floor set ttl", "library set ttl", "floor get",
              "library get")
SHORT, LONG = 300, 1300


def child(which: str, calls: int) -> None:
    # Runs inside callgrind: connect, warm every key up, then `calls` calls.
    import psycopg2
    from sqlalchemy.engine import make_url

    from fastpgcache import FastPgCache
    from fastpgcache.bench.contenders import Psycopg2Floor, sample_value
    from fastpgcache.bench.floors import capture_sql, floor_sql

    dsn, schema, floor_table = os.environ["FPC_URL"], os.environ["FPC_SCHEMA"], os.environ["FPC_FLOOR"]
    value, keys = sample_value(100), [f"k{i}" for i in range(200)]
    if which.startswith("floor"):
        floor = Psycopg2Floor("floor", lambda: psycopg2.connect(dsn), floor_sql(floor_table))
        call = {"floor set": lambda key: floor.set(key, value), "floor get": floor.get,
                "floor set ttl": lambda key: floor.set(key, value, 300)}[which]
    elif which == "replay set":
        replay = Psycopg2Floor("replay", lambda: psycopg2.connect(dsn), capture_sql(make_url(dsn), schema),
                               text_values=True)
        call = lambda key: replay.set(key, value)  # noqa: E731
    else:
        cache = FastPgCache(dsn, schema=schema, use_cuckoo_filter=False, expire_every=None, maxconn=1)
        call = {"library set": lambda key: cache.set(key, value), "library get": cache.get,
                "library set ttl": lambda key: cache.set(key, value, 300)}[which]
    for key in keys:
        call(key)
    for i in range(calls):
        call(keys[i % len(keys)])


def instructions(which: str, calls: int, env: dict) -> int:
    """The client's total instructions for `calls` calls of `which` (and everything around them)."""
    out = f"/tmp/fastpgcache-callgrind-{uuid.uuid4().hex}.out"
    try:
        ran = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                              __file__, "--child", which, str(calls)], env=env, capture_output=True, text=True)
    finally:
        if os.path.exists(out):
            os.remove(out)
    found = re.search(r"Collected : (\d+)", ran.stderr)
    if ran.returncode != 0 or found is None:
        raise SystemExit(f"{which}: the child under valgrind failed:\n{ran.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: FASTPGCACHE_URL, else an embedded server)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))

    import shutil

    from sqlalchemy.engine import make_url

    from fastpgcache.bench.floors import scratch_schema
    from fastpgcache.embedded import default_url

    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    url = make_url(args.url or default_url()).set(drivername="postgresql+psycopg2")
    with scratch_schema(url, "instructions") as (_, schema, floor_table):
        # The URL reaches the children through their environment, never their command line.
        env = {**os.environ, "PYTHONHASHSEED": "0", "FPC_SCHEMA": schema, "FPC_FLOOR": floor_table,
               "FPC_URL": url.set(drivername="postgresql").render_as_string(hide_password=False)}
        counts = {which: (instructions(which, LONG, env) - instructions(which, SHORT, env)) / (LONG - SHORT)
                  for which in CONTENDERS}
    print("client instructions per call (callgrind; the kernel and the server not counted)")
    for which, count in counts.items():
        floor = counts[which.replace("library", "floor").replace("replay", "floor")]
        print(f"  {which:16s} {count / 1000:7.1f}k  {count / floor:.2f}x the floor's")


if __name__ == "__main__":
    main()
