"""Every statement the cache sends, as SQLAlchemy Core, built once per (schema, table, user).

Reads are plain SELECTs under row-level security. Writes call the table's
SECURITY DEFINER functions (migration 0004), which bind every row to the
caller. Each function, operator, type and collation is named in pg_catalog
(`pg_catalog.now()`, `OPERATOR(pg_catalog.=)`, `CAST(... AS pg_catalog.text)`),
so no object on the caller's search path can stand in for one. Byte strings
travel as hex text decoded by the server: psycopg2 would send them as
`'...'::bytea`, a type name looked up on the search path. A set sends its
value, its encoding and the caller's identity in two text parameters that the
statement takes apart: psycopg2's work per parameter is a good part of a set's.
"""
from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import MetaData, Select, and_, any_, bindparam, case, cast, literal, literal_column, or_, select
from sqlalchemy.sql.functions import Function
from sqlalchemy.types import UserDefinedType

from .model import SECRET_BYTES, cache_table, routine_name, secrets_table, usage_table


class PgType(UserDefinedType):
    """A built-in type named with its schema, e.g. `pg_catalog.text`."""

    cache_ok = True

    def __init__(self, name: str):
        self.name = name

    def get_col_spec(self, **kw) -> str:
        return f"pg_catalog.{self.name}"


TEXT, BYTEA, INT2, INT4, INT8, FLOAT8, BOOL = (PgType(name) for name in
                                               ("text", "bytea", "int2", "int4", "int8", "float8", "bool"))
TEXT_ARRAY, BYTEA_ARRAY, INT2_ARRAY = PgType("text[]"), PgType("bytea[]"), PgType("int2[]")


def pg(name: str, *args) -> Function:
    """A pg_catalog function call: pg("now") renders `pg_catalog.now()`."""
    return Function(name, *args, packagenames=("pg_catalog",))


def _op(symbol: str):
    # A binary operator taken from pg_catalog, whatever operators the search path holds.
    def apply(left, right):
        comparison = symbol in ("=", "<>", "<", ">", "<=", ">=", "~")
        return left.op(f"OPERATOR(pg_catalog.{symbol})", is_comparison=comparison)(right)
    return apply


eq, gt, le, minus, matches = _op("="), _op(">"), _op("<="), _op("-"), _op("~")


def param(name: str, pg_type: PgType, **default) -> Any:
    """A bound parameter cast to a pg_catalog type; `value=...` makes it optional, with that default."""
    return cast(bindparam(name, **default), pg_type)


def from_hex(text: Any) -> Any:
    """The bytea a hex text (`bytes.hex()`) stands for, decoded by the server."""
    return pg("decode", text, literal_column("'hex'"))


def value_param(name: str) -> tuple[Any, Any]:
    """A value's bytes and its flags, from one text parameter (`codec.as_text`): psycopg2 spends 3-9k
    instructions on every parameter it sends, an int's the most (benchmarks/, callgrind)."""
    text = param(name, TEXT)
    return from_hex(pg("substr", text, literal_column("2"))), cast(pg("left", text, literal_column("1")), INT2)


def array_param(name: str, pg_type: PgType) -> Any:
    """A batch as one array literal (see `text_array`): one string to quote, one value to parse.

    Client side, 100 keys took 12 µs instead of 45, and 1,000 rows of set_many 0.5 ms instead of 2.1.
    Cast from text first, so drivers that bind by type (psycopg 3, asyncpg) send the literal as text too.
    """
    return cast(param(name, TEXT), pg_type)


