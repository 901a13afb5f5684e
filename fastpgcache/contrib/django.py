"""Django cache backend: `django.core.cache` on a fastpgcache table.

::

    CACHES = {
        "default": {
            "BACKEND": "fastpgcache.contrib.django.FastPgCache",
            "LOCATION": "postgresql://app@db/app",      # a SQLAlchemy URL
            "TIMEOUT": 300,
            "OPTIONS": {"schema": "public", "table": "cache"},
        }
    }

Values are pickled, as with Django's other backends, and signed with a key derived
from SECRET_KEY (SECRET_KEY_FALLBACKS still verify), so nobody who can write the
table can make the application unpickle their code. Create the table once
with ``python manage.py setup_fastpgcache`` (add ``fastpgcache.contrib.django_app``
to INSTALLED_APPS) or ``fastpgcache-admin``.
"""
from __future__ import annotations

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, InvalidCacheKey
from django.core.exceptions import ImproperlyConfigured

from ..cache import Cache, normalize_key
from . import shared_engine, stored

OPTIONS = {
    "schema": "schema of the cache table (default public)",
    "table": "name of the cache table (default cache)",
    "user_id": "role whose rows to use, for a connection that may act for several (default: the login role)",
    "engine_options": "dict of keyword arguments for sqlalchemy.create_engine (pool_size, ...)",
    "failsafe": "True to turn database errors into misses (logged) instead of exceptions",
    "expire_every": "delete a batch of expired rows every N writes (default 50; None: never)",
    "max_entries": "cap on this role's entries, oldest removed first (default: no cap)",
}
"""What OPTIONS may hold; anything else is refused so a typo does not pass silently."""
_CACHE_OPTIONS = ("schema", "table", "user_id", "failsafe", "expire_every", "max_entries")


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
        engine = shared_engine(location, options.get("engine_options"))
        passed = {name: options[name] for name in _CACHE_OPTIONS if name in options}
        self.store = Cache(engine, pickle=_signing_keys(), **passed)
        """The fastpgcache `Cache` underneath, for what Django's API lacks: ttl(), keys(), cleanup()."""

    @staticmethod
    def _check_options(options: dict) -> None:
        # MAX_ENTRIES/CULL_FREQUENCY (default 300) belong to culling backends; a cap here is opt-in (max_entries).
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            accepted = "; ".join(f"{name}: {meaning}" for name, meaning in OPTIONS.items())
            raise ImproperlyConfigured(
                f"unknown fastpgcache OPTIONS {unknown} (this backend does not cull, so MAX_ENTRIES and "
                f"CULL_FREQUENCY do not apply; set max_entries to cap the entries). "
                f"Accepted: {accepted}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.store!r}>"

    def get_backend_timeout(self, timeout=DEFAULT_TIMEOUT):
        """Seconds to keep a value: None for ever, 0 or less for already expired (Django's rules)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        return None if timeout is None else max(timeout, 0)

    def validate_key(self, key):
        """Warn about keys memcached would refuse (Django's portability check); refuse keys the table cannot hold."""
        super().validate_key(key)
        try:
            normalize_key(key)
        except (TypeError, ValueError) as error:
            raise InvalidCacheKey(f"invalid cache key {key[:80]!r}: {error}") from None

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


def _signing_keys() -> list:
    # Pickles are signed with SECRET_KEY; the fallbacks verify values written before a key rotation.
    from django.conf import settings

    key = getattr(settings, "SECRET_KEY", None)
    if not key:
        raise ImproperlyConfigured("fastpgcache signs the pickles it stores with SECRET_KEY; set SECRET_KEY")
    return [key, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
