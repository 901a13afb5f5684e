"""`FastPgCache`: the seed-compatible client. It only wires an Engine to `Cache`; no SQL here."""
from __future__ import annotations

import logging
import re

from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.log import InstanceLogger

from .cache import Cache
from .codec import SigningKeys
from .errors import CacheConnectionError, check_positive_int, check_positive_seconds, connection_hint
from .failsafe import discard_dead_connections
from .guard import NegativeLookupGuard
from .leases import LeasingQueuePool, leases_for

DRIVER = "postgresql+psycopg2"

PREPARE_THRESHOLD = 5
"""psycopg 3 prepares a statement on the server after this many runs on one connection (its own default)."""


def _connect_args(target: URL, prepare_threshold: int | None) -> dict:
    # psycopg 3 prepares by itself; on psycopg2 the cache PREPAREs each statement at its first run
    # (execution.py) unless told None, and counts no runs.
    if prepare_threshold is not None and (not isinstance(prepare_threshold, int) or prepare_threshold < 0):
        raise ValueError(f"prepare_threshold must be an int >= 0, or None to never prepare; got {prepare_threshold!r}")
    if target.get_driver_name() == "psycopg":
        return {"prepare_threshold": prepare_threshold}
    if prepare_threshold not in (None, PREPARE_THRESHOLD):
        raise ValueError("on psycopg2 statements are prepared at their first run, or never with "
                         "prepare_threshold=None; a threshold needs psycopg 3: use a postgresql+psycopg:// URL "
                         "(pip install 'fastpgcache[psycopg3]')")
    return {}


def _timeout_options(target: URL, statement_timeout: float | None, lock_timeout: float | None) -> dict:
    # libpq's startup `options`, so the limits hold from the first statement at no extra round trip.
    settings = {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout}
    for name, seconds in settings.items():
        check_positive_seconds(name, seconds, none_means="for the server's own")
    given = target.query.get("options")
    parts = [given] if isinstance(given, str) else list(given or ())
    parts += [f"-c {name}={max(1, round(seconds * 1000))}" for name, seconds in settings.items() if seconds]
    return {"options": " ".join(parts)} if parts else {}


SECRET_PARAMETERS = ("password", "sslpassword")
"""libpq parameters that are secrets wherever they are given; never shown in a repr or a log record."""

_SECRET_IN_TEXT = re.compile(r"\b(sslpassword|password)=('(?:[^'\\]|\\.)*'|[^\s'&]+)")


def hide_secrets(text: str) -> str:
    """`text` with every password=... and sslpassword=... value replaced by xxx (a driver's dsn, a URL)."""
    return _SECRET_IN_TEXT.sub(r"\1=xxx", text)


