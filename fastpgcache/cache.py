"""`Cache`: the Redis-style facade on SQLAlchemy Core. All of the cache's SQL is here."""
from __future__ import annotations

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
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session

from . import codec
from .errors import translate
from .model import DEFAULT_SCHEMA, DEFAULT_TABLE, cache_table

MAX_KEY_BYTES = 1024
"""Longest key, in UTF-8 bytes; keeps (user_id, key) well inside a btree index entry."""

MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
"""Longest ttl accepted (100 years)."""

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
    size = len(text_key.encode("utf-8", "surrogatepass"))
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
    """Translate a Redis glob (`*`, `?`, `[a-z]`, `[^x]`, `\\x`) into an anchored POSIX regex."""
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("^", "!") else i + 1)
            if end == -1:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : end]
                negate = body[:1] in ("^", "!")
                if negate:
                    body = body[1:]
                members = "".join("\\" + c if c in "\\]^[" else c for c in body)
                out.append(f"[{'^' if negate else ''}{members}]")
                i = end + 1
                continue
        else:
            out.append(re.escape(ch))
        i += 1
    out.append("$")
    return "".join(out)


class _Statements:
    """Every statement of one cache table, built once per (table, user) and reused."""

    def __init__(self, table_name: str, user_id: str | None):
        t = self.table = cache_table(table_name)
        self.user = bindparam("user_id", user_id, type_=Text) if user_id else func.current_user()
        mine = t.c.user_id == self.user
        live = or_(t.c.expires_at.is_(None), t.c.expires_at > func.now())
        expired = and_(t.c.expires_at.is_not(None), t.c.expires_at <= func.now())
        key = t.c.key == bindparam("k", type_=Text)
        keys = t.c.key == any_(bindparam("ks", type_=ARRAY(Text)))
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

        rows = func.unnest(bindparam("ks", type_=ARRAY(Text)), bindparam("vals", type_=ARRAY(LargeBinary)),
                           bindparam("flgs", type_=ARRAY(SmallInteger))).table_valued("key", "value", "flags").render_derived(name="batch")
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
            where=or_(expired, t.c.flags.in_([codec.TEXT, codec.JSON])),
        ).returning(func.convert_from(t.c.value, "UTF8"))
        # incr(create=False), as Django's incr: no row back means missing; NULL back means not a number.
        numeric = t.c.flags.in_([codec.TEXT, codec.JSON])
        added = func.convert_to(cast(cast(func.convert_from(t.c.value, "UTF8"), BigInteger) + amount, Text), "UTF8")
        self.incr_existing = (update(t).where(mine, key, live)
                              .values(value=case((numeric, added), else_=t.c.value))
                              .returning(case((numeric, func.convert_from(t.c.value, "UTF8")))))

        matches = t.c.key.op("~")(bindparam("regex", type_=Text))
        self.keys = select(t.c.key).where(mine, live, matches).order_by(t.c.key)
        self.scan = (select(t.c.key).where(mine, live, matches, t.c.key > bindparam("after", type_=Text))
                     .order_by(t.c.key).limit(bindparam("batch")))
        self.clear = delete(t).where(mine)
        batch = bindparam("batch")
        ctid = literal_column("ctid")
        # Bounded batches found through the expires_at index; ctid avoids a second key lookup.
        self.cleanup_mine = delete(t).where(ctid.in_(select(ctid).select_from(t).where(mine, expired).limit(batch)))
        self.cleanup_all = delete(t).where(ctid.in_(select(ctid).select_from(t).where(expired).limit(batch)))
        self.count = select(func.count().filter(live), func.count().filter(expired)).where(mine)


@functools.lru_cache(maxsize=64)
def _statements(table_name: str, user_id: str | None) -> _Statements:
    return _Statements(table_name, user_id)


