"""Exceptions users can act on, and the one place driver errors are translated."""
from __future__ import annotations

from typing import NoReturn

from sqlalchemy import exc as sa_exc

SETUP_HINT = (
    "run `fastpgcache-admin --url URL [--schema S]` (or `alembic -x url=URL upgrade head`) "
    "as the database admin to create it"
)


class CacheError(Exception):
    """Base class of every error fastpgcache raises on purpose."""


class CacheNotSetUpError(CacheError):
    """The cache table (or schema) does not exist yet."""


class CachePermissionError(CacheError, PermissionError):
    """The database refused the operation for this role (privileges or row-level security)."""


class CacheConnectionError(CacheError, ConnectionError):
    """The database could not be reached, refused the login, or dropped the connection during a call."""


class CacheTimeoutError(CacheError, TimeoutError):
    """A call waited too long: for a pooled connection, a lock, or the statement itself."""


class CacheLimitError(CacheError, ValueError):
    """A write would pass a limit the server enforces (value size, or the role's quota); nothing was written."""


def sqlstate(error: sa_exc.DBAPIError) -> str | None:
    """PostgreSQL's five-character error code, from psycopg2 or psycopg 3."""
    orig = error.orig
    return getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a driver error's own, without SQL or parameters)."""
    source = getattr(error, "orig", None) or error
    text = str(source).strip().splitlines()
    return text[0] if text else type(source).__name__


def raise_translated(error: sa_exc.DBAPIError, where: str) -> NoReturn:
    """Raise what `translate` makes of `error`: the cache error chained to it, or `error` itself."""
    translated = translate(error, where)
    if translated is error:
        raise error
    raise translated from error


def translate(error: sa_exc.DBAPIError, where: str) -> Exception:
    """Turn a driver error into an exception that says what to do; others pass through.

    `where` names the table (schema.table) so the message can point at it.
    """
    state = sqlstate(error)
    if state in ("FC001", "FC002"):  # the write functions' limits (migration 0004): value size, quota
        hint = getattr(getattr(error.orig, "diag", None), "message_hint", None)
        return CacheLimitError(f"{first_line(error)} (in {where}){f'; {hint}' if hint else ''}")
    if state == "42883" and "function" in first_line(error):  # undefined_function: an older table
        return CacheNotSetUpError(f"cache table {where} has no write functions yet: "
                                  f"{SETUP_HINT.replace('create', 'upgrade')}")
    if state in ("42P01", "3F000"):  # undefined_table, invalid_schema_name
        return CacheNotSetUpError(f"cache table {where} does not exist: {SETUP_HINT}")
    if state == "42501":  # insufficient_privilege, including row-level security refusals
        detail = first_line(error)
        if "row-level security" in detail:
            return CachePermissionError(
                f"{detail}. Each database role may only read and write rows whose user_id is its own "
                "login name (current_user); create the Cache without user_id, or connect as that role"
            )
        return CachePermissionError(
            f"{detail}. Ask the cache admin to grant access: `fastpgcache-admin --grant-to ROLE` "
            f"(table {where})"
        )
    if state in ("57014", "55P03"):  # query_canceled (statement_timeout), lock_not_available (lock_timeout)
        setting = "lock_timeout" if state == "55P03" else "statement_timeout"
        return CacheTimeoutError(f"{first_line(error)}: the call waited longer than {setting} allows "
                                 f"(raise it, e.g. FastPgCache({setting}=...), or find what holds the lock)")
    if state == "25001" and "modified in this transaction by a different user" in first_line(error):
        # Citus: the write functions run as the table's owner, so they write a shard over the owner's
        # connection to its worker; Citus cannot read that shard over this role's own in the same transaction.
        return CacheError(f"{first_line(error)} ({where} is distributed by Citus): in one transaction, read a key "
                          "before the cache writes to its shard, or after the commit")
    if state in ("26000", "42P05"):  # prepared statement missing / duplicate: a transaction-mode pooler
        return CacheError(f"{first_line(error)}: behind a transaction-mode pooler (pgbouncer) server-side "
                          "prepared statements break; pass prepare_threshold=None")
    if error.connection_invalidated or state in ("57P01", "57P02", "08003"):  # admin/crash shutdown, gone
        return CacheConnectionError(
            f"lost the database connection during the call: {first_line(error)} (the server restarted, crashed "
            "or ended the session; the interrupted statement was rolled back unless it had already committed, "
            "so the call can be retried)")
    if isinstance(error, sa_exc.OperationalError) and state in (None, "08001", "08006", "28P01", "28000", "57P03"):
        return CacheConnectionError(f"cannot connect to the database: {connection_hint(error)}")
    return error


def connection_hint(error: sa_exc.DBAPIError) -> str:
    """One line saying what failed and what to try; never includes the password."""
    detail = first_line(error)
    lowered = detail.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return f"{detail} (check the password: PGPASSWORD, the URL, or --password)"
    if "connection refused" in lowered or "could not translate host" in lowered or "timeout" in lowered:
        return f"{detail} (is the server running and reachable at that host and port?)"
    if "does not exist" in lowered:
        return f"{detail} (check the database and user names)"
    if "unsupported startup parameter" in lowered:
        return (f"{detail} (a pooler such as pgbouncer refuses the libpq options FastPgCache sends for its "
                "timeouts: pass statement_timeout=None, lock_timeout=None, or set "
                "ignore_startup_parameters = options in the pooler)")
    return detail


def pool_timeout_error(pool) -> CacheTimeoutError:
    """The error for a caller that waited `pool_timeout` for one of `maxconn` busy connections."""
    return CacheTimeoutError(
        f"all {pool.size()} pooled connections (maxconn) stayed busy for {pool.timeout():g} s (pool_timeout): "
        "raise maxconn or pool_timeout, or hold connections for less time")


def check_positive_int(name: str, value, *, none_means: str | None = None) -> None:
    """Raise ValueError unless `value` is an int >= 1 (a bool is not).

    None is accepted when `none_means` says what it does, e.g. "to turn it off".
    """
    if value is None and none_means:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        alternative = f", or None {none_means}" if none_means else ""
        raise ValueError(f"{name} must be a positive int{alternative}; got {value!r}")


def check_positive_seconds(name: str, value, *, none_means: str | None = None) -> None:
    """Raise ValueError unless `value` is a positive number of seconds (int or float, not a bool)."""
    if value is None and none_means:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        alternative = f", or None {none_means}" if none_means else ""
        raise ValueError(f"{name} must be a positive number of seconds{alternative}; got {value!r}")