class _RedactSecrets(logging.Filter):
    """Masks secrets in a pool's log records: psycopg2's connection repr, which the pool logs at DEBUG,
    shows `sslpassword` in clear."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = hide_secrets(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


_REDACT = _RedactSecrets()


def _secrets_apart(url: URL) -> tuple[URL, dict]:
    # A password in the query moves to the URL's own field (which reprs mask); sslpassword leaves the
    # URL for the driver's connect arguments, so neither repr(engine) nor engine.url shows it.
    query = dict(url.query)
    password = query.pop("password", None)
    if isinstance(password, tuple):  # given more than once: libpq takes the last
        password = password[-1]
    secret = {name: query.pop(name) for name in SECRET_PARAMETERS[1:] if name in query}
    if password is not None and url.password is None:
        url = url.set(password=password)
    return url.set(query=query), secret


def build_url(connection_string: str | None = None, *, url: str | URL | None = None, host: str = "localhost",
              port: int = 5432, database: str = "postgres", user: str = "postgres",
              password: str | None = None) -> URL:
    """A SQLAlchemy URL from a URL, a libpq connection string, or separate parts.

    A bare `postgresql://` URL gets the psycopg2 driver. The password stays out
    of `repr()` and `str()` of the returned URL.
    """
    given = url or connection_string
    if isinstance(given, URL):
        return _supported(given)
    if given:
        if "://" in given:
            parsed = make_url(given)
            return _supported(parsed.set(drivername=DRIVER) if parsed.drivername in ("postgresql", "postgres")
                              else parsed)
        from psycopg2.extensions import parse_dsn

        parts = parse_dsn(given)
        return URL.create(DRIVER, username=parts.pop("user", None), password=parts.pop("password", None),
                          host=parts.pop("host", None), port=int(parts.pop("port")) if "port" in parts else None,
                          database=parts.pop("dbname", None), query=parts)
    return URL.create(DRIVER, username=user, password=password or None, host=host, port=port, database=database)


def cache_engine(url: str | URL, **options) -> Engine:
    """An Engine for cache calls only; `options` go to `create_engine` and win over these defaults.

    Every call is one statement, so AUTOCOMMIT spares the BEGIN/COMMIT round trips
    and no connection comes back inside a transaction (no rollback on return);
    connections the server closed are dropped at checkout; and as nothing else
    uses the Engine, idle connections stay checked out for the next call (leases.py)::

        engine = cache_engine("postgresql+psycopg2://app@db/app", pool_size=5)
        Cache(engine).set("k", "v")
    """
    defaults = {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None, "poolclass": LeasingQueuePool}
    url, secret = _secrets_apart(make_url(url))
    if secret:
        options = {**options, "connect_args": {**secret, **options.get("connect_args", {})}}
    engine = create_engine(url, **{**defaults, **options})
    pool_logger = engine.pool.logger
    if isinstance(pool_logger, InstanceLogger):  # echo_pool: a wrapper around the logger
        pool_logger = pool_logger.logger
    if _REDACT not in pool_logger.filters:
        pool_logger.addFilter(_REDACT)
    discard_dead_connections(engine)
    # Up to pool_size connections wait idle; another pool class given in `options` keeps none.
    leases = leases_for(engine, keep=engine.pool.size() if isinstance(engine.pool, LeasingQueuePool) else 0)
    # Its connections are the cache's alone, so psycopg2's statements may stay PREPAREd on them.
    leases.prepare = engine.dialect.driver == "psycopg2"
    return engine


def _supported(url: URL) -> URL:
    # Other databases, and drivers without psycopg's blocking API, fail later with a less helpful error.
    if url.get_backend_name() != "postgresql" or url.get_driver_name() not in ("psycopg2", "psycopg"):
        raise ValueError(f"fastpgcache needs a postgresql+psycopg2:// or postgresql+psycopg:// URL, "
                         f"not {url.drivername}://")
    return url


class FastPgCache(Cache):
    """A Redis-like client owning its connection pool; every method comes from `Cache`.

    ::

        from fastpgcache import FastPgCache

        with FastPgCache(host="localhost", user="alice", password="...") as cache:
            cache.set("session", {"user": "Alice"}, ttl=3600)
            cache.get("session")   # {'user': 'Alice'}

    The pool holds up to `maxconn` connections and opens `minconn` of them at
    once, so a wrong host or password fails here rather than on first use.
    With `instance_name`, it authenticates to Databricks with rotating tokens
    (`password` is ignored) through the `databricks` extra.

    The cache's statements run as server-side prepared statements: on psycopg2
    PREPAREd at their first run on a connection, on psycopg 3 (a
    `postgresql+psycopg://` URL) after `prepare_threshold` runs. Behind a
    transaction-mode pooler pass `prepare_threshold=None` (psycopg2 also stops
    by itself when prepared statements keep vanishing).

    No call waits forever: `statement_timeout` (5 s) and `lock_timeout` (1 s)
    are set for every connection (None leaves the server's setting), and a
    caller waits at most `pool_timeout` (30 s) for one of `maxconn` busy
    connections before a `CacheTimeoutError`. `failsafe=True` answers database
    errors as cache misses instead of raising (see `Cache`).
    """

    def __init__(self, connection_string: str | None = None, host: str = "localhost", port: int = 5432,
                 database: str = "postgres", user: str = "postgres", password: str = "", schema: str = "public",
                 minconn: int = 1, maxconn: int = 10, use_cuckoo_filter: bool = True,
                 cuckoo_capacity: int = 1_000_000, instance_name: str | None = None, profile: str | None = None,
                 *, url: str | URL | None = None, engine: Engine | None = None, table: str | None = None,
                 user_id: str | None = None, pickle: SigningKeys = None, pool_timeout: float = 30.0,
                 prepare_threshold: int | None = PREPARE_THRESHOLD, statement_timeout: float | None = 5.0,
                 lock_timeout: float | None = 1.0, failsafe: bool = False, on_error=None,
                 expire_every: int | None = 50, max_entries: int | None = None):
        if not (isinstance(minconn, int) and isinstance(maxconn, int) and 0 <= minconn <= maxconn and maxconn >= 1):
            raise ValueError(f"need 0 <= minconn <= maxconn and maxconn >= 1, got minconn={minconn} maxconn={maxconn}")
        check_positive_int("cuckoo_capacity", cuckoo_capacity)
        self.use_cuckoo_filter = use_cuckoo_filter
        self.cuckoo_capacity = cuckoo_capacity
        self.token_provider = None
        self._owns_engine = engine is None
        if engine is None:
            target = build_url(connection_string, url=url, host=host, port=port, database=database, user=user,
                               password=None if instance_name else password)
            check_positive_seconds("pool_timeout", pool_timeout)
            engine = cache_engine(target, pool_size=maxconn, max_overflow=0, pool_timeout=pool_timeout,
                                  connect_args={**_connect_args(target, prepare_threshold),
                                                **_timeout_options(target, statement_timeout, lock_timeout)})
            leases_for(engine).prepare &= prepare_threshold is not None
        if instance_name:
            from .databricks import attach, provider_for_instance

            self.token_provider = provider_for_instance(instance_name, profile)
            attach(engine, self.token_provider)
        super().__init__(engine, schema=schema, table=table, user_id=user_id, pickle=pickle, failsafe=failsafe,
                         on_error=on_error, expire_every=expire_every, max_entries=max_entries)
        self._open(minconn)
        if use_cuckoo_filter and self._owns_engine:
            # Lookups go to the database until the guard has warmed in its own thread.
            self.guard = NegativeLookupGuard(self, cuckoo_capacity).start()

    def _open(self, count: int) -> None:
        # Fill the pool now: a wrong host or password is reported by the constructor.
        try:
            connections = [self.bind.connect() for _ in range(count)]
        except sa_exc.DBAPIError as error:
            failure = CacheConnectionError(f"cannot connect to the database: {connection_hint(error)}")
            if self._failsafe.absorb(failure, "connect"):  # failsafe: start anyway, answering as misses
                return
            self.close()
            raise failure from None
        except CacheConnectionError:  # raised by the Databricks login hook, already in its own words
            self.close()
            raise
        for connection in connections:
            connection.close()

    def __repr__(self) -> str:
        return f"<FastPgCache {hide_secrets(repr(self.bind.url))} {self.schema}.{self.table}>"

    def close(self) -> None:
        """Close every pooled connection and stop the negative-lookup guard and token refresher, if any."""
        if self.guard is not None:
            self.guard.stop()
        if self.token_provider is not None:
            self.token_provider.stop()
        if self._owns_engine and self._leases is not None:
            self._leases.close()
            self.bind.dispose()

    def __enter__(self) -> FastPgCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
