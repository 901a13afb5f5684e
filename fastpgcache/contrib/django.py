"""Django cache backend: `django.core.cache` on a fastpgcache table.

::

    CACHES = {
        "default": {
            "BACKEND": "fastpgcache.contrib.django.FastPgCache",
            "LOCATION": "postgresql://app@db/app",      # a SQLAlchemy URL
            "TIMEOUT": 300,
            "OPTIONS": {"schema": "public", "table": "cache"},   # and MAX_ENTRIES, guard, ...: see OPTIONS
        }
    }

Connections get FastPgCache's statement and lock timeouts (5 s, 1 s) unless
OPTIONS say otherwise. Any key Django makes works: one the table cannot hold
is stored in digest form (`fastpgcache.contrib.storable_key`). Values are
pickled, as with Django's other backends, and signed with a key derived
from SECRET_KEY (SECRET_KEY_FALLBACKS still verify), so nobody who can write the
table can make the application unpickle their code. Create the table once
with ``python manage.py setup_fastpgcache`` (add ``fastpgcache.contrib.django_app``
to INSTALLED_APPS) or ``fastpgcache-admin``.
"""
from __future__ import annotations

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, InvalidCacheKey
from django.core.exceptions import ImproperlyConfigured
from sqlalchemy import create_engine

from ..cache import Cache
from ..client import build_url
from . import key_text, shared_engine, shared_guard, storable_key, stored

OPTIONS = {
    "schema": "schema of the cache table (default public)",
    "table": "name of the cache table (default cache)",
    "user_id": "role whose rows to use, for a connection that may act for several (default: the login role)",
    "engine_options": "dict of keyword arguments for sqlalchemy.create_engine (pool_size, ...)",
    "statement_timeout": "seconds a statement may run (default 5; None: the server's setting)",
    "lock_timeout": "seconds a statement may wait for a lock (default 1; None: the server's setting)",
    "failsafe": "True to turn database errors into misses (logged) instead of exceptions",
    "guard": "True to answer lookups of absent keys without a round trip (one negative-lookup guard per process)",
    "expire_every": "delete a batch of expired rows every N writes (default 50; None: never)",
    "max_entries": "cap on this role's entries, trimmed oldest first every few writes (default: no cap)",
    "MAX_ENTRIES": "Django's: cull when a write finds more entries (default 300 once culling is on)",
    "CULL_FREQUENCY": "Django's: cull 1/CULL_FREQUENCY of the entries, 0 for all (default 3 once culling is on)",
}
"""What OPTIONS may hold; anything else is refused so a typo does not pass silently."""
_CACHE_OPTIONS = ("schema", "table", "user_id", "failsafe", "expire_every", "max_entries")
_TIMEOUT_OPTIONS = ("statement_timeout", "lock_timeout")
_DJANGO_MAX_ENTRIES, _DJANGO_CULL_FREQUENCY = 300, 3  # Django's defaults, once either option is given


