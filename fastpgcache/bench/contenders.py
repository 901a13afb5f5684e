"""The ways of talking to a cache the bench compares: raw drivers, this library, Django, Redis."""
from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from ..cache import Cache
from ..codec import JSON, as_text, decode_json, encode_json


def sample_value(size: int) -> dict:
    """A JSON object whose compact encoding is `size` bytes, like the seed's load test values."""
    value = {"user": "u-42", "items": [1, 2, 3], "note": ""}
    padding = size - len(json.dumps(value, separators=(",", ":")))
    value["note"] = "x" * max(0, padding)
    return value


def _encode(value) -> bytes:
    # Every contender encodes and decodes with the library's own JSON code, so ratios show the cost of
    # the rest: round trips, SQL and bookkeeping.
    return encode_json(value)


class Contender:
    """One way to talk to a cache. Subclasses bind get/set/... to the client's own calls."""

    name = "?"
    workloads: set | None = None  # None: every workload

    def runs(self, workload: str) -> bool:
        return self.workloads is None or workload in self.workloads

    def worker(self) -> Contender:
        """What one load-test thread uses; shared clients return themselves."""
        return self

    def get(self, key: str) -> Any:
        raise NotImplementedError

    def set(self, key: str, value: Any, ttl: float | None = None) -> Any:
        raise NotImplementedError

    def set_many(self, mapping: dict) -> Any:
        raise NotImplementedError

    def get_many(self, keys: list) -> dict:
        raise NotImplementedError

    def incr(self, key: str) -> Any:
        raise NotImplementedError

    def end_unit(self) -> None:
        """Called after each timed unit of work (untimed); Cache(session) commits here."""

    def close(self) -> None:
        pass


class Psycopg2Floor(Contender):
    """Raw psycopg2 in autocommit, one connection per thread, running the SQL it is given.

    `sql` maps each call to (statement, fixed params, positional picker or None) as floor_sql and
    capture_sql give them, and "prepare" (if present) to statements each new connection runs first;
    `text_values` sends each value as one text parameter, as the library's set does (codec.as_text)."""

    def __init__(self, name: str, connect: Callable, sql: dict, workloads: set | None = None,
                 text_values: bool = False):
        self.name, self.workloads, self._connect, self._sql = name, workloads, connect, sql
        self._text = text_values
        self._local = threading.local()
        self._all: list = []  # every thread's connection, closed together

    @property
    def _cursor(self):
        # One connection per thread: the load test's "each thread its own connection".
        local = self._local
        if not hasattr(local, "cursor"):
            connection = self._connect()
            connection.autocommit = True
            self._all.append(connection)
            self._start(connection)
        return local.cursor

    def use(self, connection) -> None:
        """Send this thread's calls on `connection`, someone else's (not closed here), from now on::

            replay.use(driver_connection)   # floor_loop.py --connections shared: the cache's own
        """
        cursor = getattr(self._local, "cursor", None)
        if cursor is None or cursor.connection is not connection:
            self._start(connection)

    def _start(self, connection) -> None:
        # A cursor for this thread, after the statements to prepare on `connection` first.
        from psycopg2.errors import DuplicatePreparedStatement

        self._local.cursor = connection.cursor()
        for statement in self._sql.get("prepare", ()):
            try:
                self._local.cursor.execute(statement)
            except DuplicatePreparedStatement:  # a connection shared with the library: the same statement
                pass

    def _value(self, value):
        data = _encode(value)
        return as_text(JSON, data) if self._text else data

    def get(self, key):
        sql, params, in_order = self._sql["get"]
        cursor = self._cursor
        values = {**params, "k": key}
        cursor.execute(sql, values if in_order is None else in_order(values))
        row = cursor.fetchone()
        return None if row is None else decode_json(str(row[0], "utf-8"))

    def set(self, key, value, ttl=None):
        sql, params, in_order = self._sql["set"]
        values = {**params, "k": key, "val": self._value(value), "flg": 2, "ttl": ttl}
        self._cursor.execute(sql, values if in_order is None else in_order(values))

    def set_many(self, mapping):
        from psycopg2.extras import execute_values

        if "set_values" not in self._sql:  # the library's SQL has no multi-row form: only used untimed
            for key, value in mapping.items():
                self.set(key, value)
            return
        sql, template, params = self._sql["set_values"]
        rows = [{**params, "k": k, "val": self._value(v), "flg": 2, "ttl": None} for k, v in mapping.items()]
        execute_values(self._cursor, sql, rows, template=template, page_size=len(rows))

    def get_many(self, keys):
        sql, params, in_order = self._sql["get_many"]
        cursor = self._cursor
        values = {**params, "ks": list(keys)}
        cursor.execute(sql, values if in_order is None else in_order(values))
        return {row[0]: decode_json(str(row[1], "utf-8")) for row in cursor.fetchall()}

    def incr(self, key):
        sql, params, in_order = self._sql["incr"]
        cursor = self._cursor
        values = {**params, "k": key, "amount": 1}
        cursor.execute(sql, values if in_order is None else in_order(values))
        result = cursor.fetchone()[0]
        return int(result[0] if isinstance(result, list) else result)  # the library's incr answers {n}

    def close(self):
        for connection in self._all:
            connection.close()


