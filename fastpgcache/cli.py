"""`fastpgcache`: the cache from a terminal, and `fastpgcache bench`.

Exit codes are for scripts: 0 found / done, 1 missing (or not stored), 2 error.
Errors are one line on stderr, never a traceback, never the password::

    $ export FASTPGCACHE_URL=postgresql://app@localhost/app
    $ fastpgcache set greeting '{"text": "hello"}' --json --ttl 60
    OK
    $ fastpgcache get greeting
    {
      "text": "hello"
    }
    $ fastpgcache get nope; echo $?
    1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import psycopg2
from sqlalchemy import exc as sa_exc

from .errors import CacheError, connection_hint, translate
from .model import DEFAULT_SCHEMA, DEFAULT_TABLE

FOUND, MISSING, ERROR = 0, 1, 2
PROG = "fastpgcache"


class UsageError(Exception):
    """A mistake on the command line that argparse cannot see (e.g. no database URL)."""


# -- commands ---------------------------------------------------------------------------------
# Each takes (cache, args) and returns the exit code; output goes to stdout.

def cmd_get(cache, args) -> int:
    value = cache.get(args.key, _MISSING, parse_json=not args.raw)
    if value is _MISSING:
        _say(f"{args.key!r} is missing or expired")
        return MISSING
    _print_value(value)
    return FOUND


def cmd_set(cache, args) -> int:
    value = sys.stdin.read() if args.value == "-" else args.value
    if args.json:
        try:
            value = json.loads(value)
        except ValueError as error:
            raise UsageError(f"--json: the value is not valid JSON ({error})") from None
    stored = cache.set(args.key, value, args.ttl, nx=args.nx, xx=args.xx)
    print("OK" if stored else "not stored")
    return FOUND if stored else MISSING


def cmd_del(cache, args) -> int:
    removed = cache.delete_many(args.keys)
    print(removed)
    return FOUND if removed else MISSING


def cmd_ttl(cache, args) -> int:
    seconds = cache.ttl(args.key)
    print(seconds)
    return MISSING if seconds == -2 else FOUND


def cmd_expire(cache, args) -> int:
    if cache.expire(args.key, args.seconds):
        print("OK")
        return FOUND
    _say(f"{args.key!r} is missing or expired")
    return MISSING


def cmd_keys(cache, args) -> int:
    for key in cache.scan_iter(args.pattern):
        print(key)
    return FOUND


def cmd_stats(cache, args) -> int:
    _print_value({"schema": cache.schema, "table": cache.table, **cache.stats()})
    return FOUND


def cmd_cleanup(cache, args) -> int:
    _print_value({"removed": cache.cleanup(args.batch_size, all_users=args.all_users)})
    return FOUND


def cmd_flush(cache, args) -> int:
    if not args.yes:
        raise UsageError("flush removes every entry of this database role; add --yes to confirm")
    _print_value({"removed": cache.clear()})
    return FOUND


def cmd_bench(args) -> int:
    from . import bench

    settings = bench.Settings.quick() if args.quick else bench.Settings()
    settings = dataclasses.replace(settings, rounds=args.rounds or settings.rounds, layout=args.layout)
    report = bench.run_bench(_url(args, required=False), redis_url=args.redis, settings=settings,
                             progress=sys.stderr.isatty())
    print(bench.format_table(report))
    if args.json:
        bench.write_json(report, args.json)
    if args.plot:
        bench.plot(report, args.plot)
    return FOUND


_MISSING = object()


def _print_value(value) -> None:
    # str as typed, bytes as they are, everything else as indented JSON.
    if isinstance(value, bytes):
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
    elif isinstance(value, str):
        print(value)
    else:
        print(json.dumps(value, indent=2, ensure_ascii=False))


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


# -- parsing ------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _connection_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--url", default=default,
                        help="database URL, e.g. postgresql://user@host/db (default: $FASTPGCACHE_URL); "
                             "give the password through PGPASSWORD or ~/.pgpass rather than here")
    parser.add_argument("--schema", default=default if default is not None else DEFAULT_SCHEMA,
                        help=f"schema of the cache table (default: {DEFAULT_SCHEMA})")
    parser.add_argument("--table", default=default if default is not None else DEFAULT_TABLE,
                        help=f"name of the cache table (default: {DEFAULT_TABLE})")


def _ttl(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, e.g. 60 or 0.5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The `fastpgcache` argument parser: connection options before or after the command."""
    parser = _Parser(
        prog=PROG, description="Use a fastpgcache cache from a terminal. Exit codes: 0 found, 1 missing, 2 error.")
    _connection_options(parser, None)
    shared = _Parser(add_help=False)
    _connection_options(shared, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, handler, summary):
        sub = commands.add_parser(name, parents=[shared], help=summary, description=summary)
        sub.set_defaults(handler=handler)
        return sub

    get = command("get", cmd_get, "Print the value of KEY (JSON indented); exit 1 if missing.")
    get.add_argument("key")
    get.add_argument("--raw", action="store_true", help="print a JSON value as stored, not re-indented")
    put = command("set", cmd_set, "Store VALUE under KEY (a string, or JSON with --json; '-' reads stdin).")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--json", action="store_true", help="parse VALUE as JSON and store the JSON value")
    put.add_argument("--ttl", type=_ttl, help="expire after this many seconds")
    only = put.add_mutually_exclusive_group()
    only.add_argument("--nx", action="store_true", help="only if KEY is missing (exit 1 if not stored)")
    only.add_argument("--xx", action="store_true", help="only if KEY exists (exit 1 if not stored)")
    remove = command("del", cmd_del, "Delete KEYs; print how many existed; exit 1 if none did.")
    remove.add_argument("keys", nargs="+", metavar="key")
    ttl = command("ttl", cmd_ttl, "Print seconds left for KEY (-1: no expiry; -2 and exit 1: missing).")
    ttl.add_argument("key")
    expire = command("expire", cmd_expire, "Give KEY a new ttl in SECONDS; exit 1 if missing.")
    expire.add_argument("key")
    expire.add_argument("seconds", type=_ttl)
    keys = command("keys", cmd_keys, "List live keys matching a Redis glob PATTERN (default '*'), one per line.")
    keys.add_argument("pattern", nargs="?", default="*")
    command("stats", cmd_stats, "Print counts of live and expired-but-not-removed entries as JSON.")
    cleanup = command("cleanup", cmd_cleanup, "Delete expired entries in bounded batches; print how many.")
    cleanup.add_argument("--batch-size", type=int, default=1000, help="rows per DELETE (default 1000)")
    cleanup.add_argument("--all-users", action="store_true",
                         help="every role's expired rows (table owner only; others see only their own)")
    flush = command("flush", cmd_flush, "Delete every entry of this database role (needs --yes).")
    flush.add_argument("--yes", action="store_true", help="confirm")
    bench = command("bench", None, "Benchmark against raw psycopg2, Django's DatabaseCache and Redis "
                                   "(no --url and no $FASTPGCACHE_URL: an embedded server).")
    bench.add_argument("--redis", metavar="URL", help="also measure Redis at URL, e.g. redis://127.0.0.1:6379")
    bench.add_argument("--quick", action="store_true", help="fewer rounds and calls (under 15 s)")
    bench.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 2)")
    layout = bench.add_mutually_exclusive_group()
    # bench.LAYOUTS, spelled out so that parsing `fastpgcache get` does not import the bench.
    layout.add_argument("--layout", choices=("split", "same", "none"), default="split",
                        help="split (default): this process on CPU 0, a local PostgreSQL and Redis on CPU 1 "
                             "(the first two CPUs it may use); same: all on CPU 0; none: nothing pinned "
                             "(see benchmarks/README.md)")
    layout.add_argument("--no-pin", dest="layout", action="store_const", const="none", default=argparse.SUPPRESS,
                        help="the same as --layout none (kept for older scripts)")
    bench.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw a latency chart (needs matplotlib)")
    return parser


