"""The floors every ratio is measured against: plain SQL on a plain table, and the library's own SQL."""
from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from ..admin import setup_cache
from ..cache import Cache
from ..client import cache_engine

FLOOR_TABLE = "floor"
"""The floor's plain table in the bench schema: the cache's columns, index and fillfactor, nothing else."""

_FLOOR_UPSERT = ("INSERT INTO {t} (user_id, key, value, flags, expires_at) VALUES {values} ON CONFLICT (user_id, key)"
                 " DO UPDATE SET value = excluded.value, flags = excluded.flags, expires_at = excluded.expires_at,"
                 " created_at = now()")
_FLOOR_ROW = "(current_user, %(k)s, %(val)s, %(flg)s, now() + %(ttl)s * interval '1 second')"
_FLOOR_MINE = "user_id = CAST(current_user AS text) COLLATE \"default\" AND (expires_at IS NULL OR expires_at > now())"


def floor_sql(qualified_table: str) -> dict:
    """The plain SQL of a hand-written cache on `qualified_table`: what every ratio is measured against.

    Each call maps to (statement, fixed params, None): the third item, for the
    library's own SQL (capture_sql), picks positional arguments from the params."""
    t = qualified_table
    return {
        "get": (f"SELECT value, flags FROM {t} WHERE {_FLOOR_MINE} AND key = %(k)s", {}, None),
        "get_many": (f"SELECT key, value, flags FROM {t} WHERE {_FLOOR_MINE} AND key = ANY(%(ks)s)", {}, None),
        "set": (_FLOOR_UPSERT.format(t=t, values=_FLOOR_ROW), {}, None),
        "set_values": (_FLOOR_UPSERT.format(t=t, values="%s"), _FLOOR_ROW, {}),
        "incr": (f"INSERT INTO {t} AS c (user_id, key, value, flags) VALUES (current_user, %(k)s,"
                 " convert_to(CAST(%(amount)s AS text), 'UTF8'), 2) ON CONFLICT (user_id, key) DO UPDATE SET"
                 " value = convert_to(CAST(CAST(convert_from(c.value, 'UTF8') AS bigint) + %(amount)s AS text),"
                 " 'UTF8') RETURNING convert_from(c.value, 'UTF8')", {}, None),
    }


def create_floor_table(connection, schema: str, logged: bool = False) -> str:
    """The floor's table in `schema`, shaped as the cache's; returns its qualified name."""
    from sqlalchemy import MetaData

    from ..model import cache_table

    table = cache_table(FLOOR_TABLE).to_metadata(MetaData(), schema=schema)
    table.create(connection)
    qualified = f'"{schema}"."{FLOOR_TABLE}"'
    connection.execute(text(f"ALTER TABLE {qualified} SET (fillfactor = 70)"))
    if not logged:  # as the cache's own table (the model leaves persistence to the migrations)
        connection.execute(text(f"ALTER TABLE {qualified} SET UNLOGGED"))
    return qualified


@contextlib.contextmanager
def scratch_schema(url: URL, prefix: str) -> Iterator[tuple[Engine, str, str]]:
    """A throwaway schema holding the cache's table and the floor's, dropped afterwards whatever happened:
    (an admin Engine, the schema, the floor's qualified table). What the scripts in benchmarks/ measure in::

        with scratch_schema(url, "floor_loop") as (admin, schema, floor_table):
            ...
    """
    admin = create_engine(url.set(drivername="postgresql+psycopg2"), poolclass=NullPool)
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        setup_cache(engine=admin, schema=schema)
        with admin.begin() as connection:
            floor_table = create_floor_table(connection, schema)
        yield admin, schema, floor_table
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def capture_sql(url: URL, schema: str, table: str | None = None) -> dict:
    """The exact SQL and literal parameters the library sends for get, get_many, set and incr.

    Recorded at the driver's cursor of an Engine like FastPgCache's own, below
    however the library executes, so the replaying contender sends the very same
    strings: each call's EXECUTE, after the PREPAREs listed under "prepare"
    (which it runs once per connection, as the library does), with its
    positional arguments picked from named params as the library picks them.
    """
    import psycopg2.extensions

    seen: list = []

    class RecordingCursor(psycopg2.extensions.cursor):
        def execute(self, query, vars=None):
            seen.append((query, vars))
            return super().execute(query, vars)

    # psycopg2 whatever the URL names: the replaying contender is psycopg2, so it replays psycopg2's SQL.
    engine = cache_engine(make_url(url).set(drivername="postgresql+psycopg2"),
                          connect_args={"cursor_factory": RecordingCursor}, poolclass=NullPool)
    cache = Cache(engine, schema=schema, table=table, expire_every=None)
    calls = {"set": ("_set(", lambda: cache.set("bench:capture", 1)),
             "get": ("SELECT", lambda: cache.get("bench:capture")),
             "get_many": ("SELECT", lambda: cache.get_many(["bench:capture"])),
             "incr": ("_incr(", lambda: cache.incr("bench:capture:n"))}
    sql: dict = {"prepare": []}
    try:
        for name, (mark, call) in calls.items():
            seen.clear()
            call()
            at = next(i for i, item in enumerate(seen) if _is_cache_sql(item[0], mark))
            if str(seen[at][0]).startswith("PREPARE "):  # the call's own statement is the EXECUTE after it
                sql["prepare"].append(seen[at][0])
                at += 1
            query, arguments = seen[at]
            prepared = next(compiled.prepared for compiled in cache._compiled.values()
                            if compiled.prepared is not None and compiled.prepared.execute == query)
            sql[name] = (query, dict(zip(prepared.names, arguments, strict=True)), prepared.arguments)
        cache.delete_many(["bench:capture", "bench:capture:n"])
    finally:
        engine.dispose()
    return sql


def _is_cache_sql(query, mark: str) -> bool:
    # Skips what the pool, the dialect or the identity lookup send around the call itself.
    text_ = query.decode() if isinstance(query, bytes) else str(query)
    return mark in text_ and ".cache" in text_ and "_secrets" not in text_
