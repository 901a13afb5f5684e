"""Surviving database faults: the failsafe error policy and dead-connection detection.

With `failsafe=True` a cache answers as if every key were missing while the
database is unreachable (reads return the default, writes return False or 0),
so a cache outage slows an application down instead of taking it down. The
first error of a burst is logged, the rest are counted until a call succeeds
again; `on_error` hears about every one of them.
"""
from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from .errors import CacheError, first_line

log = logging.getLogger("fastpgcache")

DATABASE_ERRORS = (CacheError, sa_exc.SQLAlchemyError)
"""What failsafe mode absorbs: the database's faults, never a caller's bad key, value or ttl."""

REMINDER_SECONDS = 60.0
"""During a long outage, say it is still going on at most this often."""


class Failsafe:
    """The error policy of one cache: raise database errors, or (enabled) absorb them.

    ::

        def report(error, operation):
            metrics.increment("cache.errors", tags={"op": operation})

        cache = FastPgCache(url=URL, failsafe=True, on_error=report)
        cache.get("k", "fallback")   # 'fallback' while the database is down
        cache.stats()["errors"]      # database errors this process has seen
    """

    def __init__(self, enabled: bool = False, on_error: Callable[[BaseException, str], object] | None = None):
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be a callable taking (error, operation name), "
                            f"not {type(on_error).__name__}")
        self.enabled = bool(enabled)
        self.on_error = on_error
        self.errors = 0
        self.last_error: str | None = None
        self._burst = 0
        self._burst_started = 0.0
        self._last_logged = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Failsafe {'on' if self.enabled else 'off'} errors={self.errors}>"

    def absorb(self, error: BaseException, operation: str) -> bool:
        """Count `error`; True if the caller should answer with its fallback instead of raising."""
        with self._lock:
            self.errors += 1
            self.last_error = f"{type(error).__name__}: {first_line(error)}"
            if not self.enabled:
                return False
            self._burst += 1
            self._log_burst(operation)
        self._notify(error, operation)
        return True

    @property
    def failing(self) -> bool:
        """Whether a burst of errors is going on (checked after every call, so kept cheap)."""
        return bool(self._burst)

    def succeeded(self) -> None:
        """A call worked: end the current burst of errors, if any, saying so once."""
        if self._burst:
            with self._lock:
                if self._burst:
                    log.warning("fastpgcache: database answering again after %d failed calls in %.1f s",
                                self._burst, time.monotonic() - self._burst_started)
                    self._burst = 0

    def counters(self) -> dict:
        """`errors` seen by this process and the `last_error` (type and first line), for `stats()`."""
        return {"errors": self.errors, "last_error": self.last_error}

    def _log_burst(self, operation: str) -> None:
        # First error of a burst, then a reminder now and then: an outage must not flood the log.
        now = time.monotonic()
        if self._burst == 1:
            self._burst_started = self._last_logged = now
            log.warning("fastpgcache: %s failed (%s); failsafe mode answers as a cache miss until the database "
                        "answers again", operation, self.last_error)
        elif now - self._last_logged >= REMINDER_SECONDS:
            self._last_logged = now
            log.warning("fastpgcache: database still failing: %d calls in %.0f s (last: %s)",
                        self._burst, now - self._burst_started, self.last_error)

    def _notify(self, error: BaseException, operation: str) -> None:
        # A broken callback must not turn failsafe mode back into an outage.
        if self.on_error is None:
            return
        try:
            self.on_error(error, operation)
        except Exception:
            log.exception("fastpgcache: the on_error callback raised; ignoring it")


def discard_dead_connections(engine: Engine) -> Engine:
    """Drop pooled connections the server has closed, when they are checked out, without a round trip.

    An idle connection has nothing to read; if its socket is readable, the
    server restarted, crashed or ended the session, so the pool replaces it
    before any statement is sent. That lets every call after a restart succeed,
    writes included, at the cost of one poll() instead of pre-ping's query::

        engine = discard_dead_connections(create_engine(URL))
    """
    event.listen(engine, "checkout", _check_idle_socket)
    return engine


def _check_idle_socket(dbapi_connection, connection_record, connection_proxy) -> None:
    # Raising DisconnectionError makes the pool discard this connection and check out another.
    if socket_closed(dbapi_connection):
        raise sa_exc.DisconnectionError("the server closed this idle connection")


def socket_closed(dbapi_connection) -> bool:
    """True if an idle driver connection's socket is readable or gone: the server hung up."""
    fileno = getattr(dbapi_connection, "fileno", None)
    if fileno is None:  # a driver that cannot tell: the statement will find out
        return False
    try:
        fd = fileno()
    except Exception:  # fileno() of a closed connection raises
        return True
    # poll() where there is one: select() cannot watch descriptors above 1023.
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])
