"""The cache entry: the one place its columns are defined."""
from __future__ import annotations

from functools import lru_cache

from sqlalchemy import (
    Column,
    DateTime,
    Index,
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
