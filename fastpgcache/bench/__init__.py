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

from .contenders import Contender, sample_value
from .floors import FLOOR_TABLE, capture_sql, create_floor_table, floor_sql, scratch_schema
from .layout import LAYOUTS, Pinned, apply_layout, check_layout, pin_to_cpu
from .report import FLOOR, LIB, LIB_SQL, Goal, Report, Result, format_table, plot, write_json
from .run import Settings, _Scratch, run_bench  # noqa: F401  (_Scratch: the tests reach its cleanup)

__all__ = ["FLOOR", "FLOOR_TABLE", "LAYOUTS", "LIB", "LIB_SQL", "Contender", "Goal", "Pinned", "Report", "Result",
           "Settings", "apply_layout", "capture_sql", "check_layout", "create_floor_table", "floor_sql",
           "format_table", "pin_to_cpu", "plot", "run_bench", "sample_value", "scratch_schema", "write_json"]
