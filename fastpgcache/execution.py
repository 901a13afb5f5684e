"""Running a cache operation's statements: the step protocol, and the driver-level execution.

Each cache method is written once, as a generator of (statement, params,
consume) steps; `operation` turns it into a blocking method, and `AsyncCache`
awaits the very same steps. `Executor` runs one step. Unwatched, the statement
(compiled once) runs on the driver's own cursor: on a connection of an Engine
held between calls (leases.py; autocommit, one round trip), or on the caller's
Session or Connection, in its transaction. When someone watches the Engine
(`echo`, the `sqlalchemy.engine` logger at INFO, cursor-execute or error
listeners such as OpenTelemetry's), the step goes through SQLAlchemy's own
execution instead, so they see every cache statement as SQLAlchemy shows it.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import logging
import operator
import re
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, Protocol, TypeVar, cast, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session

from .errors import pool_timeout_error, raise_translated
from .failsafe import DATABASE_ERRORS

if TYPE_CHECKING:
    from .aio import AsyncCache
    from .failsafe import Failsafe
    from .leases import ConnectionLeases

log = logging.getLogger("fastpgcache")

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
Step = tuple  # (statement, params, consume): one statement to run and how to read its cursor
Steps = Generator[Step, Any, R]  # what an operation is written as: its steps, then its answer


class Operation(Protocol[P, R_co]):
    """How type checkers see an operation: a blocking method on `Cache`, an awaited one on `AsyncCache`."""

    @overload
    def __get__(self, instance: None, owner: type) -> Operation[P, R_co]: ...
    @overload
    def __get__(self, instance: AsyncCache, owner: type) -> Callable[P, Awaitable[R_co]]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> Callable[P, R_co]: ...

    steps: Callable[..., Steps[Any]]
    fallback: Callable[..., Any] | None


DECLINED = object()
"""What an operation's `at_once` answers to have the steps run instead: nothing is written by then."""


@overload
def operation(steps: Callable[Concatenate[Any, P], Steps[R]], *, fallback: Callable[..., Any] | None = None,
              at_once: Callable[..., Any] | None = None) -> Operation[P, R]: ...
@overload
def operation(steps: None = None, *, fallback: Callable[..., Any] | None = None,
              at_once: Callable[..., Any] | None = None
              ) -> Callable[[Callable[Concatenate[Any, P], Steps[R]]], Operation[P, R]]: ...


def operation(steps=None, *, fallback=None, at_once=None):
    """Make a generator of (statement, params, consume) steps into a blocking method.

    The generator receives each step's consumed result (or has the step's
    exception thrown into it). `fallback(cache, *args, **kwargs)` is the answer
    failsafe mode gives when the database fails (failsafe.py); operations
    without one always raise::

        @operation(fallback=answer(None))
        def ttl(self, key):
            return (yield self._s.ttl, {"k": key}, scalar)

    `at_once(cache, *args, **kwargs)`, where given, is the operation's common
    case as one plain call on the same executor, tried first: the generators
    cost a set about a twentieth of its time next to raw psycopg2
    (benchmarks/floor_loop.py). It answers DECLINED when the steps must run,
    before it has sent anything or after a statement that changed nothing (a
    refused write). AsyncCache always runs the steps.
    """
    if steps is None:
        return functools.partial(operation, fallback=fallback, at_once=at_once)

    @functools.wraps(steps)
    def run(self, *args, **kwargs):
        # Drives the steps itself: a call less per operation, as AsyncCache's awaited twin does.
        try:
            result = DECLINED if at_once is None else at_once(self, *args, **kwargs)
            if result is DECLINED:
                walk = steps(self, *args, **kwargs)
                try:
                    request = next(walk)
                    while True:
                        try:
                            answer = self._execute(*request)
                        except Exception as error:
                            request = walk.throw(error)
                        else:
                            request = walk.send(answer)
                except StopIteration as done:
                    result = done.value
        except DATABASE_ERRORS as error:
            return self._fall_back(run, error, args, kwargs)
        if self._failsafe.failing:
            self._failsafe.succeeded()
        return result

    return _with_parts(run, steps, fallback)


