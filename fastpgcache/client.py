"""`FastPgCache`: the seed-compatible client. It only wires an Engine to `Cache`; no SQL here."""
from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from .cache import Cache
from .errors import CacheConnectionError, connection_hint

DRIVER = "postgresql+psycopg2"

PREPARE_THRESHOLD = 5
"""psycopg 3 prepares a statement on the server after this many runs on one connection (its own default)."""


def _connect_args(target: URL, prepare_threshold: int | None) -> dict:
    # Only psycopg 3 prepares statements; psycopg2 never does, so "off" (None) is fine there too.
    if prepare_threshold is not None and (not isinstance(prepare_threshold, int) or prepare_threshold < 0):
        raise ValueError(f"prepare_threshold must be an int >= 0, or None to never prepare; got {prepare_threshold!r}")
    if target.get_driver_name() == "psycopg":
        return {"prepare_threshold": prepare_threshold}
    if prepare_threshold not in (None, PREPARE_THRESHOLD):
        raise ValueError("prepare_threshold needs psycopg 3: use a postgresql+psycopg:// URL "
                         "(pip install 'fastpgcache[psycopg3]')")
    return {}


def build_url(connection_string: str | None = None, *, url: str | URL | None = None, host: str = "localhost",
              port: int = 5432, database: str = "postgres", user: str = "postgres",
              password: str | None = None) -> URL:
    """A SQLAlchemy URL from a URL, a libpq connection string, or separate parts.

    A bare `postgresql://` URL gets the psycopg2 driver. The password stays out
    of `repr()` and `str()` of the returned URL.
    """
    given = url or connection_string
    if isinstance(given, URL):
        return given
    if given:
        if "://" in given:
            parsed = make_url(given)
            return parsed.set(drivername=DRIVER) if parsed.drivername in ("postgresql", "postgres") else parsed
        from psycopg2.extensions import parse_dsn

        parts = parse_dsn(given)
        return URL.create(DRIVER, username=parts.pop("user", None), password=parts.pop("password", None),
                          host=parts.pop("host", None), port=int(parts.pop("port")) if "port" in parts else None,
                          database=parts.pop("dbname", None), query=parts)
    return URL.create(DRIVER, username=user, password=password or None, host=host, port=port, database=database)


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

    A `postgresql+psycopg://` URL uses psycopg 3, which runs the cache's
    statements as server-side prepared statements after `prepare_threshold`
    runs; behind a transaction-mode pooler pass `prepare_threshold=None`.
    """

    def __init__(self, connection_string: str | None = None, host: str = "localhost", port: int = 5432,
                 database: str = "postgres", user: str = "postgres", password: str = "", schema: str = "public",
                 minconn: int = 1, maxconn: int = 10, use_cuckoo_filter: bool = True,
                 cuckoo_capacity: int = 1_000_000, instance_name: str | None = None, profile: str | None = None,
                 *, url: str | URL | None = None, engine: Engine | None = None, table: str | None = None,
                 user_id: str | None = None, pickle: bool = False, pool_timeout: float = 30.0,
                 prepare_threshold: int | None = PREPARE_THRESHOLD):
        if not (isinstance(minconn, int) and isinstance(maxconn, int) and 0 <= minconn <= maxconn and maxconn >= 1):
            raise ValueError(f"need 0 <= minconn <= maxconn and maxconn >= 1, got minconn={minconn} maxconn={maxconn}")
        self.use_cuckoo_filter = use_cuckoo_filter
        self.cuckoo_capacity = cuckoo_capacity
        self.token_provider = None
        self._owns_engine = engine is None
        if engine is None:
            target = build_url(connection_string, url=url, host=host, port=port, database=database, user=user,
                               password=None if instance_name else password)
            engine = create_engine(target, pool_size=maxconn, max_overflow=0, pool_timeout=pool_timeout,
                                   connect_args=_connect_args(target, prepare_threshold))
        if instance_name:
            from .databricks import provider_for_instance, attach

            self.token_provider = provider_for_instance(instance_name, profile)
            attach(engine, self.token_provider)
        super().__init__(engine, schema=schema, table=table, user_id=user_id, pickle=pickle)
        self._open(minconn)

    def _open(self, count: int) -> None:
        # Fill the pool now: a wrong host or password is reported by the constructor.
        try:
            connections = [self.bind.connect() for _ in range(count)]
        except sa_exc.DBAPIError as error:
            self.close()
            raise CacheConnectionError(f"cannot connect to the database: {connection_hint(error)}") from None
        except CacheConnectionError:  # raised by the Databricks login hook, already in its own words
            self.close()
            raise
        for connection in connections:
            connection.close()

    def __repr__(self) -> str:
        return f"<FastPgCache {self.bind.url!r} {self.schema}.{self.table}>"

    def close(self) -> None:
        """Close every pooled connection and stop the token refresher, if any."""
        if self.token_provider is not None:
            self.token_provider.stop()
        if self._owns_engine:
            self.bind.dispose()

    def __enter__(self) -> "FastPgCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
