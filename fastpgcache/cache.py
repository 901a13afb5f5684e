"""`Cache`: the Redis-style facade on SQLAlchemy Core. All of the cache's SQL is here."""
from __future__ import annotations

import copy
import datetime as _dt
import functools
import hashlib
import math
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

from sqlalchemy import (
    BigInteger,
    Float,
    LargeBinary,
    SmallInteger,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session

from . import codec
from .errors import (CacheTimeoutError, check_positive_int, pool_timeout_error, raise_translated, sqlstate,
                     translate)
from .expiry import NOTHING_DUE, ExpiryOnWrite
from .failsafe import DATABASE_ERRORS, Failsafe
from .leases import leases_for
from .model import DEFAULT_SCHEMA, DEFAULT_TABLE, cache_table

MAX_KEY_BYTES = 1024
"""Longest key, in UTF-8 bytes; keeps (user_id, key) well inside a btree index entry."""

MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
"""Longest ttl accepted (100 years)."""

MAX_PATTERN_CHARS = 4 * MAX_KEY_BYTES
"""Longest keys() pattern; anything longer could not match a key of at most MAX_KEY_BYTES."""

_MISSING = object()


def normalize_key(key) -> str:
    """Validate a key the way redis-py converts one: str, bytes (UTF-8), int or float."""
    if isinstance(key, str):
        text_key = key
    elif isinstance(key, (bytes, bytearray, memoryview)):
        try:
            text_key = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("bytes keys must be valid UTF-8") from None
    elif isinstance(key, (int, float)) and not isinstance(key, bool):
        text_key = repr(key)
    else:
        raise TypeError(f"invalid key type {type(key).__name__}: use str, bytes, int or float")
    if "\x00" in text_key:
        raise ValueError("keys cannot contain NUL characters (PostgreSQL text cannot store them)")
    try:
        size = len(text_key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("keys must be valid Unicode text (this one holds a lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise ValueError(f"key is {size} bytes; the limit is {MAX_KEY_BYTES} bytes of UTF-8 (hash longer keys)")
    if size == 0:
        raise ValueError("keys cannot be empty")
    return text_key


def normalize_ttl(ttl) -> float | None:
    """Seconds as a positive float, or None for no expiry; raises before any SQL runs."""
    if ttl is None:
        return None
    if isinstance(ttl, _dt.timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise TypeError(f"ttl must be seconds (int or float), a timedelta, or None; got {type(ttl).__name__}")
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r} (use None for no expiry)")
    if seconds > MAX_TTL_SECONDS:
        raise ValueError(f"ttl {ttl!r} is longer than the {MAX_TTL_SECONDS} s (100 year) limit")
    return seconds


def glob_to_regex(pattern: str) -> str:
    """Translate a Redis glob (`*`, `?`, `[a-z]`, `[^x]`, `\\x`) into an anchored PostgreSQL regex."""
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif ch == "*":
            out.append(".*")
            i += 1
        elif ch == "?":
            out.append(".")
            i += 1
        elif ch == "[" and "]" in pattern[i + 1:]:
            bracket, i = _glob_class(pattern, i + 1)
            out.append(bracket)
        else:
            out.append(re.escape(ch))
            i += 1
    out.append("$")
    return "".join(out)


def _glob_class(pattern: str, i: int) -> tuple[str, int]:
    # A [...] set, as Redis reads it: ^ negates, \\ escapes, a-z is a range; returns (regex, next index).
    negate = pattern[i] == "^"
    i += negate
    members = []
    while i < len(pattern) and pattern[i] != "]":
        if pattern[i] == "\\" and i + 1 < len(pattern):
            i += 1  # an escaped character is itself; only the set's own metacharacters keep a backslash
            members.append("\\" + pattern[i] if pattern[i] in "\\]^[-" else pattern[i])
        elif pattern[i] in "[^\\":
            members.append("\\" + pattern[i])
        else:
            members.append(pattern[i])
        i += 1
    if not members:  # Redis: "[]" matches nothing, "[^]" any one character
        return ("." if negate else "(?!)"), i + 1
    return f"[{'^' if negate else ''}{''.join(members)}]", i + 1


class _Statements:
    """Every statement of one cache table, built once per (table, user) and reused."""

    def __init__(self, table_name: str, user_id: str | None):
        t = self.table = cache_table(table_name)
        # current_user is a `name`, collated "C"; compared as such to the "default"-collated user_id it
        # cannot use the primary key index, and every get became a sequential scan (3.5 ms at 50,000 rows).
        self.user = (bindparam("user_id", user_id, type_=Text) if user_id
                     else cast(func.current_user(), Text).collate("default"))
        mine = t.c.user_id == self.user
        live = or_(t.c.expires_at.is_(None), t.c.expires_at > func.now())
        expired = and_(t.c.expires_at.is_not(None), t.c.expires_at <= func.now())
        key = t.c.key == bindparam("k", type_=Text)
        keys = t.c.key == any_(_array_param("ks", Text))
        expiry = func.now() + bindparam("ttl", type_=Float) * literal_column("interval '1 second'")

        self.get = select(t.c.value, t.c.flags).where(mine, key, live)
        self.get_many = select(t.c.key, t.c.value, t.c.flags).where(mine, keys, live)
        self.exists = select(literal(1)).where(mine, key, live)
        self.ttl = select(
            case((t.c.expires_at.is_(None), -1),
                 else_=cast(func.ceil(func.extract("epoch", t.c.expires_at - func.now())), BigInteger))
        ).where(mine, key, live)

        row = {"key": bindparam("k", type_=Text), "value": bindparam("val", type_=LargeBinary),
               "flags": bindparam("flg", type_=SmallInteger), "expires_at": expiry}
        if user_id:
            row["user_id"] = self.user
        upsert = insert(t).values(**row)
        replace = {"value": upsert.excluded.value, "flags": upsert.excluded.flags,
                   "expires_at": upsert.excluded.expires_at, "created_at": func.now()}
        pk = [t.c.user_id, t.c.key]
        self.set = upsert.on_conflict_do_update(index_elements=pk, set_=replace)
        self.set_nx = upsert.on_conflict_do_update(index_elements=pk, set_=replace, where=expired).returning(
            literal(1))
        self.set_xx = (update(t).where(mine, key, live)
                       .values(value=row["value"], flags=row["flags"], expires_at=expiry, created_at=func.now())
                       .returning(literal(1)))

        rows = func.unnest(_array_param("ks", Text), _array_param("vals", LargeBinary),
                           _array_param("flgs", SmallInteger)
                           ).table_valued("key", "value", "flags").render_derived(name="batch")
        columns = [rows.c.key, rows.c.value, rows.c.flags, expiry] + ([self.user] if user_id else [])
        many = insert(t).from_select(
            ["key", "value", "flags", "expires_at"] + (["user_id"] if user_id else []), select(*columns))
        self.set_many = many.on_conflict_do_update(
            index_elements=pk, set_={"value": many.excluded.value, "flags": many.excluded.flags,
                                     "expires_at": many.excluded.expires_at, "created_at": func.now()})

        self.delete = delete(t).where(mine, key).returning(live)
        self.delete_many = delete(t).where(mine, keys).returning(live)
        self.expire = update(t).where(mine, key, live).values(expires_at=expiry).returning(literal(1))
        self.persist = (update(t).where(mine, key, live, t.c.expires_at.is_not(None))
                        .values(expires_at=None).returning(literal(1)))

        amount = bindparam("amount", type_=BigInteger)
        counter = insert(t).values(**{**row, "value": func.convert_to(cast(amount, Text), "UTF8"),
                                      "flags": literal(codec.JSON, SmallInteger), "expires_at": None})
        current = case((expired, literal(0, BigInteger)),
                       else_=cast(func.convert_from(t.c.value, "UTF8"), BigInteger))
        self.incr = counter.on_conflict_do_update(
            index_elements=pk,
            set_={"value": func.convert_to(cast(current + amount, Text), "UTF8"),
                  "flags": case((expired, literal(codec.JSON, SmallInteger)), else_=t.c.flags),
                  "expires_at": case((expired, None), else_=t.c.expires_at)},
            where=or_(expired, t.c.flags.between(codec.TEXT, codec.JSON)),
        ).returning(func.convert_from(t.c.value, "UTF8"))
        # incr(create=False), as Django's incr: no row back means missing; NULL back means not a number
        # (only a stored int counts there: Django's own backends refuse "5" + 1).
        numeric = t.c.flags == codec.JSON
        added = func.convert_to(cast(cast(func.convert_from(t.c.value, "UTF8"), BigInteger) + amount, Text), "UTF8")
        self.incr_existing = (update(t).where(mine, key, live)
                              .values(value=case((numeric, added), else_=t.c.value))
                              .returning(case((numeric, func.convert_from(t.c.value, "UTF8")))))

        matches = t.c.key.op("~")(bindparam("regex", type_=Text))
        self.keys = select(t.c.key).where(mine, live, matches).order_by(t.c.key)
        self.scan = (select(t.c.key).where(mine, live, matches, t.c.key > bindparam("after", type_=Text))
                     .order_by(t.c.key).limit(bindparam("batch")))
        self.clear = delete(t).where(mine)
        self.clear_matching = delete(t).where(mine, matches)
        batch = bindparam("batch")
        ctid = literal_column("ctid")
        # Bounded batches found through the expires_at index; ctid avoids a second key lookup.
        self.cleanup_mine = delete(t).where(ctid.in_(select(ctid).select_from(t).where(mine, expired).limit(batch)))
        self.cleanup_all = delete(t).where(ctid.in_(select(ctid).select_from(t).where(expired).limit(batch)))
        self.count = select(func.count().filter(live), func.count().filter(expired)).where(mine)
        # Expiry on write (expiry.py): SKIP LOCKED so concurrent writers never queue on the same dead rows.
        self.expire_batch = delete(t).where(ctid.in_(
            select(ctid).select_from(t).where(mine, expired).limit(batch).with_for_update(skip_locked=True)))
        # max_entries: everything older than this role's newest `keep` entries (FIFO, as Solid Cache).
        self.trim = delete(t).where(ctid.in_(
            select(ctid).select_from(t).where(mine).order_by(t.c.created_at.desc())
            .offset(bindparam("keep")).limit(batch)))
        # get_or_set's stampede lock: one transaction-level advisory lock per (user, table, key).
        lock_id = func.hashtextextended(func.concat_ws("/", self.user, table_name, bindparam("k", type_=Text)), 0)
        self.try_lock = select(func.pg_try_advisory_xact_lock(lock_id))
        self.wait_lock = select(func.pg_advisory_xact_lock_shared(lock_id))
        # Waiting for the lock is bounded by the caller's wait, whatever the connection's timeouts say.
        self.lock_wait = select(func.set_config("lock_timeout", bindparam("lock_ms", type_=Text), True),
                                func.set_config("statement_timeout", bindparam("statement_ms", type_=Text), True))
        # The negative-lookup guard's warm-up (guard.py): every row present, expired ones
        # too, since an upsert reviving one fires no insert notification.
        self.key_page = (select(t.c.key).where(mine, t.c.key > bindparam("after", type_=Text))
                         .order_by(t.c.key).limit(bindparam("batch")))
        self.whoami = select(self.user)


def _array_param(name: str, item_type) -> Any:
    # A batch travels as one array literal (_text_array and co.): psycopg2 quotes one string instead of
    # adapting every item, and the server parses one value instead of an ARRAY[...] of constants.
    # Client side, 100 keys took 12 µs instead of 45, and 1,000 rows of set_many 0.5 ms instead of 2.1.
    return cast(bindparam(name, type_=Text), ARRAY(item_type))


def _text_array(items: Iterable[str]) -> str:
    """Strings as a PostgreSQL array literal: each quoted, with its backslashes and quotes escaped."""
    return "{" + ",".join('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items) + "}"


def _bytea_array(items: Iterable[bytes]) -> str:
    """Byte strings as a bytea[] literal, in bytea's hex form."""
    return "{" + ",".join('"\\\\x' + item.hex() + '"' for item in items) + "}"


def _int_array(items: Iterable[int]) -> str:
    """Integers as an array literal (the flags of a set_many batch)."""
    return "{" + ",".join(map(str, items)) + "}"


@functools.lru_cache(maxsize=64)
def _statements(table_name: str, user_id: str | None) -> _Statements:
    return _Statements(table_name, user_id)


# The guard's listener runs these; LISTEN takes an identifier, so it cannot be a bound parameter.
_NOTIFY = select(func.pg_notify(bindparam("channel", type_=Text), bindparam("payload", type_=Text)))
# 'A' (ENABLE ALWAYS, as migration 0002 sets it): a trigger that skips replica-mode writers could hide their keys.
_HAS_TRIGGER = text(
    "SELECT EXISTS (SELECT 1 FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid"
    " JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = :schema AND c.relname = :table AND g.tgname = :trigger AND g.tgenabled = 'A')")


def listen_sql(channel: str) -> str:
    """`LISTEN` for a channel name made of [a-z0-9_] (see guard.notify_channel)."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", channel):
        raise ValueError(f"invalid channel name {channel!r}")
    return f"LISTEN {channel}"


def operation(steps=None, *, fallback: Callable[..., Any] | None = None):
    """Make a generator of (statement, params, consume) steps into a blocking method.

    Each cache method is written once as such a generator: `Cache` runs its
    steps on a blocking connection, `AsyncCache` awaits them, so the statements,
    validation and decoding exist in one copy. The generator receives each
    step's consumed result (or has the step's exception thrown into it).

    `fallback(cache, *args, **kwargs)` is the answer failsafe mode gives when
    the database fails (failsafe.py); operations without one always raise.
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


def _answer(value):
    # A failsafe fallback that ignores the call; containers are copied so callers cannot share one.
    return lambda cache, *args, **kwargs: copy.copy(value)


def _default_argument(cache, key, default=None, **options):
    # get()'s failsafe answer: the caller's own default, exactly as for a miss.
    return default


def _stats_without_database(cache):
    # stats() while the database fails: no counts from SQL, this process's counters still.
    return {"entries": None, "expired": None, **cache._counters()}


class Cache:
    """A Redis-style cache on one PostgreSQL table, run on a SQLAlchemy bind.

    Given a `Session` or `Connection`, every statement runs on it and the caller
    commits or rolls back: a `set()` rolled back with the caller's transaction
    never happened. Given an `Engine`, each call is its own short transaction::

        from sqlalchemy import create_engine
        from fastpgcache import Cache

        cache = Cache(create_engine("postgresql+psycopg2://app@localhost/app"))
        cache.set("user:1", {"name": "Alice"}, ttl=3600)
        cache.get("user:1")          # {'name': 'Alice'}
        cache.ttl("user:1")          # 3600

    `failsafe=True` (Engine binds only) turns database errors into cache misses
    (reads return the default, writes False, 0, or None for an unknown count), logged once per burst and passed to
    `on_error(error, operation_name)`. Every `expire_every` writes (50; None
    turns it off) a write also deletes a bounded batch of expired rows, and
    with `max_entries` this role's oldest entries past the cap (expiry.py).
    """

    # scoped_session: Flask-SQLAlchemy's db.session, so cache writes join the request's transaction.
    _bind_types: tuple = (Session, scoped_session, Connection, Engine)
    _engine_type: type = Engine

    def __init__(self, bind, *, schema: str | None = None, table: str | None = None,
                 user_id: str | None = None, pickle: bool = False, guard=None, failsafe: bool = False,
                 on_error: Callable[[BaseException, str], Any] | None = None,
                 expire_every: int | None = 50, max_entries: int | None = None):
        if not isinstance(bind, self._bind_types):
            names = ", ".join(kind.__name__ for kind in self._bind_types[:-1]) + f" or {self._bind_types[-1].__name__}"
            raise TypeError(f"bind must be a SQLAlchemy {names}, not {type(bind).__name__}")
        if user_id is not None and (not isinstance(user_id, str) or not user_id or "\x00" in user_id):
            raise ValueError("user_id must be a non-empty role name, or None for the connected role")
        if failsafe and not isinstance(bind, self._engine_type):
            raise ValueError("failsafe=True needs an Engine: on a Session or Connection a failed statement aborts "
                             "your transaction, which no fallback answer can hide")
        self.bind = bind
        self.schema = schema or DEFAULT_SCHEMA
        self.table = table or DEFAULT_TABLE
        self.user_id = user_id
        self.pickle = pickle
        # A NegativeLookupGuard (guard.py) answering "definitely absent" without SQL, or None.
        self.guard = guard
        self._lookups = {"hits": 0, "misses": 0, "guard_skips": 0}
        # Database errors: raised, or (failsafe) logged once per burst and answered as a miss.
        self._failsafe = Failsafe(failsafe, on_error)
        # Expiry on write and max_entries trimming: bounded batches, so no cron is needed.
        self._expiry = ExpiryOnWrite(expire_every, max_entries)
        self._s = _statements(self.table, user_id)
        self._where = f"{self.schema}.{self.table}"
        self._compiled = {}
        # Engine binds: the Engine's connections, kept idle between calls where the library owns it (leases.py).
        self._leases = leases_for(bind) if isinstance(bind, Engine) else None

    def __repr__(self) -> str:
        user = f" user {self.user_id}" if self.user_id else ""
        return f"<{type(self).__name__} {self._where} on {type(self.bind).__name__}{user}>"

    # -- running steps -----------------------------------------------------------------

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
                if attempt == 2 or not error.connection_invalidated or not statement.is_select:
                    raise
            finally:
                if pooled is not None:
                    if not autocommit and pooled.is_valid:
                        driver.autocommit = autocommit
                    self._leases.release(pooled)

    def _compile(self, statement, dialect):
        """`statement` as this cache sends it on `dialect`: its schema rendered in, compiled once."""
        compiled = self._compiled.get((statement, dialect))
        if compiled is None:
            compiled = self._compiled[(statement, dialect)] = statement.compile(
                dialect=dialect, schema_translate_map={None: self.schema}, render_schema_translate=True)
        return compiled

    def _run(self, pooled, dialect, statement, params, consume):
        # The statement is compiled once per dialect and executed on the driver's own
        # cursor: SQLAlchemy's per-call execution machinery cost 2x the round trip itself
        # on loopback (benchmarks/), while the SQL stays the Core statement above.
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

    def _serialize(self, value) -> tuple[int, bytes]:
        return codec.serialize(value, allow_pickle=self.pickle)

    def _decode(self, flags: int, value: bytes, parse_json: bool = True):
        return codec.deserialize(flags, value, parse_json=parse_json, allow_pickle=self.pickle)

    def _guard_skips(self, key: str) -> bool:
        # The guard's "definitely absent" saves the round trip; it never says so for a present key.
        if self.guard is not None and self.guard.definitely_absent(key):
            self._lookups["guard_skips"] += 1
            return True
        return False

    def _count_lookup(self, found: bool) -> None:
        self._lookups["hits" if found else "misses"] += 1

    def _remember(self, keys) -> None:
        # Written keys enter the guard before the call returns: this process never misses its own write.
        if self.guard is not None:
            self.guard.remember(keys)

    # -- strings ---------------------------------------------------------------------

    @operation(fallback=_answer(False))
    def set(self, key, value, ttl=None, *, nx: bool = False, xx: bool = False) -> bool:
        """Store `value` under `key`, replacing any value and ttl; like Redis SET.

        `nx=True` stores only if the key is absent (or expired), `xx=True` only if
        it is present. Returns True if the value was stored::

            cache.set("lock", "me", ttl=30, nx=True)   # True the first time, then False
        """
        if nx and xx:
            raise ValueError("nx and xx are mutually exclusive")
        flags, data = self._serialize(value)
        params = {"k": normalize_key(key), "val": data, "flg": flags, "ttl": normalize_ttl(ttl)}
        if nx:
            stored = yield self._s.set_nx, params, _returned_any
        elif xx:
            stored = yield self._s.set_xx, params, _returned_any
        else:
            yield self._s.set, params, _nothing
            stored = True
        if stored:
            self._remember([params["k"]])
            yield from self._expire_on_write(1)
        return stored

    @operation(fallback=_default_argument)
    def get(self, key, default=None, *, parse_json: bool = True):
        """The value stored under `key`, or `default` when it is missing or expired.

        `parse_json=False` returns a JSON value (dict, list, number) as its text::

            cache.get("user:1", parse_json=False)   # '{"name":"Alice"}'
        """
        key = normalize_key(key)
        if self._guard_skips(key):
            return default
        row = yield self._s.get, {"k": key}, _first_row
        self._count_lookup(row is not None)
        if row is None:
            return default
        value, flags = row
        return self._decode(flags, value, parse_json)

    @operation(fallback=_answer(False))
    def delete(self, key) -> bool:
        """Remove `key`; True if a live value was removed."""
        return any((yield self._s.delete, {"k": normalize_key(key)}, _scalars))

    @operation(fallback=_answer(False))
    def exists(self, key) -> bool:
        """True if `key` holds a value that has not expired."""
        key = normalize_key(key)
        if self._guard_skips(key):
            return False
        found = yield self._s.exists, {"k": key}, _returned_any
        self._count_lookup(found)
        return found

    @operation(fallback=_answer(-2))
    def ttl(self, key) -> int:
        """Seconds until `key` expires, rounded up; -1 if it never expires, -2 if missing."""
        seconds = yield self._s.ttl, {"k": normalize_key(key)}, _scalar
        return -2 if seconds is None else int(seconds)

    @operation(fallback=_answer(False))
    def expire(self, key, ttl) -> bool:
        """Give `key` a new ttl (seconds or timedelta); False if the key is missing."""
        params = {"k": normalize_key(key), "ttl": normalize_ttl(ttl)}
        if params["ttl"] is None:
            raise ValueError("expire() needs a ttl; use persist() to remove one")
        return (yield self._s.expire, params, _returned_any)

    @operation(fallback=_answer(False))
    def persist(self, key) -> bool:
        """Remove the ttl of `key`; False if the key is missing or had no ttl."""
        return (yield self._s.persist, {"k": normalize_key(key)}, _returned_any)

    @operation(fallback=_answer(None))
    def incr(self, key, amount: int = 1, *, create: bool = True) -> int | None:
        """Add `amount` to the integer at `key` in one atomic statement; a missing key starts at 0.

        The ttl is kept. Raises ValueError if the stored value is not an integer.
        `create=False` leaves a missing key missing and returns None (Django's incr)::

            cache.incr("hits")        # 1
            cache.incr("hits", 10)    # 11
        """
        _check_amount(amount)
        key = normalize_key(key)
        try:
            statement = self._s.incr if create else self._s.incr_existing
            result = yield statement, {"k": key, "amount": amount}, _scalars
        except sa_exc.DBAPIError as error:
            state = sqlstate(error)
            if state == "22003":
                raise ValueError(f"incrementing {key!r} by {amount} overflows a 64-bit integer") from None
            if state == "22P02":
                raise ValueError(f"the value at {key!r} is not an integer") from None
            raise
        if not result and not create:
            return None
        if not result or result[0] is None:
            raise ValueError(f"the value at {key!r} is not an integer")
        self._remember([key])
        yield from self._expire_on_write(1)
        return int(result[0])

    def decr(self, key, amount: int = 1, *, create: bool = True) -> int | None:
        """Subtract `amount` from the integer at `key`; see `incr`."""
        return self.incr(key, _negate(amount), create=create)

    # -- batches -----------------------------------------------------------------------

    @operation(fallback=_answer(0))
    def set_many(self, mapping: Mapping, ttl=None) -> int:
        """Store every item of `mapping` in one statement (one round trip); returns the count.

        The batch is all-or-nothing, and one ttl applies to all of it::

            cache.set_many({"a": 1, "b": [2, 3]}, ttl=60)   # 2
        """
        if not isinstance(mapping, Mapping):
            raise TypeError(f"set_many() takes a mapping of key to value, not {type(mapping).__name__}")
        seconds = normalize_ttl(ttl)
        rows = {normalize_key(key): self._serialize(value) for key, value in mapping.items()}
        if not rows:
            return 0
        params = {"ks": _text_array(rows), "vals": _bytea_array(data for _, data in rows.values()),
                  "flgs": _int_array(flags for flags, _ in rows.values()), "ttl": seconds}
        yield self._s.set_many, params, _nothing
        self._remember(rows)
        yield from self._expire_on_write(len(rows))
        return len(rows)

    @operation(fallback=_answer({}))
    def get_many(self, keys: Iterable, *, parse_json: bool = True) -> dict:
        """The live values of `keys` in one round trip; missing keys are absent from the dict::

            cache.get_many(["a", "b", "nope"])   # {'a': 1, 'b': [2, 3]}
        """
        wanted = [key for key in _key_list(keys) if not self._guard_skips(key)]
        if not wanted:
            return {}
        rows = yield self._s.get_many, {"ks": _text_array(wanted)}, _all_rows
        self._lookups["hits"] += len(rows)
        self._lookups["misses"] += len(wanted) - len(rows)
        return {key: self._decode(flags, value, parse_json) for key, value, flags in rows}

    @operation(fallback=_answer(None))
    def delete_many(self, keys: Iterable) -> int:
        """Remove `keys` in one statement; returns how many live values were removed."""
        wanted = _key_list(keys)
        if not wanted:
            return 0
        return sum((yield self._s.delete_many, {"ks": _text_array(wanted)}, _scalars))

    # -- keyspace ----------------------------------------------------------------------

    @operation(fallback=_answer([]))
    def keys(self, pattern: str = "*") -> list[str]:
        """Live keys matching a Redis glob pattern, sorted: `keys("user:*")`.

        `*`, `?`, `[abc]`, `[^a]`, `[a-z]` and `\\` escapes work as in Redis; `%`
        and `_` are ordinary characters.
        """
        return (yield self._s.keys, {"regex": _pattern(pattern)}, _scalars)

    @operation(fallback=_answer([]))
    def _scan_batch(self, regex: str, after: str, batch_size: int) -> list[str]:
        # One page of scan_iter: keyset pagination, so pages stay cheap however deep.
        return (yield self._s.scan, {"regex": regex, "after": after, "batch": batch_size}, _scalars)

    def scan_iter(self, pattern: str = "*", batch_size: int = 1000) -> Iterator[str]:
        """Iterate over matching live keys, fetching `batch_size` at a time, in key order."""
        regex, after = _pattern(pattern), ""
        check_positive_int("batch_size", batch_size)
        while True:
            batch = self._scan_batch(regex, after, batch_size)
            yield from batch
            if len(batch) < batch_size:
                return
            after = batch[-1]

    @operation(fallback=_answer(None))
    def clear(self, pattern: str | None = None) -> int:
        """Remove every entry of this user, or those whose key matches a glob; returns how many.

        One statement either way::

            cache.clear("session:*")   # this role's session entries, live or expired
        """
        if pattern is None:
            return (yield self._s.clear, {}, _rowcount)
        return (yield self._s.clear_matching, {"regex": _pattern(pattern)}, _rowcount)

    @operation(fallback=_answer(None))
    def cleanup(self, batch_size: int = 1000, *, all_users: bool = False) -> int:
        """Delete expired rows in batches of `batch_size`; returns how many were removed.

        Each batch is its own statement, so no single DELETE holds every row.
        `all_users=True` (for the table owner, exempt from row-level security)
        cleans every role's rows.
        """
        check_positive_int("batch_size", batch_size)
        statement = self._s.cleanup_all if all_users else self._s.cleanup_mine
        total = 0
        while True:
            removed = yield statement, {"batch": batch_size}, _rowcount
            total += removed
            if removed < batch_size:
                return total

    @operation(fallback=_stats_without_database)
    def stats(self) -> dict:
        """This user's live entries and expired rows not yet removed (from SQL), and this
        object's lookups: hits, misses and guard_skips (answered by the guard without SQL),
        database `errors` and the `last_error` (failsafe.py), and rows it removed on
        write: `expired_on_write` and `trimmed` past max_entries (expiry.py)::

            cache.stats()   # {'entries': 3, 'expired': 0, 'hits': 10, 'misses': 2, 'guard_skips': 40, 'guard': 'trusted',
                            #  'errors': 0, 'last_error': None, 'expired_on_write': 0, 'trimmed': 0}
        """
        live, expired = yield self._s.count, {}, _first_row
        return {"entries": live, "expired": expired, **self._counters()}

    def _counters(self) -> dict:
        # What this object counted itself, so stats() can report it even while the database is down.
        guard = self.guard.state if self.guard is not None else "off"
        return {**self._lookups, "guard": guard, **self._failsafe.counters(), **self._expiry.counters()}

    def _expire_on_write(self, writes: int):
        # Steps a write adds every N writes (expiry.py); their failure never fails the write itself.
        if not isinstance(self.bind, self._engine_type):
            return  # in the caller's transaction a failed batch would abort it; engine calls clean up for all
        due = self._expiry.due(writes)
        if due is NOTHING_DUE:
            return
        expired = trimmed = 0
        try:
            if due.expire:
                expired = yield self._s.expire_batch, {"batch": due.expire}, _rowcount
            if due.trim:
                trimmed = yield self._s.trim, {"keep": self._expiry.max_entries, "batch": due.trim}, _rowcount
        except DATABASE_ERRORS as error:
            self._expiry.failed(error)
        self._expiry.removed(expired, trimmed)

    # -- for the negative-lookup guard (guard.py) ----------------------------------------

    @operation
    def _key_page(self, after: str, batch_size: int) -> list[str]:
        # One page of the guard's warm-up: keyset pagination over the primary key.
        return (yield self._s.key_page, {"after": after, "batch": batch_size}, _scalars)

    @operation
    def _current_user(self) -> str:
        # The user_id this cache's rows carry, which the guard's hashes include.
        return (yield self._s.whoami, {}, _scalar)

    @operation
    def _has_notify_trigger(self, trigger: str) -> bool:
        # Migration 0002's trigger: without it other processes' inserts would go unnoticed.
        params = {"schema": self.schema, "table": self.table, "trigger": trigger}
        return bool((yield _HAS_TRIGGER, params, _scalar))

    @operation
    def _notify(self, channel: str, payload: str) -> None:
        # The guard's probe that notifications really arrive.
        yield _NOTIFY, {"channel": channel, "payload": payload}, _nothing

    # -- helpers for callers ----------------------------------------------------------

    def get_or_set(self, key, fn: Callable[[], Any], ttl=None, *, lock: bool = True, wait: float = 5.0):
        """Return the cached value of `key`, computing and storing `fn()` on a miss::

            profile = cache.get_or_set(f"profile:{uid}", lambda: load_profile(uid), ttl=300)

        With `lock=True` a stampede computes once: the first caller to miss runs
        `fn` holding a transaction-level advisory lock on (user, key); the others
        wait up to `wait` seconds for its commit and return what it stored (past
        `wait`, or if `fn` raised, they compute it themselves). This needs an
        Engine bind: on a Session or Connection the lock would last until the
        caller commits, so it is skipped.
        """
        normalize_ttl(ttl)
        _check_wait(wait)
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        if lock and isinstance(self.bind, self._engine_type):
            return self._fill_locked(key, fn, ttl, wait)
        return self._fill(key, fn, ttl)

    def _fill(self, key, fn, ttl):
        # The plain miss path: compute, store, return.
        value = fn()
        self.set(key, value, ttl)
        return value

    def _fill_locked(self, key, fn, ttl, wait):
        # The first caller to miss computes under the key's advisory lock; the rest wait for its commit, then read.
        connection = self._lock_connection()
        if connection is not None:
            with connection, connection.begin():
                twin = self._bound_to(connection)
                if twin._lock_turn(key, wait):
                    value = twin.get(key, _MISSING)  # stored while we waited, or just before we locked
                    if value is _MISSING:
                        value = twin._fill(key, fn, ttl)
                    self._remember([normalize_key(key)])
                    return value
        return self._fill(key, fn, ttl)

    def _lock_connection(self):
        # A pooled connection of its own for the lock's transaction (READ COMMITTED, so waiters see the commit).
        try:
            return self.bind.connect().execution_options(isolation_level="READ COMMITTED")
        except (sa_exc.DBAPIError, sa_exc.TimeoutError) as error:
            self._absorb_connect_error(error)
            return None

    def _absorb_connect_error(self, error) -> None:
        """Failsafe's answer to a connection get_or_set could not get: absorb it, or raise it as a cache error."""
        problem = pool_timeout_error(self.bind.pool) if isinstance(error, sa_exc.TimeoutError) else \
            translate(error, self._where)
        if not self._failsafe.absorb(problem, "get_or_set"):
            raise problem from (None if problem is error else error)

    def _bound_to(self, connection) -> "Cache":
        # This cache on one connection, so the lock, the re-read and the store share one transaction. Its
        # reads skip the guard: a waiter wakes at the holder's commit, maybe before the guard hears of it.
        twin = copy.copy(self)
        twin.bind, twin.guard = connection, None
        return twin

    @operation(fallback=_answer(False))
    def _lock_turn(self, key, wait: float) -> bool:
        # get_or_set: take the key's lock if free, else wait up to `wait` s for its holder; False if that timed out.
        params = {"k": normalize_key(key)}
        if (yield self._s.try_lock, params, _scalar):
            return True
        milliseconds = max(1, round(wait * 1000))
        limits = {"lock_ms": str(milliseconds), "statement_ms": str(milliseconds + 1000)}
        yield self._s.lock_wait, limits, _nothing
        try:
            yield self._s.wait_lock, params, _nothing
        except CacheTimeoutError:
            return False
        return True

    def cached(self, ttl=None, key: str | Callable[..., str] | None = None, *, lock: bool = True):
        """Decorator caching a function's result per arguments::

            @cache.cached(ttl=60)
            def report(day): ...

        `key` is a fixed key, or a function of the call's arguments returning one;
        by default the key is the function's name and a hash of its arguments.
        `lock` protects against stampedes as in `get_or_set`.
        """
        normalize_ttl(ttl)

        def decorate(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                cache_key = _call_key(fn, key, args, kwargs)
                return self.get_or_set(cache_key, lambda: fn(*args, **kwargs), ttl, lock=lock)

            return wrapper

        return decorate


def _call_key(fn, key, args, kwargs) -> str:
    # The key a cached() call is stored under (shared with the async decorator).
    if callable(key):
        return key(*args, **kwargs)
    if key is not None:
        return key
    digest = hashlib.sha256(repr((args, sorted(kwargs.items()))).encode()).hexdigest()[:32]
    return f"cached:{fn.__module__}.{fn.__qualname__}:{digest}"


def _check_wait(wait) -> None:
    # get_or_set's lock wait, checked before any SQL (shared with AsyncCache).
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 < wait <= 3600:
        raise ValueError(f"wait must be a number of seconds in (0, 3600], got {wait!r}")


def _check_amount(amount) -> None:
    # Counters are 64-bit in SQL; a larger amount would be sent as numeric and slip past the overflow check.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"amount must be an int, not {type(amount).__name__}")
    if not -(2**63) <= amount < 2**63:
        raise ValueError(f"amount {amount} does not fit in a signed 64-bit integer")


def _negate(amount) -> int:
    _check_amount(amount)
    return -amount



def _key_list(keys) -> list[str]:
    if isinstance(keys, (str, bytes)):
        raise TypeError("pass an iterable of keys, not a single key")
    return list(dict.fromkeys(normalize_key(key) for key in keys))


def _pattern(pattern) -> str:
    if isinstance(pattern, bytes):
        pattern = pattern.decode("utf-8")
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str glob, not {type(pattern).__name__}")
    if "\x00" in pattern:
        raise ValueError("patterns cannot contain NUL characters")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"pattern is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
    return glob_to_regex(pattern)


def _nothing(cursor):
    return None


def _first_row(cursor):
    return cursor.fetchone()


def _all_rows(cursor):
    return cursor.fetchall()


def _scalar(cursor):
    row = cursor.fetchone()
    return None if row is None else row[0]


def _scalars(cursor):
    return [row[0] for row in cursor.fetchall()]


def _returned_any(cursor):
    return cursor.fetchone() is not None


def _rowcount(cursor):
    return cursor.rowcount
