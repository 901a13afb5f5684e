"""Run `fastpgcache bench` and check the speed goals of issues #3 and #8, as ratios from one run.

    python benchmarks/goals.py --redis redis://127.0.0.1:6379            # embedded server, ~35 s
    python benchmarks/goals.py --url postgresql://postgres@127.0.0.1/postgres --quick

Prints the full table and the goals, writes results/bench.{txt,json,png} next to
this file, and exits 1 when a goal is missed (0 when all measured goals are met).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from fastpgcache import bench

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FASTPGCACHE_URL"),
                        help="PostgreSQL URL (default: $FASTPGCACHE_URL, else an embedded server)")
    parser.add_argument("--redis", help="Redis URL for the Redis MSET goal")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write results (default {RESULTS})")
    args = parser.parse_args()
    report = bench.run_bench(args.url, redis_url=args.redis,
                             settings=bench.Settings.quick() if args.quick else bench.Settings())
    table = bench.format_table(report)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.txt").write_text(table + "\n")
    bench.write_json(report, str(args.out / "bench.json"))
    bench.plot(report, str(args.out / "bench.png"))
    return 1 if any(goal.met is False for goal in report.goals) else 0


if __name__ == "__main__":
    raise SystemExit(main())
