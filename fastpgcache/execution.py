"""Running a cache operation's statements: the step protocol, and the driver-level execution.

Each cache method is written once, as a generator of (statement, params,
consume) steps; `operation` turns it into a blocking method, and `AsyncCache`
awaits the very same steps. `Executor` runs one step: the statement compiled
once per dialect and executed on the driver's own cursor, on the caller's
Session or Connection (in its transaction) or on a pooled connection of an
Engine (autocommit, one round trip).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session

from .errors import pool_timeout_error, raise_translated
from .failsafe import DATABASE_ERRORS


def operation(steps=None, *, fallback: Callable[..., Any] | None = None):
    """Make a generator of (statement, params, consume) steps into a blocking method.

    The generator receives each step's consumed result (or has the step's
    exception thrown into it). `fallback(cache, *args, **kwargs)` is the answer
    failsafe mode gives when the database fails (failsafe.py); operations
    without one always raise::

        @operation(fallback=answer(None))
        def ttl(self, key):
            return (yield self._s.ttl, {"k": key}, scalar)
    """
    if steps is None:
        return functools.partial(operation, fallback=fallback)

    @functools.wraps(steps)
    def run(self, *args, **kwargs):
        try:
            result = self._drive(steps(self, *args, **kwargs))
        except DATABASE_ERRORS as error:
            return self._fall_back(run, error, args, kwargs)
        self._failsafe.succeeded()
        return result

    run.steps = steps
    run.fallback = fallback
    return run


def answer(value):
    """A failsafe fallback that ignores the call; containers are copied so callers cannot share one."""
    return lambda cache, *args, **kwargs: copy.copy(value)


class Executor:
    """Runs steps on a bind: the driver cursor of the caller's connection, or of a leased pooled one."""

    # scoped_session: Flask-SQLAlchemy's db.session, so cache writes join the request's transaction.
    _bind_types: tuple = (Session, scoped_session, Connection, Engine)
    _engine_type: type = Engine

    def _drive(self, steps):
        try:
            request = next(steps)
            while True:
                try:
                    result = self._execute(*request)
                except Exception as error:
                    request = steps.throw(error)
                else:
                    request = steps.send(result)
        except StopIteration as done:
            return done.value

    def _fall_back(self, operation, error: BaseException, args, kwargs):
        """Failsafe mode's answer for a failed `operation`, or `error` raised again."""
        if operation.fallback is None or not self._failsafe.absorb(error, operation.steps.__name__):
            raise error
        return operation.fallback(self, *args, **kwargs)

    def _params(self, params: dict) -> dict:
        return {"user_id": self.user_id, **params} if self.user_id else params

    def _execute(self, statement, params: dict, consume: Callable[[Any], Any]):
        """Run one statement and consume its cursor while the connection is still held."""
        params = self._params(params)
        try:
            if isinstance(self.bind, Engine):
                return self._execute_on_engine(statement, params, consume)
            connection = self.bind.connection() if isinstance(self.bind, (Session, scoped_session)) else self.bind
            if not connection.in_transaction():
                connection.begin()  # what SQLAlchemy's autobegin would do: the caller commits or rolls back
            try:
                return self._run(connection.connection, connection.dialect, statement, params, consume)
            except sa_exc.DBAPIError as error:
                if error.connection_invalidated:
                    connection.invalidate()
                raise
        except sa_exc.DBAPIError as error:
            raise_translated(error, self._where)
        except sa_exc.TimeoutError:
            if not isinstance(self.bind, Engine):
                raise
            raise pool_timeout_error(self.bind.pool) from None

    def _execute_on_engine(self, statement, params, consume):
        # Each call is one statement, atomic on its own, so it runs in autocommit: one
        # round trip, no BEGIN/COMMIT (the flag is client-side in psycopg 2 and 3).
        # One retry of a read when the pooled connection turns out dead (server restarted);
        # writes are not retried: the first try may have committed (incr would count twice).
        for attempt in (1, 2):
            pooled = self._leases.acquire()
            driver = pooled.driver_connection
            autocommit = driver.autocommit
            try:
                if not autocommit:
                    driver.autocommit = True
                return self._run(pooled, self.bind.dialect, statement, params, consume)
            except sa_exc.DBAPIError as error:
                if error.connection_invalidated:
                    # As SQLAlchemy's own execution does: every connection pooled before now is from
                    # the lost server too, so the pool replaces them all, not just this one.
                    self._leases.lost(pooled, error)
                    pooled = None
                if attempt == 2 or not error.connection_invalidated or not _is_read(statement):
                    raise
            finally:
                if pooled is not None:
                    if not autocommit and pooled.is_valid:
                        driver.autocommit = autocommit
                    self._leases.release(pooled)

    def _compile(self, statement, dialect):
        """`statement` as this cache sends it on `dialect`, compiled once."""
        compiled = self._compiled.get((statement, dialect))
        if compiled is None:
            compiled = self._compiled[(statement, dialect)] = statement.compile(dialect=dialect)
        return compiled

    def _run(self, pooled, dialect, statement, params, consume):
        # The statement is compiled once per dialect and executed on the driver's own
        # cursor: SQLAlchemy's per-call execution machinery cost 2x the round trip itself
        # on loopback (benchmarks/), while the SQL stays the Core statement.
        compiled = self._compile(statement, dialect)
        values = compiled.construct_params(params)
        cursor = pooled.cursor()
        try:
            cursor.execute(compiled.string, values)
            return consume(cursor)
        except dialect.loaded_dbapi.Error as error:
            gone = dialect.is_disconnect(error, pooled.dbapi_connection, cursor)
            # hide_parameters: cached values (tokens, personal data) never reach an error message.
            raise sa_exc.DBAPIError.instance(compiled.string, values, error, dialect.loaded_dbapi.Error,
                                             hide_parameters=True, connection_invalidated=gone,
                                             dialect=dialect) from None
        finally:
            cursor.close()


def _is_read(statement) -> bool:
    # Reads may be retried on a fresh connection; a write function call may have committed.
    return getattr(statement, "is_select", False) and not getattr(statement, "is_write_call", False)


# -- consuming a cursor -----------------------------------------------------------------------

def nothing(cursor):
    return None


def first_row(cursor):
    return cursor.fetchone()


def all_rows(cursor):
    return cursor.fetchall()


def scalar(cursor):
    row = cursor.fetchone()
    return None if row is None else row[0]


def scalars(cursor):
    return [row[0] for row in cursor.fetchall()]


def returned_any(cursor):
    return cursor.fetchone() is not None


def rowcount(cursor):
    return cursor.rowcount