def _with_parts(run: Callable[..., Any], steps: Callable[..., Any], fallback) -> Operation[Any, Any]:
    # The parts failsafe mode and AsyncCache read back from a method: its steps and its fallback.
    method = cast(Operation[Any, Any], run)
    method.steps, method.fallback = steps, fallback
    return method


def answer(value):
    """A failsafe fallback that ignores the call; containers are copied so callers cannot share one."""
    return lambda cache, *args, **kwargs: copy.copy(value)


class Prepared(NamedTuple):
    """A psycopg2 statement as an SQL-level prepared statement: PREPARE once per connection, then EXECUTE."""

    name: str  # a digest of the statement: one name always means one statement, on any connection
    prepare: str
    execute: str  # positional: psycopg2 parses and looks up each `%(name)s`, 14k of a set's 139k instructions
    names: tuple[str, ...]  # the parameters' names, in the EXECUTE's order
    arguments: Callable[[dict], tuple | None]  # their values, in that order, from a call's params (not values())


class Compiled(NamedTuple):
    """A statement as the driver takes it: its SQL, and how to turn a step's params into the driver's."""

    sql: str
    static: dict | None  # values of the statement's own optional binds, merged under each call's params
    processing: Any  # the SQLAlchemy compiled form when its binds need SQLAlchemy's processing, else None
    order: tuple | None  # names in order, for a driver that takes positional parameters (asyncpg)
    prepared: Prepared | None = None  # psycopg2 only: psycopg 3 and asyncpg prepare on their own

    def values(self, params: dict):
        if self.processing is not None:
            params = self.processing.construct_params(params)
        elif self.static is not None:
            params = {**self.static, **params}
        return params if self.order is None else [params[name] for name in self.order]


def compile_for(statement, dialect) -> Compiled:
    """`statement` compiled for `dialect`, with its parameters prepared once."""
    compiled = statement.compile(dialect=dialect)
    order = tuple(compiled.positiontup) if compiled.positional else None
    if compiled._bind_processors:
        result = Compiled(compiled.string, None, compiled, order)
    else:
        static = {compiled.bind_names[bind]: bind.value for bind in compiled.binds.values() if not bind.required}
        result = Compiled(compiled.string, static or None, None, order)
    prepared = prepared_form(compiled.string) if dialect.driver == "psycopg2" else None
    if prepared is not None and (result.static or result.processing):
        pick = prepared.arguments

        def arguments(params: dict) -> tuple | None:
            # Still straight from a call's params: the statement's own values go in first.
            return pick(result.values(params))

        prepared = prepared._replace(arguments=arguments)
    return result._replace(prepared=prepared)


_PYFORMAT = re.compile(r"%\((\w+)\)s|%%")


def prepared_form(sql: str) -> Prepared | None:
    """psycopg2's `sql` (pyformat) as PREPARE and EXECUTE statements, or None if it cannot be prepared.

    psycopg2 sends every statement as text to be parsed and planned again; a
    prepared one skips both (a get went from 126 to 99 µs on PostgreSQL 15)::

        prepared_form("SELECT v FROM t WHERE k = CAST(%(k)s AS text)").execute
        # 'EXECUTE fastpgcache_...(%s)'
    """
    if "POSTCOMPILE" in sql:  # an expanding IN: its parameter count changes per call
        return None
    names: list[str] = []

    def number(match: re.Match) -> str:
        name = match.group(1)
        if name is None:
            return "%"  # PREPARE runs without parameters, so psycopg2 leaves %% alone: unescape it here
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    body = _PYFORMAT.sub(number, sql)
    name = "fastpgcache_" + hashlib.sha256(body.encode()).hexdigest()[:24]
    arguments = f"({', '.join('%s' for _ in names)})" if names else ""
    return Prepared(name, f"PREPARE {name} AS {body}", f"EXECUTE {name}{arguments}", tuple(names), _in_order(names))


def _in_order(names: list[str]) -> Callable[[dict], tuple | None]:
    # Picks the values out of a params dict in C (itemgetter), which answers a bare value for one name.
    if not names:
        return lambda params: None
    if len(names) == 1:
        only = names[0]
        return lambda params: (params[only],)
    return operator.itemgetter(*names)


