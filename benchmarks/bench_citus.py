"""The cache on Citus against plain PostgreSQL, one run, one machine: latency per call, CPU per call on each
node, and the figures the README's throughput model is built from.

    python benchmarks/bench_citus.py              # ~2 minutes; needs Citus built (../shared/tools/citus.sh build)
    python benchmarks/bench_citus.py --quick      # fewer calls
    python benchmarks/bench_citus.py --json out.json

Starts a plain embedded PostgreSQL 18 and a Citus cluster (coordinator + 2 workers, the same PostgreSQL 18
with Citus 14) on loopback, and a LOGIN role on each. Measures, interleaving the contenders round by round:

- plain PostgreSQL: this checkout's write functions against main's (`--baseline-ref`, default main), which
  shows what making the SQL Citus-safe costs plain PostgreSQL;
- Citus: get, set, incr through the coordinator and through a worker (keys whose shard is on that worker,
  and keys on the other one), with the single-key functions delegated to the key's worker and without;
- set_many(1000) and get_many(100) at 32 and 8 shards, with citus.max_cached_conns_per_worker 1 and 16;
- CPU time per call on each node (utime + stime of every process of the node, from /proc), which is what
  bounds throughput when calls come in parallel: the coordinator's routing, the worker's shard work.

Every number is a median over rounds; the machine is small and shared (2 vCPUs for the client and four
servers), so read them as ratios and costs per call, not as what a cluster of real machines would do.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from citus_cluster import CitusCluster, citus_available  # noqa: E402

from fastpgcache import Cache, setup_cache  # noqa: E402
from fastpgcache.client import cache_engine  # noqa: E402
from fastpgcache.distributed import DELEGATED_VERBS  # noqa: E402
from fastpgcache.embedded import EmbeddedPostgres  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def node_cpu(postmaster_pid: int) -> float:
    """Seconds of CPU used so far by a server's postmaster and its live children (backends, workers)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == postmaster_pid or int(fields[1]) == postmaster_pid:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def postmaster(server: EmbeddedPostgres) -> int:
    return int((server.data_dir / "postmaster.pid").read_text().split()[0])


class Meter:
    """Wall time per call, and CPU time per call on each named server, over many calls."""

    def __init__(self, servers: dict[str, EmbeddedPostgres]):
        self.pids = {name: postmaster(server) for name, server in servers.items()}

    def run(self, fn, calls: int) -> dict:
        before = {name: node_cpu(pid) for name, pid in self.pids.items()}
        started = time.perf_counter()
        for i in range(calls):
            fn(i)
        wall = time.perf_counter() - started
        after = {name: node_cpu(pid) for name, pid in self.pids.items()}
        return {"us": wall / calls * 1e6, **{f"cpu_{name}_us": (after[name] - before[name]) / calls * 1e6
                                              for name in self.pids}}


def median_of(rounds: list[dict]) -> dict:
    return {key: round(statistics.median(r[key] for r in rounds), 1) for key in rounds[0]}


