"""Flask-Caching backend on a fastpgcache table.

::

    app.config["CACHE_TYPE"] = "fastpgcache.contrib.flask.FastPgCache"
    app.config["CACHE_FASTPGCACHE_URL"] = "postgresql://app@db/app"   # default: SQLALCHEMY_DATABASE_URI
    cache = flask_caching.Cache(app)

Optional settings: CACHE_FASTPGCACHE_SCHEMA, CACHE_FASTPGCACHE_TABLE,
CACHE_FASTPGCACHE_ENGINE_OPTIONS (keyword arguments for create_engine),
CACHE_FASTPGCACHE_FAILSAFE (True: database errors read as misses and failed writes),
CACHE_FASTPGCACHE_PICKLE_KEY (the key pickled values are signed with; default: SECRET_KEY),
CACHE_KEY_PREFIX, CACHE_DEFAULT_TIMEOUT and CACHE_IGNORE_ERRORS as for every
Flask-Caching backend. CACHE_OPTIONS may name the same settings as keyword
arguments (schema=..., failsafe=...); a config value that is set wins.
"""
from __future__ import annotations

from flask_caching.backends.base import BaseCache

from ..cache import Cache
from ..keys import escape_glob
from . import shared_engine, stored


class FastPgCache(BaseCache):
    """A Flask-Caching backend with Flask-Caching's conventions, on fastpgcache's `Cache`.

    Timeouts: None is the default timeout, 0 never expires, a negative one
    expires at once. `inc` on a missing key starts from 0. With `failsafe=True`
    a database error answers as Flask-Caching expects of a backend error: False,
    None, or no keys; `delete_many` then raises RuntimeError unless
    `ignore_delete_many_errors` (CACHE_IGNORE_ERRORS) is set::

        backend = FastPgCache("postgresql://app@db/app", key_prefix="shop_")
        backend.set("answer", 41)      # True
        backend.inc("answer")          # 42
        backend.get_many("answer", "missing")   # [42, None]
    """

    def __init__(self, url, default_timeout: int = 300, key_prefix: str = "", *, pickle_key,
                 schema: str | None = None, table: str | None = None, engine_options: dict | None = None,
                 failsafe: bool = False, ignore_delete_many_errors: bool = False):
        super().__init__(default_timeout=default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        self.key_prefix = key_prefix or ""
        self.store = Cache(shared_engine(url, engine_options), schema=schema, table=table, pickle=pickle_key,
                           failsafe=failsafe)
        """The fastpgcache `Cache` underneath (keys without the prefix added)."""

    @classmethod
    def factory(cls, app, config, args, kwargs):
        """Build the backend from the app's config, as Flask-Caching does for CACHE_TYPE."""
        url = config.get("CACHE_FASTPGCACHE_URL") or app.config.get("SQLALCHEMY_DATABASE_URI")
        if not url:
            raise ValueError("fastpgcache needs CACHE_FASTPGCACHE_URL (or SQLALCHEMY_DATABASE_URI): "
                             "a SQLAlchemy URL such as postgresql://user@host/db")
        kwargs = {**kwargs, **_config_settings(config, kwargs)}
        kwargs.setdefault("pickle_key", app.config.get("SECRET_KEY"))
        if not kwargs["pickle_key"]:
            raise ValueError("fastpgcache signs the pickles it stores: set the app's SECRET_KEY "
                             "(or CACHE_FASTPGCACHE_PICKLE_KEY)")
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
            # delete_many, not delete: its None tells a failed delete from an absent key.
            return self.store.delete_many([self._key(key)]) is not None
        return stored(self.store, [self._key(key)], lambda: self.store.set(self._key(key), value, seconds))

    def add(self, key, value, timeout=None):
        seconds = self._seconds(timeout)
        if seconds == 0:
            return not self.store.exists(self._key(key))
        return stored(self.store, [], lambda: self.store.set(self._key(key), value, seconds, nx=True))

    def set_many(self, mapping, timeout=None):
        """Store every item in one statement (all or nothing); returns the keys set: all, or none on an error."""
        seconds = self._seconds(timeout)
        rows = {self._key(key): value for key, value in mapping.items()}
        if seconds == 0:
            done = self.store.delete_many(rows) is not None
        else:
            done = stored(self.store, list(rows), lambda: self.store.set_many(rows, seconds) == len(rows))
        return list(mapping) if done else []

    def delete(self, key):
        return self.store.delete(self._key(key))

    def delete_many(self, *keys):
        """Delete in one statement; returns the keys now absent: all of them, or none on an error.

        A failed delete raises RuntimeError unless `ignore_delete_many_errors` is set (Flask-Caching's rule).
        """
        if self.store.delete_many([self._key(key) for key in keys]) is not None:
            return list(keys)
        if not self.ignore_delete_many_errors:
            raise RuntimeError(f"Failed to delete keys: {list(keys)}")
        return []

    def clear(self):
        """Remove this prefix's entries (every entry of this role when there is no prefix), in one statement."""
        pattern = escape_glob(self.key_prefix) + "*" if self.key_prefix else None
        return self.store.clear(pattern) is not None

    def inc(self, key, delta=1):
        return self.store.incr(self._key(key), delta)

    def dec(self, key, delta=1):
        return self.store.decr(self._key(key), delta)


_SETTINGS = {"key_prefix": "CACHE_KEY_PREFIX", "schema": "CACHE_FASTPGCACHE_SCHEMA",
             "table": "CACHE_FASTPGCACHE_TABLE", "engine_options": "CACHE_FASTPGCACHE_ENGINE_OPTIONS",
             "failsafe": "CACHE_FASTPGCACHE_FAILSAFE", "pickle_key": "CACHE_FASTPGCACHE_PICKLE_KEY"}
_DEFAULT_KEY_PREFIX = "flask_cache_"  # what Flask-Caching fills in when CACHE_KEY_PREFIX is not set


def _config_settings(config, options: dict) -> dict:
    # Config values that are set win over CACHE_OPTIONS; Flask-Caching's default prefix does not.
    settings = {name: config.get(setting) for name, setting in _SETTINGS.items() if config.get(setting) is not None}
    if settings.get("key_prefix") == _DEFAULT_KEY_PREFIX and "key_prefix" in options:
        del settings["key_prefix"]
    return settings