def _url(args, *, required: bool = True) -> str | None:
    url = args.url or os.environ.get("FASTPGCACHE_URL")
    if not url and required:
        raise UsageError("no database given: pass --url URL or set FASTPGCACHE_URL")
    return url or None


def _open_cache(args):
    from .client import FastPgCache

    # One connection and no negative-lookup filter: a one-shot command would only pay to warm it.
    return FastPgCache(url=_url(args), schema=args.schema, table=args.table, minconn=1, maxconn=1,
                       use_cuckoo_filter=False)


def _run(args) -> int:
    if args.command == "bench":
        return cmd_bench(args)
    with _open_cache(args) as cache:
        return args.handler(cache, args)


def _error_line(error: Exception, where: str) -> str:
    if isinstance(error, sa_exc.DBAPIError):
        translated = translate(error, where)
        return str(translated) if translated is not error else connection_hint(error)
    if isinstance(error, (sa_exc.ArgumentError, psycopg2.ProgrammingError)):
        return "the database URL is not valid: use postgresql://user@host:port/database"
    if isinstance(error, ImportError):
        return f"{error} (install the extra that provides it, e.g. pip install 'fastpgcache[all]')"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastpgcache` command; returns the exit code (0 found, 1 missing, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`fastpgcache keys | head`): stop quietly, and keep Python's exit flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FOUND
    except (CacheError, UsageError, ValueError, TypeError, RuntimeError, ImportError, OSError,
            sa_exc.SQLAlchemyError, psycopg2.Error) as error:
        _say(_error_line(error, f"{args.schema}.{args.table}"))
        return ERROR