def text_array(items) -> str:
    """Strings as a PostgreSQL array literal: each quoted, with its backslashes and quotes escaped."""
    return "{" + ",".join('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items) + "}"


def bytea_array(items) -> str:
    """Byte strings as a bytea[] literal, in bytea's hex form."""
    return "{" + ",".join('"\\\\x' + item.hex() + '"' for item in items) + "}"


def int_array(items) -> str:
    """Integers as an array literal (the flags of a set_many batch)."""
    return "{" + ",".join(map(str, items)) + "}"


# current_user is a `name`, collated "C"; compared as such to the "default"-collated user_id it
# cannot use the primary key index, and every get became a sequential scan (3.5 ms at 50,000 rows).
_ACTING_ROLE = 'CAST(current_user AS pg_catalog.text) COLLATE pg_catalog."default"'

SET, SET_NX, SET_XX = 0, 1, 2
"""`mode` of the set function: always, only if absent or expired, only if present and live."""


class Statements:
    """Every statement of one cache table for one user (the acting role when `user_id` is None)."""

    def __init__(self, schema: str, table_name: str, user_id: str | None):
        t = self.table = cache_table(table_name).to_metadata(MetaData(), schema=schema)
        self.user = param("user_id", TEXT) if user_id else literal_column(_ACTING_ROLE)
        mine = eq(t.c.user_id, self.user)
        now = pg("now")
        live = or_(t.c.expires_at.is_(None), gt(t.c.expires_at, now))
        key = eq(t.c.key, param("k", TEXT))
        self.get = select(t.c.value, t.c.flags).where(mine, key, live)
        # The keys through the table's IMMUTABLE <table>_key_array (migration 0004): an array the planner
        # knows, so Citus sends the query to the keys' shards only.
        keys = Function(routine_name(table_name, "key_array"), param("ks", TEXT), packagenames=(schema,),
                        type_=TEXT_ARRAY)
        self.get_many = select(t.c.key, t.c.value, t.c.flags).where(mine, eq(t.c.key, any_(keys)), live)
        self.exists: Select[Any] = select(literal_column("1")).where(mine, key, live)
        self.ttl = select(case(
            (t.c.expires_at.is_(None), literal_column("-1")),
            else_=cast(pg("ceil", pg("date_part", literal_column("'epoch'"), minus(t.c.expires_at, now))), INT8),
        )).where(mine, key, live)
        regex = matches(t.c.key, param("regex", TEXT))
        self.keys = select(t.c.key).where(mine, live, regex).order_by(t.c.key)
        self.scan = (select(t.c.key).where(mine, live, regex, gt(t.c.key, param("after", TEXT)))
                     .order_by(t.c.key).limit(bindparam("batch")))
        everything: Function[int] = Function("count", literal_column("*"), packagenames=("pg_catalog",))
        self.count = select(everything.filter(live), everything.filter(and_(t.c.expires_at.is_not(None),
                                                                             le(t.c.expires_at, now)))).where(mine)
        # The negative-lookup guard's warm-up (guard.py): every row present, expired ones
        # too, since an upsert reviving one announces nothing.
        self.key_page = (select(t.c.key).where(mine, gt(t.c.key, param("after", TEXT)))
                         .order_by(t.c.key).limit(bindparam("batch")))

        secrets = secrets_table(table_name).to_metadata(MetaData(), schema=schema)
        self.identity = select(secrets.c.user_id, secrets.c.secret, secrets.c.channel).where(
            eq(secrets.c.user_id, self.user))
        usage = usage_table(table_name).to_metadata(MetaData(), schema=schema)
        self.usage = select(usage.c.entries, usage.c.bytes).where(eq(usage.c.user_id, self.user))

        credential = param("credential", TEXT)  # the secret in hex, then the role (Identity.credential)
        caller = (pg("substr", credential, literal_column(str(2 * SECRET_BYTES + 1))),
                  from_hex(pg("left", credential, literal_column(str(2 * SECRET_BYTES)))))

        def call(verb: str, *arguments, identified: bool = True):
            # A write function; its first arguments are the caller's identity (user_id, secret), taken
            # from one parameter (see value_param).
            # Marked as a write: never retried on another connection, since it may have committed.
            return select(Function(routine_name(table_name, verb), *(caller if identified else ()), *arguments,
                                   packagenames=(schema,))
                          ).execution_options(fastpgcache_write=True)

        ttl = param("ttl", FLOAT8)
        cull = (param("cull_max", INT8), param("cull_frequency", INT4))  # Django's culling (NULL: off)
        # One statement per mode, the mode written in rather than sent (see value_param).
        self.set, self.set_nx, self.set_xx = (
            call("set", param("k", TEXT), *value_param("val"), ttl, cast(literal_column(str(mode)), INT2), *cull)
            for mode in (SET, SET_NX, SET_XX))
        self.set_many = call("set_many", array_param("ks", TEXT_ARRAY), array_param("vals", BYTEA_ARRAY),
                             array_param("flgs", INT2_ARRAY), ttl, *cull)
        self.delete = call("delete", array_param("ks", TEXT_ARRAY))
        self.expire = call("expire", param("k", TEXT), ttl)
        self.incr = call("incr", param("k", TEXT), param("amount", INT8), param("create", BOOL))
        self.clear = call("clear", param("regex", TEXT))
        self.expire_batch = call("expire_batch", param("batch", INT4), param("skip_locked", BOOL))
        self.trim = call("trim", param("keep", INT8), param("batch", INT4))
        self.claim = call("claim", param("k", TEXT))
        self.cleanup_all = call("cleanup_all", param("batch", INT4), identified=False)
        # A role's first write creates its secret, through a function: only for the role it acts as.
        self.enroll = call("enroll", identified=False)
        # get_or_set waits for another caller's claim at most the caller's `wait`, whatever the
        # connection's own timeouts say (for this transaction only).
        self.lock_wait = select(pg("set_config", literal("lock_timeout"), param("lock_ms", TEXT), literal(True)),
                                pg("set_config", literal("statement_timeout"), param("statement_ms", TEXT),
                                   literal(True)))


@functools.lru_cache(maxsize=128)
def statements_for(schema: str, table: str, user_id: str | None) -> Statements:
    """The (shared, immutable) statements of one cache table and user."""
    return Statements(schema, table, user_id)


# The guard's probe that notifications arrive; LISTEN takes an identifier, so it cannot be a parameter.
NOTIFY = select(pg("pg_notify", param("channel", TEXT), param("payload", TEXT)))
