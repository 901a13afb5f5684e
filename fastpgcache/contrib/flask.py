"""Flask-Caching backend on a fastpgcache table.

::

    app.config["CACHE_TYPE"] = "fastpgcache.contrib.flask.FastPgCache"
    app.config["CACHE_FASTPGCACHE_URL"] = "postgresql://app@db/app"   # default: SQLALCHEMY_DATABASE_URI
    cache = flask_caching.Cache(app)

Optional settings: CACHE_FASTPGCACHE_SCHEMA, CACHE_FASTPGCACHE_TABLE,
CACHE_FASTPGCACHE_ENGINE_OPTIONS (keyword arguments for create_engine),
CACHE_FASTPGCACHE_STATEMENT_TIMEOUT and CACHE_FASTPGCACHE_LOCK_TIMEOUT (seconds,
5 and 1 by default; None for the server's setting), CACHE_FASTPGCACHE_FAILSAFE
(True: database errors read as misses and failed writes), CACHE_FASTPGCACHE_GUARD
(True: absent keys answered without a round trip), CACHE_FASTPGCACHE_PICKLE_KEY
(the key pickled values are signed with; default: SECRET_KEY), CACHE_KEY_PREFIX
(a str, or a function returning one, called for every key), CACHE_DEFAULT_TIMEOUT
and CACHE_IGNORE_ERRORS as for every Flask-Caching backend. CACHE_OPTIONS may name
the same settings as keyword arguments (schema=..., failsafe=...); a config value
that is set wins. CACHE_SERIALIZER is refused: values are signed, see `factory`.
"""
from __future__ import annotations

from collections.abc import Callable

from flask_caching.backends.base import BaseCache

from ..cache import Cache
from ..keys import escape_glob
from . import check_key_prefix, key_text, shared_engine, shared_guard, storable_key, stored