def operation(steps):
    """Make a generator of (statement, params, consume) steps into a blocking method.

    Each cache method is written once as such a generator: `Cache` runs its
    steps on a blocking connection, `AsyncCache` awaits them, so the statements,
    validation and decoding exist in one copy. The generator receives each
    step's consumed result (or has the step's exception thrown into it).
    """

    @functools.wraps(steps)
    def run(self, *args, **kwargs):
        return self._drive(steps(self, *args, **kwargs))

    run.steps = steps
    return run


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
    """

    # scoped_session: Flask-SQLAlchemy's db.session, so cache writes join the request's transaction.
    _bind_types: tuple = (Session, scoped_session, Connection, Engine)

    def __init__(self, bind, *, schema: str | None = None, table: str | None = None,
                 user_id: str | None = None, pickle: bool = False):
        if not isinstance(bind, self._bind_types):
            names = " or ".join(kind.__name__ for kind in self._bind_types)
            raise TypeError(f"bind must be a SQLAlchemy {names}, not {type(bind).__name__}")
        if user_id is not None and (not isinstance(user_id, str) or not user_id or "\x00" in user_id):
            raise ValueError("user_id must be a non-empty role name, or None for the connected role")
        self.bind = bind
        self.schema = schema or DEFAULT_SCHEMA
        self.table = table or DEFAULT_TABLE
        self.user_id = user_id
        self.pickle = pickle
        self._s = _statements(self.table, user_id)
        self._options = {"schema_translate_map": {None: self.schema}}
        self._where = f"{self.schema}.{self.table}"
        if isinstance(bind, Engine):
            # A single statement is atomic on its own, and autocommit
            # saves the BEGIN and COMMIT round trips around it.
            self._engine = bind.execution_options(isolation_level="AUTOCOMMIT")

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

    def _params(self, params: dict) -> dict:
        return {"user_id": self.user_id, **params} if self.user_id else params

    def _execute(self, statement, params: dict, consume: Callable[[Any], Any]):
        """Run one statement and consume its result while the connection is still held."""
        params = self._params(params)
        try:
            if isinstance(self.bind, Engine):
                return self._execute_on_engine(statement, params, consume)
            connection = self.bind.connection() if isinstance(self.bind, (Session, scoped_session)) else self.bind
            return consume(connection.execute(statement, params, execution_options=self._options))
        except sa_exc.DBAPIError as error:
            raise translate(error, self._where) from error

    def _execute_on_engine(self, statement, params, consume):
        # One retry when the pooled connection turns out dead (server restarted):
        # SQLAlchemy has invalidated the pool by then, so the retry gets a fresh one.
        for attempt in (1, 2):
            try:
                with self._engine.connect() as connection:
                    return consume(connection.execute(statement, params, execution_options=self._options))
            except sa_exc.DBAPIError as error:
                if attempt == 2 or not error.connection_invalidated:
                    raise

    def _serialize(self, value) -> tuple[int, bytes]:
        return codec.serialize(value, allow_pickle=self.pickle)

    def _decode(self, flags: int, value: bytes, parse_json: bool = True):
        return codec.deserialize(flags, value, parse_json=parse_json, allow_pickle=self.pickle)

    # -- strings ---------------------------------------------------------------------

    @operation
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
            return (yield self._s.set_nx, params, _returned_any)
        if xx:
            return (yield self._s.set_xx, params, _returned_any)
        yield self._s.set, params, _nothing
        return True

    @operation
    def get(self, key, default=None, *, parse_json: bool = True):
        """The value stored under `key`, or `default` when it is missing or expired.

        `parse_json=False` returns a JSON value (dict, list, number) as its text::

            cache.get("user:1", parse_json=False)   # '{"name":"Alice"}'
        """
        row = yield self._s.get, {"k": normalize_key(key)}, _first_row
        if row is None:
            return default
        return self._decode(row.flags, row.value, parse_json)

    @operation
    def delete(self, key) -> bool:
        """Remove `key`; True if a live value was removed."""
        return any((yield self._s.delete, {"k": normalize_key(key)}, _scalars))

    @operation
    def exists(self, key) -> bool:
        """True if `key` holds a value that has not expired."""
        return (yield self._s.exists, {"k": normalize_key(key)}, _returned_any)

    @operation
    def ttl(self, key) -> int:
        """Seconds until `key` expires, rounded up; -1 if it never expires, -2 if missing."""
        seconds = yield self._s.ttl, {"k": normalize_key(key)}, _scalar
        return -2 if seconds is None else int(seconds)

    @operation
    def expire(self, key, ttl) -> bool:
        """Give `key` a new ttl (seconds or timedelta); False if the key is missing."""
        params = {"k": normalize_key(key), "ttl": normalize_ttl(ttl)}
        if params["ttl"] is None:
            raise ValueError("expire() needs a ttl; use persist() to remove one")
        return (yield self._s.expire, params, _returned_any)

    @operation
    def persist(self, key) -> bool:
        """Remove the ttl of `key`; False if the key is missing or had no ttl."""
        return (yield self._s.persist, {"k": normalize_key(key)}, _returned_any)

    @operation
    def incr(self, key, amount: int = 1, *, create: bool = True) -> int | None:
        """Add `amount` to the integer at `key` in one atomic statement; a missing key starts at 0.

        The ttl is kept. Raises ValueError if the stored value is not an integer.
        `create=False` leaves a missing key missing and returns None (Django's incr)::

            cache.incr("hits")        # 1
            cache.incr("hits", 10)    # 11
        """
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"amount must be an int, not {type(amount).__name__}")
        try:
            statement = self._s.incr if create else self._s.incr_existing
            result = yield statement, {"k": normalize_key(key), "amount": amount}, _scalars
        except sa_exc.DBAPIError as error:
            state = getattr(error.orig, "pgcode", None) or getattr(error.orig, "sqlstate", None)
            if state == "22003":
                raise ValueError(f"incrementing {key!r} by {amount} overflows a 64-bit integer") from None
            if state == "22P02":
                raise ValueError(f"the value at {key!r} is not an integer") from None
            raise
        if not result and not create:
            return None
        if not result or result[0] is None:
            raise ValueError(f"the value at {key!r} is not an integer")
        return int(result[0])

    def decr(self, key, amount: int = 1, *, create: bool = True) -> int | None:
        """Subtract `amount` from the integer at `key`; see `incr`."""
        return self.incr(key, _negate(amount), create=create)

    # -- batches -----------------------------------------------------------------------

    @operation
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
        params = {"ks": list(rows), "vals": [data for _, data in rows.values()],
                  "flgs": [flags for flags, _ in rows.values()], "ttl": seconds}
        yield self._s.set_many, params, _nothing
        return len(rows)

    @operation
    def get_many(self, keys: Iterable, *, parse_json: bool = True) -> dict:
        """The live values of `keys` in one round trip; missing keys are absent from the dict::

            cache.get_many(["a", "b", "nope"])   # {'a': 1, 'b': [2, 3]}
        """
        wanted = _key_list(keys)
        if not wanted:
            return {}
        rows = yield self._s.get_many, {"ks": wanted}, _all_rows
        return {row.key: self._decode(row.flags, row.value, parse_json) for row in rows}

    @operation
    def delete_many(self, keys: Iterable) -> int:
        """Remove `keys` in one statement; returns how many live values were removed."""
        wanted = _key_list(keys)
        if not wanted:
            return 0
        return sum((yield self._s.delete_many, {"ks": wanted}, _scalars))

    # -- keyspace ----------------------------------------------------------------------

    @operation
    def keys(self, pattern: str = "*") -> list[str]:
        """Live keys matching a Redis glob pattern, sorted: `keys("user:*")`.

        `*`, `?`, `[abc]`, `[^a]`, `[a-z]` and `\\` escapes work as in Redis; `%`
        and `_` are ordinary characters.
        """
        return (yield self._s.keys, {"regex": _pattern(pattern)}, _scalars)

    @operation
    def _scan_batch(self, regex: str, after: str, batch_size: int) -> list[str]:
        # One page of scan_iter: keyset pagination, so pages stay cheap however deep.
        return (yield self._s.scan, {"regex": regex, "after": after, "batch": batch_size}, _scalars)

    def scan_iter(self, pattern: str = "*", batch_size: int = 1000) -> Iterator[str]:
        """Iterate over matching live keys, fetching `batch_size` at a time, in key order."""
        regex, after = _pattern(pattern), ""
        _positive("batch_size", batch_size)
        while True:
            batch = self._scan_batch(regex, after, batch_size)
            yield from batch
            if len(batch) < batch_size:
                return
            after = batch[-1]

    @operation
    def clear(self) -> int:
        """Remove every entry of this user; returns how many rows were removed."""
        return (yield self._s.clear, {}, _rowcount)

    @operation
    def cleanup(self, batch_size: int = 1000, *, all_users: bool = False) -> int:
        """Delete expired rows in batches of `batch_size`; returns how many were removed.

        Each batch is its own statement, so no single DELETE holds every row.
        `all_users=True` (for the table owner, exempt from row-level security)
        cleans every role's rows.
        """
        _positive("batch_size", batch_size)
        statement = self._s.cleanup_all if all_users else self._s.cleanup_mine
        total = 0
        while True:
            removed = yield statement, {"batch": batch_size}, _rowcount
            total += removed
            if removed < batch_size:
                return total

    @operation
    def stats(self) -> dict:
        """Counts of this user's live entries and of expired rows not yet removed."""
        live, expired = yield self._s.count, {}, _first_row
        return {"entries": live, "expired": expired}

    # -- helpers for callers ----------------------------------------------------------

    def get_or_set(self, key, fn: Callable[[], Any], ttl=None):
        """Return the cached value of `key`, computing and storing `fn()` on a miss::

            profile = cache.get_or_set(f"profile:{uid}", lambda: load_profile(uid), ttl=300)
        """
        normalize_ttl(ttl)
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = fn()
            self.set(key, value, ttl)
        return value

    def cached(self, ttl=None, key: str | Callable[..., str] | None = None):
        """Decorator caching a function's result per arguments::

            @cache.cached(ttl=60)
            def report(day): ...

        `key` is a fixed key, or a function of the call's arguments returning one;
        by default the key is the function's name and a hash of its arguments.
        """
        normalize_ttl(ttl)

        def decorate(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                cache_key = _call_key(fn, key, args, kwargs)
                return self.get_or_set(cache_key, lambda: fn(*args, **kwargs), ttl)

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


def _negate(amount) -> int:
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"amount must be an int, not {type(amount).__name__}")
    return -amount


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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
    return glob_to_regex(pattern)


def _nothing(result):
    return None


def _first_row(result):
    return result.first()


def _all_rows(result):
    return result.all()


def _scalar(result):
    return result.scalar()


def _scalars(result):
    return result.scalars().all()


def _returned_any(result):
    return result.first() is not None


def _rowcount(result):
    return result.rowcount
