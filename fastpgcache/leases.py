"""Connections a cache keeps checked out of its own pool between calls.

SQLAlchemy's pool checkout and checkin (the fairy, its events, the queue and
its lock) cost about 12 µs per call on loopback, as much as a quarter of the
round trip of a cache hit (benchmarks/). An Engine the library created for
itself has no other user, so its idle connections can wait in a LIFO stack
instead: taking one is a `deque.pop()`. The pool still creates, counts and
limits every connection, so `maxconn`, `pool_timeout` and `dispose()` keep
their meaning, and any checkout from the pool itself (`engine.connect()`, the
stampede lock's transaction) first takes back an idle connection
(`LeasingQueuePool`). An Engine the caller passed in keeps nothing idle and
gets every connection back after each call.

A `Lease` is one held connection with what each call would otherwise rebuild:
its driver cursor (reused: creating one cost about 1 µs a call) and a poller
already registered on its socket, for the hang-up check before each use.
"""
from __future__ import annotations

import collections
import contextlib
import os
import select
import threading
import weakref
from typing import TypeVar, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from .failsafe import socket_closed

# poll() where there is one (not on Windows): select() cannot watch descriptors above 1023.
HAS_POLL = hasattr(select, "poll")

LOST_PREPARED_LIMIT = 3
"""Connections that may lose their prepared statements before a process stops preparing: once is a
DISCARD ALL or a migration; again and again is a transaction-mode pooler handing out other connections."""

_registry: weakref.WeakKeyDictionary[Engine, ConnectionLeases] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
# The leases holding idle connections of each pool, for LeasingQueuePool to take them back.
_by_pool: weakref.WeakKeyDictionary[QueuePool, ConnectionLeases] = weakref.WeakKeyDictionary()


class LeasingQueuePool(QueuePool):
    """A QueuePool whose every checkout may take back a connection a cache holds idle.

    Without it, `engine.connect()` on a client whose connections all wait idle
    in its stack would wait `pool_timeout` for nothing::

        engine = create_engine(url, poolclass=LeasingQueuePool, pool_size=5)
    """

    def _do_get(self):
        leases = _by_pool.get(self)
        if leases is None:
            return super()._do_get()
        with leases.waiting():
            if not self.checkedin():
                leases.drain(1)  # an idle connection goes back to the queue, for this caller
            return super()._do_get()


L = TypeVar("L", bound="ConnectionLeases")


@overload
def leases_for(engine: Engine, keep: int | None = None) -> ConnectionLeases: ...
@overload
def leases_for(engine: Engine, keep: int | None = None, *, kind: type[L]) -> L: ...


def leases_for(engine, keep=None, *, kind=None):
    """The one `ConnectionLeases` (or `kind`, a subclass) of `engine`; `keep` > 0 (for Engines the library
    owns) holds idle ones.

    Every cache on one Engine shares it, so a cache waiting for a connection is
    never starved by another one's idle stack.
    """
    with _registry_lock:
        leases = _registry.get(engine)
        if leases is None:
            leases = _registry[engine] = (kind or ConnectionLeases)(engine)
        if keep is not None:
            leases.keep = keep
        return leases


class Lease:
    """A pooled connection held for one call at a time, with its reusable cursor."""

    __slots__ = ("fairy", "driver", "prepared", "_cursor", "_poller")

    def __init__(self, fairy):
        self.fairy = fairy
        self.driver = fairy.driver_connection
        # Names of the statements PREPAREd on this connection (execution.py), kept in the pool's `info`
        # for it, which lives as long as the connection.
        self.prepared = fairy.info.setdefault("fastpgcache_prepared", set())
        self._cursor = None
        self._poller = None

    @property
    def cursor(self):
        """The driver cursor calls on this connection reuse (results are consumed within each call)."""
        if self._cursor is None:
            self._cursor = self.driver.cursor()  # the driver's own (for async drivers, not SQLAlchemy's adapter)
        return self._cursor

    def hung_up(self) -> bool:
        """True if the server closed this idle connection (a readable socket: there is nothing to read)."""
        is_closed = getattr(self.driver, "is_closed", None)
        if is_closed is not None:  # asyncpg: its protocol reads the socket and sees the server hang up
            return is_closed()
        if not HAS_POLL:
            return socket_closed(self.driver)
        if self._poller is None:
            try:
                fd = self.driver.fileno()  # the driver's own connection: SQLAlchemy's async adapter has no fileno
            except Exception:  # fileno() of a closed connection raises
                return True
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)
        return bool(self._poller.poll(0))

    @property
    def is_valid(self) -> bool:
        return self.fairy.is_valid

    def close(self) -> None:
        """Give the connection back to the pool (its cursor goes with it)."""
        self._forget_cursor()
        self.fairy.close()

    def invalidate(self, error: BaseException | None = None) -> None:
        """Close the connection for good; the pool replaces it when next asked."""
        self._forget_cursor()
        self.fairy.invalidate(error)

    def _forget_cursor(self) -> None:
        # A cursor holds nothing on the server between calls; dropping the reference is enough (an
        # async driver's close() would have to be awaited).
        self._cursor = None