def watched(engine: Engine) -> bool:
    """Whether anyone would see statements run on `engine`: its logger, or cursor/error listeners."""
    # _has_events: SQLAlchemy's own cheap flag, set by any listener; only then are the collections looked at.
    if engine._has_events or engine.dialect._has_events:
        if engine.dispatch.before_cursor_execute or engine.dispatch.after_cursor_execute \
                or engine.dialect.dispatch.handle_error:
            return True
    return engine.logger.isEnabledFor(logging.INFO)  # what Engine._should_log_info() asks, a call less


class Executor:
    """Runs steps on a bind: the driver cursor of the caller's connection, or of a leased pooled one."""

    bind: Any  # an Engine, Connection, Session or scoped_session (their async kinds on AsyncCache)
    user_id: str | None
    _failsafe: Failsafe
    _compiled: dict
    _leases: ConnectionLeases | None
    _where: str

    # scoped_session: Flask-SQLAlchemy's db.session, so cache writes join the request's transaction.
    _bind_types: tuple = (Session, scoped_session, Connection, Engine)
    _engine_type: type = Engine

    def _fall_back(self, operation, error: BaseException, args, kwargs):
        """Failsafe mode's answer for a failed `operation`, or `error` raised again."""
        if operation.fallback is None or not self._failsafe.absorb(error, operation.steps.__name__):
            raise error
        return operation.fallback(self, *args, **kwargs)

    def _compiled_for(self, statement, dialect) -> Compiled:
        # Compiled once per (statement, dialect) for this cache.
        key = (statement, dialect)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = compile_for(statement, dialect)
        return compiled

    def _compile(self, statement, dialect):
        """`statement` as this cache sends it on `dialect` (SQLAlchemy's compiled form, for EXPLAIN and tests)."""
        return statement.compile(dialect=dialect)

    def _execute(self, statement, params: dict, consume: Callable[[Any], Any]):
        """Run one statement and consume its cursor while the connection is still held."""
        if self.user_id:
            params = {"user_id": self.user_id, **params}
        try:
            if self._leases is not None:
                return self._execute_on_engine(statement, params, consume)
            return self._execute_in_transaction(statement, params, consume)
        except sa_exc.DBAPIError as error:
            raise_translated(error, self._where)
        except sa_exc.TimeoutError:
            if self._leases is None:
                raise
            raise pool_timeout_error(self.bind.pool) from None

    def _execute_in_transaction(self, statement, params, consume):
        # The caller's Session or Connection: its transaction, begun if need be, as SQLAlchemy's autobegin would.
        connection = self.bind.connection() if isinstance(self.bind, (Session, scoped_session)) else self.bind
        if not connection.in_transaction():
            connection.begin()
        if watched(connection.engine):
            return consume(connection.execute(statement, params))
        fairy = connection.connection
        cursor = fairy.cursor()
        try:
            compiled = self._compiled_for(statement, connection.dialect)
            return self._run(cursor, fairy, connection.dialect, compiled.sql, compiled.values(params), consume)
        except sa_exc.DBAPIError as error:
            if error.connection_invalidated:
                connection.invalidate()
            raise
        finally:
            cursor.close()

    def _execute_on_engine(self, statement, params, consume):
        # Each call is one statement, atomic on its own, so it runs in autocommit: one
        # round trip, no BEGIN/COMMIT (the flag is client-side in psycopg 2 and 3; an Engine
        # made by cache_engine() sets it at connect, one passed in has it set for each call).
        # One retry of a read when the pooled connection turns out dead (server restarted);
        # writes are not retried: the first try may have committed (incr would count twice).
        engine = self.bind
        if watched(engine):
            return self._execute_watched(statement, params, consume)
        dialect = engine.dialect
        compiled = self._compiled.get(statement) or self._compiled_for_engine(statement)
        leases = self._leases
        prepared = compiled.prepared if leases.prepare else None
        for attempt in (1, 2):
            lease = leases.acquire()
            switch = not leases.autocommit and not lease.driver.autocommit
            sql = compiled.sql
            try:
                if switch:
                    lease.driver.autocommit = True
                if prepared is not None and (prepared.name in lease.prepared or
                                             self._prepare(lease, statement, compiled)):
                    sql, values = prepared.execute, prepared.arguments(params)
                else:
                    values = compiled.values(params)
                return self._run(lease.cursor, lease.fairy, dialect, sql, values, consume)
            except sa_exc.DBAPIError as error:
                if error.connection_invalidated:
                    # As SQLAlchemy's own execution does: every connection pooled before now is from
                    # the lost server too, so the pool replaces them all, not just this one.
                    leases.lost(lease, error)
                    lease = None
                elif sql is not compiled.sql and _prepared_statement_lost(error):
                    self._forget_prepared(leases, lease)
                    if attempt == 1:
                        # The EXECUTE failed before anything ran, so even a write runs again: as plain
                        # text, since a pooler might hand the next EXECUTE to yet another connection.
                        prepared = None
                        continue
                if attempt == 2 or not error.connection_invalidated or not _is_read(statement):
                    raise
            finally:
                if lease is not None:
                    if switch and lease.is_valid:
                        lease.driver.autocommit = False
                    leases.release(lease)

    def _prepare(self, lease, statement, compiled: Compiled) -> bool:
        # A statement's first run on a connection: PREPARE it there; False if it runs as text instead.
        prepared = cast(Prepared, compiled.prepared)
        try:
            self._run(lease.cursor, lease.fairy, self.bind.dialect, prepared.prepare, None, nothing)
        except sa_exc.DBAPIError as error:
            if error.connection_invalidated:
                raise
            if _sqlstate(error) != "42P05":  # not "already prepared" (by digest, the same statement)
                # Something PostgreSQL cannot prepare (say, a parameter of unknown type): sent as text from now on.
                log.debug("fastpgcache: running unprepared, PREPARE failed: %s", error.orig)
                self._compiled[statement] = compiled._replace(prepared=None)
                return False
        lease.prepared.add(prepared.name)
        return True

    def _forget_prepared(self, leases: ConnectionLeases, lease) -> None:
        # The server lost the connection's prepared statements (DISCARD ALL, a transaction-mode pooler) or
        # one's result columns changed (a migration): start again; if that keeps happening, stop preparing.
        lease.prepared.clear()
        try:
            lease.cursor.execute("DEALLOCATE ALL")
        except self.bind.dialect.loaded_dbapi.Error:
            pass  # the retry finds out whether the connection still works
        if leases.prepared_statements_lost():
            log.warning("fastpgcache: prepared statements keep vanishing from the server's connections (a "
                        "transaction-mode pooler?); running unprepared from now on")

    def _compiled_for_engine(self, statement) -> Compiled:
        # An Engine's dialect never changes, so its compiled forms are found by statement alone.
        compiled = self._compiled[statement] = compile_for(statement, self.bind.dialect)
        return compiled

    def _execute_watched(self, statement, params, consume):
        # SQLAlchemy's own execution, so echo, logging and every cursor or error listener see the
        # statement (and hide_parameters holds); each call in autocommit, as the fast path.
        with self.bind.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            return consume(connection.execute(statement, params))

    @staticmethod
    def _run(cursor, fairy, dialect, sql: str, values, consume):
        # The compiled statement on the driver's own cursor: SQLAlchemy's per-call execution
        # machinery cost 2x the round trip itself on loopback (benchmarks/).
        try:
            cursor.execute(sql, values)
            return consume(cursor)
        except dialect.loaded_dbapi.Error as error:
            gone = dialect.is_disconnect(error, fairy.dbapi_connection, cursor)
            # hide_parameters: cached values (tokens, personal data) never reach an error message.
            raise sa_exc.DBAPIError.instance(sql, values, error, dialect.loaded_dbapi.Error,
                                             hide_parameters=True, connection_invalidated=gone,
                                             dialect=dialect) from None


def _sqlstate(error: sa_exc.DBAPIError) -> str | None:
    return getattr(error.orig, "pgcode", None)


def _prepared_statement_lost(error: sa_exc.DBAPIError) -> bool:
    # 26000: no such prepared statement; 0A000 with this text: a migration changed its result columns.
    state = _sqlstate(error)
    return state == "26000" or (state == "0A000" and "cached plan must not change result type" in str(error.orig))


def _is_read(statement) -> bool:
    # Reads may be retried on a fresh connection; a write function call may have committed.
    return getattr(statement, "is_select", False) and not statement.get_execution_options().get("fastpgcache_write")


# -- consuming a cursor (a driver cursor, SQLAlchemy's result, or AsyncCache's buffered rows) --------

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
