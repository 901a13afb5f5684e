"""The cache entry and its companion tables: the one place their columns are defined."""
from __future__ import annotations

from functools import lru_cache

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase

DEFAULT_SCHEMA = "public"
DEFAULT_TABLE = "cache"

DEFAULT_OWNER = "fastpgcache_owner"
"""The NOLOGIN role that owns the cache's tables and write functions (nobody logs in as it)."""

DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
"""Largest value a write may store unless the admin says otherwise: memcached's item limit, which
Django and Flask caches are already written for; larger values belong in object storage."""

CHANNEL_PREFIX = "fastpgcache_"
"""Notification channels are this prefix and 32 hex digits of sha256(role secret, NUL)."""

SECRET_BYTES = 32
"""Length of a role's secret: a SHA-256 digest."""

# A role's secret: 256 bits from two v4 UUIDs (gen_random_uuid uses the server's strong random source).
_RANDOM_SECRET = ("pg_catalog.sha256(pg_catalog.convert_to(pg_catalog.gen_random_uuid()::pg_catalog.text"
                  " OPERATOR(pg_catalog.||) pg_catalog.gen_random_uuid()::pg_catalog.text, 'UTF8'))")
_CHANNEL = (f"'{CHANNEL_PREFIX}' OPERATOR(pg_catalog.||) pg_catalog.left(pg_catalog.encode(pg_catalog.sha256("
            "secret OPERATOR(pg_catalog.||) '\\x00'::pg_catalog.bytea), 'hex'), 32)")


def expiry_index_name(table: str) -> str:
    """The index that finds one role's rows by expiry (migration 0005); fits 63 bytes beside a 48-byte table name."""
    return f"{table}_expiry_idx"


def _entry_table(name: str, metadata: MetaData) -> Table:
    # Built by a function so a cache under another table name has the same
    # columns without a second definition. No schema: Cache maps it at run time.
    return Table(
        name,
        metadata,
        Column("user_id", Text, nullable=False, server_default=func.current_user()),
        Column("key", Text, nullable=False),
        Column("value", LargeBinary, nullable=False),
        Column("flags", SmallInteger, nullable=False, server_default=text("0")),
        Column("expires_at", DateTime(timezone=True), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        PrimaryKeyConstraint("user_id", "key", name=f"{name}_pkey"),
        Index(f"{name}_expires_at_idx", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
        Index(expiry_index_name(name), "user_id", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
        prefixes=["UNLOGGED"],
        # Cache writes never need the inserted key back; skip the RETURNING SQLAlchemy would add.
        implicit_returning=False,
    )


class Base(DeclarativeBase):
    pass


class CacheEntry(Base):
    """One cached value of one database role.

    The table is UNLOGGED (no WAL: fast writes, emptied after a crash). Its
    schema is applied when statements run, so one model serves every schema::

        from fastpgcache import CacheEntry
        session.execute(select(CacheEntry.key).where(CacheEntry.expires_at.is_(None)))
    """

    __table__ = _entry_table(DEFAULT_TABLE, Base.metadata)


@lru_cache(maxsize=64)
def cache_table(name: str = DEFAULT_TABLE) -> Table:
    """The entry table under `name`: the model's own table for the default name."""
    if name == DEFAULT_TABLE:
        return CacheEntry.__table__
    return _entry_table(name, MetaData())


@lru_cache(maxsize=64)
def secrets_table(name: str = DEFAULT_TABLE) -> Table:
    """`<table>_secrets`: one random secret per role, readable by that role only (row-level security).

    The secret proves who a write function's caller is, keys the hashes the
    negative-lookup guard hears, and names the role's notification channel.
    """
    return Table(
        f"{name}_secrets",
        MetaData(),
        Column("user_id", Text, primary_key=True, server_default=text("CAST(current_user AS pg_catalog.text)")),
        Column("secret", LargeBinary, nullable=False, server_default=text(_RANDOM_SECRET)),
        Column("channel", Text, Computed(text(_CHANNEL), persisted=True), nullable=False),
    )


@lru_cache(maxsize=64)
def settings_table(name: str = DEFAULT_TABLE) -> Table:
    """`<table>_settings`: the limits the write functions enforce (one row, set by the admin)."""
    return Table(
        f"{name}_settings",
        MetaData(),
        Column("singleton", Boolean, primary_key=True, server_default=text("true")),
        Column("max_value_bytes", Integer, nullable=False, server_default=text(str(DEFAULT_MAX_VALUE_BYTES))),
        Column("quota_entries", BigInteger, nullable=True),
        Column("quota_bytes", BigInteger, nullable=True),
        CheckConstraint("singleton", name="settings_one_row"),
        CheckConstraint("max_value_bytes > 0 AND quota_entries > 0 AND quota_bytes > 0", name="settings_positive"),
    )


@lru_cache(maxsize=64)
def usage_table(name: str = DEFAULT_TABLE) -> Table:
    """`<table>_usage`: entries and bytes per role, kept by the write functions while a quota is set."""
    return Table(
        f"{name}_usage",
        MetaData(),
        Column("user_id", Text, primary_key=True),
        Column("entries", BigInteger, nullable=False, server_default=text("0")),
        Column("bytes", BigInteger, nullable=False, server_default=text("0")),
    )


def routine_name(table: str, verb: str) -> str:
    """Name of the cache table's write function for `verb`, e.g. `cache_set`."""
    return f"{table}_{verb}"