def baseline_migrations(ref: str) -> Path | None:
    """A copy of alembic/ whose 0004 is the one at git `ref` (None when git cannot show it)."""
    shown = subprocess.run(["git", "show", f"{ref}:alembic/versions/0004_write_functions.py"], cwd=ROOT,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        return None
    copy = Path(tempfile.mkdtemp(prefix="fastpgcache-bench-")) / "alembic"
    shutil.copytree(ROOT / "alembic", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "versions" / "0004_write_functions.py").write_text(shown.stdout)
    return copy


def make_role(admin_url: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin_url)
    with engine.begin() as connection:
        connection.execute(text(f'CREATE ROLE "{name}" LOGIN'))
    engine.dispose()
    return name


def role_cache(url: str, role: str, schema: str) -> Cache:
    # The client FastPgCache builds: AUTOCOMMIT, connections leased between calls.
    return Cache(cache_engine(make_url(url).set(username=role), pool_size=2), schema=schema, expire_every=None)


def single_key_ops(cache: Cache, keys: list[str]) -> dict:
    n = len(keys)
    # The same keys for all three (they hold integers), so a worker's "own" keys stay its own for incr too.
    return {"get": lambda i: cache.get(keys[i % n]), "set": lambda i: cache.set(keys[i % n], i),
            "incr": lambda i: cache.incr(keys[i % n])}


def plain_postgresql(args, report: dict) -> None:
    from fastpgcache import admin

    server = EmbeddedPostgres().start()
    try:
        role = make_role(server.url)
        admin_engine = create_engine(server.url)
        setup_cache(engine=admin_engine, schema="branch")
        contenders = {"branch": role_cache(server.url, role, "branch")}
        migrations = baseline_migrations(args.baseline_ref)
        if migrations is not None:
            real = admin.migrations_dir
            admin.migrations_dir = lambda: migrations
            try:
                setup_cache(engine=admin_engine, schema="baseline")
            finally:
                admin.migrations_dir = real
            contenders["baseline"] = role_cache(server.url, role, "baseline")
        keys = [f"key:{i}" for i in range(500)]
        meter = Meter({"server": server})
        rounds = {name: {op: [] for op in ("get", "set", "incr", "set_many_1000")} for name in contenders}
        for cache in contenders.values():
            cache.set_many({key: 0 for key in keys})
        batch = {f"batch:{i}": "x" * 100 for i in range(1000)}
        for _ in range(args.rounds):
            for name, cache in contenders.items():
                for op, fn in single_key_ops(cache, keys).items():
                    rounds[name][op].append(meter.run(fn, args.calls))
                rounds[name]["set_many_1000"].append(meter.run(lambda i, cache=cache: cache.set_many(batch), 3))
        report["plain"] = {name: {op: median_of(r) for op, r in ops.items()} for name, ops in rounds.items()}
        if "baseline" in rounds:
            # Per round, this checkout's time over main's (interleaved, so both saw the same machine).
            report["plain_ratio_branch_to_baseline"] = {op: round(statistics.median(
                b["us"] / a["us"] for a, b in zip(rounds["baseline"][op], rounds["branch"][op], strict=True)), 3)
                for op in rounds["branch"]}
        for cache in contenders.values():
            cache.bind.dispose()
        admin_engine.dispose()
    finally:
        server.stop()


def set_conns(cluster: CitusCluster, conns: int) -> None:
    for url in [cluster.coordinator_url, *cluster.worker_urls]:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(f"ALTER SYSTEM SET citus.max_cached_conns_per_worker = {conns}"))
            connection.execute(text("SELECT pg_reload_conf()"))
        engine.dispose()


def citus_cluster(args, report: dict) -> None:
    with CitusCluster() as cluster:
        admin_engine = create_engine(cluster.coordinator_url)
        role = make_role(cluster.coordinator_url)
        setup_cache(engine=admin_engine, schema="delegated", distributed=True, shard_count=32)
        setup_cache(engine=admin_engine, schema="routed", distributed=True, shard_count=32)
        setup_cache(engine=admin_engine, schema="eight", distributed=True, shard_count=8)
        with admin_engine.begin() as connection:
            # "routed": the same table, its single-key functions run by the coordinator (no delegation).
            for verb in DELEGATED_VERBS:
                signature = connection.execute(text(
                    "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.proname = :n"
                    " AND p.pronamespace = 'routed'::regnamespace"), {"n": f"cache_{verb}"}).scalar()
                connection.execute(text("SELECT create_distributed_function(:f)"), {"f": signature})
            ports = {}
            for key in (f"key:{i}" for i in range(2000)):
                shard = connection.execute(text("SELECT get_shard_id_for_distribution_column('delegated.cache', :k)"),
                                           {"k": key}).scalar()
                ports.setdefault(connection.execute(text(
                    "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid)"
                    " WHERE p.shardid = :s"), {"s": shard}).scalar(), []).append(key)
        w0, w1 = (make_url(url).port for url in cluster.worker_urls)
        servers = {"coordinator": cluster.coordinator, "worker0": cluster.workers[0], "worker1": cluster.workers[1]}
        meter = Meter(servers)
        set_conns(cluster, 16)
        every = ports[w0][:250] + ports[w1][:250]
        contenders = {
            "coordinator, delegated": (role_cache(cluster.coordinator_url, role, "delegated"), every),
            "coordinator, not delegated": (role_cache(cluster.coordinator_url, role, "routed"), every),
            "worker0, key on worker0": (role_cache(cluster.worker_urls[0], role, "delegated"), ports[w0][:500]),
            "worker0, key on worker1": (role_cache(cluster.worker_urls[0], role, "delegated"), ports[w1][:500]),
        }
        for cache, keys in contenders.values():
            cache.set_many({key: 0 for key in keys})
        rounds = {name: {op: [] for op in ("get", "set", "incr")} for name in contenders}
        for _ in range(args.rounds):
            for name, (cache, keys) in contenders.items():
                for op, fn in single_key_ops(cache, keys).items():
                    rounds[name][op].append(meter.run(fn, args.calls))
        report["citus_single_key"] = {name: {op: median_of(r) for op, r in ops.items()} for name, ops in rounds.items()}
        # Batches: shard count and cached connections per worker.
        batch = {f"batch:{i}": "x" * 100 for i in range(1000)}
        wanted = [f"key:{i}" for i in range(100)]
        batches = {}
        for conns in (1, 16):
            set_conns(cluster, conns)
            for schema in ("delegated", "eight"):
                cache = role_cache(cluster.coordinator_url, role, schema)
                cache.set_many(batch)
                found = [meter.run(lambda i, cache=cache: cache.set_many(batch), 3) for _ in range(args.rounds)]
                read = [meter.run(lambda i, cache=cache: cache.get_many(wanted), 20) for _ in range(args.rounds)]
                shards = "32" if schema == "delegated" else "8"
                batches[f"set_many(1000), {shards} shards, {conns} cached conns"] = median_of(found)
                batches[f"get_many(100), {shards} shards, {conns} cached conns"] = median_of(read)
                cache.bind.dispose()
        report["citus_batches"] = batches
        report["round_trips"] = round_trips(cluster, role)
        for cache, _ in contenders.values():
            cache.bind.dispose()
        admin_engine.dispose()