class LibraryContender(Contender):
    """This library's `Cache` (or `FastPgCache`), called exactly as an application would."""

    def __init__(self, name: str, cache: Cache, workloads: set | None = None, on_close=None):
        self.name, self.cache, self.workloads, self._on_close = name, cache, workloads, on_close

    # One call in between, as every floor has its own method around the driver.
    def get(self, key):
        return self.cache.get(key)

    def set(self, key, value, ttl=None):
        return self.cache.set(key, value, ttl=ttl)

    def set_many(self, mapping):
        return self.cache.set_many(mapping)

    def get_many(self, keys):
        return self.cache.get_many(keys)

    def incr(self, key):
        return self.cache.incr(key)

    def close(self):
        if self._on_close:
            self._on_close()


class SessionContender(LibraryContender):
    """`Cache(session)`: the marginal cost of cache calls inside the caller's open transaction."""

    def __init__(self, engine, schema: str, table: str | None = None):
        self._engine, self._schema, self._table = engine, schema, table
        self.session = Session(engine)
        self._threads = threading.local()
        super().__init__("Cache(session)", Cache(self.session, schema=schema, table=table),
                         on_close=self.session.close)

    def worker(self):
        local = self._threads
        if not hasattr(local, "contender"):
            local.contender = SessionContender(self._engine, self._schema, self._table)
        return local.contender

    def end_unit(self):
        self.session.commit()


class DjangoContender(Contender):
    """Django's built-in `DatabaseCache` on the same server (its own table, in the bench schema)."""

    name = "Django DatabaseCache"

    def __init__(self, django_cache):
        from django.db import connections

        self._cache, self._connections = django_cache, connections
        self.get, self.get_many, self.incr = django_cache.get, django_cache.get_many, django_cache.incr

    def set(self, key, value, ttl=None):
        self._cache.set(key, value, timeout=ttl)

    def set_many(self, mapping):
        self._cache.set_many(mapping, timeout=None)

    def close(self):
        self._connections.close_all()


class RedisContender(Contender):
    """redis-py against Redis, values JSON-encoded client-side as the other contenders do."""

    name = "Redis"

    def __init__(self, client, prefix: str):
        self._r, self._prefix = client, prefix

    def get(self, key):
        data = self._r.get(self._prefix + key)
        return None if data is None else decode_json(data.decode())

    def set(self, key, value, ttl=None):
        self._r.set(self._prefix + key, _encode(value), ex=None if ttl is None else int(ttl))

    def set_many(self, mapping):
        self._r.mset({self._prefix + k: _encode(v) for k, v in mapping.items()})

    def get_many(self, keys):
        names = list(keys)
        found = self._r.mget([self._prefix + k for k in names])
        return {k: decode_json(v.decode()) for k, v in zip(names, found, strict=True) if v is not None}

    def incr(self, key):
        return self._r.incr(self._prefix + key)

    def close(self):
        keys = list(self._r.scan_iter(match=self._prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            self._r.delete(*keys[start:start + 1000])
        self._r.close()


DJANGO_SCHEMA = "fastpgcache_bench_django"
"""Django's tables live here: its search_path is fixed when settings are configured, once per process."""

_django_database: dict | None = None


def _django_cache(url: URL, table: str):
    """A DatabaseCache on its own table, configuring Django in-process on first use."""
    global _django_database
    import django
    from django.conf import settings
    from django.core.cache.backends.db import DatabaseCache

    database = {"ENGINE": "django.db.backends.postgresql", "NAME": url.database or "postgres",
                "USER": url.username or "", "PASSWORD": url.password or "", "HOST": url.host or "",
                "PORT": str(url.port or ""), "OPTIONS": {"options": f"-c search_path={DJANGO_SCHEMA}"}}
    if not settings.configured:
        settings.configure(DATABASES={"default": database}, USE_TZ=True, INSTALLED_APPS=[])
        django.setup()
        _django_database = copy.deepcopy(database)  # Django fills defaults into the dict it was given
    elif _django_database != database:
        raise RuntimeError("Django settings are already configured for another database in this process")
    cache = DatabaseCache(table, {"TIMEOUT": None, "OPTIONS": {"MAX_ENTRIES": 10_000_000}})
    _create_django_table(table)
    return cache


def _create_django_table(name: str) -> None:
    # Django's own createcachetable logic, for a table that is not in settings.CACHES.
    from django.core.management.commands.createcachetable import Command

    command = Command()
    command.verbosity = 0
    command.create_table("default", name, dry_run=False)