class FastPgCache(BaseCache):
    """A Flask-Caching backend with Flask-Caching's conventions, on fastpgcache's `Cache`.

    Timeouts: None is the default timeout, 0 never expires, a negative one
    expires at once. `inc` on a missing key starts from 0. With `failsafe=True`
    a database error answers as Flask-Caching expects of a backend error: False,
    None, or no keys; `delete_many` then raises RuntimeError unless
    `ignore_delete_many_errors` (CACHE_IGNORE_ERRORS) is set. Any key Flask-Caching
    makes works: one the table cannot hold is stored in digest form (`storable_key`)::

        backend = FastPgCache("postgresql://app@db/app", key_prefix="shop_")
        backend.set("answer", 41)      # True
        backend.inc("answer")          # 42
        backend.get_many("answer", "missing")   # [42, None]
    """

    def __init__(self, url, default_timeout: int = 300, key_prefix: str | Callable[[], str] = "", *, pickle_key,
                 schema: str | None = None, table: str | None = None, engine_options: dict | None = None,
                 statement_timeout: float | None = 5.0, lock_timeout: float | None = 1.0,
                 failsafe: bool = False, guard: bool = False, ignore_delete_many_errors: bool = False):
        super().__init__(default_timeout=default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        self.key_prefix = key_prefix if callable(key_prefix) else check_key_prefix(key_prefix or "")
        if not isinstance(guard, bool):
            raise TypeError(f"guard must be True or False, got {guard!r}")
        engine = shared_engine(url, engine_options, statement_timeout=statement_timeout, lock_timeout=lock_timeout)
        self.store = Cache(engine, schema=schema, table=table, pickle=pickle_key, failsafe=failsafe)
        """The fastpgcache `Cache` underneath (keys without the prefix added)."""
        if guard:
            self.store.guard = shared_guard(self.store)

    @classmethod
    def factory(cls, app, config, args, kwargs):
        """Build the backend from the app's config, as Flask-Caching does for CACHE_TYPE.

        CACHE_SERIALIZER is refused: values read back must carry an HMAC under the
        app's key (codec.py), which a serializer of its own would bypass.
        """
        if config.get("CACHE_SERIALIZER") is not None:
            raise ValueError("fastpgcache does not take CACHE_SERIALIZER: it encodes values itself and signs every "
                             "pickle with the app's SECRET_KEY, so nobody who can write the table can make the app "
                             "unpickle their data; another serializer would bypass that signature. Remove "
                             "CACHE_SERIALIZER.")
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
        prefix = "a function" if callable(self.key_prefix) else repr(self.key_prefix)
        return f"<{type(self).__name__} {self.store!r} prefix {prefix}>"

    def _prefix(self) -> str:
        # A callable prefix is asked for every key (RedisCache's convention), so it may depend on the request.
        if callable(self.key_prefix):
            return check_key_prefix(self.key_prefix())
        return self.key_prefix

    def _key(self, key) -> str:
        # Keys convert as Cache's do (42 -> '42'); whatever the table cannot hold goes in digest form.
        return storable_key(self._prefix() + key_text(key))

    def _seconds(self, timeout) -> float | None:
        # Flask-Caching: 0 means no expiry; a negative timeout is already past (0 here).
        seconds = self._normalize_timeout(timeout)
        return None if seconds == 0 else max(seconds, 0)

    def get(self, key):
        return self.store.get(self._key(key))

    def get_many(self, *keys):
        stored_keys = [self._key(key) for key in keys]
        found = self.store.get_many(stored_keys)
        return [found.get(key) for key in stored_keys]

    def has(self, key):
        return self.store.exists(self._key(key))

    def set(self, key, value, timeout=None):
        seconds, key = self._seconds(timeout), self._key(key)
        if seconds == 0:
            # delete_many, not delete: its None tells a failed delete from an absent key.
            return self.store.delete_many([key]) is not None
        return stored(self.store, [key], lambda: self.store.set(key, value, seconds))

    def add(self, key, value, timeout=None):
        seconds, key = self._seconds(timeout), self._key(key)
        if seconds == 0:
            return not self.store.exists(key)
        return stored(self.store, [], lambda: self.store.set(key, value, seconds, nx=True))

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
        """Remove this prefix's entries (every entry of this role when there is no prefix), in one statement.

        Keys in digest form keep their prefix, so they go too; a callable prefix is asked once.
        """
        prefix = self._prefix()
        pattern = escape_glob(prefix) + "*" if prefix else None
        return self.store.clear(pattern) is not None

    def inc(self, key, delta=1):
        return self.store.incr(self._key(key), delta)

    def dec(self, key, delta=1):
        return self.store.decr(self._key(key), delta)


_SETTINGS = {"key_prefix": "CACHE_KEY_PREFIX", "schema": "CACHE_FASTPGCACHE_SCHEMA",
             "table": "CACHE_FASTPGCACHE_TABLE", "engine_options": "CACHE_FASTPGCACHE_ENGINE_OPTIONS",
             "statement_timeout": "CACHE_FASTPGCACHE_STATEMENT_TIMEOUT",
             "lock_timeout": "CACHE_FASTPGCACHE_LOCK_TIMEOUT",
             "failsafe": "CACHE_FASTPGCACHE_FAILSAFE", "guard": "CACHE_FASTPGCACHE_GUARD",
             "pickle_key": "CACHE_FASTPGCACHE_PICKLE_KEY"}
_NONE_IS_A_CHOICE = ("statement_timeout", "lock_timeout")  # None there means the server's setting, not "unset"
_DEFAULT_KEY_PREFIX = "flask_cache_"  # what Flask-Caching fills in when CACHE_KEY_PREFIX is not set


def _config_settings(config, options: dict) -> dict:
    # Config values that are set win over CACHE_OPTIONS; Flask-Caching's default prefix does not.
    settings = {name: config.get(setting) for name, setting in _SETTINGS.items()
                if config.get(setting) is not None or (name in _NONE_IS_A_CHOICE and setting in config)}
    if settings.get("key_prefix") == _DEFAULT_KEY_PREFIX and "key_prefix" in options:
        del settings["key_prefix"]
    return settings