class ConnectionLeases:
    """Hands out pooled connections as Leases, keeping up to `keep` of them checked out while idle.

    At most `keep` connections stay open while idle, here and in the pool together:
    one released when the stack is full is closed, not parked in the pool's queue.

    ::

        leases = leases_for(engine, keep=10)
        lease = leases.acquire()   # a Lease: .fairy, .driver, .cursor
        try:
            ...
        finally:
            leases.release(lease)
    """

    def __init__(self, engine: Engine, keep: int = 0):
        self.engine = engine
        self.keep = keep
        # Connections already in autocommit from their connect (cache_engine's AUTOCOMMIT isolation level):
        # calls need not switch it on and back off.
        self.autocommit = getattr(engine.dialect, "_on_connect_isolation_level", None) == "AUTOCOMMIT"
        # psycopg2 statements run PREPAREd (execution.py); only on Engines no one else uses (cache_engine).
        self.prepare = False
        self._prepared_lost = 0
        self._idle: collections.deque = collections.deque()
        self._waiting = 0  # callers blocked in the pool's own checkout; released connections go to them
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<ConnectionLeases keep={self.keep} idle={len(self._idle)}>"

    def acquire(self) -> Lease:
        """An idle connection whose server has not hung up, else one from the pool (waiting up to its timeout)."""
        while True:
            try:
                lease = self._idle.pop()
            except IndexError:
                return Lease(self._from_pool())
            # A readable socket means the server hung up (restart, crash, terminated backend);
            # the pool replaces it, and the loop checks the next.
            if not lease.hung_up():
                return lease
            lease.invalidate()  # also checks it back in

    def prepared_statements_lost(self) -> bool:
        """Counts a connection that lost its prepared statements; True when that turns preparing off."""
        self._prepared_lost += 1
        if self.prepare and self._prepared_lost >= LOST_PREPARED_LIMIT:
            self.prepare = False
            return True
        return False

    def release(self, lease: Lease) -> None:
        """Keep `lease` idle for the next call, or give it back to the pool."""
        if self._waiting or self._closed or not lease.is_valid:
            lease.close()
            return
        if len(self._idle) >= self.keep:
            if self.keep:  # the stack holds `keep` idle connections already: this one is not needed open
                lease.invalidate()
            else:
                lease.close()
            return
        self._idle.append(lease)
        # Announce-then-check on both sides: a caller that began waiting on the pool after the
        # test above gets a connection back; an extra one returned is harmless.
        if self._waiting:
            self.drain(1)

    def lost(self, lease: Lease, error: BaseException) -> None:
        """`lease` found its server gone: the pool replaces it and every connection opened
        before now (they are from the lost server too), the idle ones included."""
        lease._forget_cursor()
        self.engine.pool._invalidate(lease.fairy, error)
        self.drain()

    def drain(self, count: int | None = None) -> None:
        """Give idle connections (all, or `count`) back to the pool."""
        while count is None or count > 0:
            try:
                lease = self._idle.pop()
            except IndexError:
                return
            lease.close()
            count = None if count is None else count - 1

    def close(self) -> None:
        """Return every idle connection, and from now on every released one, to the pool."""
        self._closed = True
        self.drain()

    @contextlib.contextmanager
    def waiting(self):
        """Around a wait in the pool: meanwhile, released connections go to the pool, not the idle stack.

        Announce-then-check with release(): whichever of the two runs second sees the other.
        """
        with self._lock:
            self._waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    def _from_pool(self):
        # raw_connection() lets a refused connection out as the bare driver error; wrap it for translate().
        pool = self.engine.pool  # a new one after dispose(): LeasingQueuePool must find us from it too
        if self.keep and isinstance(pool, LeasingQueuePool):
            _by_pool[pool] = self
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            return self.engine.raw_connection()
        except dbapi_error as error:
            raise sa_exc.DBAPIError.instance(None, None, error, dbapi_error, dialect=self.engine.dialect) from None

    def _forget(self) -> None:
        # In a forked child: the idle connections' sockets belong to the parent; never touch them.
        self._idle = collections.deque()
        self._waiting = 0
        self._lock = threading.Lock()
        if self.keep:
            self.engine.dispose(close=False)


def _forget_in_child() -> None:
    # os.register_at_fork wants a plain function; every Engine's leases forget the parent's connections.
    for leases in list(_registry.values()):
        leases._forget()


os.register_at_fork(after_in_child=_forget_in_child)