def round_trips(cluster: CitusCluster, role: str) -> dict:
    """Commands the coordinator sends to workers per call (citus.log_remote_commands), delegated or not."""
    found = {}
    for schema in ("delegated", "routed"):
        engine = create_engine(make_url(cluster.coordinator_url).set(username=role), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            cache = Cache(connection, schema=schema, expire_every=None)
            cache._identity_now()
            raw = connection.connection.dbapi_connection
            connection.exec_driver_sql("SET citus.log_remote_commands = on")
            keys = [f"k{i}" for i in range(10)]
            calls = {"set": lambda c=cache: c.set("rt", 1), "get": lambda c=cache: c.get("rt"),
                     "incr": lambda c=cache: c.incr("rt:n"), "get_many(10)": lambda c=cache, k=keys: c.get_many(k)}
            for op, call in calls.items():
                del raw.notices[:]
                call()
                found[f"{op}, {schema}"] = sum("issuing" in note for note in raw.notices)
        engine.dispose()
    return found


def model(report: dict, cores: int = 8, workers=(1, 2, 4, 8, 16)) -> dict:
    """Most calls per second the CPU allows, from the measured CPU per call (see the README's model).

    One plain server: cores / c_plain. Citus, clients entering through the coordinator only: the lesser of
    the coordinator's cores / its CPU per call and the workers' W * cores / theirs. Clients entering through
    every worker (multi-host URL): W * cores over the mean CPU per call, where a call's key is on the entry
    worker one time in W (all its CPU there) and on another worker otherwise (routing there + shard work)."""
    plain, single = report["plain"]["branch"], report["citus_single_key"]
    table = {}
    for op in ("get", "set"):
        c_plain = plain[op]["cpu_server_us"]
        via = single["coordinator, delegated"][op]
        c_coord = via["cpu_coordinator_us"]
        c_workers = via["cpu_worker0_us"] + via["cpu_worker1_us"]
        local = single["worker0, key on worker0"][op]["cpu_worker0_us"]
        remote = single["worker0, key on worker1"][op]
        c_remote = remote["cpu_worker0_us"] + remote["cpu_worker1_us"]
        row = {"plain, one server": round(cores / c_plain * 1e6)}
        for w in workers:
            row[f"{w} workers, via coordinator"] = round(min(cores / c_coord, w * cores / c_workers) * 1e6)
            mean = local / w + c_remote * (1 - 1 / w)
            row[f"{w} workers, via every worker"] = round(w * cores / mean * 1e6)
        table[op] = row
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--baseline-ref", default="main", help="git ref whose 0004 is the plain baseline")
    args = parser.parse_args(argv)
    args.calls, args.rounds = (200, 3) if args.quick else (1000, 5)
    if not citus_available():
        print("bench_citus: Citus is not built into this virtualenv's PostgreSQL: run ../shared/tools/citus.sh build",
              file=sys.stderr)
        return 2
    report = {"meta": {"calls": args.calls, "rounds": args.rounds, "cpus": os.cpu_count(),
                       "note": "loopback, unpinned, one machine"}}
    plain_postgresql(args, report)
    citus_cluster(args, report)
    report["model_calls_per_second_8_cores_per_node"] = model(report)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def print_report(report: dict) -> None:
    print(f"calls per measurement {report['meta']['calls']}, rounds {report['meta']['rounds']}, "
          f"{report['meta']['cpus']} CPUs, {report['meta']['note']}; medians; cpu_X: CPU time of node X per call")
    for section, rows in report.items():
        if section == "meta":
            continue
        print(f"\n== {section}")
        for name, value in rows.items():
            if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
                for op, figures in value.items():
                    print(f"{name:32s} {op:8s} " + "  ".join(f"{k} {v:8.1f}" for k, v in figures.items()))
            elif isinstance(value, dict):
                print(f"{name:48s} " + "  ".join(f"{k} {v:8.1f}" for k, v in value.items()))
            else:
                print(f"{name:32s} {value}")


if __name__ == "__main__":
    sys.exit(main())