class FastPgCache(BaseCache):
    """A Django cache backend on fastpgcache's `Cache`; every backend of one LOCATION shares an Engine.

    ::

        from django.core.cache import cache
        cache.set("greeting", {"text": "hello"}, timeout=60)
        cache.get("greeting")       # {'text': 'hello'}
        cache.incr("missing")       # ValueError, as with every Django backend
    """

    def __init__(self, location, params):
        super().__init__(params)
        options = dict(params.get("OPTIONS") or {})
        self._check_options(options)
        if not location:
            raise ImproperlyConfigured("fastpgcache needs LOCATION: a SQLAlchemy URL such as postgresql://user@host/db")
        self._location, self._engine_options = location, options.get("engine_options")
        timeouts = {name: options[name] for name in _TIMEOUT_OPTIONS if name in options}
        engine = shared_engine(location, self._engine_options, **timeouts)
        passed = {name: options[name] for name in _CACHE_OPTIONS if name in options}
        self.store = Cache(engine, pickle=_signing_keys(), **passed, **_culling(options))
        """The fastpgcache `Cache` underneath, for what Django's API lacks: ttl(), keys(), cleanup()."""
        if options.get("guard"):
            self.store.guard = shared_guard(self.store)

    @staticmethod
    def _check_options(options: dict) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            accepted = "; ".join(f"{name}: {meaning}" for name, meaning in OPTIONS.items())
            raise ImproperlyConfigured(f"unknown fastpgcache OPTIONS {unknown}. Accepted: {accepted}")
        if not isinstance(options.get("guard", False), bool):
            raise ImproperlyConfigured(f"OPTIONS guard must be True or False, got {options['guard']!r}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.store!r}>"

    def get_backend_timeout(self, timeout=DEFAULT_TIMEOUT):
        """Seconds to keep a value: None for ever, 0 or less for already expired (Django's rules)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        return None if timeout is None else max(timeout, 0)

    def make_key(self, key, version=None):
        """The key stored for `key`: Django's (prefix, version, KEY_FUNCTION), in the digest form
        `storable_key` gives when the table cannot hold it (over 1024 bytes, or with NUL)."""
        return storable_key(self._django_key(key, version))

    def make_and_validate_key(self, key, version=None):
        # Django's portability warnings (memcached's limits) are about the key Django made, not its stored form.
        made = self._django_key(key, version)
        self.validate_key(made)
        return storable_key(made)

    def _django_key(self, key, version) -> str:
        made = super().make_key(key, version=version)
        try:
            return key_text(made)  # a KEY_FUNCTION may return bytes or a number
        except (TypeError, ValueError) as error:
            raise InvalidCacheKey(f"invalid cache key {made!r:.80}: {error}") from None

    def _admin_engine(self):
        """A plain Engine on this LOCATION for `setup_fastpgcache`: migrations may run longer than the
        backend's statement_timeout allows. The caller disposes of it."""
        return create_engine(build_url(url=self._location), **(self._engine_options or {}))

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        seconds = self.get_backend_timeout(timeout)
        if seconds == 0:
            # Stored and expired at once: "added" exactly when nothing live was there.
            return not self.store.exists(key)
        return stored(self.store, [], lambda: self.store.set(key, value, seconds, nx=True))

    def get(self, key, default=None, version=None):
        return self.store.get(self.make_and_validate_key(key, version=version), default)

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        seconds = self.get_backend_timeout(timeout)
        if seconds == 0:
            self.store.delete(key)
        else:
            stored(self.store, [key], lambda: self.store.set(key, value, seconds))

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        seconds = self.get_backend_timeout(timeout)
        if seconds == 0:
            return self.store.delete(key)
        if seconds is None:
            # persist() is False for a key that already had no expiry, which still counts as touched.
            return self.store.persist(key) or self.store.exists(key)
        return self.store.expire(key, seconds)

    def delete(self, key, version=None):
        return self.store.delete(self.make_and_validate_key(key, version=version))

    def has_key(self, key, version=None):
        return self.store.exists(self.make_and_validate_key(key, version=version))

    def incr(self, key, delta=1, version=None):
        """Add `delta` atomically; ValueError if the key is missing, TypeError if it holds no integer.

        In failsafe mode a database error is a miss too (ValueError): there is no count to return.
        """
        made = self.make_and_validate_key(key, version=version)
        try:
            value = self.store.incr(made, delta, create=False)
        except ValueError as error:
            raise TypeError(str(error)) from None
        if value is None:
            raise ValueError(f"Key '{made}' not found")
        return value

    def decr(self, key, delta=1, version=None):
        return self.incr(key, -delta, version=version)

    def get_many(self, keys, version=None):
        made = {self.make_and_validate_key(key, version=version): key for key in keys}
        found = self.store.get_many(made)
        return {made[key]: value for key, value in found.items()}

    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        """Store every item in one statement (all or nothing); returns the keys that failed: none, or
        all of them when failsafe mode absorbed a database error or a value was too large."""
        rows = {self.make_and_validate_key(key, version=version): value for key, value in data.items()}
        seconds = self.get_backend_timeout(timeout)
        if seconds == 0:
            done = self.store.delete_many(rows) is not None
        else:
            done = stored(self.store, list(rows), lambda: self.store.set_many(rows, seconds) == len(rows))
        return [] if done else list(data)

    def delete_many(self, keys, version=None):
        self.store.delete_many([self.make_and_validate_key(key, version=version) for key in keys])

    def clear(self):
        """Remove every entry of this role in the table, whatever its prefix or version (as Django's db cache)."""
        self.store.clear()

    def close(self, **kwargs):
        """Nothing to release: the process shares one Engine, whose idle connections wait for the next call."""


def _culling(options: dict) -> dict:
    # Django's MAX_ENTRIES/CULL_FREQUENCY as Cache's culling keywords. Culling costs a count of the
    # role's rows on every write, so it is on only when asked for (Django's DatabaseCache always culls).
    if "MAX_ENTRIES" not in options and "CULL_FREQUENCY" not in options:
        return {}
    return {"cull_max_entries": _whole_number(options, "MAX_ENTRIES", _DJANGO_MAX_ENTRIES, minimum=1),
            "cull_frequency": _whole_number(options, "CULL_FREQUENCY", _DJANGO_CULL_FREQUENCY, minimum=0)}


def _whole_number(options: dict, name: str, default: int, minimum: int) -> int:
    value = options.get(name, default)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)  # Django reads these with int(): settings from the environment are strings
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ImproperlyConfigured(f"OPTIONS {name} must be a whole number >= {minimum}, got {value!r}")
    return value


def _signing_keys() -> list:
    # Pickles are signed with SECRET_KEY; the fallbacks verify values written before a key rotation.
    from django.conf import settings

    key = getattr(settings, "SECRET_KEY", None)
    if not key:
        raise ImproperlyConfigured("fastpgcache signs the pickles it stores with SECRET_KEY; set SECRET_KEY")
    return [key, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
