"""fastpgcache: a Redis-style cache in a PostgreSQL table, on SQLAlchemy.

::

    from fastpgcache import FastPgCache
    cache = FastPgCache(url="postgresql://app@localhost/app")
    cache.set("greeting", "hello", ttl=60)
"""
from .admin import setup_cache
from .cache import MAX_KEY_BYTES, Cache
from .client import FastPgCache
from .cuckoo import CuckooFilter
from .errors import (
    CacheConnectionError,
    CacheError,
    CacheLimitError,
    CacheNotSetUpError,
    CachePermissionError,
    CacheTimeoutError,
)
from .keys import escape_glob
from .model import CacheEntry

# The package's version, defined here only: pyproject.toml reads it ([tool.setuptools.dynamic]).
__version__ = "0.1.0"

__all__ = [
    "AsyncCache",
    "AsyncFastPgCache",
    "Cache",
    "CacheConnectionError",
    "CacheEntry",
    "CacheError",
    "CacheLimitError",
    "CacheNotSetUpError",
    "CachePermissionError",
    "CacheTimeoutError",
    "CuckooFilter",
    "DatabricksTokenProvider",
    "FastPgCache",
    "MAX_KEY_BYTES",
    "escape_glob",
    "setup_cache",
]


def __getattr__(name):
    # The Databricks SDK is an optional extra: load its provider only when asked for.
    if name == "DatabricksTokenProvider":
        from .databricks import DatabricksTokenProvider

        return DatabricksTokenProvider
    if name in ("AsyncCache", "AsyncFastPgCache"):  # SQLAlchemy's asyncio needs greenlet: the `asyncio` extra
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'fastpgcache' has no attribute {name!r}")
