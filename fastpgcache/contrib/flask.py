"""Flask-Caching backend on a fastpgcache table.

::

    app.config["CACHE_TYPE"] = "fastpgcache.contrib.flask.FastPgCache"
    app.config["CACHE_FASTPGCACHE_URL"] = "postgresql://app@db/app"   # default: SQLALCHEMY_DATABASE_URI
    cache = flask_caching.Cache(app)

Optional settings: CACHE_FASTPGCACHE_SCHEMA, CACHE_FASTPGCACHE_TABLE,
CACHE_FASTPGCACHE_ENGINE_OPTIONS (keyword arguments for create_engine),
CACHE_FASTPGCACHE_FAILSAFE (True: database errors read as misses and failed writes),
CACHE_KEY_PREFIX and CACHE_DEFAULT_TIMEOUT as for every Flask-Caching backend.
"""
from __future__ import annotations

import re

from flask_caching.backends.base import BaseCache

from ..cache import Cache
from . import shared_engine


class FastPgCache(BaseCache):
    """A Flask-Caching backend with Flask-Caching's conventions, on fastpgcache's `Cache`.

    Timeouts: None is the default timeout, 0 never expires, a negative one
    expires at once. `inc` on a missing key starts from 0::

        backend = FastPgCache("postgresql://app@db/app", key_prefix="shop_")
        backend.set("answer", 41)      # True
        backend.inc("answer")          # 42
        backend.get_many("answer", "missing")   # [42, None]
    """

    def __init__(self, url, default_timeout: int = 300, key_prefix: str = "", *, schema: str | None = None,
                 table: str | None = None, engine_options: dict | None = None, failsafe: bool = False,
                 ignore_delete_many_errors: bool = False):
        super().__init__(default_timeout=default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        self.key_prefix = key_prefix or ""
        self.store = Cache(shared_engine(url, engine_options), schema=schema, table=table, pickle=True,
                           failsafe=failsafe)
        """The fastpgcache `Cache` underneath (keys without the prefix added)."""

    @classmethod
    def factory(cls, app, config, args, kwargs):
        """Build the backend from the app's config, as Flask-Caching does for CACHE_TYPE."""
        url = config.get("CACHE_FASTPGCACHE_URL") or app.config.get("SQLALCHEMY_DATABASE_URI")
        if not url:
            raise ValueError("fastpgcache needs CACHE_FASTPGCACHE_URL (or SQLALCHEMY_DATABASE_URI): "
                             "a SQLAlchemy URL such as postgresql://user@host/db")
        kwargs = {**kwargs, "key_prefix": config.get("CACHE_KEY_PREFIX") or "",
                  "schema": config.get("CACHE_FASTPGCACHE_SCHEMA"), "table": config.get("CACHE_FASTPGCACHE_TABLE"),
                  "engine_options": config.get("CACHE_FASTPGCACHE_ENGINE_OPTIONS"),
                  "failsafe": bool(config.get("CACHE_FASTPGCACHE_FAILSAFE", False))}
        return cls(url, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.store!r} prefix {self.key_prefix!r}>"

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    def _seconds(self, timeout) -> float | None:
        # Flask-Caching: 0 means no expiry; a negative timeout is already past (0 here).
        seconds = self._normalize_timeout(timeout)
        return None if seconds == 0 else max(seconds, 0)

    def get(self, key):
        return self.store.get(self._key(key))

    def get_many(self, *keys):
        found = self.store.get_many([self._key(key) for key in keys])
        return [found.get(self._key(key)) for key in keys]

    def has(self, key):
        return self.store.exists(self._key(key))

    def set(self, key, value, timeout=None):
        seconds = self._seconds(timeout)
        if seconds == 0:
            self.store.delete(self._key(key))
            return True
        return self.store.set(self._key(key), value, seconds)

    def add(self, key, value, timeout=None):
        seconds = self._seconds(timeout)
        if seconds == 0:
            return not self.store.exists(self._key(key))
        return self.store.set(self._key(key), value, seconds, nx=True)

    def set_many(self, mapping, timeout=None):
        """Store every item in one statement; returns the keys set (all of them)."""
        seconds = self._seconds(timeout)
        rows = {self._key(key): value for key, value in mapping.items()}
        if seconds == 0:
            self.store.delete_many(rows)
        else:
            self.store.set_many(rows, seconds)
        return list(mapping)

    def delete(self, key):
        return self.store.delete(self._key(key))

    def delete_many(self, *keys):
        """Delete in one statement; returns the keys now absent (every one: a DELETE does not half-fail)."""
        self.store.delete_many([self._key(key) for key in keys])
        return list(keys)

    def clear(self):
        """Remove this prefix's entries (every entry of this role when there is no prefix)."""
        if not self.key_prefix:
            self.store.clear()
            return True
        self.store.delete_many(self.store.keys(_glob_escape(self.key_prefix) + "*"))
        return True

    def inc(self, key, delta=1):
        return self.store.incr(self._key(key), delta)

    def dec(self, key, delta=1):
        return self.store.decr(self._key(key), delta)


def _glob_escape(text: str) -> str:
    # A prefix is literal text; keys() takes a glob.
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
